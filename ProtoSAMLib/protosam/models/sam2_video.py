"""Memory mode's engine room: one structure's walk through a volume with SAM 2's video predictor.

Everything SAM 2 does here is the official ``sam2`` package's ``SAM2VideoPredictor`` (the
refiner's own model, :func:`protosam.models.sam2_refiner.load_sam2_refiner`), through its public
methods: ``init_state``, ``add_new_mask`` (a painted or corrected slice: a conditioning frame,
exactly that mask), ``add_new_points_or_box`` (prototype prompts on a slice the walk already
tracked: a correction that keeps the memory), ``propagate_in_video_preflight`` and
``propagate_in_video`` (one slice at a time, so the walk can stop, prompt or be cancelled
between slices). ProtoSAM supplies three things the package reads from its video files:

* **Frames.** ``init_state`` gets its frames from ``sam2.utils.misc.load_video_frames`` (an MP4
  file or a folder of JPEGs). For the duration of that one call the predictor module's name
  ``load_video_frames`` answers with :class:`_SliceFrames` instead, a lazy sequence of this
  volume's slices prepared exactly as the per-slice refiner prepares them (uint8 picture,
  ``SAM2Transforms``); the rest of ``init_state`` is the package's. The "video" is 1024 x 1024,
  the refiner's frame, so prompts and masks share the per-slice refiner's coordinates.
* **Frame 0 is blank.** ``init_state`` encodes frame 0 as a warm-up, and the predictor never
  tracks backwards from frame 0; slice ``k`` is therefore frame ``k + 1`` and frame 0 a blank
  frame that is encoded once (that warm-up) and never walked into.
* **Image features.** Before each call on a frame, the predictor's own one-frame feature cache
  (``inference_state["cached_features"]``) is filled from the engine's encoder cache (the
  per-slice refiner's packed features of that slice, with the ``no_mem_embed`` the refiner adds
  taken off again): slices are encoded once per run whatever the number of structures, and a
  session's update walks again without encoding (the features differ from a fresh encoding
  by one float32 rounding of that addition at most).

**Bounded memory.** The predictor attends to every conditioning frame, to the masks of the last
``num_maskmem - 1`` tracked frames and to the object pointers of the last
``max_obj_ptrs_in_encoder - 1`` (6 and 15 with every published SAM 2.1 configuration) in the
walking direction. After each slice the walk drops from the inference state every tracked
frame further back than that window (:attr:`SliceWalk.window` = 16 frames), except the first
window past the start, which the walk the other way reads first (when there is one). So the
state holds at most ``2 x window + 1`` tracked frames plus the conditioning frames, and a 200-slice walk keeps what a
30-slice one keeps; the masks it sees are the ones the predictor would compute with nothing
dropped.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["SliceWalk", "MEMORY_PROMPT_MIN_PROBABILITY"]

#: A slice gets prototype prompts during a memory walk when its coarse (ALPNet) foreground's
#: mean probability is above this: the prototypes are then confident enough to steer SAM 2
#: back to the structure (after it splits, or after the memory lost it); below it, the walk
#: follows SAM 2's memory alone. The coarse foreground is where the foreground probability
#: beats the background's (> 0.5), so the mean lies in (0.5, 1]; 0.8 asks for a clear margin.
MEMORY_PROMPT_MIN_PROBABILITY = 0.8

#: The one object each walk tracks (a walk is one structure).
_OBJECT = 1

# init_state and propagate_in_video read two names of the predictor module: the frame loader
# (swapped for the volume's slices during init_state) and tqdm (one bar per slice would flood
# the log; the engine reports progress itself). Swapping module names is not thread safe:
# every swap happens under this lock.
_MODULE_NAMES_LOCK = threading.Lock()


class _QuietBar:
    """tqdm's place while the walk runs: iterates, prints nothing."""

    def __init__(self, iterable, *args, **kwargs):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)


@contextlib.contextmanager
def _predictor_module_names(**names) -> Iterator[None]:
    import sam2.sam2_video_predictor as video_module

    with _MODULE_NAMES_LOCK:
        saved = {name: getattr(video_module, name) for name in names}
        for name, value in names.items():
            setattr(video_module, name, value)
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(video_module, name, value)


class _SliceFrames:
    """The predictor's ``images``: frame 0 blank, frame ``k + 1`` slice ``k``, prepared on demand
    (nothing is held: a volume's frames at 1024 px would take 12 MB a slice)."""

    def __init__(self, count: int, prepared_slice: Callable[[int], torch.Tensor], blank: torch.Tensor):
        self.count, self.prepared_slice, self.blank = count, prepared_slice, blank

    def __len__(self) -> int:
        return self.count + 1

    def __getitem__(self, frame: int) -> torch.Tensor:
        if not 0 <= frame <= self.count:
            raise IndexError(frame)
        return self.blank if frame == 0 else self.prepared_slice(frame - 1)


class SliceWalk:
    """One structure walked through ``count`` slices by SAM 2's video predictor.

    ``refiner``: the engine's :class:`~protosam.models.sam2_refiner.Sam2Refiner` (its model is
    a ``SAM2VideoPredictor``); ``packed_features(k)``: slice ``k``'s packed refiner features
    (the engine's cache); ``picture(k)``: slice ``k`` as the refiner's ``[1, 3, 1024, 1024]``
    input (only read if the predictor ever misses its feature cache). Slice indices are the
    volume's; masks come back as ``[1024, 1024]`` mask logits (> 0: the structure).
    """

    def __init__(self, refiner, count: int, packed_features: Callable[[int], torch.Tensor],
                 picture: Callable[[int], torch.Tensor]):
        from sam2.sam2_video_predictor import SAM2VideoPredictor

        self.predictor = refiner.model
        if not isinstance(self.predictor, SAM2VideoPredictor):
            raise TypeError("Memory mode needs the refiner's model built as sam2's SAM2VideoPredictor "
                            "(protosam.models.sam2_refiner.load_sam2_refiner builds it so).")
        self.refiner = refiner
        self.count = count
        self.packed_features = packed_features
        size = self.predictor.image_size
        blank = refiner.transforms.transforms(torch.zeros(3, size, size))

        def prepared_slice(index: int) -> torch.Tensor:
            return refiner.prepare_images(picture(index))[0].cpu()

        frames = _SliceFrames(count, prepared_slice, blank)
        from .sam2_refiner import FRAME

        def load_frames(video_path, image_size, **_):
            return frames, FRAME, FRAME

        with _predictor_module_names(load_video_frames=load_frames):
            self.state = self.predictor.init_state(video_path="<protosam slices>", offload_video_to_cpu=True)
        # The warm-up's positional encodings depend only on the feature sizes: every frame's, and
        # every walk's with this model (84 MiB at 1024 px: one copy per refiner, not per structure).
        _, warm_up = self.state["cached_features"].pop(0)
        shared = refiner.__dict__.setdefault("memory_position", [p[:1] for p in warm_up["vision_pos_enc"]])
        self._position = shared
        self._placeholder_image = torch.zeros(1, 3, 1, 1)
        self.window = max(int(self.predictor.num_maskmem), int(self.predictor.max_obj_ptrs_in_encoder))
        self.conditioning: List[int] = []
        #: Whether a walk down follows the walk up (it then reads the first window above the start).
        self.walks_down = True
        self._protected: set = set()
        self._direction = 0

    # ------------------------------------------------------------------ features
    def _offer_features(self, index: int) -> None:
        """Put slice ``index``'s features in the predictor's one-frame cache."""
        embedding, high_res = self.refiner.unpack(self.packed_features(index).to(self.predictor.device))
        if self.predictor.directly_add_no_mem_embed:
            embedding = embedding - self.predictor.no_mem_embed.reshape(1, -1, 1, 1)
        position = [p.to(embedding.device) for p in self._position]  # no-op unless the device changed
        backbone = {"backbone_fpn": [*high_res, embedding], "vision_pos_enc": position}
        self.state["cached_features"] = {index + 1: (self._placeholder_image, backbone)}

    # ------------------------------------------------------------------ inputs
    @torch.inference_mode()
    def condition(self, index: int, mask: np.ndarray) -> None:
        """Slice ``index`` is a conditioning frame with exactly ``mask`` (``[H, W]``, any size:
        the predictor resizes it to its image size); its memory is encoded at once."""
        self._offer_features(index)
        self.predictor.add_new_mask(self.state, index + 1, _OBJECT, torch.as_tensor(np.asarray(mask) > 0))
        self.predictor.propagate_in_video_preflight(self.state)
        self.conditioning.append(index)

    @torch.inference_mode()
    def prompt(self, index: int, box: Optional[np.ndarray], points: np.ndarray, labels: np.ndarray) -> torch.Tensor:
        """Prompts on slice ``index`` (1024 frame): on a slice the walk has tracked, a correction
        that keeps the memory (its mask joins the memory as a tracked frame); on a slice not
        tracked yet, the start of a walk (a conditioning frame decoded from the prompts alone).
        Returns the slice's mask logits ``[1024, 1024]``."""
        self._offer_features(index)
        started = (index + 1) not in self.state["frames_tracked_per_obj"].get(0, {})
        _, _, masks = self.predictor.add_new_points_or_box(
            self.state, index + 1, _OBJECT,
            points=torch.as_tensor(np.asarray(points, np.float32).reshape(-1, 2)),
            labels=torch.as_tensor(np.asarray(labels, np.int32).reshape(-1)),
            box=None if box is None else torch.as_tensor(np.asarray(box, np.float32)),
        )
        self.predictor.propagate_in_video_preflight(self.state)
        if started:
            self.conditioning.append(index)
        return masks[0, 0]

    # ------------------------------------------------------------------ walking
    @torch.inference_mode()
    def track(self, index: int, downwards: bool) -> torch.Tensor:
        """Slice ``index`` from the memory (its stored mask for a conditioning frame), walking
        up (increasing index) or down. Returns its mask logits ``[1024, 1024]``."""
        direction = -1 if downwards else 1
        if direction != self._direction:
            # The walk up keeps the window of tracked frames just above its start for the walk
            # down, which reads them first; the walk down needs no such keeping.
            keep = not downwards and self.walks_down
            self._protected = set(range(index + 2, index + 2 + self.window)) if keep else set()
            self._direction = direction
        if index + 1 not in self.state["output_dict_per_obj"][0]["cond_frame_outputs"]:
            self._offer_features(index)  # a conditioning frame's stored output needs none
        masks = None
        with _predictor_module_names(tqdm=_QuietBar):
            for _, _, masks in self.predictor.propagate_in_video(
                    self.state, start_frame_idx=index + 1, max_frame_num_to_track=0, reverse=downwards):
                pass
        self._forget_behind(index + 1, direction)
        return masks[0, 0]

    def _forget_behind(self, frame: int, direction: int) -> None:
        """Drop tracked frames the predictor will not read again (see the module docstring)."""
        def needed(other: int) -> bool:
            return 0 <= (frame - other) * direction <= self.window or other in self._protected

        conditioning = {c + 1 for c in self.conditioning}
        state = self.state
        for record in (state["output_dict_per_obj"][0]["non_cond_frame_outputs"],
                       state["frames_tracked_per_obj"][0], state["point_inputs_per_obj"][0],
                       state["mask_inputs_per_obj"][0]):
            for other in [f for f in record if f not in conditioning and not needed(f)]:
                del record[other]

    def frames_held(self) -> Dict[str, int]:
        """How many frames the inference state holds, by kind (for tests and benchmarks)."""
        outputs = self.state["output_dict_per_obj"][0]
        return {"conditioning": len(outputs["cond_frame_outputs"]),
                "tracked": len(outputs["non_cond_frame_outputs"]),
                "tracked_records": len(self.state["frames_tracked_per_obj"][0]),
                "features": len(self.state["cached_features"])}


def prompt_for_memory(prompts: Sequence, box_only: bool):
    """The one prompt set a memory walk gives SAM 2 on a slice (SAM 2 takes one box per object
    and frame): the component of largest foreground mass (the CCA choice), its box and, unless
    the refiner takes boxes only, its points. ``(box, points [P, 2], labels [P])``."""
    chosen = max(prompts, key=lambda p: p.mass)
    if box_only:
        return chosen.box, np.zeros((0, 2), np.float32), np.zeros((0,), np.int32)
    return chosen.box, chosen.points, chosen.point_labels
