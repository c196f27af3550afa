"""Deprecated alias of :mod:`protosam.serving.client`: moved in ProtoSAM 0.2, removed in 0.3 (docs/layout.md)."""
import warnings

warnings.warn("protosam.server_client moved to protosam.serving.client; the old name is removed in ProtoSAM 0.3.",
              DeprecationWarning, stacklevel=2)

from .serving.client import *  # noqa: E402,F401,F403
