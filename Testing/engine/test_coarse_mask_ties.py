"""The coarse mask's rule (foreground only where strictly more probable than background; the
argmax's tie rule) as ``Engine.refine`` applies it to the logits resized to SAM's frame."""
import pytest
import torch


class _ReachedSam(Exception):
    pass


def _sam_not_wanted():
    raise _ReachedSam


def test_refine_gives_ties_to_the_background_and_a_strict_margin_to_the_foreground(tiny_models):
    from protosam import Engine

    engine = Engine(tiny_models, preset="default", device="cpu")
    size = tiny_models.input_size
    tied = torch.zeros((2, size, size))
    refined = engine.refine(tied, _sam_not_wanted)  # no foreground voxel: SAM is never asked
    assert refined.mask.shape == (size, size) and not refined.mask.any()

    ahead = tied.clone()
    ahead[1, 40:60, 40:60] = 1e-3  # foreground strictly more probable on a square only
    with pytest.raises(_ReachedSam):
        engine.refine(ahead, _sam_not_wanted)
