"""Locus training package: HPA data, HPA-sim, the competition metric, training and export.

TensorFlow is imported only by the modules that train or export
(:mod:`training.model`, :mod:`training.train`, :mod:`training.export`), so data,
simulation and evaluation work with the serving install alone.
"""
