"""Deprecated alias of :mod:`protosam.cohorts.ray_cluster`: moved in ProtoSAM 0.2, removed in 0.3 (docs/layout.md)."""
import warnings

warnings.warn("protosam.batch_ray moved to protosam.cohorts.ray_cluster; the old name is removed in ProtoSAM 0.3.",
              DeprecationWarning, stacklevel=2)

from .cohorts.ray_cluster import *  # noqa: E402,F401,F403
