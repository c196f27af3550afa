"""Deprecated alias of :mod:`protosam.cli.common`: moved in ProtoSAM 0.2, removed in 0.3 (docs/layout.md)."""
import warnings

warnings.warn("protosam.cli_common moved to protosam.cli.common; the old name is removed in ProtoSAM 0.3.",
              DeprecationWarning, stacklevel=2)

from .cli.common import *  # noqa: E402,F401,F403
