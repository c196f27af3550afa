"""Deprecated alias of :mod:`protosam.cli.weights`: moved in ProtoSAM 0.2, removed in 0.3 (docs/layout.md)."""
import warnings

warnings.warn("protosam.weights.cli moved to protosam.cli.weights; the old name is removed in ProtoSAM 0.3.",
              DeprecationWarning, stacklevel=2)

from ..cli.weights import *  # noqa: E402,F401,F403
