"""Deprecated alias of :mod:`protosam.cli.evaluate`: moved in ProtoSAM 0.2, removed in 0.3 (docs/layout.md)."""
import warnings

warnings.warn("protosam.evaluation.cli moved to protosam.cli.evaluate; the old name is removed in ProtoSAM 0.3.",
              DeprecationWarning, stacklevel=2)

from ..cli.evaluate import *  # noqa: E402,F401,F403
