"""Smoke tests of benchmarks/propagation_benchmark.py with the tiny random-weight models.

They run the real benchmark (naive flow, ours, ours with auto extent) on a few Colin27 slices
and check the figures it reports and its naive-vs-ours mask identity check.

What "naive equals ours" checks, plainly: the naive flow (benchmarks/naive_flow.py) calls the
same Engine step methods as ``segment_volume`` (DINOv2 encoding, prototypes, ALPNet scoring,
refine), only in the reference's call order and with its repeated work (support encoded per
pair, SAM per pair). Equal masks show that sharing encodings across structures, batching and
skipping SAM on empty slices change no voxel. They say nothing about fidelity to the published
method: that is tested against an independent flow built from the official pieces in
test_pipeline.py::test_paper_preset_matches_an_independent_reference_flow (and the reference
kernels test below checks that the naive flow really runs SamPredictor and the official
attention layouts).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
TINY = ["--dinov2", "dinov2_tiny14", "--sam", "sam_tiny", "--size", "64", "--input-size", "112", "--volume", "colin27"]


@pytest.fixture(scope="module")
def bench(colin27):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import propagation_benchmark

        yield propagation_benchmark
    finally:
        sys.path.remove(str(BENCHMARKS))


def _check_phase(result, slices):
    assert result["seconds"] > 0 and result["cpu_seconds"] > 0
    assert result["slices"] == slices
    assert result["slices_per_second"] == pytest.approx(slices / result["seconds"])
    assert 50 < result["peak_rss_mib"] < 16384
    assert result["rss_method"].startswith("resource.getrusage")


def test_benchmark_in_process_reports_figures_and_identical_masks(bench, tmp_path, capsys, one_thread):
    out = tmp_path / "bench.json"
    args = TINY + ["--slices", "4", "--segments", "2", "--naive-slices", "2", "--in-process", "--default-fp32",
                   "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    assert bench.main(args) == 0
    printed = capsys.readouterr().out
    assert "IDENTICAL: 0 differing voxels" in printed and "EXTRAPOLATED" in printed
    assert "a check of the work sharing, not of fidelity" in printed

    report = json.loads(out.read_text())
    assert set(report["phases"]) == {"naive", "ours", "ours_auto_extent", "ours_default_fp32"}
    assert report["volume"]["source"] == "colin27" and report["volume"]["shape"] == [4, 64, 64]
    support = {name: s["support_slice"] for name, s in report["volume"]["structures"].items()}
    assert len(support) == 2

    naive, ours = report["phases"]["naive"], report["phases"]["ours"]
    _check_phase(naive, 2)
    _check_phase(ours, 4)
    assert naive["preset"] == ours["preset"] == "paper"
    assert naive["pairs"] == 2 * 2
    # Ours (auto extent off) runs every slice except the painted support slice of each structure.
    assert ours["pairs"] == 2 * 4 - 2
    for name, slices in ours["processed_slices"].items():
        assert slices == [k for k in range(4) if k != support[name]]
    assert report["phases"]["ours_auto_extent"]["preset"] == "default"
    # --default-fp32: the default preset with its precision pinned, whatever `auto` picks here.
    pinned = report["phases"]["ours_default_fp32"]
    assert pinned["preset"] == "default" and pinned["precision"] == pinned["resolved_precision"] == "fp32"
    assert naive["extrapolated"] is True
    assert naive["full_volume_seconds"] == pytest.approx(naive["seconds"] * 2)
    assert set(naive["naive_step_seconds"]) >= {"support_dinov2", "query_dinov2", "refine"}
    # The reference's cost structure: 2 DINOv2 and 1 SAM encodings per pair; ours: 1 + 1 per
    # slice (support slices are query slices here) and refine once per pair.
    assert naive["step_calls"]["dinov2"] == 2 * naive["pairs"]
    assert naive["step_calls"]["sam_embedding"] == naive["pairs"]
    assert ours["step_calls"]["dinov2"] == 4
    assert ours["step_calls"]["sam_embedding"] <= 4
    assert ours["step_calls"]["refine"] == ours["pairs"]
    assert naive["sam_prompt_sets"] >= naive["pairs"] - naive["empty_coarse_pairs"]

    # Same Engine steps in both flows: this is the work-sharing check (see the module docstring).
    identity = report["identity"]
    expected_pairs = sum(len([k for k in range(2) if k != support[n]]) for n in support)
    assert identity["slices_compared"] == expected_pairs
    assert identity["voxels_compared"] == expected_pairs * 64 * 64
    assert identity["differing_voxels"] == 0
    assert identity["foreground_voxels"] > 0  # the masks compared are not trivially empty

    summary = report["summary"]
    assert summary["naive_extrapolated"] is True
    assert summary["speedup_ours"] == pytest.approx(naive["full_volume_seconds"] / ours["seconds"])
    assert summary["speedup_ours_auto_extent"] > 0 and summary["cpu_time_ratio_ours"] > 0
    assert report["machine"]["nproc"] >= 1 and report["machine"]["cpu_model"]

    # The masks the report was computed from are on disk and really are equal where compared.
    naive_masks = np.load(naive["masks_file"])
    ours_masks = np.load(ours["masks_file"])
    for i, name in enumerate(support):
        common = sorted(set(naive["processed_slices"][name]) & set(ours["processed_slices"][name]))
        np.testing.assert_array_equal(naive_masks[f"mask_{i}"][common], ours_masks[f"mask_{i}"][common])


def test_benchmark_worker_processes(tmp_path):
    """Default mode: each phase in its own process (its own peak RSS and its own heap
    thresholds: the reference flow keeps glibc's, ours reuses freed blocks), exit status 0.
    (No auto-extent phase, to keep the test short; the identity check is tested above.)"""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCHMARKS / "propagation_benchmark.py")] + TINY + [
        "--slices", "2", "--segments", "1", "--skip-auto-extent", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["phases"]) == {"naive", "ours"}
    assert "per worker process" in done.stdout
    glibc = sys.platform.startswith("linux")
    assert report["phases"]["naive"]["heap_blocks_reused"] is False
    assert report["phases"]["ours"]["heap_blocks_reused"] is glibc
    result = report["phases"]["ours"]
    assert result["process_seconds"] >= result["seconds"] > 0
    assert result["peak_rss_mib"] > 50
    assert result["processed_slices"] == {"Precentral_L": [0]}  # slice 1 is the painted support


@pytest.mark.parametrize("users_setting", [None, "1"])
def test_reference_flow_keeps_glibc_heap_and_leaves_the_environment_as_it_was(bench, tiny_models, monkeypatch,
                                                                              users_setting):
    """The reference flow's engine is built with glibc's own heap thresholds; the environment
    is restored afterwards, so the next phase's engine fixes them, or, where the user asked
    for glibc's defaults for the whole benchmark, keeps them too."""
    import benchmark_phases
    from dataclasses import asdict

    if users_setting is None:
        monkeypatch.delenv("PROTOSAM_MALLOC_DEFAULTS", raising=False)
    else:
        monkeypatch.setenv("PROTOSAM_MALLOC_DEFAULTS", users_setting)
    spec = {"models": asdict(tiny_models), "device": "cpu"}
    assert benchmark_phases._engine_keeping_glibc_heap(spec, "naive").heap_blocks_reused is False
    assert os.environ.get("PROTOSAM_MALLOC_DEFAULTS") == users_setting
    ours = benchmark_phases._engine(spec, "ours")
    assert ours.heap_blocks_reused is (users_setting is None and sys.platform.startswith("linux"))


def test_compare_masks_counts_differences_on_common_slices_only(bench):
    a = {"mask_0": np.zeros((4, 8, 8), np.uint8)}
    b = {"mask_0": np.zeros((4, 8, 8), np.uint8)}
    a["mask_0"][1, 2:4, 2:4] = 1  # 4 voxels on slice 1
    b["mask_0"][1, 2:4, 2:3] = 1  # 2 of them
    b["mask_0"][3] = 1  # slice 3 is not processed by a: ignored
    result = bench.compare_masks(a, b, {"s": [0, 1, 2]}, {"s": [1, 2, 3]}, ["s"])
    assert result["slices_compared"] == 2
    assert result["voxels_compared"] == 2 * 64
    assert result["differing_voxels"] == 2
    assert result["per_structure"]["s"]["dice"] == pytest.approx(2 * 2 / 6)


def _phase(seconds, cpu, slices):
    return {"seconds": seconds, "cpu_seconds": cpu, "slices": slices, "naive_step_seconds": {}}


@pytest.mark.parametrize("same_slices, scale", [(False, 8.0), (True, 1.0)])
def test_summary_extrapolates_naive_only_when_ours_covers_more_slices(bench, same_slices, scale):
    naive = _phase(100.0, 150.0, 8)
    naive["naive_step_seconds"] = {"sam_embedding_on_empty": 20.0}
    report = {"config": {"same_slices": same_slices}, "volume": {"shape": [64, 32, 32]},
              "phases": {"naive": naive, "ours": _phase(50.0, 60.0, 8 if same_slices else 64)}}
    summary = bench.summarise(report)["summary"]
    assert naive["extrapolated"] is (not same_slices)
    assert summary["naive_seconds"] == pytest.approx(100.0 * scale)
    assert summary["speedup_ours"] == pytest.approx(100.0 * scale / 50.0)
    assert summary["cpu_time_ratio_ours"] == pytest.approx(150.0 * scale / 60.0)
    assert summary["speedup_ours_vs_sam_skipping_naive"] == pytest.approx(80.0 * scale / 50.0)


def test_naive_reference_kernels_give_the_engine_masks_and_restore_it(bench, tiny_models, monkeypatch):
    """While the naive flow runs with the reference's kernels, the engine really runs them
    (all-heads DINOv2 and SAM attention, SamPredictor per component); no voxel changes, and the
    engine gets its own kernels back afterwards."""
    import naive_flow
    from engine_helpers import blob_slice

    from protosam import Engine
    from protosam.models.sam_memory import CHUNK_BYTES

    engine = Engine(tiny_models, preset="paper", device="cpu")
    global_blocks = [b for b in engine.refiner.sam.image_encoder.blocks if b.window_size == 0]
    explicit = [m for m in engine.encoder.modules() if hasattr(m, "heads_per_chunk")]

    def kernels():
        dinov2 = frozenset(m.heads_per_chunk for m in explicit)
        sam = frozenset(("forward" in b.attn.__dict__, getattr(b.attn, "heads_per_chunk", None)) for b in global_blocks)
        return dinov2, sam

    seen = []
    predictor_calls = []
    predict = naive_flow.SamPredictor.predict
    monkeypatch.setattr(
        naive_flow.SamPredictor, "predict", lambda self, **kw: predictor_calls.append(1) or predict(self, **kw)
    )
    slices = [blob_slice(48, center=(24, 18 + 2 * k), radius=7 + k, seed=k) for k in range(4)]
    volume = np.stack([image for image, _ in slices])
    mask = np.zeros(volume.shape, np.uint8)
    mask[1] = slices[1][1]
    runs = {}
    for reference in (True, False):
        predictor_calls.clear()
        runs[reference] = naive_flow.naive_segment_volume(
            engine, volume, {"s": mask}, {"s": 1}, reference_kernels=reference,
            progress=lambda done, total: seen.append((reference, kernels())),
        )
        calls = len(predictor_calls)
        assert (calls > 0) if reference else (calls == 0)
    assert runs[True].masks["s"].any() and runs[True].pairs == 4
    assert np.array_equal(runs[True].masks["s"], runs[False].masks["s"])
    # During the reference run: official all-heads layouts; otherwise and afterwards: ours.
    official = (frozenset({None}), frozenset({(False, None)}))
    ours = (frozenset({1}), frozenset({(True, 1)}))
    assert {state for reference, state in seen if reference} == {official}
    assert {state for reference, state in seen if not reference} == {ours}
    assert kernels() == ours
    assert {b.attn.chunk_bytes for b in global_blocks} == {CHUNK_BYTES}
    with pytest.raises(ValueError, match="paper"):
        naive_flow.naive_segment_volume(Engine(tiny_models, preset="default", device="cpu"), volume, {"s": mask}, {"s": 1})


def test_corrections_benchmark_reports_its_figures(bench, tmp_path, one_thread):
    """benchmarks/corrections_benchmark.py --tiny runs end to end on Colin27 and writes the
    figures the issue asks for (full run, clicks on cached slices, update, their ratio) and the
    precision it was asked for and ran in."""
    import corrections_benchmark
    import performance_tables

    out = tmp_path / "figures.json"
    assert corrections_benchmark.main(["--tiny", "--volume", "colin27", "--work-dir", str(tmp_path / "models"),
                                       "--precision", "fp32", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["full_propagation_s"] > 0 and report["update_s"] > 0
    assert report["update_speedup"] == pytest.approx(report["full_propagation_s"] / report["update_s"])
    assert report["click_slices"] and len(report["click_times_s"]) == len(report["click_slices"])
    assert report["click_s"] == report["click_times_s"][0] > 0
    assert report["support_slice"] not in report["click_slices"]
    assert len(report["machine"]["load_average_start"]) == 3
    assert 0 <= report["update_slices_run_again"] <= report["processed_slices"]
    assert report["precision"]["asked"] == "fp32" and report["precision"]["used"] == "fp32"
    assert report["machine"]["cpu_model"]  # and git_commit, where the checkout is a git repository
    assert "fp32" in report["precision"]["note"]
    # docs/performance.md's table of such a run shows the gestures and the precision.
    table = performance_tables.corrections_table(report, "`figures.json`")
    assert all(f"| {gesture} |" in table for gesture in ("box", "scribble", "lasso"))
    assert "precision fp32" in table


def test_performance_page_tables_are_generated_from_the_recorded_results(tmp_path):
    """docs/performance.md's tables are benchmarks/performance_tables.py's output for the
    JSON in benchmarks/results/ (regenerate with --write); --check refuses a stale page."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import performance_tables
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert performance_tables.main(["--check"]) == 0, "run: python benchmarks/performance_tables.py --write"
    stale = tmp_path / "performance.md"
    stale.write_text(performance_tables.PAGE.read_text().replace("| phase |", "| stage |", 1))
    assert performance_tables.main(["--check", "--page", str(stale)]) == 1
    assert performance_tables.main(["--write", "--page", str(stale)]) == 0
    assert performance_tables.main(["--check", "--page", str(stale)]) == 0


def test_flop_budget_counts_our_decoder_with_its_own_arithmetic(bench):
    """flop_budget counts the reference flow's decoding as segment-anything's MaskDecoder and
    ours as SharedImageDecoder (image terms per embedding, folded attention per prompt set), and
    the reference's SAM encoding with the windows' padding projected, ours without: the tiny
    model's one windowed block projects 4,096 tokens instead of 4,900 (32 channels in, 96 + 32
    out: 2 x 804 x 32 x 128 multiply-adds fewer)."""
    import flop_budget

    flops = flop_budget.model_flops("dinov2_tiny14", "sam_tiny", 112)
    assert flops["dinov2"] > 0 and flops["sam_embedding"] > 0
    assert flops["sam_embedding"] - flops["ours_sam_embedding"] == 2 * 804 * 32 * (96 + 32)
    assert 0 < flops["ours_decoding_per_prompt_set"] < flops["decoding_per_prompt_set"]
    assert flops["ours_decoder_terms_per_embedding"] > 0


def test_speed_ceiling_counts_each_flows_fastest_steps_by_the_recorded_calls(bench, tmp_path, capsys, monkeypatch):
    """speed_ceiling on a tiny recorded run: the reference flow's steps are timed in a process
    that keeps glibc's heap thresholds, ours' phases in another with their own precision; a
    flow's best case is its fastest round of each step times the calls the run made (the
    reference's scaled to the whole volume as the run extrapolated it), and the best-case
    ratios are those totals' quotients."""
    import speed_ceiling

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("PROTOSAM_MALLOC_DEFAULTS", raising=False)
    run = tmp_path / "run.json"
    assert bench.main(TINY + ["--slices", "4", "--segments", "2", "--naive-slices", "2", "--in-process", "--bf16",
                              "--work-dir", str(tmp_path / "work"), "--out", str(run)]) == 0
    recorded = json.loads(run.read_text())
    out = tmp_path / "ceiling.json"
    assert speed_ceiling.main(["--results", str(run), "--rounds", "2", "--prompt-sets", "3",
                               "--work-dir", str(tmp_path / "ceiling"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())

    glibc = sys.platform.startswith("linux")
    assert report["workers"]["naive"]["heap_blocks_reused"] == {"naive": False}
    assert report["workers"]["ours"]["heap_blocks_reused"] == dict.fromkeys(
        ["ours", "ours_auto_extent", "ours_bf16"], glibc)
    assert report["workers"]["ours"]["precision"]["ours"] == "fp32"
    assert report["workers"]["ours"]["precision"]["ours_bf16"] == "bf16"
    assert 1 <= report["prompt_sets"] <= 3
    steps = report["steps"]
    assert set(steps) == {"naive", "ours", "ours_auto_extent", "ours_bf16"}
    for flow in steps.values():
        for step in speed_ceiling.STEPS:
            assert len(flow[step]["rounds_seconds"]) == 2
            assert flow[step]["best_seconds"] == min(flow[step]["rounds_seconds"]) > 0

    ceilings = report["ceilings"]

    def expected_seconds(flow, run):
        # Each step at the faster of its fastest round and the recorded run's mean per call.
        seconds, calls = run["step_seconds"], run["step_calls"]
        total = 0.0
        for step, count, mean in (("dinov2", calls["dinov2"], seconds["dinov2"] / calls["dinov2"]),
                                  ("sam_embedding", calls["sam_embedding"],
                                   seconds["sam_embedding"] / calls["sam_embedding"]),
                                  ("decoding_per_prompt_set", run["sam_prompt_sets"],
                                   seconds["refine"] / run["sam_prompt_sets"])):
            total += count * min(steps[flow][step]["best_seconds"], mean)
        return total

    assert ceilings["naive"]["extrapolation"] == pytest.approx(2.0)  # 4 slices, the reference ran 2
    assert ceilings["naive"]["seconds"] == pytest.approx(2.0 * expected_seconds("naive", recorded["phases"]["naive"]))
    for phase in ("ours", "ours_auto_extent", "ours_bf16"):
        expected = expected_seconds(phase, recorded["phases"][phase])
        assert ceilings[phase]["seconds"] == pytest.approx(expected)
        assert ceilings[phase]["best_case_ratio"] == pytest.approx(ceilings["naive"]["seconds"] / expected)
        assert ceilings[phase]["recorded_ratio"] == recorded["summary"][f"speedup_{phase}"]
    assert ceilings["ours"]["target"] == 10 and ceilings["ours_bf16"]["target"] == 15
    printed = capsys.readouterr().out
    assert "target 10x" in printed and "best case" in printed

    # Counted again from two measurements (nothing timed): every step's rounds of both, so a
    # faster round in the second file becomes that step's fastest.
    faster = json.loads(out.read_text())
    halved = [seconds / 2 for seconds in faster["steps"]["ours"]["sam_embedding"]["rounds_seconds"]]
    faster["steps"]["ours"]["sam_embedding"] = {"rounds_seconds": halved, "best_seconds": min(halved),
                                                "median_seconds": 0.0}
    (tmp_path / "faster.json").write_text(json.dumps(faster))
    merged = tmp_path / "merged.json"
    assert speed_ceiling.main(["--results", str(run), "--steps-from", str(out), str(tmp_path / "faster.json"),
                               "--out", str(merged)]) == 0
    merged = json.loads(merged.read_text())
    assert merged["rounds"] == 4 and len(merged["steps"]["naive"]["dinov2"]["rounds_seconds"]) == 4
    sam = merged["steps"]["ours"]["sam_embedding"]
    assert sam["best_seconds"] == min(halved) and len(sam["rounds_seconds"]) == 4
    assert merged["ceilings"]["naive"]["seconds"] == pytest.approx(ceilings["naive"]["seconds"])
    ours = recorded["phases"]["ours"]
    mean = ours["step_seconds"]["sam_embedding"] / ours["step_calls"]["sam_embedding"]
    assert merged["ceilings"]["ours"]["seconds_by_step"]["sam_embedding"] == pytest.approx(
        ours["step_calls"]["sam_embedding"] * min(min(halved), mean))


def test_decoder_benchmark_reports_speed_and_agreement(bench, tmp_path, capsys):
    """decoder_benchmark runs both decoders on the tiny SAM, interleaved, and reports their
    agreement within the tests' bound."""
    import decoder_benchmark

    out = tmp_path / "decoder.json"
    assert decoder_benchmark.main(["--sam", "sam_tiny", "--prompt-sets", "3", "--repeats", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["agreement"]["logits_compared"] == 3 * 3 * 256 * 256
    assert report["agreement"]["max_logit_error_eps_of_largest"] <= 64
    for name in ("stock", "ours"):
        assert len(report["speed"][name]["rounds_ms"]) == 2 and report["speed"][name]["median_ms"] > 0
    assert "ours / stock" in capsys.readouterr().out


def test_memory_profile_reports_the_peak_by_step_and_its_file_backed_part(bench, tmp_path, one_thread):
    """memory_profile.py on the tiny models: the peak per step, and the resident set split into
    its file-backed part (shared libraries' pages, which machines keep in different amounts) and
    the anonymous rest the run holds; the three figures agree with each other."""
    import memory_profile

    out = tmp_path / "memory.json"
    assert memory_profile.main(["--tiny", "--volume", "colin27", "--work-dir", str(tmp_path / "models"),
                                "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    peaks = report["peak_resident_mib_by_step"]
    assert {"load models", "DINOv2", "SAM embedding", "refine (SAM decoding)"} <= set(peaks)
    assert report["peak_resident_mib"] == max(peaks.values()) and report["peak_step"] in peaks
    # torch's shared libraries are mapped before any model: a file-backed part well above zero.
    assert 10 < report["file_backed_mib_before_models"] < report["resident_mib_before_models"]
    assert 10 < report["file_backed_mib_at_peak"] < report["peak_resident_mib"]
    # The highest anonymous memory is at least the peak's own anonymous part, and under the peak.
    assert (report["peak_resident_mib"] - report["file_backed_mib_at_peak"]
            <= report["peak_anonymous_mib"] < report["peak_resident_mib"])
