"""Reading request bodies under a deadline, a minimum rate and a memory budget shared by all requests.

A body is read before its images are admitted to the grading queue, so a client that trickles its upload
(or stalls) holds a connection and its bytes, never a place in the queue. Each body must arrive within
``body_timeout_s`` and, after a head start of ``body_grace_s``, at ``body_min_bytes_per_s`` on average; a
slower one gets 408 and its connection is closed. The bytes of all bodies held at once are bounded by a
budget: a request whose declared ``Content-Length`` does not fit is refused with 503 before any of it is
read (a chunked body is charged as it arrives). A request is also refused before its body is read when the
queue has no room for even one image. A client that goes away mid-body is counted as 499, not as an error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import Message, Receive

from retinagrade.api.batching import Admission
from retinagrade.api.errors import BodyTimeoutError, ClientClosedError, OverloadedError, RequestTooLargeError
from retinagrade.api.telemetry import ServiceMetrics


class ByteBudget:
    """Bytes of request bodies held in memory at once, across requests. Event-loop thread only."""

    def __init__(self, limit: int, metrics: ServiceMetrics) -> None:
        self.limit = limit
        self.metrics = metrics
        self.held = 0

    def try_reserve(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        self.metrics.buffered_bytes.set(self.held)
        return True

    def release(self, size: int) -> None:
        self.held -= size
        self.metrics.buffered_bytes.set(self.held)


@dataclass(frozen=True)
class BodyPace:
    """How fast a body must arrive."""

    timeout_s: float
    min_bytes_per_s: int
    grace_s: float


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    try:
        return max(0, int(value))
    except ValueError:
        return None


class _GuardedBody:
    """The ``receive`` of one request, with its size limit, deadline and share of the byte budget."""

    def __init__(
        self,
        receive: Receive,
        *,
        declared: int | None,
        limit: int,
        pace: BodyPace,
        budget: ByteBudget,
        admission: Admission,
        retry_after_s: int,
    ) -> None:
        self._receive = receive
        self.declared = declared
        self.limit = limit
        self.pace = pace
        self.budget = budget
        self.admission = admission
        self.retry_after_s = retry_after_s
        self.started = time.perf_counter()
        self.received = 0
        self.reserved = 0
        self.opened = False
        self.complete = False

    def _overloaded(self) -> OverloadedError:
        self.admission.metrics.rejected.inc()
        # Connection: close, so uvicorn drops the unread rest of the body instead of reading it to discard it.
        return OverloadedError(
            "The service is at capacity; retry shortly.",
            headers={"Retry-After": str(self.retry_after_s), "Connection": "close"},
        )

    def _too_large(self) -> RequestTooLargeError:
        return RequestTooLargeError(
            f"The request body is larger than the limit of {self.limit:,} bytes.", headers={"Connection": "close"}
        )

    def _open(self) -> None:
        """Checks made before the first byte is read: size, room in the queue, room in the byte budget."""
        self.opened = True
        if self.declared is not None and self.declared > self.limit:
            raise self._too_large()
        if self.admission.full:
            raise self._overloaded()
        if self.declared is not None:
            if not self.budget.try_reserve(self.declared):
                raise self._overloaded()
            self.reserved = self.declared

    def _time_left(self) -> float:
        elapsed = time.perf_counter() - self.started
        by_rate = self.pace.grace_s + self.received / self.pace.min_bytes_per_s
        return min(self.pace.timeout_s, by_rate) - elapsed

    async def receive(self) -> Message:
        if self.complete:
            return await self._receive()  # after the body: disconnect notices, unguarded
        if not self.opened:
            self._open()
        left = self._time_left()
        try:
            if left <= 0:
                raise TimeoutError
            message = await asyncio.wait_for(self._receive(), left)
        except TimeoutError:
            raise BodyTimeoutError(
                f"The request body did not arrive in time (at least {self.pace.min_bytes_per_s:,} bytes/s "
                f"after {self.pace.grace_s:g} s, all of it within {self.pace.timeout_s:g} s).",
                headers={"Connection": "close"},
            ) from None
        if message["type"] == "http.disconnect":
            raise ClientClosedError("The client closed the connection before the request was read.")
        chunk = len(message.get("body", b""))
        self.received += chunk
        if self.received > self.limit:
            raise self._too_large()
        if self.received > self.reserved:  # a chunked body (or one longer than declared) is charged as it comes
            extra = self.received - self.reserved
            if not self.budget.try_reserve(extra):
                raise self._overloaded()
            self.reserved += extra
        self.complete = not message.get("more_body", False)
        return message

    def release(self) -> None:
        self.budget.release(self.reserved)
        self.reserved = 0


class BodyIntake:
    """Hands routes a view of their request whose body is read under the rules above."""

    def __init__(self, budget: ByteBudget, admission: Admission, pace: BodyPace, retry_after_s: int) -> None:
        self.budget = budget
        self.admission = admission
        self.pace = pace
        self.retry_after_s = retry_after_s

    @contextmanager
    def guard(self, request: Request, limit: int) -> Iterator[Request]:
        """The request, reading its body through the guard; its bytes stay charged until the block ends.

        The checks run at the first read, so whatever a route validates before reading (media type, fields
        in the URL) is answered first, even when the service is full.

        Raises (on reading the body):
            RequestTooLargeError: the body is longer than ``limit``.
            OverloadedError: no room in the queue or in the byte budget.
            BodyTimeoutError: the body came too slowly or not at all.
            ClientClosedError: the client went away mid-body.
        """
        guarded = _GuardedBody(
            request.receive,
            declared=_declared_length(request),
            limit=limit,
            pace=self.pace,
            budget=self.budget,
            admission=self.admission,
            retry_after_s=self.retry_after_s,
        )
        try:
            yield Request(request.scope, guarded.receive)
        finally:
            guarded.release()
