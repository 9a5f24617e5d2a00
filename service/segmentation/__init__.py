"""Segmentation backends behind one factory, :func:`make_segmenter`.

Backends are registered by name with the module and class that implement them;
the module is imported only when the backend is asked for, so optional heavy
dependencies (ONNX nets, ``hpacellseg``) cost nothing until used. To add a
backend, add one line to :data:`BACKENDS`.
"""

from __future__ import annotations

import importlib

from locus.service.segmentation.base import SegmentationError, Segmenter

__all__ = ["BACKENDS", "Segmenter", "SegmentationError", "make_segmenter", "backend_names"]

#: Registry: backend name -> ``"module:Class"``; the class is built as ``Class(**options)``.
BACKENDS: dict[str, str] = {
    "classical": "locus.service.segmentation.classical:ClassicalSegmenter",
    "hpa": "locus.service.segmentation.hpa:HpaSegmenter",
    "hpacellseg": "locus.service.segmentation.hpacellseg_backend:HpaCellSegSegmenter",
}


def backend_names() -> list[str]:
    """Names of the registered segmentation backends, sorted.

    Returns
    -------
    list of str
        For example ``["classical", "hpa"]``.
    """
    return sorted(BACKENDS)


def make_segmenter(name: str, **options) -> Segmenter:
    """Build a segmenter by its registry name.

    Parameters
    ----------
    name : str
        Backend name, one of :func:`backend_names` (case-insensitive).
    **options
        Keyword options passed to the backend's constructor.

    Returns
    -------
    Segmenter
        The backend instance.

    Raises
    ------
    ValueError
        Unknown backend name (the message lists the valid ones).
    """
    key = str(name).strip().lower()
    if key not in BACKENDS:
        raise ValueError(f"unknown segmentation backend {name!r}; valid names: {', '.join(backend_names())}")
    module_name, _, class_name = BACKENDS[key].partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)(**options)
