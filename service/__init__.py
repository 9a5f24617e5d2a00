"""Locus service (``locus.service``): the array pipeline and, above it, the HTTP service over ONNX Runtime."""

from locus import __version__

__all__ = ["__version__"]
