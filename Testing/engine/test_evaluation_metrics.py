"""Dice definitions and the paper protocol's slice rules, checked against hand computations."""
from __future__ import annotations

import math

import numpy as np
import pytest

from protosam.evaluation.metrics import (
    OverlapCounts,
    dice_score,
    outside_false_positives,
    per_slice_dice,
    scan_dice_3d,
    slices_containing,
)
from protosam.evaluation.protocol import (
    chunk_fractions,
    explicit_split,
    fold_boundaries,
    fold_split,
    plan_query,
    query_chunk,
    support_slice_indices,
)
from protosam.evaluation.report import EvaluationReport, ScanRecord, SliceRecord


def _volume(shape, boxes):
    """uint8 volume with the given (k, r0, r1, c0, c1) boxes set to 1."""
    volume = np.zeros(shape, np.uint8)
    for k, r0, r1, c0, c1 in boxes:
        volume[k, r0:r1, c0:c1] = 1
    return volume


# ------------------------------------------------------------------------------------ Dice
def test_dice_of_two_masks_by_hand():
    gt = np.zeros((4, 4), np.uint8)
    gt[0, 0:4] = 1  # 4 pixels
    pred = np.zeros((4, 4), np.uint8)
    pred[0, 0:2] = 1  # 2 inside
    pred[3, 3] = 1  # 1 outside
    # tp 2, fp 1, fn 2 -> 2*2 / (4 + 1 + 2) = 4/7
    assert dice_score(pred, gt) == pytest.approx(4 / 7)
    assert dice_score(gt, gt) == 1.0
    assert dice_score(np.zeros_like(gt), gt) == 0.0
    assert dice_score(np.zeros_like(gt), np.zeros_like(gt)) == 1.0
    assert dice_score(np.zeros_like(gt), np.zeros_like(gt), empty=0.0) == 0.0
    assert OverlapCounts(2, 1, 2) + OverlapCounts(1, 0, 0) == OverlapCounts(3, 1, 2)


def test_dice_rejects_mismatched_shapes_and_non_numeric():
    with pytest.raises(ValueError, match="shapes differ"):
        dice_score(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="numeric or boolean"):
        dice_score(np.array([["a"]]), np.array([["b"]]))


def test_2d_dice_per_slice_only_on_slices_with_the_structure():
    # slice 1: gt 4x4 = 16 px, pred 4x2 = 8 px inside       -> 2*8/(16+8)  = 2/3
    # slice 2: gt 2x2 = 4 px, pred empty                     -> 0
    # slice 3: gt empty, pred 3 px                           -> not evaluated
    # slice 4: gt 2x2, pred the same 2x2 + 2 px outside      -> 2*4/(4+6) = 0.8
    gt = _volume((6, 8, 8), [(1, 0, 4, 0, 4), (2, 0, 2, 0, 2), (4, 2, 4, 2, 4)])
    pred = _volume((6, 8, 8), [(1, 0, 4, 0, 2), (3, 5, 6, 0, 3), (4, 2, 4, 2, 4), (4, 7, 8, 0, 2)])
    result = per_slice_dice(pred, gt, axis=0)
    assert list(result) == [1, 2, 4]
    assert result[1] == pytest.approx(2 / 3)
    assert result[2] == 0.0
    assert result[4] == pytest.approx(0.8)
    # Restricting to some slices keeps only those that also contain the structure.
    assert list(per_slice_dice(pred, gt, axis=0, slices=[2, 3, 5])) == [2]
    # The same along another axis: move the slice axis to the end.
    moved = per_slice_dice(np.moveaxis(pred, 0, 2), np.moveaxis(gt, 0, 2), axis=2)
    assert moved == result
    assert slices_containing(gt).tolist() == [1, 2, 4]


def test_3d_dice_sums_counts_over_the_scan_by_hand():
    gt = _volume((6, 8, 8), [(1, 0, 4, 0, 4), (2, 0, 2, 0, 2), (4, 2, 4, 2, 4)])
    pred = _volume((6, 8, 8), [(1, 0, 4, 0, 2), (3, 5, 6, 0, 3), (4, 2, 4, 2, 4), (4, 7, 8, 0, 2)])
    # tp = 8 + 4 = 12; fp = 3 (slice 3) + 2 (slice 4) = 5; fn = 8 + 4 = 12
    assert scan_dice_3d(pred, gt) == pytest.approx(24 / (24 + 5 + 12))
    # Only the GT extent [1, 4] (the SSL-ALPNet rule): slice 3's FP is inside it, nothing changes.
    assert scan_dice_3d(pred, gt, slices=range(1, 5)) == pytest.approx(24 / 41)
    # Slices 1..2 only: tp 8, fp 0, fn 8 + 4
    assert scan_dice_3d(pred, gt, slices=[1, 2]) == pytest.approx(16 / (16 + 12))


def test_false_positives_outside_the_structure_by_hand():
    gt = _volume((8, 5, 5), [(2, 0, 2, 0, 2), (4, 0, 2, 0, 2)])  # extent 2..4, gap at 3
    pred = _volume((8, 5, 5), [(0, 0, 1, 0, 3), (3, 0, 1, 0, 1), (4, 0, 2, 0, 2), (7, 0, 2, 0, 2)])
    fp = outside_false_positives(pred, gt)
    assert (fp.first_gt_slice, fp.last_gt_slice) == (2, 4)
    assert fp.slices_outside_extent == 2  # slices 0 and 7
    assert fp.voxels_outside_extent == 3 + 4
    assert fp.slices_without_structure == 3  # 0, 3 (the gap) and 7
    empty = outside_false_positives(pred, np.zeros_like(gt))
    assert (empty.first_gt_slice, empty.slices_outside_extent, empty.voxels_outside_extent) == (-1, 4, 3 + 1 + 4 + 4)


def test_report_pools_2d_over_slices_and_averages_3d_over_scans():
    report = EvaluationReport()
    for scan_id, dices, dice_3d in (("a", [1.0, 0.0, 0.5], 0.4), ("b", [1.0], 0.8)):
        for index, dice in enumerate(dices):
            report.slices.append(SliceRecord("paper", "liver", scan_id, index, 0, 0, dice, 1, 1))
        report.scans.append(ScanRecord("paper", "liver", scan_id, "s", "0", 0, 2, len(dices),
                                       float(np.mean(dices)), dice_3d, len(dices)))
    report.scans.append(ScanRecord("paper", "spleen", "a", "s", "0", 0, 0, 1, 0.2, 0.3, 1))
    report.slices.append(SliceRecord("paper", "spleen", "a", 0, 0, 0, 0.2, 1, 1))
    by_organ = {s.organ: s for s in report.summaries()}
    # ProtoSAM 2-D: mean over all 4 slices = 2.5 / 4 (not the mean of per-scan means, 0.75)
    assert by_organ["liver"].dice_2d == pytest.approx(0.625)
    assert by_organ["liver"].n_slices == 4
    # SSL-ALPNet 3-D: mean over scans
    assert by_organ["liver"].dice_3d == pytest.approx(0.6)
    assert by_organ["liver"].dice_3d_std == pytest.approx(0.2)
    mean = report.mean_row("paper")
    assert mean["dice_2d"] == pytest.approx((0.625 + 0.2) / 2)
    assert mean["dice_3d"] == pytest.approx((0.6 + 0.3) / 2)
    assert [s.organ for s in report.summaries()] == ["spleen", "liver"]  # the paper's column order
    table = report.format_table()
    assert "Spleen" in table and "Liver" in table
    assert "62.50" in table and "60.00" in table and "41.25" in table and "45.00" in table


# ------------------------------------------------------------------------------------ protocol
def test_chunk_fractions_are_one_sixth_half_five_sixths():
    assert chunk_fractions(3) == pytest.approx([1 / 6, 1 / 2, 5 / 6])
    assert chunk_fractions(1) == [0.5]
    assert chunk_fractions(5) == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    with pytest.raises(ValueError):
        chunk_fractions(0)


def test_support_slices_by_hand():
    # 12 organ slices 10..21: positions int(12/6)=2, int(6)=6, int(10)=10 -> 12, 16, 20
    assert support_slice_indices(range(10, 22)) == [12, 16, 20]
    # 7 slices 40..46: int(7/6)=1, int(3.5)=3, int(35/6)=5 -> 41, 43, 45
    assert support_slice_indices([46, 40, 41, 42, 43, 44, 45]) == [41, 43, 45]
    # With a gap the list (not the extent) is indexed: [3, 4, 9, 10, 11, 12] -> 4, 10, 12
    assert support_slice_indices([3, 4, 9, 10, 11, 12]) == [4, 10, 12]
    assert support_slice_indices([5]) == [5, 5, 5]
    assert support_slice_indices(range(10, 22), 1) == [16]
    with pytest.raises(ValueError, match="does not contain"):
        support_slice_indices([])


def test_query_chunks_from_the_query_extent_by_hand():
    # extent 20..31: width (31 - 20) / 3 = 11/3; (z - 20) // 3.667
    expected = {20: 0, 23: 0, 24: 1, 27: 1, 28: 2, 31: 2}
    for z, part in expected.items():
        assert query_chunk(z, 20, 31) == part, z
    # extent 0..5: width 5/3; 1 // 1.667 = 0, 2 // 1.667 = 1, 5 // 1.667 = 3 -> clipped to 2
    assert [query_chunk(z, 0, 5) for z in range(6)] == [0, 0, 1, 1, 2, 2]
    assert query_chunk(7, 7, 7) == 0  # a one-slice organ
    assert query_chunk(3, 5, 9) == 0 and query_chunk(12, 5, 9) == 2  # clipped outside
    plan = plan_query([33, 30, 31, 35])  # gap at 32 and 34: still part of [z_min, z_max]
    assert (plan.z_min, plan.z_max) == (30, 35)
    assert plan.chunk_of_slice == {30: 0, 31: 0, 32: 1, 33: 1, 34: 2, 35: 2}
    assert plan.organ_slices == (30, 31, 33, 35)
    assert plan.slices_of_chunk(1) == [32, 33]


def test_fold_split_matches_the_reference_separators():
    assert fold_boundaries(30) == [0, 6, 12, 18, 24, 30]
    assert fold_boundaries(20) == [0, 4, 8, 12, 16, 20]
    ids = [str(i) for i in [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30,
                            31, 32, 33, 34, 35, 36, 37, 38, 39, 40]]
    split = fold_split(list(reversed(ids)), fold=0)  # order of the input does not matter
    assert split.query_scans == ("1", "2", "3", "4", "5", "6")
    assert split.support_scan == "7"
    last = fold_split(ids, fold=4)
    assert last.query_scans == tuple(ids[24:30]) and last.support_scan == "1"  # circular
    chaos = fold_split([str(i) for i in (1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39)], 1)
    assert chaos.query_scans == ("8", "10", "13", "15") and chaos.support_scan == "19"
    # numeric sorting, not text sorting
    assert fold_split(["10", "9", "2", "1"], 0, n_folds=2).query_scans == ("1", "2")
    with pytest.raises(ValueError):
        fold_split(ids, fold=5)
    explicit = explicit_split(["3", "1", "2"], "2")
    assert explicit.support_scan == "2" and explicit.query_scans == ("1", "3") and explicit.fold == -1
    with pytest.raises(ValueError, match="not in the dataset"):
        explicit_split(["1", "2"], "9")


def test_nan_summary_for_empty_inputs():
    report = EvaluationReport()
    assert report.summaries() == []
    assert math.isnan(report.mean_row("paper")["dice_2d"])
