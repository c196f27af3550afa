"""Deprecated alias of :mod:`protosam.cohorts.batch`: moved in ProtoSAM 0.2, removed in 0.3 (docs/layout.md)."""
import warnings

warnings.warn("protosam.batch moved to protosam.cohorts.batch; the old name is removed in ProtoSAM 0.3.",
              DeprecationWarning, stacklevel=2)

from .cohorts.batch import *  # noqa: E402,F401,F403
