"""What the service loads once at start, and a request's work: pipeline, worker pool, admission, time limit."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from locus.service.attribution import Cancelled
from locus.service.errors import ApiError
from locus.service.factory import build_pipeline
from locus.service.formats import FORMATS, FileAnswer, answer_field
from locus.service.imaging import decode_field
from locus.service.inference import Classifier
from locus.service.pipeline import ClassifyOptions, Pipeline
from locus.service.response import classify_response, kaggle_row
from locus.service.schemas import ClassifyResponse, KaggleResponse
from locus.service.settings import Settings

__all__ = ["Admission", "ServiceState", "load_state"]

log = logging.getLogger("locus.state")


@dataclass
class Admission:
    """Bound on requests in flight plus queued; beyond it the service answers 503 at once.

    Parameters
    ----------
    running : int
        Requests classified at once (the worker pool's size).
    queued : int
        Requests allowed to wait for a worker.
    """

    running: int
    queued: int
    _count: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def capacity(self) -> int:
        """Most requests admitted at once."""
        return self.running + self.queued

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet finished."""
        return self._count

    def try_enter(self) -> bool:
        """Admit one request if there is room."""
        with self._lock:
            if self._count >= self.capacity:
                return False
            self._count += 1
            return True

    def leave(self) -> None:
        """A request finished."""
        with self._lock:
            self._count = max(0, self._count - 1)


@dataclass
class ServiceState:
    """Everything a request handler needs: the pipeline, the worker pool and admission control.

    :meth:`classify` is the whole of a request's work after its form is read: admission,
    decoding and the pipeline in the worker pool, the time limit, and the answer.
    """

    settings: Settings
    pipeline: Pipeline
    executor: ThreadPoolExecutor
    admission: Admission
    metrics: Any = None
    ready: bool = True
    draining: bool = False

    @property
    def classifier(self) -> Classifier:
        """The loaded model folder."""
        return self.pipeline.classifier

    @property
    def segmenter_name(self) -> str:
        """The segmentation backend that runs."""
        return self.pipeline.segmenter_name

    def close(self) -> None:
        """Stop taking work, finish what is in flight, release the pool and the batcher."""
        self.ready = False
        self.draining = True
        self.executor.shutdown(wait=True)
        self.pipeline.close()

    def admit(self) -> None:
        """Take one admission slot, or raise 503 at once when the service is at capacity.

        Raises
        ------
        ApiError
            503 ``overloaded`` with ``Retry-After``.
        """
        if not self.admission.try_enter():
            if self.metrics is not None:
                self.metrics.rejected("overloaded")
            raise ApiError(
                503,
                "overloaded",
                f"the service is at capacity ({self.admission.capacity} requests in flight or queued); "
                "retry after the Retry-After seconds",
                headers={"Retry-After": "1"},
            )

    async def classify(
        self,
        files: dict[str, BinaryIO | bytes],
        options: ClassifyOptions,
        *,
        request_id: str,
        output: str,
        image_id: str,
    ) -> ClassifyResponse | KaggleResponse | FileAnswer:
        """Decode and classify one field in the worker pool, within the time limit.

        The caller holds an admission slot (:meth:`admit`); it is released when the work
        really ends, also after a timeout.

        Parameters
        ----------
        files : dict
            Channel name -> the uploaded file (read in the worker, so queued requests hold none in memory) or bytes.
        options : ClassifyOptions
            What to compute.
        request_id, output, image_id : str
            Provenance, ``json``, ``kaggle`` or a file format of :mod:`locus.service.formats`,
            and the field's ID (Kaggle row, table rows, file name).

        Returns
        -------
        ClassifyResponse or KaggleResponse or FileAnswer
            The answer.

        Raises
        ------
        ApiError
            504 when the time limit passes; 4xx for bad images.
        """
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        fut = loop.run_in_executor(
            self.executor, self._classify_sync, files, options, request_id, output, image_id, stop.is_set
        )
        fut.add_done_callback(self._finished)
        limit = self.settings.request_timeout_s
        try:
            body = await asyncio.wait_for(asyncio.shield(fut), timeout=limit)
        except TimeoutError as exc:
            stop.set()  # the work stops at its next check (between stages and IG batches) and frees the worker
            if self.metrics is not None:
                self.metrics.rejected("timeout")
            raise ApiError(
                504,
                "timeout",
                f"classification ran past the limit of {limit:g} s (LOCUS_REQUEST_TIMEOUT_S); "
                "send a smaller field or fewer attribution steps",
            ) from exc
        if self.metrics is not None and isinstance(body, ClassifyResponse):
            self.metrics.observe_field(body)
        return body

    def _finished(self, fut: asyncio.Future) -> None:
        """Free the admission slot when the work really ends (also after a timeout)."""
        self.admission.leave()
        if not fut.cancelled() and isinstance(fut.exception(), Cancelled):
            log.info("work of a timed-out request stopped")

    def _classify_sync(
        self,
        files: dict[str, BinaryIO | bytes],
        options: ClassifyOptions,
        request_id: str,
        output: str,
        image_id: str,
        stop: Callable[[], bool] = lambda: False,
    ) -> ClassifyResponse | KaggleResponse | FileAnswer:
        t0 = time.perf_counter()
        blobs = {c: f if isinstance(f, bytes) else _read_all(f) for c, f in files.items()}
        image = decode_field(blobs, max_pixels=self.settings.max_image_pixels)
        del blobs
        if stop():
            raise Cancelled("stopped after decoding: the request ran past its time limit")
        decode_ms = (time.perf_counter() - t0) * 1e3
        result = self.pipeline.run(image, options, stop=stop)
        result.timings_ms = {"decode": decode_ms, **result.timings_ms}
        if output == "kaggle":
            return kaggle_row(result, image_id)
        if output in FORMATS:
            return answer_field(output, result, options, self.pipeline, request_id=request_id, image_id=image_id)
        body = classify_response(result, options, self.pipeline, request_id=request_id)
        body.timings_ms["total"] = round((time.perf_counter() - t0) * 1e3, 2)
        return body


def _read_all(f: BinaryIO) -> bytes:
    f.seek(0)
    return f.read()


def load_state(settings: Settings, metrics: Any = None) -> ServiceState:
    """Build the pipeline (with the dynamic batcher) and start the worker pool.

    Parameters
    ----------
    settings : Settings
        Service settings.
    metrics : Metrics, optional
        Prometheus metrics (batch sizes, rejections, fields).

    Returns
    -------
    ServiceState
        The loaded state.

    Raises
    ------
    locus.service.manifest.ModelFolderError
        The model folder is missing, malformed or does not match its files.
    """
    on_batch = metrics.batch_size if metrics is not None else None
    pipeline = build_pipeline(settings, batched=True, on_batch=on_batch)
    concurrency = settings.resolved_concurrency()
    executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="locus-worker")
    log.info(
        "model %s %s loaded from %s on %s; segmenter %s",
        pipeline.classifier.manifest.name,
        pipeline.classifier.manifest.version,
        settings.model_dir,
        pipeline.classifier.provider.primary,
        pipeline.segmenter_name,
    )
    return ServiceState(
        settings=settings,
        pipeline=pipeline,
        executor=executor,
        admission=Admission(running=concurrency, queued=settings.max_queue),
        metrics=metrics,
    )
