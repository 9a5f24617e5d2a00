"""Locus service: per-cell protein localisation over ONNX Runtime."""

__version__ = "0.1.0"
