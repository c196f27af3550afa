"""Interactive evaluation tracks: ProtoSAM driven by the CVPR 2025 challenge's simulated user.

Every interaction goes through :class:`protosam.session.Session`, the API behind the Slicer
module, exactly as a user's would: a box with :meth:`Session.box`, a click with
:meth:`Session.correct`, then :meth:`Session.update` to propagate the corrected slice through
the volume (the module's "Update"). The simulated user and the scores are in
:mod:`.click_simulation` and :mod:`.interactive_metrics`.

Tracks (``protosam evaluate --interactive TRACK``):

* ``cvpr25``: the challenge's protocol. Step 0 draws the case's box on its ``z_mid`` slice
  (boxes from the npz, or made from the labels as ``get_boxes.py`` does) and propagates it
  within ``z_min..z_max``; a case without boxes scores 0 there and starts from an empty
  prediction. Steps 1..5: one click per class on the largest error, then an update.
* ``one-shot``: step 0 is the ground-truth mask of the class on its ``z_mid`` slice of the
  same volume, propagated through the whole volume (no box, no slice range); then the same
  five clicks. (The ``realistic`` protocol instead takes its support from another scan.)
* ``cohort``: the cases in order, as a user working through a cohort with an example bank
  (:class:`protosam.examples.ExampleBank`). The first volume starts like ``one-shot`` (one
  example) unless the bank already holds examples of the class; every later volume starts from
  the bank alone (``Session.start(..., examples=bank.supports(...))``, as a user propagating
  from a bank does), then gets the five clicks, and its painted and corrected slices, with
  their final masks, are added to the bank (``add_session_slices``). Reported against the
  volume index.

Classes are segmented as separate structures (as segments in Slicer); the clicks of a class
are placed on its own mask. The challenge scores one label map; with non-overlapping masks
(every fixture and track here) the numbers are the same.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from .click_simulation import ChallengeBox, challenge_boxes, median_foreground_slice, simulate_click
from .interactive_metrics import CHALLENGE_CLICKS, NSD_MIN_DSC, click_auc, dice, surface_dice, time_budget

logger = logging.getLogger(__name__)

TRACKS = ("cvpr25", "one-shot", "cohort")


@dataclass
class InteractiveCase:
    """One volume: ``image`` and ``labels`` indexed ``(z, y, x)`` (slice axis first), voxel
    ``spacing`` in mm in the same order, the challenge's ``boxes`` per class if the case has
    them, and the ``modality`` the report groups by."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    spacing: Tuple[float, float, float]
    boxes: Optional[Dict[int, ChallengeBox]] = None
    modality: str = "unknown"
    #: An npz case without boxes is a challenge case that starts without a box; an image/label
    #: pair has no stored boxes, so the cvpr25 track makes them from its labels.
    from_npz: bool = False

    @property
    def classes(self) -> List[int]:
        return [int(c) for c in np.unique(self.labels) if c != 0]


def load_npz_case(path: Path, *, modality: Optional[str] = None) -> InteractiveCase:
    """A case in the challenge's npz format: ``imgs``, ``gts``, ``spacing`` and optionally
    ``boxes`` (a list of per-class dicts in increasing class order). The modality is the npz
    name's prefix before the first underscore (e.g. ``CT_``, ``MR_``) unless given."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=True) as data:
            missing = [key for key in ("imgs", "gts", "spacing") if key not in data]
            if missing:
                raise InputError(f"{path} lacks {', '.join(missing)}: a challenge case has imgs, gts and spacing.")
            image, labels, spacing = data["imgs"], data["gts"], data["spacing"]
            entries = list(data["boxes"]) if "boxes" in data else None
    except (OSError, ValueError) as error:
        raise InputError(f"Cannot read the case {path}: {error}") from None
    if image.ndim != 3 or labels.shape != image.shape:
        raise InputError(f"{path}: imgs and gts must be 3-D volumes of one shape, got {image.shape} and {labels.shape}. "
                         "(2-D and RGB cases of the challenge are not interactive 3-D cases.)")
    case = InteractiveCase(path.stem, image, labels.astype(np.int32), _spacing(spacing, path), None,
                           modality or path.stem.split("_")[0], from_npz=True)
    if entries is not None:
        classes = case.classes
        if len(entries) != len(classes):
            raise InputError(f"{path}: {len(entries)} boxes for {len(classes)} classes; the challenge stores one "
                             "box per class, in increasing class order.")
        case.boxes = {c: ChallengeBox.from_json(e) for c, e in zip(classes, entries)}
    return case


def load_pair_case(name: str, image_path: Path, label_path: Path, *, modality: str = "unknown") -> InteractiveCase:
    """A case from an image and a label volume (NIfTI, NRRD, MHA...); no boxes (they are made
    from the labels when the track needs them)."""
    from .datasets import ScanFiles, read_scan

    scan = read_scan(ScanFiles(name, Path(image_path), Path(label_path)))
    return InteractiveCase(name, scan.image, scan.label, tuple(float(s) for s in scan.spacing_kji), None, modality)


def discover_cases(data: Path, *, layout: str = "auto", modality: Optional[str] = None) -> List[InteractiveCase]:
    """Every case of ``data``: a folder of challenge npz files, one npz file, or image/label
    pairs in the layouts of ``protosam evaluate --data`` (NIfTI/NRRD/MHA)."""
    data = Path(data).expanduser()
    if data.is_file() and data.suffix == ".npz":
        return [load_npz_case(data, modality=modality)]
    if not data.is_dir():
        raise InputError(f"--data {data} is neither a folder nor a challenge .npz case.")
    npz = sorted(p for p in data.glob("*.npz") if not p.name.endswith("_predictions.npz"))
    if npz:
        return [load_npz_case(p, modality=modality) for p in npz]
    from .datasets import discover_scans

    return [load_pair_case(s.scan_id, s.image, s.label, modality=modality or "unknown")
            for s in discover_scans(data, layout)]


def _spacing(value, where) -> Tuple[float, float, float]:
    spacing = np.asarray(value, dtype=float).reshape(-1)
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise InputError(f"{where}: spacing must be three positive numbers (mm per array axis), got {value!r}.")
    return tuple(float(s) for s in spacing)


# ---------------------------------------------------------------------------- results
@dataclass
class StepRecord:
    """One class of one case after one step. ``step`` 0 is the initial interaction (box or
    mask), 1..5 the clicks. ``click_zyx`` and ``click_positive`` are empty when no click was
    placed (perfect prediction, or step 0)."""

    track: str
    case: str
    modality: str
    volume_index: int
    class_value: int
    class_name: str
    step: int
    interaction: str
    click_zyx: str
    click_positive: Optional[bool]
    dsc: float
    nsd: float
    nsd_raw: float
    seconds: float
    note: str = ""


@dataclass
class ClassSummary:
    track: str
    case: str
    modality: str
    volume_index: int
    class_value: int
    class_name: str
    dsc_auc: float
    nsd_auc: float
    dsc_final: float
    nsd_final: float
    dsc_initial: float
    seconds_total: float


@dataclass
class CaseSummary:
    """The challenge's per-case row: scores are means over classes per step (NSD 0 when that
    step's mean DSC is at most 0.2), AUCs over the five click steps."""

    track: str
    case: str
    modality: str
    volume_index: int
    classes: int
    dsc: List[float]
    nsd: List[float]
    dsc_auc: float
    nsd_auc: float
    dsc_final: float
    nsd_final: float
    seconds_per_step: List[float]
    seconds_total: float
    budget_seconds: float
    within_budget: bool


@dataclass
class InteractiveResults:
    steps: List[StepRecord] = field(default_factory=list)
    classes: List[ClassSummary] = field(default_factory=list)
    cases: List[CaseSummary] = field(default_factory=list)
    meta: Dict[str, object] = field(default_factory=dict)

    def extend(self, other: "InteractiveResults") -> None:
        self.steps += other.steps
        self.classes += other.classes
        self.cases += other.cases


# ---------------------------------------------------------------------------- the runner
@dataclass
class TrackOptions:
    track: str
    clicks: int = CHALLENGE_CLICKS
    box_seed: Optional[int] = 2025
    modality: str = "auto"  # intensity preprocessing of the engine (see segment_volume)
    class_names: Dict[int, str] = field(default_factory=dict)
    classes: Optional[List[int]] = None


def _class_name(options: TrackOptions, value: int) -> str:
    return options.class_names.get(int(value), str(int(value)))


def _timed(call: Callable[[], object]) -> Tuple[object, float]:
    start = time.perf_counter()
    value = call()
    return value, time.perf_counter() - start


class _ClassRun:
    """One class of one case in its own session, as a user would segment one structure."""

    def __init__(self, engine, case: InteractiveCase, value: int, options: TrackOptions,
                 slice_range: Optional[Tuple[int, int]] = None):
        from ..session import Session

        self.case, self.value, self.options = case, value, options
        self.truth = case.labels == value
        # The session's own encoder cache (the default budget): every update and click after
        # the first step reuses the slices' encodings, as in the module. (The engine's shared
        # cache is off unless the engine was made with one.)
        self.session = Session(engine, case.image, modality=options.modality, slice_range=slice_range)
        self.started = False
        self.prediction = np.zeros(case.labels.shape, np.uint8)
        self.clicked_slices: List[int] = []

    def _update(self) -> str:
        try:
            self.prediction = self.session.update(self.value)
            return ""
        except InputError as error:
            # No usable support (e.g. every fixed slice empty): the prediction stays as the
            # slices are, as in the module after a refused update.
            self.prediction = self.session.mask(self.value)
            return f"update refused: {error}"

    def box(self, box: ChallengeBox) -> str:
        self.session.adopt(self.value, np.zeros(self.case.labels.shape, np.uint8), [])
        self.started = True  # an adopted (empty) structure takes boxes and clicks
        self.session.box(self.value, box.z_mid, box.xyxy())
        return self._update()

    def start_from_mask(self, slice_index: int) -> str:
        painted = np.zeros(self.truth.shape, np.uint8)
        painted[slice_index] = self.truth[slice_index]
        self.prediction = self.session.start({self.value: painted}, support_slices={self.value: [slice_index]})[self.value]
        self.started = True
        return ""

    def start_from_examples(self, supports) -> str:
        self.prediction = self.session.start({}, examples={self.value: supports})[self.value]
        self.started = True
        return ""

    def click(self, zyx, positive: bool) -> str:
        z, y, x = (int(v) for v in zyx)
        if not self.started:
            # A first click on an empty prediction: the structure starts empty, as a new segment.
            self.session.adopt(self.value, np.zeros(self.case.labels.shape, np.uint8), [])
            self.started = True
        self.session.correct(self.value, z, [(x, y)], [1 if positive else 0])
        self.clicked_slices.append(z)
        return self._update()

    def close(self) -> None:
        self.session.close()


def _scores(prediction, truth, spacing) -> Tuple[float, float, float]:
    dsc = dice(prediction, truth)
    nsd_raw = surface_dice(prediction, truth, spacing)
    return dsc, (nsd_raw if dsc > NSD_MIN_DSC else 0.0), nsd_raw


def run_case(engine, case: InteractiveCase, options: TrackOptions, *, volume_index: int = 0,
             examples=None, progress: Optional[Callable[[str], None]] = None) -> InteractiveResults:
    """All classes of one case through the track's steps; ``examples``: the cohort track's
    :class:`protosam.examples.ExampleBank` (a class is the bank structure of its name)."""
    if options.track not in TRACKS:
        raise InputError(f"Unknown interactive track {options.track!r}: choose one of {', '.join(TRACKS)}.")
    present = case.classes
    classes = [c for c in options.classes if c in present] if options.classes is not None else present
    if options.classes is not None and len(classes) < len(options.classes):
        logger.warning("Case %s has no voxels of class(es) %s: they are not evaluated on it.", case.name,
                       sorted(set(options.classes) - set(classes)))
    if not classes:
        logger.warning("Case %s has none of the classes to evaluate; skipped.", case.name)
        return InteractiveResults()
    boxes = case.boxes
    if options.track == "cvpr25" and boxes is None and not case.from_npz:
        # NIfTI/NRRD pairs have no stored boxes: make them as get_boxes.py does.
        boxes = challenge_boxes(case.labels, seed=options.box_seed)
    results = InteractiveResults()
    per_step_class_rows: Dict[int, List[StepRecord]] = {}
    for value in classes:
        name = _class_name(options, value)
        truth = case.labels == value
        z_mid = median_foreground_slice(truth)
        box = boxes.get(value) if (options.track == "cvpr25" and boxes) else None
        run = _ClassRun(engine, case, value, options,
                        slice_range=(box.z_min, box.z_max) if box is not None else None)
        rows: List[StepRecord] = []
        try:
            # Step 0
            note = ""
            # The bank's examples this run can use: taken along the cases' slice axis (0), as
            # ExampleBank.supports(name, axis=0) selects them.
            usable = [e for e in examples.list(name) if not e.plane and e.axis == 0] \
                if options.track == "cohort" and examples is not None else []
            from_bank = bool(usable)
            if options.track == "cvpr25":
                if box is not None:
                    step0, interaction = (lambda: run.box(box)), "box"
                else:
                    step0, interaction = None, "none"
            elif not from_bank:
                step0, interaction = (lambda: run.start_from_mask(z_mid)), "mask"
            else:
                # Reading the bank (and encoding examples not cached yet) is part of the step,
                # as it is of a user's propagation from a bank.
                step0 = lambda: run.start_from_examples(examples.supports(name, axis=0, engine=engine))  # noqa: E731
                interaction = f"examples:{len(usable)}"
            if step0 is None:
                seconds, note = 0.0, "no box: the challenge scores this step 0"
            else:
                start = time.perf_counter()
                try:
                    note = step0()
                except InputError as error:
                    # E.g. a support too small for the feature grid: the user would see this
                    # message; the prediction stays empty and the clicks go on.
                    note = f"refused: {error}"
                    run.prediction = np.zeros(case.labels.shape, np.uint8)
                seconds = time.perf_counter() - start
            if interaction == "none":
                dsc = nsd = nsd_raw = 0.0
            else:
                dsc, nsd, nsd_raw = _scores(run.prediction, truth, case.spacing)
            rows.append(StepRecord(options.track, case.name, case.modality, volume_index, value, name, 0, interaction,
                                   "", None, dsc, nsd, nsd_raw, seconds, note or ""))
            # Steps 1..clicks
            for step in range(1, options.clicks + 1):
                click = simulate_click(run.prediction, truth)
                if click is None:
                    seconds, interaction, note, zyx, positive = 0.0, "none", "prediction perfect: no click", "", None
                else:
                    note, seconds = _timed(lambda: run.click(click.zyx, click.positive))
                    interaction = "click+" if click.positive else "click-"
                    zyx, positive = " ".join(str(v) for v in click.zyx), click.positive
                dsc, nsd, nsd_raw = _scores(run.prediction, truth, case.spacing)
                rows.append(StepRecord(options.track, case.name, case.modality, volume_index, value, name, step,
                                       interaction, zyx, positive, dsc, nsd, nsd_raw, seconds, note or ""))
                if progress:
                    progress(f"[{options.track}] {case.name} class {name} step {step}: DSC {dsc:.3f} NSD {nsd:.3f}")
            if examples is not None and options.track == "cohort":
                _add_to_bank(examples, run, name)
        finally:
            run.close()
        results.steps += rows
        per_step_class_rows[value] = rows
        click_rows = rows[1:]
        results.classes.append(ClassSummary(
            options.track, case.name, case.modality, volume_index, value, name,
            click_auc([r.dsc for r in click_rows], options.clicks), click_auc([r.nsd for r in click_rows], options.clicks),
            rows[-1].dsc, rows[-1].nsd, rows[0].dsc, float(sum(r.seconds for r in rows))))
    # The challenge's case row: mean over classes per step, its NSD rule on the mean DSC.
    steps = options.clicks + 1
    dscs, nsds, seconds = [], [], []
    for step in range(steps):
        at_step = [per_step_class_rows[v][step] for v in classes]
        mean_dsc = float(np.mean([r.dsc for r in at_step]))
        skipped = all(r.interaction == "none" and step == 0 for r in at_step)
        dscs.append(0.0 if skipped else mean_dsc)
        nsds.append(0.0 if skipped or mean_dsc <= NSD_MIN_DSC else float(np.mean([r.nsd_raw for r in at_step])))
        seconds.append(float(sum(r.seconds for r in at_step)))
    budget = time_budget(len(classes))
    results.cases.append(CaseSummary(
        options.track, case.name, case.modality, volume_index, len(classes), dscs, nsds,
        click_auc(dscs, options.clicks), click_auc(nsds, options.clicks), dscs[-1], nsds[-1], seconds,
        float(sum(seconds)), budget, float(sum(seconds)) <= budget))
    return results


def _add_to_bank(bank, run: "_ClassRun", name: str) -> None:
    """The user's "add to the bank" after a volume: its painted and corrected slices that show
    the structure, with their final masks (none when nothing was fixed or all are empty)."""
    from ..examples import add_session_slices

    if not run.started or not run.session.fixed_slices(run.value):
        return
    try:
        add_session_slices(bank, run.session, run.value, name)
    except InputError as error:  # every fixed slice empty: nothing to teach
        logger.info("%s: %s", run.case.name, error)


def run_track(engine, cases: Sequence[InteractiveCase], options: TrackOptions, *,
              examples=None, progress: Optional[Callable[[str], None]] = None) -> InteractiveResults:
    """Every case through one track. The cohort track works with the example bank
    ``examples`` (a :class:`protosam.examples.ExampleBank`, or its folder; default: a new bank
    in a temporary folder, deleted at the end) across the cases in order."""
    import tempfile

    from ..examples import ExampleBank

    results = InteractiveResults()
    if options.track != "cohort":
        for index, case in enumerate(cases):
            results.extend(run_case(engine, case, options, volume_index=index, progress=progress))
        results.meta["track"] = options.track
        return results
    with tempfile.TemporaryDirectory(prefix="protosam-cohort-bank-") as scratch:
        bank = examples if isinstance(examples, ExampleBank) else ExampleBank(Path(scratch) / "bank" if examples is None
                                                                              else examples)
        grown = []
        for index, case in enumerate(cases):
            results.extend(run_case(engine, case, options, volume_index=index, examples=bank, progress=progress))
            grown.append(len(bank.list()))
        results.meta["track"] = options.track
        results.meta["examples_after_volume"] = grown
        results.meta["examples_at_end"] = grown[-1] if grown else len(bank.list())
        results.meta["examples_bank"] = None if examples is None else str(bank.folder)
    return results


def results_to_json(results: InteractiveResults) -> Dict[str, object]:
    def clean(value):
        if isinstance(value, float) and not np.isfinite(value):
            return None
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    def rows(records):
        return [{k: clean(v) for k, v in asdict(r).items()} for r in records]

    return {"meta": results.meta, "cases": rows(results.cases), "classes": rows(results.classes),
            "steps": rows(results.steps)}


def write_challenge_npz(case: InteractiveCase, path: Path, *, with_boxes: bool = True,
                        box_seed: Optional[int] = 2025) -> Path:
    """Write ``case`` in the challenge's npz format (``imgs``, ``gts``, ``spacing`` and, with
    ``with_boxes``, ``boxes`` made as ``get_boxes.py`` makes them, unless the case has some)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"imgs": np.asarray(case.image), "gts": np.asarray(case.labels).astype(np.uint8 if case.labels.max() < 256
                                                                                       else np.uint16),
              "spacing": np.asarray(case.spacing, float)}
    if with_boxes:
        boxes = case.boxes or challenge_boxes(case.labels, seed=box_seed)
        arrays["boxes"] = np.array([boxes[c].to_json() for c in sorted(boxes)], dtype=object)
    np.savez_compressed(path, **arrays)
    return path


#: Colin27/AAL stand-ins of the small interactive cases (label value -> AAL name patterns).
COLIN27_STRUCTURES = {"thalamus": ("Thalamus",), "putamen": ("Putamen",)}


def write_colin27_cases(sample, out_dir: Path, *, fmt: str = "nifti", slice_range: Tuple[int, int] = (64, 92),
                        row_range: Optional[Tuple[int, int]] = (85, 155), scans: Optional[Sequence] = None,
                        structures: Optional[Dict[str, Sequence[str]]] = None) -> Dict[str, int]:
    """Small interactive cases cut from Colin27 + AAL (hemispheres x even/odd axial slices, see
    :func:`protosam.evaluation.pseudo_scans.build_pseudo_dataset`): NIfTI pairs
    (``image_<id>.nii.gz``/``label_<id>.nii.gz``, ``fmt="nifti"``) or challenge npz files with
    boxes (``MR_colin27_<id>.npz``, ``fmt="npz"``). Returns the label map {name: value}."""
    import tempfile

    from .pseudo_scans import DEFAULT_SCANS, build_pseudo_dataset

    structures = dict(structures or COLIN27_STRUCTURES)
    organs = ("spleen", "right_kidney", "left_kidney", "liver")  # the synapse layout's values 1, 2, 3, 6
    if len(structures) > len(organs):
        raise InputError(f"At most {len(organs)} Colin27 structures at once.")
    stand_ins = {organ: tuple(patterns) for organ, patterns in zip(organs, structures.values())}
    out_dir = Path(out_dir)
    if fmt == "nifti":
        description = build_pseudo_dataset(sample, out_dir, stand_ins=stand_ins, slice_range=slice_range,
                                           row_range=row_range, scans=scans or DEFAULT_SCANS)
    elif fmt == "npz":
        with tempfile.TemporaryDirectory() as folder:
            description = build_pseudo_dataset(sample, Path(folder), stand_ins=stand_ins, slice_range=slice_range,
                                               row_range=row_range, scans=scans or DEFAULT_SCANS)
            for scan_id in description["scans"]:
                case = load_pair_case(scan_id, Path(folder) / f"image_{scan_id}.nii.gz",
                                      Path(folder) / f"label_{scan_id}.nii.gz")
                write_challenge_npz(case, out_dir / f"MR_colin27_{scan_id}.npz")
    else:
        raise InputError(f"Unknown case format {fmt!r}: nifti or npz.")
    values = description["label_map"]
    return {name: int(values[organ]) for name, organ in zip(structures, stand_ins)}
