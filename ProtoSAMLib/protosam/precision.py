"""The encoders' numeric precision: the user's choice (``--precision``), what each device
supports, and what ``auto`` picks.

``fp32`` runs the encoders in float32 (the paper's results); ``bf16`` and ``fp16`` run DINOv2
and SAM's image encoder under ``torch.autocast`` (matrix products in the reduced type,
normalisations in float32); the mask decoder and everything after it stay float32.

The checks of a choice against a preset and a device type need no torch (Slicer's process and
the server's request handling use them); what the hardware supports is read at run time
(:func:`resolve_precision`, imports torch).
"""
from __future__ import annotations

import logging
import platform
from typing import List, Optional, Tuple

from .errors import InputError

logger = logging.getLogger(__name__)

__all__ = [
    "PRECISIONS", "AUTO_PICKS_BF16_ON_CPUS_WITH_BF16_UNITS", "check_precision_for_preset", "check_precision_for_device",
    "cpu_bf16_units", "resolve_precision",
]

#: The choices of ``--precision``; "auto" first (the default).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

#: ``auto`` on a CPU with bfloat16 units (found at run time by :func:`cpu_bf16_units`) picks bf16:
#: ``benchmarks/bf16_check.py`` measured it faster than float32 there for both encoders and within
#: the error bounds stated in docs/performance.md ("bf16 on a CPU"). False: ``auto`` keeps float32
#: on every CPU. CPUs without such units keep float32 either way; ``--preset paper`` pins fp32.
AUTO_PICKS_BF16_ON_CPUS_WITH_BF16_UNITS = True

# /proc/cpuinfo flags (x86: "flags", ARM: "Features") and torch.cpu capability names that mean
# bfloat16 arithmetic in hardware.
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def _check_name(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"Unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}.")


def check_precision_for_preset(precision: Optional[str], preset) -> Optional[str]:
    """``precision`` (None: not given) against a preset's own ``precision`` -> the precision to use,
    or None to keep the preset's. A preset that pins one (``paper``: fp32, the published
    reference) refuses any other; ``auto`` then means the pinned one."""
    if precision is None:
        return None
    _check_name(precision)
    if precision == "auto" or preset.precision == "auto" or precision == preset.precision:
        return None if preset.precision != "auto" else precision
    why = " (it reproduces the published reference, computed in float32)" if preset.name == "paper" else ""
    raise InputError(
        f"Preset '{preset.name}' pins precision {preset.precision}{why}, so precision {precision} cannot go with it: "
        f"choose precision {preset.precision} or auto with preset {preset.name}, or preset default to run in "
        f"{precision}.")


def check_precision_for_device(precision: str, device_type: str) -> None:
    """The refusals that need only the device type ("cuda", "mps", "cpu"), no torch."""
    _check_name(precision)
    if precision == "fp16" and device_type != "cuda":
        where = "Apple GPUs (MPS)" if device_type == "mps" else "CPUs"
        raise InputError(
            f"Precision fp16 runs only on NVIDIA GPUs (CUDA), not on {where} ({device_type}): choose precision fp32 "
            "(exact), bf16 (faster on hardware with bfloat16 units) or auto.")


def _cpuinfo_flags() -> List[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return value.split()
    except OSError:
        pass
    return []


def cpu_bf16_units() -> List[str]:
    """The bfloat16 hardware features of this CPU (e.g. ``["amx_bf16", "avx512_bf16"]``; empty:
    none, bf16 then runs through conversions to float32). Read from torch's CPU capabilities
    where this torch has them (2.8+), else from /proc/cpuinfo (Linux)."""
    import torch

    found = set()
    get_capabilities = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
    if get_capabilities is not None:
        try:
            capabilities = get_capabilities()
            found.update(name for name in _CPU_BF16_FLAGS if capabilities.get(name) is True)
        except (RuntimeError, AttributeError):
            pass
    found.update(flag for flag in _cpuinfo_flags() if flag in _CPU_BF16_FLAGS)
    return sorted(found)


def _cuda_bf16(device) -> Tuple[bool, str]:
    """(native bfloat16 on this CUDA GPU, its name and compute capability)."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    described = f"{torch.cuda.get_device_name(index)}, compute capability {major}.{minor}"
    if getattr(torch.version, "hip", None):
        return True, described
    return major >= 8, described


def _mps_bf16() -> bool:
    import torch

    try:
        torch.ones(1, dtype=torch.bfloat16, device="mps")
        return True
    except (RuntimeError, TypeError):  # macOS before 14 has no bfloat16 on MPS
        return False


def resolve_precision(precision: str, device) -> Tuple[str, str]:
    """``precision`` (a choice of :data:`PRECISIONS`) on ``device`` (a torch.device) -> (``fp32``,
    ``bf16`` or ``fp16``, why: the words of the start message). Raises InputError where the
    device cannot run it; a CPU without bfloat16 units runs bf16 (slowly), with a warning."""
    check_precision_for_device(precision, device.type)
    if device.type == "cuda":
        native_bf16, gpu = _cuda_bf16(device)
        if precision == "auto":
            if native_bf16:
                return "bf16", f"the GPU has bfloat16 units: {gpu}"
            return "fp32", f"the GPU has no bfloat16 units ({gpu}); precision fp16 may be faster"
        if precision == "bf16" and not native_bf16:
            raise InputError(
                f"Precision bf16 needs an NVIDIA GPU with bfloat16 units (compute capability 8.0 or newer, e.g. "
                f"A100, RTX 30xx); this one is {gpu}: choose precision fp16 (fast on this GPU) or fp32.")
        return precision, f"as asked, on {gpu}"
    if device.type == "mps":
        if precision == "bf16" and not _mps_bf16():
            raise InputError("Precision bf16 on an Apple GPU needs macOS 14 or newer: choose precision fp32 or auto.")
        if precision == "auto":
            return "fp32", "auto runs float32 on Apple GPUs"
        return precision, "as asked"
    units = cpu_bf16_units()
    described = f"bfloat16 units: {', '.join(units)}" if units else f"no bfloat16 units ({platform.machine()})"
    if precision == "auto":
        if units and AUTO_PICKS_BF16_ON_CPUS_WITH_BF16_UNITS:
            return "bf16", f"this CPU has {described}"
        if units:
            return "fp32", f"this CPU has {described}, but auto keeps float32 on CPUs; choose precision bf16 to try it"
        return "fp32", f"this CPU has {described}"
    if precision == "bf16" and not units:
        logger.warning(
            "Precision bf16 on a CPU without bfloat16 units (no avx512_bf16, amx_bf16 or ARM bf16): every product "
            "converts to float32 and back, which can be slower than precision fp32 for no gain.")
        return "bf16", f"this CPU has {described}: emulated, likely slower than fp32"
    return precision, f"as asked; this CPU has {described}" if precision == "bf16" else "as asked"
