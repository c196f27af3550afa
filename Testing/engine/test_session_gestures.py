"""Box, scribble and lasso corrections of a session (protosam.session) with the tiny
random-weight models. Random SAM weights mark arbitrary parts of a slice, so these tests hold
the mechanics, which do not depend on the weights: voxels a gesture forces, slices a gesture
must not touch, undo giving the slice back bit for bit, refusals."""
from dataclasses import replace

import numpy as np
import pytest

from protosam import PRESETS, Engine, InputError
from protosam.session import Session, _rasterise_polygon, _rasterise_polyline, _sample_along

SLICES, SIZE = 8, 48
WHOLE_VOLUME = replace(PRESETS["default"], auto_extent=False)


@pytest.fixture(scope="module")
def engine(tiny_models):
    return Engine(tiny_models, preset=WHOLE_VOLUME, device="cpu")


def _volume(seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    volume = rng.normal(0, 0.05, (SLICES, SIZE, SIZE)).astype(np.float32)
    truth = np.zeros(volume.shape, np.uint8)
    for k in range(1, SLICES - 1):
        truth[k] = (yy - 22) ** 2 + (xx - 26) ** 2 <= 81
    volume += 2.0 * truth
    return volume, truth


@pytest.fixture()
def session(engine):
    volume, truth = _volume()
    session = Session(engine, volume, modality="none")
    session.start({"organ": truth}, support_slices={"organ": [4]})
    return session


def _state(session, index):
    """Everything of slice ``index`` a correction may change (for bit-for-bit comparisons)."""
    state = session.structures["organ"]
    fixed = state.fixed.get(index)
    return (session.mask("organ").copy(), None if fixed is None else fixed.copy(), session.clicks("organ", index),
            sorted(state.fixed))


def _same(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    assert (a[1] is None) == (b[1] is None)
    if a[1] is not None:
        np.testing.assert_array_equal(a[1], b[1])
    assert a[2:] == b[2:]


def test_rasterising_lines_polygons_and_sampling():
    line = _rasterise_polyline(np.array([[2.0, 3.0], [9.0, 3.0]]), (12, 12))
    assert line.sum() == 8 and line[3, 2:10].all()
    square = _rasterise_polygon(np.array([[2.0, 2.0], [6.0, 2.0], [6.0, 6.0], [2.0, 6.0]]), (10, 10))
    expected = np.zeros((10, 10), bool)
    expected[2:7, 2:7] = True
    np.testing.assert_array_equal(square, expected)
    dot = _rasterise_polyline(np.array([[4.0, 4.0]]), (9, 9), radius=1.5)
    assert dot.sum() == 9
    # 40 voxels: ceil(40 / 16) = 3 points; 200 voxels: at most 4.
    np.testing.assert_allclose(_sample_along(np.array([[0.0, 0.0], [40.0, 0.0]])),
                               [[20 / 3, 0.0], [20.0, 0.0], [100 / 3, 0.0]])
    np.testing.assert_allclose(_sample_along(np.array([[0.0, 0.0], [0.0, 100.0], [100.0, 100.0]])),
                               [[0.0, 25.0], [0.0, 75.0], [25.0, 100.0], [75.0, 100.0]])
    np.testing.assert_allclose(_sample_along(np.array([[3.0, 4.0]])), [[3.0, 4.0]])


def test_negative_lasso_removes_what_it_encloses_and_undo_restores(session):
    index = 2
    before = _state(session, index)
    polygon = [[10, 10], [40, 10], [40, 35], [10, 35]]
    mask = session.lasso("organ", index, polygon, positive=False)
    assert not mask[10:36, 10:41].any()
    after = session.mask("organ")
    np.testing.assert_array_equal(after[index], mask)
    outside = np.ones(mask.shape, bool)
    outside[10:36, 10:41] = False
    np.testing.assert_array_equal(mask[outside], before[0][index][outside])
    others = [k for k in range(SLICES) if k != index]
    np.testing.assert_array_equal(after[others], before[0][others])
    assert index in session.fixed_slices("organ")
    assert session.corrections("organ", index) == ["lasso"]
    session.undo("organ", index)
    _same(_state(session, index), before)


def test_positive_lasso_adds_and_survives_later_clicks(session):
    index = 3
    before = _state(session, index)
    mask = session.lasso("organ", index, [[2, 2], [12, 2], [12, 12], [2, 12]], positive=True)
    assert mask[2:13, 2:13].all()
    after_lasso = _state(session, index)
    clicked = session.correct("organ", index, [[30, 40]], [0])
    assert clicked[2:13, 2:13].all(), "lassoed voxels stay through a later click"
    assert session.corrections("organ", index) == ["lasso", "click"]
    _same(_state(session, index), _state(session, index))
    session.undo_click("organ", index)
    _same(_state(session, index), after_lasso)
    session.undo("organ", index)
    _same(_state(session, index), before)
    with pytest.raises(InputError, match="no click to undo"):
        session.undo("organ", index)


def test_negative_scribble_removes_every_voxel_it_covers(session):
    index = 5
    before = _state(session, index)
    session.correct("organ", index, [[26, 22]], [1])
    after_click = _state(session, index)
    stroke = [[5, 22], [45, 22], [45, 30]]
    mask = session.scribble("organ", index, stroke, positive=False)
    covered = _rasterise_polyline(np.array(stroke, float), (SIZE, SIZE))
    assert not mask[covered].any()
    assert session.clicks("organ", index) == [(26.0, 22.0, 1)], "sampled points are not listed as clicks"
    state = session.structures["organ"]
    assert [c.positive for c in state.clicks[index]] == [True, False, False, False]
    others = [k for k in range(SLICES) if k != index]
    np.testing.assert_array_equal(session.mask("organ")[others], before[0][others])
    # A later click keeps the scribbled voxels out.
    assert not session.correct("organ", index, [[20, 30]], [1])[covered].any()
    session.undo("organ", index)
    session.undo("organ", index)
    _same(_state(session, index), after_click)
    session.undo("organ", index)
    _same(_state(session, index), before)


def test_positive_scribble_marks_its_voxels(session):
    index = 6
    before = _state(session, index)
    mask = session.scribble("organ", index, [[3, 40], [20, 44]], positive=True, radius=1)
    covered = _rasterise_polyline(np.array([[3, 40], [20, 44]], float), (SIZE, SIZE), 1)
    assert mask[covered].all()
    assert session.fixed_slices("organ") == [4, 6]
    session.clear_clicks("organ", index)
    _same(_state(session, index), before)


def test_box_replaces_the_slice_prompt_sets_and_keeps_clicks_inside(session):
    index = 2
    before = _state(session, index)
    session.correct("organ", index, [[20, 20], [44, 44]], [1, 0])
    after_clicks = _state(session, index)
    session.lasso("organ", index, [[0, 0], [5, 0], [5, 5]], positive=True)
    mask = session.box("organ", index, (30, 30, 10, 10))  # any corner order
    assert session.clicks("organ", index) == [(20.0, 20.0, 1)], "the click outside the box is dropped"
    state = session.structures["organ"]
    prompts = state.before_clicks[index].prompts
    assert len(prompts) == 1 and prompts[0].box is not None
    assert state.edits.get(index) in (None, []), "the box starts the slice anew: the lasso is dropped"
    np.testing.assert_array_equal(state.fixed[index], mask)
    others = [k for k in range(SLICES) if k != index]
    np.testing.assert_array_equal(session.mask("organ")[others], before[0][others])
    assert session.corrections("organ", index) == ["click", "click", "lasso", "box"]
    # A click after the box joins it; undoing it gives the box's own result back.
    after_box = _state(session, index)
    session.correct("organ", index, [[15, 15]], [0])
    session.undo("organ", index)
    _same(_state(session, index), after_box)
    session.undo("organ", index)  # the box
    session.undo("organ", index)  # the lasso
    _same(_state(session, index), after_clicks)
    session.undo("organ", index)
    session.undo("organ", index)
    _same(_state(session, index), before)


def test_box_without_clicks_is_the_decoded_box(engine, session):
    from protosam.session import _voxel_box_to_sam

    index = 1
    mask = session.box("organ", index, (8, 8, 30, 30))
    box = _voxel_box_to_sam(8, 8, 30, 30, (SIZE, SIZE))
    np.testing.assert_allclose(box[:2], [8 * 1024 / SIZE, 8 * 1024 / SIZE])
    np.testing.assert_allclose(box[2:], [31 * 1024 / SIZE - 1, 31 * 1024 / SIZE - 1])
    assert session.clicks("organ", index) == []
    np.testing.assert_array_equal(session.mask("organ")[index], mask)


def test_fixed_gesture_slices_teach_at_update(session):
    session.lasso("organ", 2, [[10, 10], [40, 10], [40, 35], [10, 35]], positive=True)
    lassoed = session.mask("organ")[2].copy()
    updated = session.update("organ")
    np.testing.assert_array_equal(updated[2], lassoed)
    assert session.fixed_slices("organ") == [2, 4]
    session.undo("organ", 2)  # undo still works after an update
    assert session.fixed_slices("organ") == [4]


def test_bad_gestures_are_refused(session):
    with pytest.raises(InputError, match="four numbers"):
        session.box("organ", 2, (1, 2, 3))
    with pytest.raises(InputError, match="outside the slice"):
        session.box("organ", 2, (60, 60, 70, 70))
    with pytest.raises(InputError, match="at least 3"):
        session.lasso("organ", 2, [[1, 1], [2, 2]], positive=True)
    with pytest.raises(InputError, match="outside the slice"):
        session.scribble("organ", 2, [[1, 1], [99, 2]], positive=True)
    assert session.corrections("organ", 2) == []


def test_medsam_refuses_scribbles_but_takes_boxes_and_lassos(session, monkeypatch):
    monkeypatch.setattr(session.engine.refiner, "medsam", True)
    with pytest.raises(InputError, match="MedSAM takes boxes only, so scribbles"):
        session.scribble("organ", 2, [[1, 1], [9, 2]], positive=False)
    with pytest.raises(InputError, match="MedSAM takes boxes only, so clicks"):
        session.correct("organ", 2, [[1, 1]], [1])
    monkeypatch.setattr(session.engine.refiner, "medsam", False)
    # (The tiny SAM is not a MedSAM: only the refusal is the refiner's; boxes and lassos
    # take no points, so they never ask.)
    session.box("organ", 2, (5, 5, 20, 20))
    session.lasso("organ", 2, [[1, 1], [9, 2], [5, 9]], positive=True)
