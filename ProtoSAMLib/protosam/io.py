"""Reading and writing volumes (NIfTI, NRRD, anything SimpleITK reads) and result files.

Arrays from SimpleITK are indexed ``[k, j, i]`` (slice, row, column), i.e. reversed from the
image's ``(i, j, k)`` index order; direction and spacing stay on the ``sitk.Image``. Every
write goes to a temporary folder inside the destination folder first and is renamed into place, so
a failure (disk full, cancel, crash) never leaves a partial output file.
"""
from __future__ import annotations

import contextlib
import io as _io
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .errors import InputError, ProtoSAMError

logger = logging.getLogger(__name__)

__all__ = [
    "read_volume", "write_labelmap", "check_same_geometry", "slice_axis_for_plane", "atomic_output",
    "save_npz_atomic", "PLANES", "MAX_LABEL_VALUE", "LABELMAP_FORMATS", "labelmap_files", "volume_files",
    "same_file", "check_input_file", "check_labelmap_output", "check_report_folder",
    "check_segment_paths", "check_writable", "check_labelmap_format", "WritePlan",
]

PathLike = Union[str, os.PathLike]
PLANES = ("auto", "axial", "coronal", "sagittal")
# Which physical (LPS) axis a plane's normal follows.
_PLANE_NORMAL = {"sagittal": 0, "coronal": 1, "axial": 2}


def read_volume(path: PathLike, what: str = "image") -> Tuple[np.ndarray, sitk.Image]:
    """Read a 3-D scalar volume -> (``[k, j, i]`` array in its own dtype, the sitk image)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"The {what} {path} is a directory, not an image file.")
    if not path.is_file():
        raise InputError(f"The {what} file does not exist: {path}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"Cannot read the {what} {path}: {str(exc).strip().splitlines()[-1]}") from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"The {what} {path} has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or vector); "
            "convert it to a single-channel (grey-scale) volume first."
        )
    if image.GetDimension() != 3:
        raise InputError(
            f"The {what} {path} is {image.GetDimension()}-D (size {image.GetSize()}); a 3-D volume is needed. "
            "For a 4-D series extract one time point; for a 2-D image use 'protosam slices'."
        )
    return sitk.GetArrayFromImage(image), image


def check_same_geometry(a: sitk.Image, b: sitk.Image, what_a: str, what_b: str, tolerance: float = 1e-4) -> None:
    """Raise InputError unless size, spacing, origin and direction agree."""
    problems = []
    if a.GetSize() != b.GetSize():
        problems.append(f"size {a.GetSize()} vs {b.GetSize()}")
    for name, va, vb in (
        ("spacing", a.GetSpacing(), b.GetSpacing()),
        ("origin", a.GetOrigin(), b.GetOrigin()),
        ("direction", a.GetDirection(), b.GetDirection()),
    ):
        scale = max(1.0, max(abs(v) for v in va))
        if not np.allclose(va, vb, atol=tolerance * scale, rtol=0):
            problems.append(f"{name} {tuple(round(v, 4) for v in va)} vs {tuple(round(v, 4) for v in vb)}")
    if problems:
        raise InputError(
            f"The {what_a} and the {what_b} do not share one voxel grid ({'; '.join(problems)}). "
            f"Resample the {what_b} onto the {what_a} first."
        )


def slice_axis_for_plane(image: sitk.Image, plane: str = "auto") -> int:
    """Array axis (0..2 of the ``[k, j, i]`` array) whose slices lie in ``plane``.

    ``auto`` picks the index axis with the coarsest spacing (thick-slice acquisitions are
    segmented slice by slice), and the axial one when spacing is isotropic.
    """
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {', '.join(PLANES)}, not {plane!r}")
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)  # columns: i, j, k in LPS
    if plane == "auto":
        spacing = np.array(image.GetSpacing())
        if np.ptp(spacing) > 1e-3 * spacing.max():
            return 2 - int(np.argmax(spacing))
        plane = "axial"
    index_axis = int(np.argmax(np.abs(direction[_PLANE_NORMAL[plane], :])))
    return 2 - index_axis


#: Largest label value a written label map can hold (uint16).
MAX_LABEL_VALUE = 65535

#: Output formats that keep a 3-D label map and its full geometry (size, spacing, origin,
#: direction), as SimpleITK writes them; each with the companion files it writes next to the
#: named one (same stem). ``Testing/engine/test_io.py`` round-trips every entry. Others are
#: refused: PNG/TIFF/VTK/GIPL drop slices or the direction matrix, and ITK's DICOM writer can
#: abort the process.
LABELMAP_FORMATS = {
    ".nii.gz": (), ".nii": (), ".nrrd": (), ".mha": (), ".h5": (), ".hdf5": (), ".mnc": (),
    ".nhdr": (".raw.gz",), ".mhd": (".zraw",), ".hdr": (".img",), ".img": (".hdr",),
}


def _format_suffix(path: Path) -> str:
    """The ``LABELMAP_FORMATS`` key ``path`` ends with, or ``''``. Case-sensitive, as ITK's
    writers are (``seg.NII.GZ`` and ``seg.MHA`` fail to write)."""
    name = path.name
    return max((suffix for suffix in LABELMAP_FORMATS if name.endswith(suffix) and len(name) > len(suffix)),
               key=len, default="")


def labelmap_files(path: PathLike) -> List[Path]:
    """Every file :func:`write_labelmap` writes for ``path``: ``path`` itself, then its companions."""
    path = Path(path)
    suffix = _format_suffix(path)
    stem = path.name[: len(path.name) - len(suffix)]
    return [path] + [path.with_name(stem + companion) for companion in LABELMAP_FORMATS.get(suffix, ())]


#: Header keys naming the data file(s) of a detached header: NRRD ``data file:`` (also
#: ``datafile:``) and MetaImage ``ElementDataFile =``. Each takes one file name, ``LIST`` (the
#: names follow, one a line, to the end of the header), or a printf pattern with ``min max step``
#: (``slice%03d.raw 1 40 1``); NRRD's ``LOCAL`` / MetaImage's ``LOCAL`` mean the data follow the
#: header in the same file.
_DATA_FILE_KEY = re.compile(r"^\s*(?:ElementDataFile\s*=|data\s*file\s*:)\s*(.*?)\s*$", re.IGNORECASE)
_HEADER_BYTES = 1 << 20


def _data_file_names(header: Path) -> List[str]:
    """The data file names written in a detached NRRD / MetaImage header (see ``_DATA_FILE_KEY``)."""
    try:
        with open(header, "rb") as stream:
            raw = stream.read(_HEADER_BYTES)
    except OSError:
        return []
    nrrd = raw.startswith(b"NRRD")
    lines = raw.decode("latin-1").splitlines()
    names: List[str] = []
    for position, line in enumerate(lines):
        if nrrd and not line.strip():
            break  # the end of a NRRD header (data may follow)
        match = _DATA_FILE_KEY.match(line)
        if not match:
            continue
        value = match.group(1)
        words = value.split()
        if not words or words[0].upper() == "LOCAL":
            return []
        if words[0].upper() == "LIST":
            for name in lines[position + 1:]:
                if nrrd and not name.strip():
                    break
                if name.strip():
                    names.append(name.strip())
            return names
        if "%" in words[0] and len(words) >= 4:
            try:
                first, last, step = int(words[1]), int(words[2]), int(words[3])
                if step == 0:
                    raise ValueError
                numbers = range(first, last + (1 if step > 0 else -1), step)
                if len(numbers) > 100_000:
                    raise ValueError
                return [words[0] % number for number in numbers]
            except (ValueError, TypeError):
                return []
        return [value]
    return []


def volume_files(path: PathLike) -> List[Path]:
    """The files a volume on disk consists of: ``path`` and, for a detached header, the data
    file(s) it names: ``.nhdr`` / ``.nrrd`` ``data file:`` and ``.mhd`` / ``.mha``
    ``ElementDataFile`` (one name, a ``LIST`` or a printf pattern, relative to the header's
    folder), and the ``.img`` of an Analyze / NIfTI-pair ``.hdr`` (and the ``.hdr`` of an ``.img``)."""
    path = Path(path)
    files = [path]
    name = path.name.lower()
    if name.endswith((".hdr", ".img")):
        files.append(path.with_suffix(".img" if name.endswith(".hdr") else ".hdr"))
    elif name.endswith((".mhd", ".mha", ".nhdr", ".nrrd")):
        for data in _data_file_names(path):
            data_path = Path(data).expanduser()
            files.append(data_path if data_path.is_absolute() else path.parent / data_path)
    return files


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` are one file on disk (links, hard links, ``..``, case-folding file systems)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist: it cannot be the other
        return False


def check_input_file(path: PathLike, option: str) -> Path:
    """``path`` as a Path when it is an existing regular file; else InputError naming ``option``."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path} is a directory; give the image file itself (e.g. {path / 'image.nii.gz'}).")
    if not path.exists():
        raise InputError(f"{option} {path} does not exist.")
    if not path.is_file():
        raise InputError(f"{option} {path} is not a regular file.")
    return path


def _place(path: PathLike) -> str:
    """``path`` with its spelling normalised: absolute, ``..`` and symbolic links resolved (as far
    as the path exists), case-folded where the platform folds case."""
    return os.path.normcase(os.path.realpath(os.path.abspath(os.fspath(path))))


@dataclass
class _Output:
    option: str
    path: Path
    files: List[Path]
    folder: bool
    make_folder: bool


class WritePlan:
    """Every path a command will write and every file it reads, checked together before any
    work: the one decision "this path may be written" of ``segment``, ``slices``, ``batch``,
    ``evaluate`` and ``demo``.

    Register inputs with :meth:`read` (an image, a mask, a manifest; a folder the command reads
    from) and outputs with :meth:`write` (a file, with the companion files it writes) or
    :meth:`write_folder`; :meth:`check` then refuses, with an :class:`InputError` that says
    what to do:

    * an output file that is an input's file: the input itself or a data file its header
      names (:func:`volume_files`), through symbolic or hard links or any other spelling;
    * an output folder that is an input file or a folder the command reads inputs from;
    * two outputs that are one file;
    * an output that is a directory, or whose folder is missing (unless it is to be created)
      or not writable.

    Example::

        plan = WritePlan()
        plan.read("--image", image)
        plan.write("--output", output, labelmap_files(output))
        plan.check()
    """

    def __init__(self):
        self.inputs: List[Tuple[str, Path]] = []
        self.input_folders: List[Tuple[str, Path]] = []
        self.outputs: List[_Output] = []

    def read(self, option: str, path: Optional[PathLike], *, folder: bool = False) -> "WritePlan":
        """An input file (``folder=True``: a folder inputs are read from); None is ignored."""
        if path is not None:
            (self.input_folders if folder else self.inputs).append((option, Path(path)))
        return self

    def write(self, option: str, path: PathLike, files: Optional[Sequence[PathLike]] = None, *,
              make_folder: bool = False) -> "WritePlan":
        """An output file and ``files``, every file writing it creates (default: ``path`` alone);
        ``make_folder``: its folder is created when missing."""
        path = Path(path)
        self.outputs.append(_Output(option, path, [Path(f) for f in (files or [path])], False, make_folder))
        return self

    def write_folder(self, option: str, path: PathLike, files: Sequence[PathLike] = ()) -> "WritePlan":
        """An output folder (created when missing) and the files the command writes in it."""
        path = Path(path)
        self.outputs.append(_Output(option, path, [Path(f) for f in files], True, True))
        return self

    def check(self) -> None:
        """Raise InputError for the first path that may not be written (see the class)."""
        for output in self.outputs:
            _check_place(output)
        self.check_collisions()

    def check_collisions(self) -> None:
        """Only the checks between paths: no output is an input, no two outputs are one file.
        Linear in the number of paths (a cohort of thousands of rows is checked in a blink)."""
        input_files: Dict[object, Tuple[str, Path]] = {}
        for option, path in self.inputs:
            for data in volume_files(path):
                for key in _identities(data):
                    input_files.setdefault(key, (option, data))
        input_folders: Dict[object, Tuple[str, Path]] = {}
        for option, folder in self.input_folders:
            for key in _identities(folder):
                input_folders.setdefault(key, (option, folder))
        written: Dict[object, Tuple[_Output, Path]] = {}
        for output in self.outputs:
            keys = _identities(output.path)
            if output.folder:
                for key in keys:
                    if key in input_files:
                        option, _ = input_files[key]
                        raise InputError(f"{output.option} {output.path} is the file of {option}; give a new folder "
                                         "for the results.")
                    if key in input_folders:
                        option, _ = input_folders[key]
                        raise InputError(
                            f"{output.option} {output.path} is the folder of {option}: the results would be mixed "
                            "with your data. Give another folder for the results.")
            for file in output.files:
                file_keys = _identities(file)
                for key in file_keys:
                    if key in input_files:
                        option, input_file = input_files[key]
                        what = "is" if file == output.path else f"would write {file.name}, which is"
                        raise InputError(
                            f"{output.option} {output.path} {what} the file of {option} ({input_file}): writing it "
                            "would destroy your input. Choose another output file name.")
                for key in file_keys:
                    other, _ = written.get(key, (output, file))
                    if other is not output:
                        raise InputError(
                            f"{output.option} {output.path} and {other.option} {other.path} both write {file}: "
                            "give each its own file name.")
                for key in file_keys:
                    written.setdefault(key, (output, file))


def _identities(path: PathLike) -> List[object]:
    """What makes ``path`` one file: its normalised spelling (:func:`_place`) and, when it
    exists, its (device, inode)."""
    keys: List[object] = [_place(path)]
    try:
        status = os.stat(path)
        keys.append((status.st_dev, status.st_ino))
    except OSError:
        pass
    return keys


def _check_place(output: _Output) -> None:
    option, path = output.option, output.path
    if output.folder:
        check_report_folder(path, option)
        return
    if path.is_dir():
        raise InputError(f"{option} {path} is a directory; give a file name inside it, e.g. {path / 'seg.nii.gz'}.")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        if not output.make_folder:
            raise InputError(f"The folder of {option} {path} does not exist: create {folder} first.")
        existing = _nearest_existing(folder)
        if not existing.is_dir():
            raise InputError(f"The folder of {option} {path} cannot be made: {existing} is a file, not a folder.")
        folder = existing
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"The folder of {option} {path} is not writable: choose another output path.")


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (where a missing folder would be created)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: PathLike, option: str, inputs: Mapping[str, Optional[PathLike]],
                   files: Optional[Sequence[PathLike]] = None) -> Path:
    """A :class:`WritePlan` of one output file ``path`` (writing ``files``) and ``inputs``
    (command-line name -> file): InputError unless ``path`` may be written."""
    plan = WritePlan()
    for input_option, input_path in inputs.items():
        plan.read(input_option, input_path)
    plan.write(option, path, files)
    plan.check()
    return Path(path)


def check_labelmap_output(path: PathLike, option: str, inputs: Mapping[str, PathLike]) -> Path:
    """:func:`check_writable` for a label map, plus: its format keeps a 3-D volume and its geometry."""
    check_labelmap_format(path, option)
    return check_writable(path, option, inputs, labelmap_files(path))


def check_labelmap_format(path: PathLike, option: str) -> Path:
    """InputError unless ``path`` ends with a format that keeps a 3-D label map and its geometry."""
    path = Path(path)
    if not path.is_dir() and not _format_suffix(path):
        raise InputError(
            f"{option} {path}: cannot write a 3-D label map with its geometry in this format; "
            f"end the name with one of {', '.join(LABELMAP_FORMATS)}."
        )
    return path


def check_report_folder(path: PathLike, option: str, output: Optional[PathLike] = None) -> Path:
    """Check that ``path`` is, or can be created as, a folder for report files (not ``output``)."""
    path = Path(path)
    if output is not None and os.path.abspath(path) == os.path.abspath(output):
        raise InputError(f"{option} {path} is the output file; give a folder for the report.")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise InputError(f"{option} {path}: {existing} is a file, not a folder; give a folder for the report.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: {existing} is not writable; choose another folder for the report.")
    return path


def check_segment_paths(image: PathLike, support_mask: PathLike, output: PathLike,
                        support_image: Optional[PathLike] = None, report: Optional[PathLike] = None) -> None:
    """Every file check of ``protosam segment``, done before anything is read or any model loaded.

    Inputs are existing files (a directory is named as such); the output is a label-map format
    that keeps the geometry, in an existing writable folder, and none of the files it writes is
    an input's file; the report folder can be made.
    """
    inputs = {"--image": image, "--support-image": support_image, "--support-mask": support_mask}
    for option, value in inputs.items():
        if value is not None:
            check_input_file(value, option)
    check_labelmap_format(output, "--output")
    plan = WritePlan()
    for option, value in inputs.items():
        plan.read(option, value)
    plan.write("--output", output, labelmap_files(output))
    if report is not None:
        check_report_folder(report, "--report", output)
        plan.write_folder("--report", report)
    plan.check()


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Yield a path to write ``path`` at, in a temporary folder beside it; move the result into
    place on success.

    Whatever is written into the temporary folder is moved next to ``path`` under the same
    names: companion files first (e.g. the ``.raw.gz`` of an ``.nhdr``), ``path`` itself last,
    so a header never points at a missing or temporary data file. Each move is an atomic
    rename; the temporary folder is removed on any failure, and the destination is never
    half-written. Files get the mode the user's umask gives new files.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ProtoSAMError(f"The output {path} is a folder; give a file name inside it.")
    if not folder.is_dir():
        raise ProtoSAMError(f"Output folder does not exist: {folder}. Create it first.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ProtoSAMError(f"Output folder is not writable: {folder}. Choose another output path.")
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=folder))
    try:
        temporary = staging / path.name
        yield temporary
        if not temporary.exists():
            raise ProtoSAMError(f"Nothing was written for {path}.")
        for written in sorted(staging.iterdir()):
            if written.name != path.name:
                os.replace(written, folder / written.name)
        os.replace(temporary, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_labelmap(labels: np.ndarray, reference: sitk.Image, path: PathLike) -> None:
    """Write a ``[k, j, i]`` integer label array with ``reference``'s exact geometry, atomically.

    Written as uint8 when every label fits, else uint16; labels must lie in 0..65535.
    """
    if labels.size and (labels.min() < 0 or labels.max() > MAX_LABEL_VALUE):
        raise InputError(
            f"Label values must lie in 0..{MAX_LABEL_VALUE} to be written; got {labels.min()}..{labels.max()}."
        )
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    image = sitk.GetImageFromArray(labels.astype(dtype, copy=False))
    image.CopyInformation(reference)
    with atomic_output(path) as temporary:
        try:
            sitk.WriteImage(image, str(temporary), useCompression=True)
        except RuntimeError as exc:
            raise ProtoSAMError(f"Could not write {path}: {str(exc).strip().splitlines()[-1]}") from exc


def save_npz_atomic(path: PathLike, **arrays: np.ndarray) -> None:
    """``np.savez_compressed`` into ``path`` exactly (no suffix added), atomically."""
    buffer = _io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    with atomic_output(path) as temporary:
        temporary.write_bytes(buffer.getvalue())
