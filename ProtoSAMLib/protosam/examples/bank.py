"""The example bank: a folder of support slices that outlives a session (see docs/cohorts.md).

Layout of a bank folder::

    index.json                  {"version": 1, "salt": "...", "examples": [ {...}, ... ]}
    examples/<id>.npz           image (float32 [H, W], as the engine normalised it), mask (uint8)
    features/<key>/<id>.npy     cached encoder features of an example, per encoder setting
    features/<key>/key.json     what <key> stands for (encoder, input size, attention, precision)
    .lock                       the writers' lock file (empty)

Only what the index lists exists for a reader. Every change takes the lock, writes its files
under temporary names, and publishes them with ``os.replace`` (the index last), so a writer
killed at any point leaves the previous index intact and two writers never lose each other's
entries. Files left behind by a killed writer are removed by the next writer.

No patient name, ID, path or date is stored. The source volume is known only by a one-way
hash salted with the bank's own random salt (``volume_hash``): within a bank it tells which
examples came from one volume; it cannot be computed without the volume itself. The images
are patient data all the same: share a bank as you would share the scans.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
import tempfile
import uuid
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import InputError

__all__ = ["ExampleBank", "Example", "INDEX_VERSION", "feature_setting", "encode_example"]

INDEX_NAME = "index.json"
LOCK_NAME = ".lock"
EXAMPLES_DIR = "examples"
FEATURES_DIR = "features"
INDEX_VERSION = 1
_TEMPORARY_PREFIX = ".writing-"

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Example:
    """One bank entry (its arrays are read with :meth:`ExampleBank.arrays`).

    ``plane``: "axial", "coronal" or "sagittal" when the slice was taken in the canonical
    order of :mod:`protosam.orientation` (files with geometry), "" for arrays as stored, then
    ``axis`` names the slicing axis; ``slice_index`` of ``slice_count``: its place in its
    volume along that axis; ``volume_hash``: the salted one-way hash of its source volume;
    ``terminology``: the Slicer terminology string when one was given; ``modality``: the
    intensity preprocessing its image went through ("ct", "mri" or "none")."""

    id: str
    structure: str
    slice_index: int
    slice_count: int
    shape: Tuple[int, int]
    volume_hash: str
    plane: str = ""
    axis: Optional[int] = None
    terminology: Optional[str] = None
    modality: str = ""

    @property
    def relative_position(self) -> float:
        """0 at the first slice of its volume, 1 at the last."""
        return self.slice_index / max(self.slice_count - 1, 1)

    def to_json(self) -> dict:
        entry = asdict(self)
        entry["shape"] = list(self.shape)
        return entry

    @classmethod
    def from_json(cls, entry: dict) -> "Example":
        fields = {name: entry[name] for name in cls.__dataclass_fields__ if name in entry}
        fields["shape"] = tuple(fields["shape"])
        return cls(**fields)


def feature_setting(engine) -> Dict[str, object]:
    """What an encoder's features depend on, as cached features are keyed: the DINOv2 model
    and its weights (a custom checkpoint by size and modification time, never its path), the
    encoder input size, the attention setting and the precision. Features computed on a GPU
    and a CPU under one setting agree to float tolerance and share the key."""
    checkpoint = engine.models.dinov2_checkpoint
    weights = "official"
    if checkpoint:
        status = os.stat(checkpoint)
        weights = hashlib.sha256(f"{status.st_size}:{status.st_mtime_ns}".encode()).hexdigest()[:16]
    dtype = getattr(engine, "autocast_dtype", None)
    return {
        "encoder": engine.models.dinov2,
        "weights": weights,
        "input_size": int(engine.encoder_input_size),
        "fused_attention": bool(getattr(engine, "dinov2_fused_attention", False)),
        "precision": "fp32" if dtype is None else str(dtype).replace("torch.", ""),
    }


def encode_example(engine, image: np.ndarray) -> np.ndarray:
    """An example's encoder features ``[C, g, g]`` float32 on the host: its slice encoded alone,
    as a support slice is (the values the bank caches)."""
    return engine.encode(engine.to_model_input(np.asarray(image, np.float32)[None]))[0].float().cpu().numpy()


def _setting_key(setting: Dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:20]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes (released when the holder dies)."""
    handle = open(path, "a+b")
    try:
        if os.name == "nt":  # pragma: no cover - exercised on Windows only
            import msvcrt

            handle.seek(0)
            while True:
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    continue
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        handle.close()  # closing releases the lock on every platform


def _write_atomically(path: Path, data: bytes) -> None:
    """``data`` into ``path``: a temporary file in the same folder, flushed to disk, renamed."""
    descriptor, temporary = tempfile.mkstemp(prefix=_TEMPORARY_PREFIX, dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


class ExampleBank:
    """A folder of examples: support slices with their masks, shared by runs and processes.

    ``ExampleBank(folder)`` opens the bank in ``folder``, or makes one there when the folder
    is missing or empty; any other folder is refused (a bank never mixes with other files).
    Adding, removing and caching features lock the bank and publish atomically, so several
    processes may use one bank at once.

    Example::

        bank = ExampleBank("liver-bank")
        bank.add("liver", image_slice, mask_slice, slice_index=40, slice_count=90,
                 volume_hash=bank.volume_hash(normalised_volume), plane="axial")
        bank.structures()                  # {"liver": 1}
        supports = bank.supports("liver", plane="axial", engine=engine)   # for segment_volume
    """

    def __init__(self, folder: PathLike, *, create: bool = True):
        self.folder = Path(folder)
        self.index_path = self.folder / INDEX_NAME
        if self.index_path.is_file():
            self._read_index()
            return
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"The example bank {self.folder} is a file; give a folder.")
        if self.folder.is_dir() and any(self.folder.iterdir()):
            raise InputError(f"{self.folder} is not an example bank (it has no {INDEX_NAME}) and is not empty: give an "
                             "empty or new folder for a bank, so that it never mixes with other files.")
        if not create:
            raise InputError(f"There is no example bank in {self.folder}: add examples to make one.")
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._lock():
            if not self.index_path.is_file():
                self._write_index({"version": INDEX_VERSION, "salt": secrets.token_hex(16), "examples": []})

    # ------------------------------------------------------------------ reading
    def _read_index(self) -> dict:
        try:
            index = json.loads(self.index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise InputError(f"The example bank index {self.index_path} cannot be read: {error}") from error
        version = index.get("version") if isinstance(index, dict) else None
        if not isinstance(version, int):
            raise InputError(f"{self.index_path} is not an example bank index (no version).")
        if version > INDEX_VERSION:
            raise InputError(f"The example bank {self.folder} was written by a newer ProtoSAM (index version "
                             f"{version}; this one reads up to {INDEX_VERSION}): update ProtoSAM.")
        return index

    def list(self, structure: Optional[str] = None) -> List[Example]:
        """The examples, in the order they were added (of ``structure`` only, when given)."""
        examples = [Example.from_json(entry) for entry in self._read_index()["examples"]]
        return [e for e in examples if structure is None or e.structure == structure]

    def structures(self) -> Dict[str, int]:
        """structure name -> number of examples, in the order the structures were first added."""
        counts: Dict[str, int] = {}
        for example in self.list():
            counts[example.structure] = counts.get(example.structure, 0) + 1
        return counts

    def arrays(self, example: Union[Example, str]) -> Tuple[np.ndarray, np.ndarray]:
        """(image float32 [H, W], mask bool [H, W]) of an example."""
        example_id = example.id if isinstance(example, Example) else example
        with np.load(self.folder / EXAMPLES_DIR / f"{example_id}.npz", allow_pickle=False) as data:
            return data["image"].astype(np.float32), data["mask"].astype(bool)

    def volume_hash(self, volume: np.ndarray) -> str:
        """The salted one-way hash of a volume's content (shape, dtype and voxels) for this bank."""
        volume = np.ascontiguousarray(volume)
        digest = hashlib.sha256(bytes.fromhex(self._read_index()["salt"]))
        digest.update(repr((volume.shape, volume.dtype.str)).encode())
        digest.update(volume.data)
        return digest.hexdigest()

    # ------------------------------------------------------------------ writing
    def _lock(self):
        return _locked(self.folder / LOCK_NAME)

    def _write_index(self, index: dict) -> None:
        _write_atomically(self.index_path, json.dumps(index, indent=1).encode("utf-8"))

    def add(self, structure: str, image: np.ndarray, mask: np.ndarray, *, slice_index: int, slice_count: int,
            volume_hash: str, plane: str = "", axis: Optional[int] = None, terminology: Optional[str] = None,
            modality: str = "") -> Example:
        """Add one example and return it: ``image`` the slice as the engine normalised it,
        ``mask`` the whole structure on that slice (a partial label such as a scribble is not
        an example: it would teach that the rest of the structure is background)."""
        return self.add_many([dict(structure=structure, image=image, mask=mask, slice_index=slice_index,
                                   slice_count=slice_count, volume_hash=volume_hash, plane=plane, axis=axis,
                                   terminology=terminology, modality=modality)])[0]

    def add_slices(self, structure: str, volume: np.ndarray, mask: np.ndarray, slices: Iterable[int], *,
                   plane: str = "", axis: Optional[int] = None, terminology: Optional[str] = None,
                   modality: str = "") -> List[Example]:
        """Add slices of one volume in one step: ``volume`` the normalised volume slice-first
        ``[N, H, W]`` (its slicing order: canonical for ``plane``, or as stored along
        ``axis``), ``mask`` the structure's ``[N, H, W]`` mask; every slice must show it."""
        volume = np.asarray(volume, np.float32)
        mask = np.asarray(mask)
        if volume.ndim != 3 or mask.shape != volume.shape:
            raise InputError(f"add_slices needs a 3-D volume and a mask of its shape; got {volume.shape} and "
                             f"{mask.shape}.")
        source = self.volume_hash(volume)
        return self.add_many([
            dict(structure=structure, image=volume[int(k)], mask=mask[int(k)], slice_index=int(k),
                 slice_count=volume.shape[0], volume_hash=source, plane=plane, axis=axis, terminology=terminology,
                 modality=modality)
            for k in slices])

    def add_many(self, entries: Sequence[dict]) -> List[Example]:
        """Add several examples (dicts of :meth:`add`'s arguments) as one change: all or none."""
        prepared = [self._prepare(entry) for entry in entries]
        if not prepared:
            return []
        with self._lock():
            index = self._read_index()
            self._tidy(index)
            (self.folder / EXAMPLES_DIR).mkdir(exist_ok=True)
            for example, image, mask in prepared:
                _write_atomically(self.folder / EXAMPLES_DIR / f"{example.id}.npz", _npz_bytes(image=image, mask=mask))
            index["examples"].extend(example.to_json() for example, _, _ in prepared)
            self._write_index(index)  # the entries appear here, all at once
        return [example for example, _, _ in prepared]

    def _prepare(self, entry: dict) -> Tuple[Example, np.ndarray, np.ndarray]:
        structure = entry["structure"]
        if not isinstance(structure, str) or not structure.strip():
            raise InputError("An example needs a structure name (e.g. 'liver').")
        image = np.asarray(entry["image"], np.float32)
        mask = np.asarray(entry["mask"])
        if image.ndim != 2 or mask.shape != image.shape:
            raise InputError(f"An example is one 2-D slice and its mask of the same shape; got {image.shape} and "
                             f"{mask.shape}.")
        if not np.isfinite(image).all():
            raise InputError("An example's image has NaN or infinite values.")
        if not mask.any():
            raise InputError(f"The mask of the '{structure}' example on slice {entry['slice_index']} is empty: an "
                             "example shows the whole structure on its slice.")
        index, count = int(entry["slice_index"]), int(entry["slice_count"])
        if not 0 <= index < count:
            raise InputError(f"Slice {index} is outside its volume's {count} slices.")
        plane = entry.get("plane") or ""
        if plane not in ("", "axial", "coronal", "sagittal"):
            raise InputError(f"Unknown plane {plane!r}: axial, coronal, sagittal, or '' for arrays as stored.")
        axis = entry.get("axis")
        if plane == "" and axis not in (0, 1, 2):
            raise InputError("An example of arrays as stored needs its slicing axis (0, 1 or 2).")
        example = Example(
            id=uuid.uuid4().hex, structure=structure.strip(), slice_index=index, slice_count=count,
            shape=tuple(int(n) for n in image.shape), volume_hash=str(entry["volume_hash"]), plane=plane,
            axis=None if plane else int(axis), terminology=entry.get("terminology") or None,
            modality=entry.get("modality") or "")
        return example, image, (mask != 0).astype(np.uint8)

    def remove(self, ids: Iterable[str] = (), *, structure: Optional[str] = None) -> List[Example]:
        """Remove the examples with these ids (and every example of ``structure``, when given);
        returns the removed ones. Unknown ids raise InputError and remove nothing."""
        ids = set(ids)
        with self._lock():
            index = self._read_index()
            known = {entry["id"] for entry in index["examples"]}
            unknown = sorted(ids - known)
            if unknown:
                raise InputError(f"No example with id {', '.join(unknown)} in {self.folder}: 'protosam examples "
                                 "list' shows the ids.")
            removed = [Example.from_json(e) for e in index["examples"]
                       if e["id"] in ids or (structure is not None and e["structure"] == structure)]
            gone = {example.id for example in removed}
            index["examples"] = [e for e in index["examples"] if e["id"] not in gone]
            self._write_index(index)  # from here on they are gone for every reader
            self._tidy(index)
        return removed

    def _tidy(self, index: dict) -> None:
        """Under the lock: delete what no index entry names (a killed writer's files)."""
        listed = {entry["id"] for entry in index["examples"]}
        folders = [self.folder, self.folder / EXAMPLES_DIR]
        features = self.folder / FEATURES_DIR
        if features.is_dir():
            folders += [path for path in features.iterdir() if path.is_dir()]
        for folder in folders:
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                stale = path.name.startswith(_TEMPORARY_PREFIX)
                if folder != self.folder and path.suffix in (".npz", ".npy") and path.stem not in listed:
                    stale = True
                if stale and path.is_file():
                    with contextlib.suppress(OSError):
                        path.unlink()

    # ------------------------------------------------------------------ supports for the engine
    def supports(self, structure: str, *, plane: str = "", axis: Optional[int] = None, engine=None,
                 features=None):
        """The examples of ``structure`` taken in ``plane`` (or as stored along ``axis``) as
        :class:`protosam.propagation.SupportExample` for ``segment_volume``'s ``examples``.

        With ``engine`` each carries its encoder features, read from the bank's cache for the
        engine's setting (:func:`feature_setting`) or computed once now and stored there, so a
        run from the bank encodes only the volume it segments. ``features`` (instead of
        ``engine``): a function from a list of :class:`Example` to their features, for callers
        whose encoder runs elsewhere (the Ray driver: :meth:`cached_features` and
        :meth:`store_features` around a worker's encoding)."""
        from ..propagation import SupportExample

        chosen = [e for e in self.list(structure) if e.plane == (plane or "") and (plane or e.axis == axis)]
        if features is None and engine is not None:
            features = lambda examples: self.features(examples, engine)  # noqa: E731
        values = features(chosen) if features is not None and chosen else [None] * len(chosen)
        supports = []
        for example, feature in zip(chosen, values):
            image, mask = self.arrays(example)
            supports.append(SupportExample(image, mask, example.slice_index, example.slice_count, feature))
        return supports

    def cached_features(self, examples: Sequence[Example], setting: Dict[str, object]) -> Dict[str, np.ndarray]:
        """example id -> features ``[C, g, g]`` float32 cached for ``setting``
        (:func:`feature_setting`); examples without cached features are left out."""
        folder = self.folder / FEATURES_DIR / _setting_key(setting)
        found: Dict[str, np.ndarray] = {}
        for example in examples:
            try:
                found[example.id] = np.load(folder / f"{example.id}.npy", allow_pickle=False)
            except (OSError, ValueError):
                continue
        return found

    def store_features(self, setting: Dict[str, object], computed: Dict[str, np.ndarray]) -> None:
        """Cache features (example id -> ``[C, g, g]`` float32) computed under ``setting``;
        those of examples removed meanwhile are not kept."""
        if not computed:
            return
        folder = self.folder / FEATURES_DIR / _setting_key(setting)
        with self._lock():
            listed = {entry["id"] for entry in self._read_index()["examples"]}
            folder.mkdir(parents=True, exist_ok=True)
            key_file = folder / "key.json"
            if not key_file.is_file():
                _write_atomically(key_file, json.dumps(setting, indent=1).encode("utf-8"))
            for example_id, value in computed.items():
                if example_id in listed:  # removed meanwhile: used for this run, not kept
                    buffer = io.BytesIO()
                    np.save(buffer, np.asarray(value, np.float32))
                    _write_atomically(folder / f"{example_id}.npy", buffer.getvalue())

    def features(self, examples: Sequence[Example], engine) -> List[np.ndarray]:
        """Encoder features ``[C, g, g]`` float32 of ``examples`` for ``engine``: cached ones read,
        missing ones encoded (:func:`encode_example`) and stored."""
        setting = feature_setting(engine)
        found = self.cached_features(examples, setting)
        computed = {example.id: encode_example(engine, self.arrays(example)[0])
                    for example in examples if example.id not in found}
        self.store_features(setting, computed)
        found.update(computed)
        return [found[example.id] for example in examples]

    # ------------------------------------------------------------------ export
    def export(self, destination: PathLike, *, structures: Optional[Sequence[str]] = None) -> Path:
        """Copy the bank (or its ``structures``) to a new bank: a folder, or a ``.zip`` file of
        one. Cached features are left out (they are rebuilt where the copy is used); the salt is
        kept, so the volume hashes stay comparable. The copy appears whole or not at all."""
        destination = Path(destination)
        if destination.exists() and not (destination.is_dir() and not any(destination.iterdir())):
            raise InputError(f"{destination} already exists: give a new folder or .zip file for the export.")
        with self._lock():  # a consistent snapshot: no writer changes the bank meanwhile
            index = self._read_index()
            if structures is not None:
                wanted = set(structures)
                missing = wanted - {entry["structure"] for entry in index["examples"]}
                if missing:
                    raise InputError(f"The bank has no structure {', '.join(sorted(missing))}.")
                index["examples"] = [e for e in index["examples"] if e["structure"] in wanted]
            files = [(f"{EXAMPLES_DIR}/{e['id']}.npz", self.folder / EXAMPLES_DIR / f"{e['id']}.npz")
                     for e in index["examples"]]
            text = json.dumps(index, indent=1).encode("utf-8")
            if destination.suffix.lower() == ".zip":
                descriptor, temporary = tempfile.mkstemp(prefix=_TEMPORARY_PREFIX, dir=destination.parent)
                os.close(descriptor)
                try:
                    with zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as archive:
                        archive.writestr(INDEX_NAME, text)
                        for name, path in files:
                            archive.write(path, name)
                    os.replace(temporary, destination)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(temporary)
                    raise
                return destination
            destination.parent.mkdir(parents=True, exist_ok=True)
            temporary = Path(tempfile.mkdtemp(prefix=_TEMPORARY_PREFIX, dir=destination.parent))
            try:
                (temporary / EXAMPLES_DIR).mkdir()
                for name, path in files:
                    shutil.copyfile(path, temporary / name)
                (temporary / INDEX_NAME).write_bytes(text)
                if destination.is_dir():
                    destination.rmdir()  # empty (checked above): replaced by the finished copy
                os.replace(temporary, destination)
            except BaseException:
                shutil.rmtree(temporary, ignore_errors=True)
                raise
            return destination
