"""The official pretrained checkpoints ProtoSAM can download, described as data.

Each :class:`WeightsEntry` names one file: where it comes from (an https URL), how big it
is, and the integrity data that identifies it. Names are the architecture names the engine
uses (``"dinov2_vitb14"``, ``"vit_h"``, ``"medsam_vit_b"`` ...).

Provenance of the integrity data (checked with the public search index; nothing invented):

* **SAM** (``dl.fbaipublicfiles.com/segment_anything/``, Apache-2.0, linked from the
  facebookresearch/segment-anything README). Meta publishes no checksum file. The 6 hex
  digits in each file name are **not** a SHA-256 prefix: they are the first digits of the
  file's **MD5** (e.g. ``sam_vit_h_4b8939.pth`` has MD5 ``4b8939a8...``, SHA-256
  ``a7bf3b02...``). The full SHA-256, MD5 and byte sizes below agree across many independent
  public projects that pin these files.
* **DINOv2** (``dl.fbaipublicfiles.com/dinov2/<arch>/``, linked from the
  facebookresearch/dinov2 README; Apache-2.0 per its model card). Meta publishes no
  checksums; the SHA-256 values are the ones pinned by finegrain-ai/refiners for these
  exact URLs and agree with several independent projects; byte sizes likewise.
* **MedSAM ViT-B**: the official bowang-lab/MedSAM README links a Google Drive folder, which
  cannot be fetched without a browser. The same file (``medsam_vit_b.pth``,
  375 049 145 bytes) is published on Zenodo, record 10.5281/zenodo.10689643 (CC-BY-4.0),
  whose listed MD5 is ``3bb6db55bd0c9ca30b61248bca72f8d6``; its SHA-256 is as recorded by
  several independent projects.

* **SAM 2.1** (``dl.fbaipublicfiles.com/segment_anything_2/092824/``, Apache-2.0, linked from
  the facebookresearch/sam2 README "Download Checkpoints" and its ``checkpoints/download_ckpts.sh``,
  checked at commit 2b90b9f). Meta publishes no checksums, and no SHA-256 or exact byte size
  could be sourced from the public search index while this entry was written (no internet
  here). The URLs are recorded, but these files are **local only** (``local_only``): ProtoSAM
  does not download a file it cannot verify. Fetch one yourself and pass it with
  ``--sam-checkpoint FILE``.
* **MedSAM2** (``MedSAM2_latest.pt`` on huggingface.co/wanglab/MedSAM2, linked from the
  bowang-lab/MedSAM2 README through its ``download.sh``, checked at commit 332f30d; the code
  is Apache-2.0). No checksum is published with it and none could be sourced: local only, as
  SAM 2.1. Its 512 px configuration is in :mod:`protosam.models.sam2_refiner` with its source.

Verification uses the full SHA-256 (always present for downloadable official entries); the
MD5 is kept only as the published cross-reference. Test-only tiny architectures have no
entry: they must be given an explicit checkpoint path.
"""
from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional

from .. import catalogue

FAMILIES = catalogue.FAMILIES

#: Hosts that may be contacted over plain http. Only the loopback interface: this exists so
#: tests can serve files from 127.0.0.1; every real download must use https.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

#: Architectures used only by tests (tiny random-weight models); they have no download.
TEST_ONLY_ARCHITECTURES: Mapping[str, str] = catalogue.test_only_models()

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")


def is_allowed_url(url: str) -> bool:
    """True for ``https://`` URLs, and ``http://`` URLs whose host is the loopback interface.

    Everything else (``http://`` to any other host, ``file:``, ``ftp:`` ...) is refused, so a
    tampered registry or redirect can neither downgrade a download to clear text nor read
    local files.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return False
    host = (parts.hostname or "").lower()
    if not host:
        return False
    if parts.scheme == "https":
        return True
    return parts.scheme == "http" and is_loopback_url(url)


def is_loopback_url(url: str) -> bool:
    """True when the URL's host is the loopback interface (such URLs bypass any proxy)."""
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class WeightsEntry:
    """One downloadable checkpoint file.

    Attributes:
        name: registry key, the name users type (``protosam weights download NAME``).
        family: ``"dinov2"`` or ``"sam"`` (decides which ``--...-checkpoint`` option applies).
        architecture: the engine's architecture name this file loads into.
        file_name: plain file name inside the cache folder (no directories).
        url: where to fetch it; https, or http on the loopback interface (tests only).
        size: exact size in bytes, or None when unknown.
        sha256: full lowercase hex SHA-256, or None when unknown.
        md5: published MD5 (lowercase hex), kept as a cross-reference, or None.
        source: where the URL and integrity data come from.
        license: licence of the weights as published.
        local_only: why ProtoSAM does not download this file (no published SHA-256 could be
            sourced); empty for downloadable entries. Such files are passed with
            ``--sam-checkpoint FILE``.
    """

    name: str
    family: str
    architecture: str
    file_name: str
    url: str
    size: Optional[int] = None
    sha256: Optional[str] = None
    md5: Optional[str] = None
    source: str = ""
    license: str = ""
    local_only: str = ""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError("WeightsEntry.name must be a non-empty string")
        if self.family not in FAMILIES:
            raise ValueError(f"WeightsEntry {self.name!r}: family must be one of {FAMILIES}, got {self.family!r}")
        if not self.architecture:
            raise ValueError(f"WeightsEntry {self.name!r}: architecture must be set")
        bad_name = (
            not self.file_name
            or self.file_name in (".", "..")
            or any(sep in self.file_name for sep in ("/", "\\", "\0"))
            or self.file_name.startswith(".")
            or self.file_name.endswith((".part", ".lock", ".verified"))
        )
        if bad_name:
            raise ValueError(
                f"WeightsEntry {self.name!r}: file_name {self.file_name!r} must be a plain file name "
                "(no folders, not hidden, not ending in .part/.lock/.verified)"
            )
        if not is_allowed_url(self.url):
            raise ValueError(
                f"WeightsEntry {self.name!r}: URL {self.url!r} refused; only https URLs "
                "(or http on 127.0.0.1/localhost, for tests) are allowed"
            )
        if self.size is not None and (not isinstance(self.size, int) or self.size <= 0):
            raise ValueError(f"WeightsEntry {self.name!r}: size must be a positive int or None")
        if self.sha256 is not None and not _HEX64.fullmatch(self.sha256):
            raise ValueError(f"WeightsEntry {self.name!r}: sha256 must be 64 lowercase hex digits")
        if self.md5 is not None and not _HEX32.fullmatch(self.md5):
            raise ValueError(f"WeightsEntry {self.name!r}: md5 must be 32 lowercase hex digits")


_FB = "https://dl.fbaipublicfiles.com"
_SAM_SOURCE = "facebookresearch/segment-anything README (model checkpoints)"
_DINO_SOURCE = "facebookresearch/dinov2 README (pretrained backbones)"


def _sam(name: str, file_name: str, size: int, sha256: str, md5: str) -> WeightsEntry:
    return WeightsEntry(
        name=name, family="sam", architecture=name, file_name=file_name,
        url=f"{_FB}/segment_anything/{file_name}", size=size, sha256=sha256, md5=md5,
        source=_SAM_SOURCE, license="Apache-2.0",
    )


def _dino(name: str, registers: bool, size: int, sha256: str) -> WeightsEntry:
    arch = name[: -len(catalogue.REGISTERS_SUFFIX)] if registers else name
    file_name = f"{name}_pretrain.pth"
    return WeightsEntry(
        name=name, family="dinov2", architecture=name, file_name=file_name,
        url=f"{_FB}/dinov2/{arch}/{file_name}", size=size, sha256=sha256,
        source=_DINO_SOURCE, license="Apache-2.0",
    )


_SAM2_SOURCE = "facebookresearch/sam2 README (Download Checkpoints, SAM 2.1) and checkpoints/download_ckpts.sh"
_NO_HASH = ("no SHA-256 or size is published for this file and none could be sourced, so ProtoSAM cannot verify "
            "a download")


def _sam2(name: str) -> WeightsEntry:
    file_name = f"{name}.pt"
    return WeightsEntry(
        name=name, family="sam2", architecture=name, file_name=file_name,
        url=f"{_FB}/segment_anything_2/092824/{file_name}", source=_SAM2_SOURCE, license="Apache-2.0",
        local_only=_NO_HASH,
    )


_ENTRIES = (
    _dino(catalogue.DINOV2_VITS14, False, 88_283_115, "b938bf1bc15cd2ec0feacfe3a1bb553fe8ea9ca46a7e1d8d00217f29aef60cd9"),
    _dino(catalogue.DINOV2_VITB14, False, 346_378_731, "0b8b82f85de91b424aded121c7e1dcc2b7bc6d0adeea651bf73a13307fad8c73"),
    _dino(catalogue.DINOV2_VITL14, False, 1_217_586_395, "d5383ea8f4877b2472eb973e0fd72d557c7da5d3611bd527ceeb1d7162cbf428"),
    _dino(catalogue.DINOV2_VITG14, False, 4_546_108_579, "baf8467e50af277596bbbafa06887c177ee899ab46033649c383577d7e9309d3"),
    _dino(catalogue.DINOV2_VITS14 + catalogue.REGISTERS_SUFFIX, True, 88_291_785, "f433177089a681826f849f194ece3bb48f4d63fb38d32fc837e3dc7a4e5641fb"),
    _dino(catalogue.DINOV2_VITB14 + catalogue.REGISTERS_SUFFIX, True, 346_393_545, "73182a088cf94833c94b1666d1c99e02fe87e2007bff57b564fb6206e25dba71"),
    _dino(catalogue.DINOV2_VITL14 + catalogue.REGISTERS_SUFFIX, True, 1_217_607_321, "36e4deffbaef061a2576705b0c36f93621e2ae20bf6274694821b0b492551b51"),
    _dino(catalogue.DINOV2_VITG14 + catalogue.REGISTERS_SUFFIX, True, 4_546_140_349, "746ecb8c6301c645c5c855be91687d274587d6e48fdaec4a729753160b34a283"),
    _sam(catalogue.SAM_VIT_B, "sam_vit_b_01ec64.pth", 375_042_383,
         "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", "01ec64d29a2fca3f0661936605ae66f8"),
    _sam(catalogue.SAM_VIT_L, "sam_vit_l_0b3195.pth", 1_249_524_607,
         "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", "0b3195507c641ddb6910d2bb5adee89c"),
    _sam(catalogue.SAM_VIT_H, "sam_vit_h_4b8939.pth", 2_564_550_879,
         "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", "4b8939a88964f0f4ff5f5b2642c598a6"),
    WeightsEntry(
        name=catalogue.MEDSAM_VIT_B, family="sam", architecture=catalogue.MEDSAM_VIT_B, file_name="medsam_vit_b.pth",
        url="https://zenodo.org/records/10689643/files/medsam_vit_b.pth",
        size=375_049_145,
        sha256="34b34b78c1d18cb8c6bf84cf9c00e135d6d6c965699f3c0e31ef1bc9dcb5be74",
        md5="3bb6db55bd0c9ca30b61248bca72f8d6",
        source="Zenodo record 10.5281/zenodo.10689643 (MedSAM ViT-B, Ma et al. 2024); the "
        "bowang-lab/MedSAM README links the same file on Google Drive",
        license="CC-BY-4.0 (Zenodo record)",
    ),
    _sam2(catalogue.SAM2_1_HIERA_TINY),
    _sam2(catalogue.SAM2_1_HIERA_SMALL),
    _sam2(catalogue.SAM2_1_HIERA_BASE_PLUS),
    _sam2(catalogue.SAM2_1_HIERA_LARGE),
    WeightsEntry(
        name=catalogue.MEDSAM2, family="sam2", architecture=catalogue.MEDSAM2, file_name="MedSAM2_latest.pt",
        url="https://huggingface.co/wanglab/MedSAM2/resolve/main/MedSAM2_latest.pt",
        source="bowang-lab/MedSAM2 README and download.sh (MedSAM2_latest.pt, used by medsam2_infer_3D_CT.py "
        "with configs/sam2.1_hiera_t512.yaml)",
        license="Apache-2.0 (bowang-lab/MedSAM2 repository; see the Hugging Face model card)",
        local_only=_NO_HASH,
    ),
)

#: All official checkpoints, by name (read-only).
REGISTRY: Mapping[str, WeightsEntry] = MappingProxyType({e.name: e for e in _ENTRIES})


def get_entry(name: str, registry: Optional[Mapping[str, WeightsEntry]] = None) -> WeightsEntry:
    """Look up ``name`` in ``registry`` (default: :data:`REGISTRY`).

    Raises ValueError for unknown names (listing the known ones). Test-only architectures
    raise ValueError too; :func:`protosam.weights.resolve_checkpoint` explains them better.
    """
    table = REGISTRY if registry is None else registry
    entry = table.get(name)
    if entry is None:
        raise ValueError(f"Unknown model {name!r}. Known downloadable models: {', '.join(table) or '(none)'}.")
    return entry
