"""Sample data: the Colin27 T1 brain ("ch2") and the AAL atlas on the same 1 mm MNI grid.

Both files ship in Debian's ``mricron-data`` package (``apt-get install mricron-data``), which
puts them in ``/usr/share/mricron/templates``. Geometry of both volumes: 181 x 217 x 181
voxels (x, y, z), 1 mm isotropic, origin (90, 125, -71) mm, direction diag(-1, -1, 1) (ITK LPS),
so SimpleITK arrays are (181, 217, 181) in (k, j, i) order. ``ch2.nii.gz`` is uint8 T1 (0..254);
``aal.nii.gz`` is uint8 with 116 regions, named in ``aal.nii.txt`` ("<value> <name> <code>").

Where the package is not installed, :func:`download_sample` fetches the same ``.deb`` from a
Debian mirror, checks its size and the SHA-256 published in Debian's signed package index
(bookworm), extracts the three files (pure Python: ``ar`` + ``tar``) and checks each file's
SHA-256 as well. Nothing is ever synthesised in place of the real files.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

from ..errors import IntegrityError, ProtoSAMError
from ..weights.registry import is_allowed_url

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


class SampleDataUnavailableError(ProtoSAMError):
    """The sample volume is neither installed nor downloadable."""


#: Where distributions put the mricron templates.
TEMPLATE_DIRS: Tuple[Path, ...] = (
    Path("/usr/share/mricron/templates"),
    Path("/usr/share/mricron"),
    Path("/usr/local/share/mricron/templates"),
    Path("/usr/lib/mricron/templates"),
    Path("/opt/mricron/templates"),
)
IMAGE_NAME = "ch2.nii.gz"
LABELS_NAME = "aal.nii.gz"
NAMES_NAME = "aal.nii.txt"

#: SHA-256 of the files as shipped in mricron-data 1.2.20211006+dfsg-4 (computed from the
#: package's files, whose MD5s match the package's own md5sums list).
FILE_SHA256: Dict[str, str] = {
    IMAGE_NAME: "a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309",
    LABELS_NAME: "b512dcd3f36b77f56be7a9a038134096e66314b7e8c31d25875b96bcf6991454",
    NAMES_NAME: "1788d6556a9ec056de9867b2382cf1ce1b51b87ae4cfd9cd25de48ae4dde709e",
}


@dataclass(frozen=True)
class DebSource:
    """A Debian package holding the sample files: mirrors, size, SHA-256, member folder."""

    file_name: str
    urls: Tuple[str, ...]
    size: int
    sha256: str
    member_dir: str
    file_sha256: Tuple[Tuple[str, str], ...]


_DEB_NAME = "mricron-data_1.2.20211006+dfsg-4_all.deb"
#: Size and SHA-256 from Debian bookworm's Packages index; the second URL is the permanent
#: snapshot.debian.org copy addressed by the file's SHA-1 (2a68e52c...).
MRICRON_DATA_DEB = DebSource(
    file_name=_DEB_NAME,
    urls=(
        f"https://deb.debian.org/debian/pool/main/m/mricron/{_DEB_NAME}",
        "https://snapshot.debian.org/file/2a68e52ce5e881c7a3d9c1f7b50897a32e281426",
    ),
    size=16122652,
    sha256="d40aa0ed66cf89bf6cafa049ad3884703c9d975c2ee2737525b7196528df9d6f",
    member_dir="usr/share/mricron/templates",
    file_sha256=tuple(FILE_SHA256.items()),
)


@dataclass(frozen=True)
class SampleFiles:
    """Paths of the sample image, its label map and the label names; where they came from."""

    image: Path
    labels: Path
    names: Path
    source: str


def find_installed_sample(search_dirs: Optional[Iterable[Path]] = None) -> Optional[SampleFiles]:
    """The Colin27 + AAL files of an installed ``mricron-data`` package, or None."""
    for folder in (search_dirs if search_dirs is not None else TEMPLATE_DIRS):
        folder = Path(folder)
        files = [folder / n for n in (IMAGE_NAME, LABELS_NAME, NAMES_NAME)]
        if all(f.is_file() for f in files):
            return SampleFiles(files[0], files[1], files[2], source=f"installed:{folder}")
    return None


def default_cache_dir() -> Path:
    """``<ProtoSAM home>/samples``: next to the weights (``$PROTOSAM_HOME`` or ``~/.protosam``)."""
    from ..weights import home_dir

    return home_dir() / "samples"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url: str, target: Path, expected_size: int, expected_sha256: str,
           progress: Optional[Progress], timeout: float) -> None:
    if not is_allowed_url(url):
        raise ValueError(f"Refusing to download from {url}: only https (or http on localhost) is allowed.")
    digest = hashlib.sha256()
    done = 0
    fd, tmp_name = tempfile.mkstemp(prefix=".part-", dir=str(target.parent))
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            if not is_allowed_url(response.geturl()):
                raise ValueError(f"{url} redirected to {response.geturl()}, which is not https.")
            while True:
                block = response.read(1 << 16)
                if not block:
                    break
                out.write(block)
                digest.update(block)
                done += len(block)
                if done > expected_size:
                    raise IntegrityError(f"{url} sends more than the expected {expected_size} bytes.")
                if progress is not None:
                    progress(done, expected_size)
        if done != expected_size or digest.hexdigest() != expected_sha256:
            raise IntegrityError(
                f"Download from {url} does not match the published file ({done} bytes, "
                f"SHA-256 {digest.hexdigest()}; expected {expected_size} bytes, "
                f"{expected_sha256}). The mirror may be broken; try again later.")
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _ar_members(data: bytes) -> Dict[str, bytes]:
    """Members of a Debian ``ar`` archive (``!<arch>`` + 60-byte headers)."""
    if not data.startswith(b"!<arch>\n"):
        raise IntegrityError("Not a Debian package (no ar signature).")
    members: Dict[str, bytes] = {}
    offset = 8
    while offset + 60 <= len(data):
        header = data[offset: offset + 60]
        if header[58:60] != b"`\n":
            raise IntegrityError("Corrupt ar header in Debian package.")
        name = header[0:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        start = offset + 60
        members[name] = data[start: start + size]
        offset = start + size + (size % 2)
    return members


def extract_deb_files(deb_path: Path, member_dir: str, names: Sequence[str],
                      out_dir: Path) -> Dict[str, Path]:
    """Extract ``member_dir/<name>`` for each name from a ``.deb`` into ``out_dir``."""
    members = _ar_members(Path(deb_path).read_bytes())
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise IntegrityError(f"{deb_path} has no data.tar member.")
    modes = {"data.tar.xz": "r:xz", "data.tar.gz": "r:gz", "data.tar.bz2": "r:bz2", "data.tar": "r:"}
    if data_name not in modes:
        raise IntegrityError(f"{deb_path}: unsupported payload {data_name}.")
    wanted = {f"{member_dir.strip('/')}/{n}": n for n in names}
    found: Dict[str, Path] = {}
    with tarfile.open(fileobj=io.BytesIO(members[data_name]), mode=modes[data_name]) as tar:
        for info in tar.getmembers():
            key = info.name[2:] if info.name.startswith("./") else info.name
            if key in wanted and info.isfile():
                handle = tar.extractfile(info)
                target = out_dir / wanted[key]
                target.write_bytes(handle.read())
                found[wanted[key]] = target
    missing = sorted(set(names) - set(found))
    if missing:
        raise IntegrityError(f"{deb_path} lacks {', '.join(missing)} under {member_dir}.")
    return found


def download_sample(cache_dir: Optional[Path] = None, *, source: DebSource = MRICRON_DATA_DEB,
                    progress: Optional[Progress] = None, timeout: float = 60.0) -> SampleFiles:
    """Download (once) and verify the sample; returns the cached files.

    Raises :class:`SampleDataUnavailableError` when no mirror answers and
    :class:`IntegrityError` when a file does not match its published checksum.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    expected = dict(source.file_sha256)
    targets = {name: folder / name for name in expected}
    if all(p.is_file() and sha256_of(p) == expected[n] for n, p in targets.items()):
        return SampleFiles(targets[IMAGE_NAME], targets[LABELS_NAME], targets[NAMES_NAME],
                           source=f"cache:{folder}")
    deb_path = folder / source.file_name
    errors = []
    integrity_failed = False
    if not (deb_path.is_file() and sha256_of(deb_path) == source.sha256):
        for url in source.urls:
            try:
                logger.info("Downloading sample data from %s", url)
                _fetch(url, deb_path, source.size, source.sha256, progress, timeout)
                break
            except IntegrityError as exc:
                integrity_failed = True
                errors.append(str(exc))
                logger.warning("%s", exc)
            except (urllib.error.URLError, OSError) as exc:
                errors.append(f"{url}: {exc}")
                logger.warning("Download failed from %s: %s", url, exc)
        else:
            if integrity_failed:
                raise IntegrityError("No mirror sent the published sample package: "
                                     + "; ".join(errors))
            raise SampleDataUnavailableError(
                "The sample data (Colin27 + AAL) is not installed and could not be downloaded "
                f"({'; '.join(errors)}). Install it with 'apt-get install mricron-data', or "
                f"place {IMAGE_NAME}, {LABELS_NAME} and {NAMES_NAME} in {folder}.")
    extracted = extract_deb_files(deb_path, source.member_dir, list(expected), folder)
    for name, path in extracted.items():
        actual = sha256_of(path)
        if actual != expected[name]:
            path.unlink()
            raise IntegrityError(f"{name} extracted from {deb_path} has SHA-256 {actual}, "
                                 f"expected {expected[name]}. Delete {deb_path} and retry.")
    deb_path.unlink()
    return SampleFiles(targets[IMAGE_NAME], targets[LABELS_NAME], targets[NAMES_NAME],
                       source=f"download:{source.urls[0]}")


def get_sample(*, download: bool = True, cache_dir: Optional[Path] = None,
               search_dirs: Optional[Iterable[Path]] = None,
               progress: Optional[Progress] = None) -> SampleFiles:
    """Installed files first, then the verified cache/download (when ``download``)."""
    installed = find_installed_sample(search_dirs)
    if installed is not None:
        return installed
    if not download:
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        files = [folder / n for n in (IMAGE_NAME, LABELS_NAME, NAMES_NAME)]
        if all(f.is_file() and sha256_of(f) == FILE_SHA256[f.name] for f in files):
            return SampleFiles(*files, source=f"cache:{folder}")
        raise SampleDataUnavailableError(
            "The sample data (Colin27 + AAL) is not installed. Install Debian's mricron-data "
            "package ('apt-get install mricron-data') or allow the download.")
    return download_sample(cache_dir, progress=progress)


def read_label_names(path: Path) -> Dict[int, str]:
    """``{value: name}`` from an AAL-style text file ("<value> <name> [code]" per line)."""
    names: Dict[int, str] = {}
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    if not names:
        raise ValueError(f"No '<value> <name>' lines in {path}")
    return names
