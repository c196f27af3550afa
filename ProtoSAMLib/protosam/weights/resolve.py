"""Pretrained weights: cache folder, verified downloads, and checkpoint resolution.

Cache layout: ``<home>/weights/<file_name>``, where ``home`` is the ``home=`` argument, else
the ``PROTOSAM_HOME`` environment variable, else ``~/.protosam``. Next to a file there may be

* ``<file_name>.part`` - an unfinished download, resumed with an HTTP Range request;
* ``<file_name>.lock`` - an OS file lock held while a process downloads that file, so two
  processes never write the same ``.part`` (the lock dies with its process: nothing stale);
* ``<file_name>.verified`` - a record that the file's SHA-256 was checked, keyed by the
  file's size and modification time, so multi-GB files are not rehashed on every run.
  (Whoever can rewrite the cache can also rewrite this record; it guards against
  corruption, not against an attacker with write access to the cache.)

A finished download is checked (size, then SHA-256) and only then moved into place with
``os.replace``, so ``<file_name>`` is never partial. Only https URLs are contacted
(plain http only on 127.0.0.1/localhost, for tests); redirects are held to the same rule.
Checkpoints are read elsewhere with ``torch.load(weights_only=True)``
(:mod:`protosam.weights.checkpoints`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Mapping, Optional, Union

from ..errors import CancelledError, CheckpointError, IntegrityError, WeightsUnavailableError
from .transfer import HASH_BLOCK, DownloadLock, Interrupted, ProgressCallback, human_size, transfer
from .registry import REGISTRY, TEST_ONLY_ARCHITECTURES, WeightsEntry, get_entry, is_allowed_url

logger = logging.getLogger(__name__)

__all__ = [
    "REGISTRY", "WeightsEntry", "ProgressCallback", "home_dir", "weights_dir", "cache_path",
    "cache_status", "verify_file", "download", "resolve_checkpoint", "checkpoint_option",
]

PathLike = Union[str, "os.PathLike[str]"]


# ----------------------------------------------------------------------------- cache paths
def home_dir(home: Optional[PathLike] = None) -> Path:
    """The ProtoSAM home folder: ``home`` if given, else ``$PROTOSAM_HOME``, else ``~/.protosam``."""
    if home is not None and str(home) != "":
        return Path(home).expanduser()
    env = os.environ.get("PROTOSAM_HOME", "")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".protosam"


def weights_dir(home: Optional[PathLike] = None) -> Path:
    """Folder that holds the downloaded checkpoints: ``<home>/weights``."""
    return home_dir(home) / "weights"


def cache_path(entry: WeightsEntry, home: Optional[PathLike] = None) -> Path:
    """Where ``entry``'s file lives in the cache (whether or not it is there yet)."""
    return weights_dir(home) / entry.file_name


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def checkpoint_option(family: str) -> str:
    """The command-line option that passes an explicit checkpoint for a model family."""
    return "--sam-checkpoint" if family in ("sam", "sam2") else "--dinov2-checkpoint"


# ----------------------------------------------------------------------------- verification
def _file_sha256(path: Path, cancel: Optional[threading.Event] = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(HASH_BLOCK), b""):
            if cancel is not None and cancel.is_set():
                raise CancelledError(f"Cancelled while checking {path}.")
            digest.update(block)
    return digest.hexdigest()


def _marker_matches(path: Path, entry: WeightsEntry, stat: os.stat_result) -> bool:
    try:
        record = json.loads(_sidecar(path, ".verified").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(record, dict)
        and record.get("sha256") == entry.sha256
        and record.get("size") == stat.st_size
        and record.get("mtime_ns") == stat.st_mtime_ns
    )


def _write_marker(path: Path, entry: WeightsEntry) -> None:
    stat = path.stat()
    record = {"sha256": entry.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    marker = _sidecar(path, ".verified")
    try:
        tmp = _sidecar(path, f".verified.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(record), encoding="utf-8")
        os.replace(tmp, marker)
    except OSError as exc:  # a read-only cache still works, it just rehashes next time
        logger.debug("Could not write %s: %s", marker, exc)


def verify_file(
    path: PathLike, entry: WeightsEntry, *, use_marker: bool = True, cancel: Optional[threading.Event] = None
) -> None:
    """Raise IntegrityError unless ``path`` has ``entry``'s size and SHA-256 (where known).

    With ``use_marker`` a previous successful check recorded next to the file (same size and
    modification time) is trusted instead of rehashing; a successful full check writes it.
    """
    path = Path(path)
    stat = path.stat()
    if entry.size is not None and stat.st_size != entry.size:
        raise IntegrityError(
            f"{path} has {stat.st_size} bytes, but {entry.name} ({entry.file_name}) has {entry.size}. "
            f"The file is truncated or not the published one: delete it and download it again "
            f"(protosam weights download {entry.name})."
        )
    if entry.sha256 is None:
        logger.warning("No published SHA-256 for %s; only its size was checked.", entry.name)
        return
    if use_marker and _marker_matches(path, entry, stat):
        return
    logger.info("Checking the SHA-256 of %s (%s); this is done once per file.", path, human_size(stat.st_size))
    actual = _file_sha256(path, cancel)
    if actual != entry.sha256:
        raise IntegrityError(
            f"{path} has SHA-256 {actual}, but the published {entry.file_name} has {entry.sha256}. "
            f"The file is corrupt or not the official one: delete it and download it again "
            f"(protosam weights download {entry.name})."
        )
    _write_marker(path, entry)


def cache_status(entry: WeightsEntry, home: Optional[PathLike] = None) -> str:
    """Cheap status of ``entry`` in the cache, without hashing.

    One of ``"verified"`` (present, hash checked before and unchanged since), ``"present"``
    (right size, hash not checked yet), ``"wrong size"``, ``"partial"`` (an unfinished
    download that can be resumed), ``"missing"``, or ``"local only"`` (never downloaded nor
    taken from the cache: pass the file with ``--sam-checkpoint``, see ``entry.local_only``).
    """
    if entry.local_only:
        return "local only"
    path = cache_path(entry, home)
    try:
        stat = path.stat()
    except OSError:
        return "partial" if _sidecar(path, ".part").exists() else "missing"
    if entry.size is not None and stat.st_size != entry.size:
        return "wrong size"
    if entry.sha256 is None or _marker_matches(path, entry, stat):
        return "verified"
    return "present"



def local_only_message(entry: WeightsEntry) -> str:
    """Why a local-only checkpoint is not downloaded, and what to do instead."""
    return (
        f"ProtoSAM does not download {entry.name}: {entry.local_only}. Download {entry.url} yourself "
        f"(source: {entry.source}), check it as you see fit, and pass it with "
        f"{checkpoint_option(entry.family)} FILE."
    )


def _entry_url(entry: WeightsEntry, base_url: Optional[str]) -> str:
    """The URL to fetch: ``entry.url``, or ``<base_url>/<file_name>`` for a mirror."""
    if base_url is None:
        return entry.url
    url = base_url.rstrip("/") + "/" + entry.file_name
    if not is_allowed_url(url):
        raise ValueError(f"Mirror URL {base_url!r} refused: only https URLs (or http on 127.0.0.1) are allowed.")
    return url


def _offline_message(entry: WeightsEntry, target: Path, url: str, reason: str) -> str:
    return (
        f"The {entry.name} weights ({entry.file_name}, {human_size(entry.size)}) are not available: {reason}. "
        f"To install them without this tool, download {url} on a machine with internet access and save it "
        f"as {target} (or pass {checkpoint_option(entry.family)} FILE with a checkpoint you already have)."
    )


def download(
    entry: Union[str, WeightsEntry],
    home: Optional[PathLike] = None,
    *,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[threading.Event] = None,
    timeout: float = 30.0,
    retries: int = 3,
    base_url: Optional[str] = None,
    registry: Optional[Mapping[str, WeightsEntry]] = None,
    lock_timeout: Optional[float] = None,
) -> Path:
    """Download ``entry`` into the cache (resuming a ``.part`` file) and return its verified path.

    Args:
        entry: a WeightsEntry, or a name looked up in ``registry`` (default: the official one).
        home: ProtoSAM home folder (see :func:`home_dir`).
        progress: called as ``progress(done_bytes, total_bytes)`` (total 0 when unknown).
        cancel: when set, the download stops at the next chunk, keeps its ``.part`` file for
            a later resume, and raises CancelledError.
        timeout: seconds without data before a connection counts as lost.
        retries: how many times a transfer that broke off after making progress is resumed
            at once (with an HTTP Range request) before giving up.
        base_url: fetch ``<base_url>/<file_name>`` instead of the official URL (a mirror;
            the file is still checked against the published size and SHA-256).
        lock_timeout: seconds to wait for another process downloading the same file
            (None: wait until it finishes or ``cancel`` is set).

    Raises:
        WeightsUnavailableError: network failure; the message says which URL to fetch by
            hand and where to put the file. IntegrityError: the server's file is not the
            published one (nothing is left in place). CancelledError. ValueError: bad URL.
    """
    if isinstance(entry, str):
        entry = get_entry(entry, registry)
    if entry.local_only:
        raise WeightsUnavailableError(local_only_message(entry))
    url = _entry_url(entry, base_url)
    target = cache_path(entry, home)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsUnavailableError(
            _offline_message(entry, target, url, f"cannot create the cache folder {target.parent} ({exc}); "
                             "choose another with PROTOSAM_HOME or --home")
        ) from exc
    lock = DownloadLock(_sidecar(target, ".lock"))
    lock.acquire(cancel, lock_timeout)
    try:
        if target.exists():
            try:
                verify_file(target, entry, cancel=cancel)
                return target  # already there (perhaps finished by another process meanwhile)
            except IntegrityError as exc:
                logger.warning("Replacing the cached %s: %s", entry.file_name, exc)
                target.unlink()
                _sidecar(target, ".verified").unlink(missing_ok=True)
        part = _sidecar(target, ".part")
        attempt = 0
        while True:
            before = part.stat().st_size if part.exists() else 0
            try:
                logger.info("Downloading %s from %s%s", entry.file_name, url, f" (resuming at {before} bytes)" if before else "")
                digest = transfer(entry, url, part, progress, cancel, timeout)
                break
            except Interrupted as exc:
                after = part.stat().st_size if part.exists() else 0
                if attempt >= retries or not (exc.restart or after > before):
                    raise WeightsUnavailableError(
                        _offline_message(entry, target, url, f"the transfer broke off: {exc}. Run the same command "
                                         f"again to resume from {part}")
                    ) from exc
                attempt += 1
                logger.warning("Transfer of %s interrupted (%s); resuming (retry %d of %d).", entry.file_name, exc, attempt, retries)
            except WeightsUnavailableError as exc:
                raise WeightsUnavailableError(_offline_message(entry, target, url, str(exc))) from exc
        size = part.stat().st_size
        problem = None
        if entry.size is not None and size != entry.size:
            problem = f"{size} bytes arrived, but the published file has {entry.size}"
        elif entry.sha256 is not None and digest != entry.sha256:
            problem = f"its SHA-256 is {digest}, but the published one is {entry.sha256}"
        if problem is not None:
            part.unlink()
            raise IntegrityError(
                f"Downloaded {url} is not the published {entry.file_name}: {problem}. It was deleted and nothing "
                "was installed; try again later or fetch the file from the official source."
            )
        os.replace(part, target)
        _write_marker(target, entry)
        logger.info("Saved %s (%s)", target, human_size(size))
        return target
    finally:
        lock.release()


# ----------------------------------------------------------------------------- resolution
def resolve_checkpoint(
    name: Union[str, WeightsEntry],
    checkpoint: Optional[PathLike] = None,
    *,
    download: bool = True,
    progress: Optional[ProgressCallback] = None,
    home: Optional[PathLike] = None,
    registry: Optional[Mapping[str, WeightsEntry]] = None,
    base_url: Optional[str] = None,
    cancel: Optional[threading.Event] = None,
    timeout: float = 30.0,
) -> Path:
    """Path of the checkpoint to load for model ``name``.

    Order: an explicit ``checkpoint`` path wins (it must exist; it is not hash-checked, so
    fine-tuned files work); else the cached official file, verified (size and SHA-256); else
    a download when ``download`` is True. Test-only architectures (``dinov2_tiny14``,
    ``sam_tiny``) need an explicit path.

    Raises:
        CheckpointError: the explicit path does not exist, or a test-only name without one.
        WeightsUnavailableError: not cached and not downloadable (message: which URL to fetch
            and where to put it). IntegrityError: the cached file is corrupt and downloads
            are off, or the download is not the published file. ValueError: unknown name.
    """
    label = name.name if isinstance(name, WeightsEntry) else name
    if checkpoint is not None and str(checkpoint) != "":
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"Checkpoint file for {label} not found: {path}. Check the path, or leave it out to use "
                "the official weights from the cache."
            )
        return path
    if isinstance(name, WeightsEntry):
        entry = name
    else:
        if name in TEST_ONLY_ARCHITECTURES and (registry is None or name not in registry):
            option = checkpoint_option(TEST_ONLY_ARCHITECTURES[name])
            raise CheckpointError(
                f"{name!r} is a test-only architecture with no published weights: pass an explicit checkpoint "
                f"path ({option} FILE; protosam.testing.write_tiny_checkpoints writes one)."
            )
        entry = get_entry(name, registry)
    if entry.local_only:
        raise WeightsUnavailableError(local_only_message(entry))
    target = cache_path(entry, home)
    url = _entry_url(entry, base_url)
    if target.exists():
        try:
            verify_file(target, entry, cancel=cancel)
            return target
        except IntegrityError as exc:
            if not download:
                raise IntegrityError(
                    f"{exc} Downloads are off; to repair it by hand, fetch {url} and save it as {target}."
                ) from exc
            logger.warning("Cached %s failed its check; downloading it again.", entry.file_name)
    if not download:
        raise WeightsUnavailableError(_offline_message(
            entry, target, url, f"not in the cache, and downloads are off here ('protosam weights download {entry.name}' "
            "fetches it)"
        ))
    return _download(entry, home, progress=progress, cancel=cancel, timeout=timeout, base_url=base_url)


_download = download  # resolve_checkpoint has a parameter named "download"
