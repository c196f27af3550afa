"""Behaviour presets: ``paper`` reproduces the published reference, ``default`` is for users.

Every field that differs between the two is explained in docs/cli.md ("Presets").
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional

from .precision import PRECISIONS, check_precision_for_preset

__all__ = ["Preset", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class Preset:
    name: str
    # CCA: keep only the coarse component with the largest foreground-probability mass.
    keep_largest_component: bool = False
    # Ask SAM for 3 masks per prompt set (ignored with CCA, as in the reference).
    multimask_output: bool = True
    # Of SAM's 3 masks keep the best-scoring one; False keeps index 0 (the reference quirk).
    pick_best_score: bool = True
    negative_points: bool = False
    # Prompt at most this many coarse components per slice, those of largest foreground mass
    # (None: all, as the reference does; a noisy coarse map can have hundreds).
    max_components: Optional[int] = 16
    # Decode all prompt sets of a slice in one SAM decoder call (same masks up to float
    # rounding). GPU only: on a CPU one call per set with shared image terms is faster.
    batch_prompts: bool = True
    # Volume propagation: walk outwards from the support slice and stop once the structure
    # has been absent for ``stop_after_empty`` consecutive slices.
    auto_extent: bool = True
    stop_after_empty: int = 3
    # DINOv2 attention through PyTorch's fused kernel; False runs the official code's explicit
    # attention for bit-level agreement with the reference (features differ by ~4e-6 otherwise),
    # in float32 only: under bf16/fp16 the fused kernel runs (Engine.dinov2_fused_attention).
    fused_attention: bool = True
    # The encoders' precision (protosam.precision): "fp32", "bf16", "fp16" (CUDA only), or "auto"
    # (bf16 on CUDA GPUs with bfloat16 units, else fp32). A preset with another value pins it.
    precision: str = "auto"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.stop_after_empty < 1:
            raise ValueError("stop_after_empty must be at least 1")

    @property
    def effective_multimask(self) -> bool:
        return self.multimask_output and not self.keep_largest_component


PRESETS: Dict[str, Preset] = {
    "paper": Preset(
        name="paper",
        pick_best_score=False,
        max_components=None,
        batch_prompts=False,
        fused_attention=False,
        auto_extent=False,
        precision="fp32",
    ),
    "default": Preset(name="default"),
}


def get_preset(preset, *, cca: Optional[bool] = None, precision: Optional[str] = None) -> Preset:
    """Look up a preset by name (or pass a Preset through), optionally overriding CCA and the
    precision (None: the preset's; a preset that pins one refuses another, see protosam.precision)."""
    if isinstance(preset, Preset):
        chosen = preset
    else:
        try:
            chosen = PRESETS[preset]
        except KeyError:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}") from None
    if cca is not None and cca != chosen.keep_largest_component:
        chosen = replace(chosen, keep_largest_component=cca)
    precision = check_precision_for_preset(precision, chosen)
    if precision is not None and precision != chosen.precision:
        chosen = replace(chosen, precision=precision)
    return chosen
