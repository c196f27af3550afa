"""Deprecated alias of :mod:`protosam.serving.server`, :mod:`protosam.serving.scheduler`,
:mod:`protosam.serving.tokens` and :mod:`protosam.cli.serve`: moved in ProtoSAM 0.2, removed in 0.3
(docs/layout.md)."""
import warnings

warnings.warn("protosam.server moved to protosam.serving.server, protosam.serving.scheduler, "
              "protosam.serving.tokens, protosam.cli.serve; the old name is removed in ProtoSAM 0.3.",
              DeprecationWarning, stacklevel=2)

from .serving.server import *  # noqa: E402,F401,F403
from .serving.scheduler import *  # noqa: E402,F401,F403
from .serving.tokens import *  # noqa: E402,F401,F403
from .cli.serve import *  # noqa: E402,F401,F403
