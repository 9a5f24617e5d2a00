"""Locus: per-cell protein localisation for Human Protein Atlas-style fluorescence images.

One import name, three layers that only point down (see the README's "Code map"):

- :mod:`locus.service` (folder ``service/``): the array code (decode, segment, crop,
  classify, attribute, encode, metric, readers, submission codec) and, above it, the
  HTTP service (:mod:`locus.service.api`, :mod:`locus.service.app`);
- :mod:`locus.training` (folder ``training/``): HPA-sim, training and export, built on the
  array code, never on the HTTP service;
- :mod:`locus.cli`: the ``locus`` console script, one subcommand per job.
"""

__version__ = "0.2.0"
