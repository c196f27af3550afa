"""Deprecated alias of :mod:`protosam.serving.worker_process`: moved in ProtoSAM 0.2, removed in 0.3 (docs/layout.md)."""
import warnings

warnings.warn("protosam.worker_process moved to protosam.serving.worker_process; the old name is removed in ProtoSAM 0.3.",
              DeprecationWarning, stacklevel=2)

from .serving.worker_process import *  # noqa: E402,F401,F403
