"""Computes expected.json with the CVPR 2025 challenge's own evaluation code (run once by hand;
the tests only read the JSON). Not part of ProtoSAM: it needs the challenge's repository at
commit 748e862 exported to a folder (``git archive``) and a Python environment with that
code's requirements (numpy<2, scipy, pandas, connected-components-3d, scikit-image, OpenCV,
torch, tqdm).

It runs ``get_boxes.py``'s ``process`` on the cases with boxes (numpy's generator seeded with
2025 before each case, as a fresh worker process has it) and then ``CVPR25_iter_eval.py``
unchanged, with a stand-in ``docker`` command on PATH that answers each step with the fixed
prediction of ``<case>_predictions.npz`` and keeps a copy of each input it was given (the
clicks the challenge's simulator placed). Per-class DSC/NSD come from the challenge's
``SurfaceDice.py``.

    python run_challenge_code.py CHALLENGE_CODE_DIR CASES_DIR WORK_DIR OUT_JSON
"""
import csv
import importlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np

COMMIT = "748e862d162e3e3ee8197bd4085b19bbbe0bb8a0"
BOXED = ("case_a", "case_c")
FAKE_DOCKER = r'''#!{python}
import os, shutil, sys
from pathlib import Path
import numpy as np
if sys.argv[1:3] == ["container", "run"]:
    inputs = Path("inputs")
    (case,) = [p.name for p in inputs.glob("*.npz")]
    with np.load(inputs / case, allow_pickle=True) as given:
        step = len(given["clicks_order"][0]) if "clicks_order" in given else 0
    log = Path(os.environ["FIXTURE_LOG"])
    shutil.copy(inputs / case, log / f"{{case[:-4]}}_step{{step}}.npz")
    with np.load(Path(os.environ["FIXTURE_CASES"]) / (case[:-4] + "_predictions.npz")) as p:
        np.savez_compressed(Path("outputs") / case, segs=p["steps"][step])
'''


def main(code_dir, cases_dir, work_dir, out_json):
    code_dir, cases_dir, work = Path(code_dir).resolve(), Path(cases_dir).resolve(), Path(work_dir).resolve()
    out_json = Path(out_json).resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "imgs").mkdir(parents=True)
    (work / "team").mkdir()
    (work / "log").mkdir()
    (work / "bin").mkdir()
    (work / "team" / "fixture.tar.gz").write_bytes(b"")
    docker = work / "bin" / "docker"
    docker.write_text(FAKE_DOCKER.format(python=sys.executable))
    docker.chmod(docker.stat().st_mode | stat.S_IEXEC)

    # get_boxes.py: importing it seeds numpy with 2025 and makes its output folders in the cwd.
    sys.path.insert(0, str(code_dir))
    os.chdir(work)
    get_boxes = importlib.import_module("get_boxes")
    boxes = {}
    for case in sorted(p.stem for p in cases_dir.glob("case_?.npz")):
        if case in BOXED:
            np.random.seed(2025)
            get_boxes.process(str(cases_dir / f"{case}.npz"))
            shutil.copy(work / get_boxes.path_dest / f"{case}.npz", work / "imgs" / f"{case}.npz")
            with np.load(work / "imgs" / f"{case}.npz", allow_pickle=True) as made:
                boxes[case] = [{k: int(v) for k, v in entry.items()} for entry in made["boxes"]]
        else:
            shutil.copy(cases_dir / f"{case}.npz", work / "imgs" / f"{case}.npz")

    command = [sys.executable, str(code_dir / "CVPR25_iter_eval.py"), "-i", "imgs", "-o", "seg", "-d", "team",
               "-val_gts", "no_separate_gts", "-v"]
    env = dict(os.environ, PATH=f"{work / 'bin'}:{os.environ['PATH']}", FIXTURE_LOG=str(work / "log"),
               FIXTURE_CASES=str(cases_dir))
    run = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    (work / "eval_stdout.txt").write_text(run.stdout + run.stderr)
    if run.returncode:
        raise SystemExit(run.stdout + run.stderr)

    from SurfaceDice import compute_dice_coefficient, compute_surface_distances, compute_surface_dice_at_tolerance

    with open(work / "seg" / "fixture" / "fixture_metrics.csv") as handle:
        rows = {row["CaseName"][:-4]: row for row in csv.DictReader(handle)}
    result = {"source": {"repository": "JunMa11/CVPR-MedSegFMCompetition", "commit": COMMIT,
                         "files": ["CVPR25_iter_eval.py", "get_boxes.py", "SurfaceDice.py"]},
              "command": "python Testing/engine/data/cvpr25/run_challenge_code.py CODE_DIR "
                         "Testing/engine/data/cvpr25/cases WORK Testing/engine/data/cvpr25/expected.json "
                         "(numpy " + np.__version__ + ", in a separate environment)",
              "cases": {}}
    for case, row in sorted(rows.items()):
        with np.load(work / "imgs" / f"{case}.npz", allow_pickle=True) as data:
            gts, spacing = data["gts"], data["spacing"]
        with np.load(cases_dir / f"{case}_predictions.npz") as p:
            steps = p["steps"]
        classes = [int(c) for c in np.unique(gts) if c != 0]
        clicks = {}
        for step in range(1, 6):
            with np.load(work / "log" / f"{case}_step{step}.npz", allow_pickle=True) as given:
                per_class, order = given["clicks"], given["clicks_order"]
                clicks[step] = {}
                for ind, cls in enumerate(classes):
                    kind = order[ind][-1]
                    clicks[step][cls] = None if kind is None else {
                        "zyx": [int(v) for v in per_class[ind][kind][-1]], "positive": kind == "fg"}
        per_class_scores = []
        for step, seg in enumerate(steps):
            scores = {}
            for cls in classes:
                distances = compute_surface_distances(gts == cls, seg == cls, spacing)
                scores[cls] = {"dsc": float(compute_dice_coefficient(gts == cls, seg == cls)),
                               "nsd_raw": float(compute_surface_dice_at_tolerance(distances, 2.0))}
            per_class_scores.append(scores)
        result["cases"][case] = {
            "classes": classes, "spacing": [float(s) for s in spacing], "boxes": boxes.get(case),
            "dsc": [float(row[f"DSC_{i}"]) for i in range(1, 7)],
            "nsd": [float(row[f"NSD_{i}"]) for i in range(1, 7)],
            "dsc_auc": float(row["DSC_AUC"]), "nsd_auc": float(row["NSD_AUC"]),
            "dsc_final": float(row["DSC_Final"]), "nsd_final": float(row["NSD_Final"]),
            "runtime_upperbound": float(row["runtime_upperbound"]),
            "clicks": {str(s): {str(c): v for c, v in by_class.items()} for s, by_class in clicks.items()},
            "per_class": [{str(c): v for c, v in scores.items()} for scores in per_class_scores],
        }
    Path(out_json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:5])
