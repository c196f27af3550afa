"""Deprecated alias of :mod:`protosam.serving.protocol`: moved in ProtoSAM 0.2, removed in 0.3 (docs/layout.md)."""
import warnings

warnings.warn("protosam.protocol moved to protosam.serving.protocol; the old name is removed in ProtoSAM 0.3.",
              DeprecationWarning, stacklevel=2)

from .serving.protocol import *  # noqa: E402,F401,F403
