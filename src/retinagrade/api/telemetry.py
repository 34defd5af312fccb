"""Prometheus metrics, one registry per app (so several apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from retinagrade.constants import GRADE_NAMES
from retinagrade.inference.model_spec import ModelSpec
from retinagrade.monitoring.drift import DriftMonitor

#: HTTP methods that get a metric label of their own; any other method string (a client may send anything, before
#: authentication) is counted as ``other``, so no client can add series at will.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT"})
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


class ServiceMetrics:
    """The series the service exports on ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "retinagrade_http_requests", "HTTP requests answered.", ["route", "method", "status"], registry=r
        )
        self.request_latency = Histogram(
            "retinagrade_http_request_duration_seconds",
            "HTTP request latency, receipt to last byte.",
            ["route", "method", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("retinagrade_http_requests_in_flight", "HTTP requests being handled.", registry=r)
        self.inference_latency = Histogram(
            "retinagrade_inference_duration_seconds",
            "Duration of one model call (a whole batch).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "retinagrade_inference_batch_size", "Images per model call.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("retinagrade_admitted_images", "Images admitted and not yet answered.", registry=r)
        self.rejected = Counter(
            "retinagrade_overload_rejections",
            "Requests refused with 503 (queue or body-byte budget full).",
            registry=r,
        )
        self.buffered_bytes = Gauge(
            "retinagrade_buffered_body_bytes", "Request-body bytes charged to the byte budget.", registry=r
        )
        self.decoding_bytes = Gauge(
            "retinagrade_decoding_bytes", "Memory charged to the decodes in progress.", registry=r
        )
        self.audit_failures = Counter("retinagrade_audit_failures", "Audit writes or checks that failed.", registry=r)
        self.results = Counter("retinagrade_results", "Images answered, by result status.", ["status"], registry=r)
        self.grades = Counter(
            "retinagrade_grades", "Graded images, by ICDR grade.", ["grade", "grade_name"], registry=r
        )
        self.input_errors = Counter(
            "retinagrade_input_errors", "Images refused as bad input, by code.", ["code"], registry=r
        )
        self.ungradable_rate = Gauge(
            "retinagrade_ungradable_rate",
            "Share of answered images found ungradable since start-up.",
            registry=r,
        )
        self.model_info = Gauge(
            "retinagrade_model_info",
            "The model being served (value 1).",
            ["name", "version", "sha256"],
            registry=r,
        )
        self.drift_psi = Gauge(
            "retinagrade_drift_psi",
            "Population stability index of a monitored signal over the last images against the site's reference "
            "(NaN until the window holds enough images).",
            ["site", "signal"],
            registry=r,
        )
        self.drift_window = Gauge(
            "retinagrade_drift_window_images", "Images in a site's drift window.", ["site"], registry=r
        )
        self._answered = 0
        self._ungradable = 0
        for status in ("graded", "ungradable", "not_fundus"):
            self.results.labels(status)
        for grade, name in enumerate(GRADE_NAMES):
            self.grades.labels(str(grade), name)

    def observe_request(self, route: str, method: str, status: int, latency_s: float) -> None:
        """Count and time one answered request (``route`` is its template, never its URL)."""
        labels = (route, method if method in HTTP_METHODS else "other", str(status))
        self.requests.labels(*labels).inc()
        self.request_latency.labels(*labels).observe(latency_s)

    def set_model(self, spec: ModelSpec) -> None:
        self.model_info.labels(spec.name, spec.version, spec.sha256).set(1)

    def observe_drift(self, site: str, monitor: DriftMonitor) -> None:
        """Publish the monitor's PSI per signal (called after each answer; the window is small)."""
        for signal, value in monitor.psi().items():
            self.drift_psi.labels(site, signal).set(value)
        self.drift_window.labels(site).set(len(monitor))

    def observe_result(self, status: str, grade: int | None) -> None:
        self.results.labels(status).inc()
        if grade is not None:
            self.grades.labels(str(grade), GRADE_NAMES[grade]).inc()
        self._answered += 1
        self._ungradable += status == "ungradable"
        self.ungradable_rate.set(self._ungradable / self._answered)
