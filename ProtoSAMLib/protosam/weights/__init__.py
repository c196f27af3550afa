"""Pretrained weights: the official checkpoints, the cache and verified downloads.

* :mod:`.registry` - the official files (URLs, sizes, SHA-256) by model name;
* :mod:`.resolve` - the cache folder, cache status, verification, download, and which file a
  model uses (re-exported here: ``protosam.weights.resolve_checkpoint`` ...);
* :mod:`.transfer` - resumable, locked HTTP transfers;
* :mod:`.checkpoints` - safe loading and strict key/shape checks of checkpoint files;
* ``protosam weights list|download|path`` is :mod:`protosam.cli.weights`.
"""
from .resolve import (
    REGISTRY,
    ProgressCallback,
    WeightsEntry,
    cache_path,
    cache_status,
    checkpoint_option,
    download,
    home_dir,
    resolve_checkpoint,
    verify_file,
    weights_dir,
)

__all__ = [
    "REGISTRY", "WeightsEntry", "ProgressCallback", "home_dir", "weights_dir", "cache_path",
    "cache_status", "verify_file", "download", "resolve_checkpoint", "checkpoint_option",
]
