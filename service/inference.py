"""ONNX Runtime inference: session creation, the provider check, and the classifier.

One :class:`Classifier` per model folder holds one ``InferenceSession``. The
providers come from settings; the provider actually obtained is checked after
creation (``onnxruntime-gpu`` silently falls back to the CPU when CUDA is
missing) and reported, and a GPU host that fell back logs an error.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from locus.service.manifest import Manifest, ModelFolderError, load_manifest
from locus.service.tta import TTA_VIEWS

__all__ = ["GPU_PROVIDERS", "Classifier", "ProviderReport", "create_session"]

log = logging.getLogger("locus.inference")


#: ONNX Runtime execution providers that run the graph on a GPU.
GPU_PROVIDERS: frozenset[str] = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})


@dataclass(frozen=True)
class ProviderReport:
    """Which execution providers were asked for and which were obtained."""

    requested: tuple[str, ...]
    obtained: tuple[str, ...]

    @property
    def primary(self) -> str:
        """The provider that runs the graph (the first obtained)."""
        return self.obtained[0] if self.obtained else "none"

    @property
    def on_gpu(self) -> bool:
        """True when the graph runs on a GPU provider."""
        return self.primary in GPU_PROVIDERS

    @property
    def fell_back(self) -> bool:
        """True when a GPU provider was asked for but the session runs on the CPU."""
        wants_gpu = any(p in GPU_PROVIDERS for p in self.requested)
        return wants_gpu and self.primary == "CPUExecutionProvider"


def create_session(
    path: str | Path,
    providers: list[str],
    *,
    intra_op_threads: int = 0,
    require_gpu: bool = False,
    provider_options: dict[str, dict[str, str]] | None = None,
) -> tuple[ort.InferenceSession, ProviderReport]:
    """Create an ONNX Runtime session and check the provider it actually got.

    Parameters
    ----------
    path : str or Path
        The ONNX file.
    providers : list of str
        Providers in order of preference; unavailable ones are skipped.
    intra_op_threads : int
        Intra-op threads (0: ONNX Runtime's default). Spinning is disabled so
        idle threads do not steal cores from the rest of the service.
    require_gpu : bool
        Raise when a GPU provider was asked for and the session runs on the CPU.
    provider_options : dict, optional
        Options per provider name, e.g. ``{"CUDAExecutionProvider": {"cudnn_conv_algo_search": "HEURISTIC"}}``
        (ONNX Runtime's own names and values); providers not named get their defaults.

    Returns
    -------
    session : onnxruntime.InferenceSession
        The session.
    report : ProviderReport
        Requested and obtained providers.

    Raises
    ------
    ModelFolderError
        The file cannot be loaded, or ``require_gpu`` is set and no GPU provider was obtained.
    """
    available = set(ort.get_available_providers())
    if not _gpu_present():
        # onnxruntime-gpu lists CUDA even on hosts without a GPU and then logs an error when it fails to load it.
        available -= GPU_PROVIDERS
    chosen = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    try:
        options = provider_options or {}
        session = ort.InferenceSession(
            str(path), sess_options=opts, providers=[(p, dict(options.get(p, {}))) for p in chosen]
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelFolderError(f"{path}: ONNX Runtime could not load it ({exc})") from exc
    report = ProviderReport(requested=tuple(providers), obtained=tuple(session.get_providers()))
    if report.fell_back:
        msg = (
            f"GPU REQUESTED BUT NOT OBTAINED: {Path(path).name} runs on {report.primary} "
            f"(asked for {list(providers)}, available {sorted(available)}); check the CUDA/cuDNN libraries"
        )
        if require_gpu:
            raise ModelFolderError(msg)
        if _gpu_present():
            log.error(msg)
        else:
            log.info("no GPU on this host: %s runs on the CPU provider", Path(path).name)
    return session, report


def _gpu_present() -> bool:
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/proc/driver/nvidia", "/dev/dxg"))


class Classifier:
    """A model folder loaded for inference: manifest, session, thresholds.

    Parameters
    ----------
    folder : str or Path
        The model folder; its manifest is validated and the ONNX hashes checked.
    providers : list of str
        ONNX Runtime providers in order of preference.
    intra_op_threads : int
        Intra-op threads.
    max_batch : int
        Largest batch sent to the session at once.
    require_gpu : bool
        See :func:`create_session`.
    fixed_batch : bool, optional
        Pad every model call to ``max_batch`` rows, so the session only ever sees one input shape, and run that
        shape once at load. ``None`` (default): on a GPU provider only. On CUDA, ONNX Runtime plans every
        convolution again (cuDNN's algorithm search) whenever a call's batch differs from the previous call's;
        measured on an H200 that is 0.45-0.66 s per change with the ``HEURISTIC`` search and 1.2-2.7 s with
        ``EXHAUSTIVE``, against 2-10 ms for the model itself, and fields of different cell counts change it on
        almost every request. On a CPU padding only adds work.
    conv_algo_search : {"HEURISTIC", "EXHAUSTIVE", "DEFAULT"}
        cuDNN's convolution algorithm search on CUDA (ONNX Runtime's ``cudnn_conv_algo_search``), for the model
        and the gradient model. Measured on an H200 with the default model: ``HEURISTIC`` plans a batch shape in
        0.45-0.66 s and ``EXHAUSTIVE`` (ONNX Runtime's default) in 1.2-2.7 s, and both then run at the same speed
        (2.3-11 ms for 10-240 crops); ``DEFAULT`` plans fastest but then runs at 160-250 ms.
    """

    def __init__(
        self,
        folder: str | Path,
        providers: list[str] | None = None,
        *,
        intra_op_threads: int = 0,
        max_batch: int = 64,
        require_gpu: bool = False,
        fixed_batch: bool | None = None,
        conv_algo_search: str = "HEURISTIC",
    ) -> None:
        self.folder = Path(folder)
        self.manifest: Manifest = load_manifest(self.folder)
        self.providers_requested = providers or ["CPUExecutionProvider"]
        self.provider_options = {"CUDAExecutionProvider": {"cudnn_conv_algo_search": conv_algo_search}}
        self.session, self.provider = create_session(
            self.folder / "model.onnx",
            self.providers_requested,
            intra_op_threads=intra_op_threads,
            require_gpu=require_gpu,
            provider_options=self.provider_options,
        )
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != self.manifest.input_name:
            raise ModelFolderError(
                f"{self.folder / 'model.onnx'}: expected one input named {self.manifest.input_name!r}, "
                f"got {[i.name for i in inputs]}"
            )
        shape = inputs[0].shape
        s = self.manifest.input_size
        if len(shape) != 4 or list(shape[1:]) != [s, s, 4]:
            raise ModelFolderError(
                f"{self.folder / 'model.onnx'}: input shape {shape} does not match the manifest ([N, {s}, {s}, 4])"
            )
        outputs = [o.name for o in self.session.get_outputs()]
        if self.manifest.output_name not in outputs:
            raise ModelFolderError(
                f"{self.folder / 'model.onnx'}: no output named {self.manifest.output_name!r} (has {outputs})"
            )
        self.max_batch = max_batch
        self.thresholds = np.asarray(self.manifest.thresholds, dtype=np.float32)
        self._view_thresholds = {n: np.asarray(self.manifest.thresholds_for(n), dtype=np.float32) for n in TTA_VIEWS}
        self.crop_rule = self.manifest.crop.rule()
        self._grad_session: ort.InferenceSession | None = None
        self._grad_lock = threading.Lock()
        self.fixed_batch = self.provider.on_gpu if fixed_batch is None else bool(fixed_batch)
        if self.fixed_batch:  # the one input shape's planning happens now, not in the first request
            self.run_batch(np.zeros((1, s, s, 4), dtype=np.float32))

    def thresholds_for(self, views: int) -> np.ndarray:
        """Per-class decision thresholds for scores averaged over ``views`` test-time views.

        Parameters
        ----------
        views : int
            1, 2, 4 or 8.

        Returns
        -------
        numpy.ndarray
            (19,) ``float32``: the manifest's set for that view count, else its one-view ``thresholds``.
        """
        return self._view_thresholds.get(int(views), self.thresholds)

    @property
    def input_size(self) -> int:
        """Side of the square model input."""
        return self.manifest.input_size

    def run_batch(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch through the session (no splitting; padded to ``max_batch`` rows with ``fixed_batch``).

        Parameters
        ----------
        batch : numpy.ndarray
            (N, S, S, 4) float32 0-255.

        Returns
        -------
        numpy.ndarray
            (N, 19) float32 probabilities.
        """
        n = batch.shape[0]
        if self.fixed_batch and n < self.max_batch:
            padded = np.zeros((self.max_batch, *batch.shape[1:]), dtype=np.float32)
            padded[:n] = batch
            batch = padded
        (probs,) = self.session.run([self.manifest.output_name], {self.manifest.input_name: batch})
        return np.asarray(probs[:n], dtype=np.float32)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Classify cells in batches of at most ``max_batch``.

        Parameters
        ----------
        batch : numpy.ndarray
            (N, S, S, 4) float32 0-255; N may be 0.

        Returns
        -------
        numpy.ndarray
            (N, 19) float32 probabilities.
        """
        n = batch.shape[0]
        if n == 0:
            return np.zeros((0, len(self.thresholds)), dtype=np.float32)
        parts = [self.run_batch(batch[i : i + self.max_batch]) for i in range(0, n, self.max_batch)]
        return np.concatenate(parts, axis=0)

    @property
    def supports_attributions(self) -> bool:
        """Whether the folder ships a gradient model."""
        return self.manifest.grad is not None

    def grad_session(self) -> ort.InferenceSession:
        """The gradient model's session, created on first use.

        Raises
        ------
        ModelFolderError
            The folder has no gradient model.
        """
        if self.manifest.grad is None:
            raise ModelFolderError(f"{self.folder}: this model folder has no gradient model (grad.onnx)")
        with self._grad_lock:
            if self._grad_session is None:
                self._grad_session, _ = create_session(
                    self.folder / self.manifest.grad.file,
                    list(self.providers_requested),
                    intra_op_threads=self.session.get_session_options().intra_op_num_threads,
                    provider_options=self.provider_options,
                )
            return self._grad_session
