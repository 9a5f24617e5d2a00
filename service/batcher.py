"""A small dynamic batcher: cells of concurrent requests share model batches.

Requests (running in worker threads) submit their cells and block on a
future. One worker thread takes cells from the queue until it has
``max_batch`` of them or ``max_wait`` has passed since the first one arrived,
runs the model once, and hands every request its own rows back. With one
request in flight it degenerates to plain batching with no added wait beyond
``max_wait``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DynamicBatcher", "BatcherStats"]


@dataclass
class BatcherStats:
    """Counters a test or /metrics can read."""

    batches: int = 0
    items: int = 0
    shared_batches: int = 0
    """Batches that carried cells of more than one request."""
    sizes: list[int] = field(default_factory=list)


@dataclass
class _Job:
    inputs: np.ndarray
    future: Future
    done_rows: list[np.ndarray] = field(default_factory=list)
    offset: int = 0
    taken: int = 0


class DynamicBatcher:
    """Group cells from concurrent callers into batches for one model function.

    Parameters
    ----------
    run : callable
        ``run(batch) -> outputs``: (B, ...) float32 -> (B, K) float32, one model call.
    max_batch : int
        Largest batch.
    max_wait_s : float
        How long a batch waits for more cells after its first one arrived.
    on_batch : callable, optional
        Called with the size of every batch run (metrics).
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        max_batch: int = 64,
        max_wait_s: float = 0.002,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._queue: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.stats = BatcherStats()
        self._thread = threading.Thread(target=self._loop, name="locus-batcher", daemon=True)
        self._thread.start()

    def submit(self, inputs: np.ndarray) -> Future:
        """Queue cells; the future resolves to their outputs in the same order.

        Parameters
        ----------
        inputs : numpy.ndarray
            (N, ...) model inputs; N may be 0.

        Returns
        -------
        concurrent.futures.Future
            Resolves to an (N, K) array, or raises the model's exception.
        """
        fut: Future = Future()
        if inputs.shape[0] == 0:
            fut.set_result(None)
            return fut
        with self._cv:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(_Job(inputs=inputs, future=fut))
            self._cv.notify()
        return fut

    def __call__(self, inputs: np.ndarray, timeout: float | None = None) -> np.ndarray | None:
        """Submit and wait: the drop-in replacement for a direct model call."""
        return self.submit(inputs).result(timeout=timeout)

    def close(self) -> None:
        """Stop the worker after the queued cells are done."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    def _take(self) -> list[tuple[_Job, int, int]]:
        """Pick up to max_batch rows from queued jobs (called with the lock held)."""
        picked: list[tuple[_Job, int, int]] = []
        room = self.max_batch
        while self._queue and room > 0:
            job = self._queue[0]
            start = job.offset + job.taken
            n = min(room, job.inputs.shape[0] - start)
            picked.append((job, start, n))
            job.taken += n
            room -= n
            if job.offset + job.taken >= job.inputs.shape[0]:
                self._queue.popleft()
        return picked

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue and self._closed:
                    return
                deadline = time.monotonic() + self.max_wait_s
                while self._pending_rows() < self.max_batch and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(timeout=left)
                picked = self._take()
            if not picked:
                continue
            batch = np.concatenate([job.inputs[s : s + n] for job, s, n in picked], axis=0)
            try:
                out = self._run(batch)
            except Exception as exc:
                if len({id(job) for job, _, _ in picked}) == 1:
                    job = picked[0][0]
                    if not job.future.done():
                        job.future.set_exception(exc)
                    continue
                # A shared batch failed: run each caller's rows alone, so one bad input fails only its own request.
                self._run_separately(picked)
                continue
            self.stats.batches += 1
            self.stats.items += batch.shape[0]
            self.stats.sizes.append(batch.shape[0])
            if len({id(job) for job, _, _ in picked}) > 1:
                self.stats.shared_batches += 1
            if self._on_batch is not None:
                self._on_batch(batch.shape[0])
            row = 0
            for job, _s, n in picked:
                job.done_rows.append(out[row : row + n])
                row += n
                if sum(r.shape[0] for r in job.done_rows) == job.inputs.shape[0] and not job.future.done():
                    job.future.set_result(np.concatenate(job.done_rows, axis=0))

    def _run_separately(self, picked: list[tuple[_Job, int, int]]) -> None:
        for job, s, n in picked:
            if job.future.done():
                continue
            try:
                out = self._run(job.inputs[s : s + n])
            except Exception as exc:
                job.future.set_exception(exc)
                continue
            self.stats.batches += 1
            self.stats.items += n
            self.stats.sizes.append(n)
            job.done_rows.append(out)
            if sum(r.shape[0] for r in job.done_rows) == job.inputs.shape[0]:
                job.future.set_result(np.concatenate(job.done_rows, axis=0))

    def _pending_rows(self) -> int:
        return sum(job.inputs.shape[0] - job.offset - job.taken for job in self._queue)
