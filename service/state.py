"""What the service loads once at start: model, segmenter, batcher, worker pool, admission control."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from service.batcher import DynamicBatcher
from service.inference import Classifier
from service.pipeline import Pipeline
from service.segmentation import make_segmenter
from service.segmentation.base import Segmenter
from service.settings import Settings

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
    """Everything a request handler needs."""

    settings: Settings
    classifier: Classifier
    segmenter: Segmenter
    segmenter_name: str
    batcher: DynamicBatcher
    pipeline: Pipeline
    executor: ThreadPoolExecutor
    admission: Admission
    ready: bool = True
    draining: bool = False

    def close(self) -> None:
        """Stop taking work, finish what is in flight, release the pool and the batcher."""
        self.ready = False
        self.draining = True
        self.executor.shutdown(wait=True)
        self.batcher.close()


def _build_segmenter(settings: Settings) -> tuple[Segmenter, str]:
    try:
        seg = make_segmenter(settings.segmenter, **settings.segmenter_options())
        return seg, settings.segmenter
    except Exception as exc:
        if settings.segmenter_fallback and settings.segmenter != "classical":
            log.error("segmenter %r could not start (%s); falling back to classical", settings.segmenter, exc)
            return make_segmenter("classical"), "classical"
        raise


def load_state(settings: Settings, on_batch=None) -> ServiceState:
    """Load the model folder and segmenter and start the batcher and worker pool.

    Parameters
    ----------
    settings : Settings
        Service settings.
    on_batch : callable, optional
        Called with each model batch size (metrics).

    Returns
    -------
    ServiceState
        The loaded state.

    Raises
    ------
    service.manifest.ModelFolderError
        The model folder is missing, malformed or does not match its files.
    """
    classifier = Classifier(
        settings.model_dir,
        settings.providers,
        intra_op_threads=settings.resolved_threads(),
        max_batch=settings.max_batch,
        require_gpu=settings.require_gpu,
    )
    segmenter, seg_name = _build_segmenter(settings)
    batcher = DynamicBatcher(
        classifier.predict, max_batch=settings.max_batch, max_wait_s=settings.max_wait_ms / 1e3, on_batch=on_batch
    )
    pipeline = Pipeline(classifier, segmenter, predict=batcher)
    concurrency = settings.resolved_concurrency()
    executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="locus-worker")
    log.info(
        "model %s %s loaded from %s on %s; segmenter %s",
        classifier.manifest.name,
        classifier.manifest.version,
        settings.model_dir,
        classifier.provider.primary,
        seg_name,
    )
    return ServiceState(
        settings=settings,
        classifier=classifier,
        segmenter=segmenter,
        segmenter_name=seg_name,
        batcher=batcher,
        pipeline=pipeline,
        executor=executor,
        admission=Admission(running=concurrency, queued=settings.max_queue),
    )
