"""Deprecated alias of :mod:`protosam.cli.batch`: moved in ProtoSAM 0.2, removed in 0.3 (docs/layout.md)."""
import warnings

warnings.warn("protosam.batch_cli moved to protosam.cli.batch; the old name is removed in ProtoSAM 0.3.",
              DeprecationWarning, stacklevel=2)

from .cli.batch import *  # noqa: E402,F401,F403
