"""HPA-sim: synthetic HPA-style fields of view with per-cell ground truth.

See :mod:`locus.training.sim.generator` for the public API (``SimConfig``, ``SimField``,
``generate_field``, ``write_dataset``) and ``locus sim`` for the command line.
"""

from locus.training.sim.generator import SIM_VERSION, SimConfig, SimField, field_id, generate_field, write_dataset

__all__ = ["SIM_VERSION", "SimConfig", "SimField", "field_id", "generate_field", "write_dataset"]
