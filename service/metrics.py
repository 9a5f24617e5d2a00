"""Prometheus metrics of the domain: fields and cells classified, stage latencies, batches, queue, rejections."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

_STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The service's domain metrics, in their own registry (one per app, so tests can build many apps).

    Parameters
    ----------
    registry : CollectorRegistry, optional
        Where to register; a new one by default.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.fields = Counter("locus_fields_classified_total", "Fields of view classified", registry=r)
        self.cells = Counter("locus_cells_classified_total", "Cells classified", registry=r)
        self.stage = Histogram(
            "locus_stage_seconds", "Time per pipeline stage", ["stage"], buckets=_STAGE_BUCKETS, registry=r
        )
        self.batch = Histogram(
            "locus_batch_size", "Cells per model batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r
        )
        self.rejections = Counter("locus_rejections_total", "Requests refused, by reason", ["reason"], registry=r)
        self.in_flight = Gauge("locus_requests_in_flight", "Classify requests admitted and not finished", registry=r)
        self.queued = Gauge("locus_requests_queued", "Classify requests admitted and waiting for a worker", registry=r)
        self.capacity = Gauge(
            "locus_admission_capacity", "Most classify requests admitted at once (running + queued)", registry=r
        )
        self.errors = Counter(
            "locus_errors_total", "Error answers (4xx/5xx) by status and error code", ["status", "code"], registry=r
        )
        self.labels = Counter("locus_labels_called_total", "Labels called per class", ["class_name"], registry=r)

    def observe_field(self, body: Any) -> None:
        """Count one answered field from its :class:`~locus.service.schemas.ClassifyResponse`."""
        self.fields.inc()
        self.cells.inc(len(body.cells))
        for cell in body.cells:
            for lab in cell.labels:
                self.labels.labels(class_name=lab.name).inc()
        for stage, ms in body.timings_ms.items():
            if stage != "total":
                self.stage.labels(stage=stage).observe(ms / 1e3)

    def rejected(self, reason: str) -> None:
        """Count one refused request."""
        self.rejections.labels(reason=reason).inc()

    def error(self, status: int, code: str) -> None:
        """Count one error answer."""
        self.errors.labels(status=str(status), code=code).inc()

    def admission(self, in_flight: int, running: int, capacity: int) -> None:
        """Set the admission gauges from the admission control's counters.

        Parameters
        ----------
        in_flight : int
            Requests admitted and not finished.
        running : int
            Requests classified at once (the rest of those in flight wait).
        capacity : int
            Most requests admitted at once.
        """
        self.in_flight.set(in_flight)
        self.queued.set(max(0, in_flight - running))
        self.capacity.set(capacity)

    def batch_size(self, n: int) -> None:
        """Record one model batch."""
        self.batch.observe(n)
