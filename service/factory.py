"""The one place where a pipeline is put together: classifier + segmenter (+ batcher) from settings.

The HTTP service (:mod:`locus.service.state`), ``locus predict``, ``locus overlay``,
training's crop extraction and the default model's evaluation all build their
components here, so a setting (say, the HPA network files) reaches every caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from locus.service.config import PipelineSettings
from locus.service.inference import Classifier
from locus.service.pipeline import Pipeline
from locus.service.segmentation import make_segmenter
from locus.service.segmentation.base import Segmenter

__all__ = ["build_classifier", "build_segmenter", "build_pipeline"]

log = logging.getLogger("locus.factory")


def build_classifier(settings: PipelineSettings, model_dir: str | Path | None = None) -> Classifier:
    """Load a model folder with the settings' ONNX Runtime options.

    Parameters
    ----------
    settings : PipelineSettings
        Providers, threads, batch size, GPU requirement.
    model_dir : str or Path, optional
        Model folder; default ``settings.model_dir``.

    Returns
    -------
    Classifier
        The loaded, checked model folder.
    """
    return Classifier(
        model_dir or settings.model_dir,
        settings.providers,
        intra_op_threads=settings.resolved_threads(),
        max_batch=settings.max_batch,
        require_gpu=settings.require_gpu,
        fixed_batch=settings.fixed_batch,
        conv_algo_search=settings.cudnn_conv_algo_search,
    )


def build_segmenter(settings: PipelineSettings, name: str | None = None) -> tuple[Segmenter, str]:
    """Start a segmentation backend with the settings' options (falling back to classical if allowed).

    Parameters
    ----------
    settings : PipelineSettings
        Backend options (HPA network files, providers) and ``segmenter_fallback``.
    name : str, optional
        Backend; default ``settings.segmenter``.

    Returns
    -------
    segmenter : Segmenter
        The backend.
    name : str
        The backend actually started.
    """
    name = name or settings.segmenter
    try:
        return make_segmenter(name, **settings.segmenter_options(name)), name
    except Exception as exc:
        if settings.segmenter_fallback and name != "classical":
            log.error("segmenter %r could not start (%s); falling back to classical", name, exc)
            return make_segmenter("classical", **settings.segmenter_options("classical")), "classical"
        raise


def build_pipeline(
    settings: PipelineSettings | None = None,
    *,
    model_dir: str | Path | None = None,
    segmenter: str | None = None,
    batched: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> Pipeline:
    """Build the pipeline: model folder, segmenter and, for a server, the dynamic batcher.

    Parameters
    ----------
    settings : PipelineSettings, optional
        Default: read from the ``LOCUS_*`` environment.
    model_dir : str or Path, optional
        Model folder instead of ``settings.model_dir``.
    segmenter : str, optional
        Backend instead of ``settings.segmenter``.
    batched : bool
        Share model batches across concurrent callers (:class:`locus.service.batcher.DynamicBatcher`).
    on_batch : callable, optional
        Called with each model batch size (metrics); with ``batched`` only.

    Returns
    -------
    Pipeline
        Ready to :meth:`~locus.service.pipeline.Pipeline.run`; call ``close()`` when done.
    """
    settings = settings or PipelineSettings()
    classifier = build_classifier(settings, model_dir)
    seg, seg_name = build_segmenter(settings, segmenter)
    batcher = None
    if batched:
        from locus.service.batcher import DynamicBatcher

        batcher = DynamicBatcher(
            classifier.predict, max_batch=settings.max_batch, max_wait_s=settings.max_wait_ms / 1e3, on_batch=on_batch
        )
    return Pipeline(
        classifier,
        seg,
        seg_name,
        batcher,
        tta=settings.resolved_tta(classifier.provider.on_gpu),
        field_context=settings.field_context,
    )
