"""Locus training package: HPA data, HPA-sim, the competition metric, training and export.

TensorFlow is imported only by the modules that train or export
(:mod:`locus.training.model`, :mod:`locus.training.train`, :mod:`locus.training.export`), so data,
simulation and evaluation work with the serving install alone.
"""
