"""Typed errors. Every message says what went wrong and what the user can do about it."""


class ProtoSAMError(Exception):
    """Base class of all errors the engine raises on purpose."""


class InputError(ProtoSAMError, ValueError):
    """An image, mask, label or geometry the engine cannot work with."""


class CheckpointError(ProtoSAMError):
    """A checkpoint file is missing, truncated, corrupt or for another architecture."""


class WeightsUnavailableError(ProtoSAMError):
    """Pretrained weights are not in the cache and cannot be downloaded."""


class IntegrityError(CheckpointError):
    """A file's SHA-256 does not match the published value."""


class CancelledError(ProtoSAMError):
    """The caller cancelled a running job (through a cancel event)."""
