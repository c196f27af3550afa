"""Transport for :mod:`protosam.weights`: the https-only HTTP client, resumable streaming of
one file into a ``.part`` file, and the cross-process download lock.

Nothing here knows about the cache layout; :func:`protosam.weights.download` drives it.
"""
from __future__ import annotations

import hashlib
import http.client as http_client
import logging
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from ..errors import CancelledError, IntegrityError, WeightsUnavailableError
from .registry import WeightsEntry, is_allowed_url, is_loopback_url

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``; ``total_bytes`` is 0 when the size is unknown."""

CHUNK_BYTES = 64 * 1024
HASH_BLOCK = 4 * 1024 * 1024
_USER_AGENT = "protosam-weights/0.1"


def human_size(n: Optional[int]) -> str:
    """``375042383`` -> ``"375.0 MB"``; None or 0 -> ``"unknown size"``."""
    if not n:
        return "unknown size"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


class DownloadLock:
    """Exclusive OS lock on ``<file>.lock``: one downloader per file across processes.

    ``fcntl.flock`` (POSIX) and ``msvcrt.locking`` (Windows) are released by the OS when the
    holder exits, so a crashed download never leaves a stale lock. The lock file itself is
    never deleted (deleting it would let two processes lock two different inodes).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: Optional[int] = None

    def _try_lock(self, fd: int) -> bool:
        try:
            if os.name == "nt":
                import msvcrt

                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    def acquire(self, cancel: Optional[threading.Event], timeout: Optional[float]) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if timeout is None else time.monotonic() + timeout
        announced = False
        while not self._try_lock(fd):
            if not announced:
                logger.info("Another process is downloading %s; waiting for it.", self.path.name[: -len(".lock")])
                announced = True
            if cancel is not None and cancel.is_set():
                os.close(fd)
                raise CancelledError(f"Cancelled while waiting for another download of {self.path.name}.")
            if deadline is not None and time.monotonic() > deadline:
                os.close(fd)
                raise WeightsUnavailableError(
                    f"Timed out waiting for another process that holds {self.path}. "
                    "Wait for it to finish, or stop it and try again."
                )
            time.sleep(0.1)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if os.name == "nt":
                import msvcrt

                os.lseek(self._fd, 0, os.SEEK_SET)
                msvcrt.locking(self._fd, msvcrt.LK_UNLCK, 1)
            else:
                import fcntl

                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None


class _SafeRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to https URLs (and to loopback http when the download itself
    is a loopback test download), so a server cannot downgrade or divert a transfer."""

    def __init__(self, allow_loopback: bool) -> None:
        super().__init__()
        self.allow_loopback = allow_loopback

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        allowed = is_allowed_url(newurl) and (newurl.lower().startswith("https://") or self.allow_loopback)
        if not allowed:
            raise _RefusedRedirect(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _RefusedRedirect(urllib.error.URLError):
    def __init__(self, url: str) -> None:
        super().__init__(f"refused redirect to {url!r} (only https is allowed)")
        self.url = url


def _open(url: str, offset: int, timeout: float):
    loopback = is_loopback_url(url)
    handlers: list = [_SafeRedirectHandler(allow_loopback=loopback)]
    if loopback:
        handlers.append(urllib.request.ProxyHandler({}))  # never send loopback traffic to a proxy
    opener = urllib.request.build_opener(*handlers)
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    return opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)


def parse_content_range(value: Optional[str]):
    """``"bytes 100-199/200"`` -> (100, 200); total is None for ``*``; None if unparsable."""
    if not value or not value.startswith("bytes "):
        return None
    try:
        span, total = value[len("bytes "):].split("/")
        start = int(span.split("-")[0])
        return start, (None if total.strip() == "*" else int(total))
    except ValueError:
        return None


class Interrupted(Exception):
    """The transfer stopped early; the .part file holds what arrived and can be resumed.

    ``restart`` is True when the .part file was discarded (it did not fit the server's file)
    and the next attempt starts from zero.
    """

    def __init__(self, message: str, *, restart: bool = False) -> None:
        super().__init__(message)
        self.restart = restart


def transfer(
    entry: WeightsEntry, url: str, part: Path, progress: Optional[ProgressCallback],
    cancel: Optional[threading.Event], timeout: float,
) -> str:
    """Fetch ``url`` into ``part`` (resuming what is there); return the SHA-256 of the whole file.

    Raises Interrupted when the stream ends early (``part`` keeps what arrived),
    IntegrityError when the server offers a file of the wrong size, CancelledError on cancel.
    """
    offset = part.stat().st_size if part.exists() else 0
    if entry.size is not None and offset > entry.size:
        logger.warning("Discarding %s: larger than the published file.", part)
        part.unlink()
        offset = 0
    hasher = hashlib.sha256()
    if offset:
        with open(part, "rb") as stream:
            for block in iter(lambda: stream.read(HASH_BLOCK), b""):
                hasher.update(block)
        if offset == entry.size:
            return hasher.hexdigest()
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # our range is past the end: the .part is not this file
            logger.warning("Server refused to resume %s (HTTP 416); starting over.", entry.file_name)
            part.unlink()
            raise Interrupted("the partial file did not match the server's file", restart=True) from exc
        raise WeightsUnavailableError(f"the server answered HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WeightsUnavailableError(f"cannot reach {url} ({reason})") from exc
    with response:
        total = None
        status = response.status
        if offset and status == 206:
            span = parse_content_range(response.headers.get("Content-Range"))
            if span is None or span[0] != offset:
                part.unlink()
                raise Interrupted(
                    f"the server resumed at the wrong place ({response.headers.get('Content-Range')})", restart=True
                )
            total = span[1]
        elif status == 200:
            if offset:
                logger.info("Server ignored the resume request for %s; downloading from the start.", entry.file_name)
                offset, hasher = 0, hashlib.sha256()
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise WeightsUnavailableError(f"unexpected HTTP status {status} from {url}")
        if entry.size is not None and total is not None and total != entry.size:
            part.unlink(missing_ok=True)
            raise IntegrityError(
                f"{url} serves {total} bytes, but the published {entry.file_name} has {entry.size} bytes; "
                "it is not the expected file. Nothing was installed."
            )
        expected = entry.size if entry.size is not None else total
        if expected is not None:
            free = shutil.disk_usage(part.parent).free
            if free < expected - offset:
                raise WeightsUnavailableError(
                    f"not enough disk space in {part.parent} ({human_size(free)} free, {human_size(expected - offset)} needed)"
                )
        done = offset
        if progress is not None:
            progress(done, expected or 0)
        try:
            with open(part, "ab" if offset else "wb") as out:
                while True:
                    if cancel is not None and cancel.is_set():
                        raise CancelledError(
                            f"Download of {entry.file_name} cancelled after {done} bytes; "
                            f"run it again to resume from {part}."
                        )
                    try:
                        chunk = response.read(CHUNK_BYTES)
                    except (OSError, http_client.HTTPException) as exc:
                        raise Interrupted(f"connection lost after {done} bytes ({exc})") from exc
                    if not chunk:
                        break
                    out.write(chunk)
                    hasher.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, expected or 0)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:  # writing failed: disk full, permissions...
            raise WeightsUnavailableError(f"cannot write {part} ({exc}); free space or fix permissions, then run again") from exc
    if expected is not None and done < expected:
        raise Interrupted(f"connection closed after {done} of {expected} bytes")
    return hasher.hexdigest()

