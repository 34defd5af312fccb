"""Admission control and dynamic batching of model calls.

Concurrent requests are coalesced into one ONNX Runtime call, as Triton and BentoML do: an asyncio queue and
one worker that takes the first waiting image, gathers up to ``max_batch_size`` images, waiting at most
``max_batch_wait`` for more *only while other admitted images are still being prepared* (so a lone request
never waits), and runs the model once on a dedicated thread. With ``max_batch_size=1`` it degenerates to
one call per image on that same thread, which is how batching is switched off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from retinagrade.api.errors import OverloadedError
from retinagrade.api.telemetry import ServiceMetrics
from retinagrade.inference.grader import ModelOutputs
from retinagrade.pipeline import PreparedRequest

logger = logging.getLogger("retinagrade.api.batching")

InferFn = Callable[[list[PreparedRequest]], list[ModelOutputs | None]]


class Admission:
    """Bounds the images in the service at once; beyond the bound a request is refused with 503.

    Only images that were read and are ready to grade are admitted: a body still arriving holds no place.

    Used only from the event loop thread, so plain integers suffice.
    """

    def __init__(self, limit: int, retry_after_s: int, metrics: ServiceMetrics) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self.admitted = 0

    @property
    def full(self) -> bool:
        """No room for even one more image: a new request is refused before its body is read."""
        return self.admitted >= self.limit

    @contextmanager
    def admit(self, images: int) -> Iterator[None]:
        if self.admitted + images > self.limit:
            self.metrics.rejected.inc()
            raise OverloadedError(
                "The service is at capacity; retry shortly.",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.admitted += images
        self.metrics.queue_depth.set(self.admitted)
        try:
            yield
        finally:
            self.admitted -= images
            self.metrics.queue_depth.set(self.admitted)


@dataclass
class _Waiting:
    request: PreparedRequest
    future: asyncio.Future[ModelOutputs | None]
    enqueued: float


class DynamicBatcher:
    """Runs ``infer`` on batches of waiting images, one batch at a time, on its own thread."""

    def __init__(self, infer: InferFn, *, max_batch_size: int, max_wait_s: float, metrics: ServiceMetrics) -> None:
        self._infer = infer
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        #: Images being decoded/preprocessed that may soon join the queue (maintained by the service).
        self.preparing = 0
        self._queue: asyncio.Queue[_Waiting] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retinagrade-model")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="retinagrade-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            waiting = self._queue.get_nowait()
            if not waiting.future.done():
                waiting.future.cancel()
        self._executor.shutdown(wait=True)

    async def infer(self, requests: list[PreparedRequest]) -> list[ModelOutputs | None]:
        """Model outputs for each request (``None`` for those the gate excused from the model)."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[ModelOutputs | None] | None] = []
        now = time.perf_counter()
        for request in requests:
            if request.needs_model:
                future: asyncio.Future[ModelOutputs | None] = loop.create_future()
                self._queue.put_nowait(_Waiting(request, future, now))
                futures.append(future)
            else:
                futures.append(None)
        return [None if f is None else await f for f in futures]

    async def _gather(self) -> list[_Waiting]:
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if self.preparing == 0 or remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return [w for w in batch if not w.future.done()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            started = time.perf_counter()
            for waiting in batch:
                waiting.request.timings_ms["queue"] = round((started - waiting.enqueued) * 1000.0, 2)
            try:
                outputs = await loop.run_in_executor(self._executor, self._infer, [w.request for w in batch])
            except Exception as exc:  # a model failure fails this batch's requests, never the worker
                logger.error("model call failed for a batch of %d", len(batch), exc_info=exc)
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(exc)
                continue
            self.metrics.inference_latency.observe(time.perf_counter() - started)
            self.metrics.batch_size.observe(len(batch))
            for waiting, output in zip(batch, outputs, strict=True):
                if not waiting.future.done():
                    waiting.future.set_result(output)
