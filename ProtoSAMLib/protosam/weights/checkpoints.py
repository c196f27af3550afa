"""Reading checkpoint files safely.

Every checkpoint goes through :func:`load_state_dict`: ``torch.load(weights_only=True)``
so a tampered file cannot run code, and every failure becomes a :class:`CheckpointError`
that names the file and says what to do.
"""
from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Dict, Mapping, Union

import torch

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def load_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """Load a ``torch.save``-d state dict (name -> tensor) onto the CPU.

    Accepts a plain state dict, or a dict that wraps one under ``"model"`` or ``"state_dict"``
    (fine-tuned checkpoints such as MedSAM's training output are saved that way).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint file not found: {path}. Check the path, or run "
            "'protosam weights download NAME' to fetch the official file."
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint file is empty: {path}. Delete it and download it again.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as exc:
        raise CheckpointError(
            f"Cannot read checkpoint {path}: the file is truncated, corrupt, or contains "
            f"objects other than tensors ({type(exc).__name__}: {exc}). "
            "Delete it and download it again, or point to a valid checkpoint."
        ) from exc
    if isinstance(obj, Mapping):
        for wrapper_key in ("model", "state_dict"):
            inner = obj.get(wrapper_key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"Checkpoint {path} is not a state dict of named tensors; "
            "use the official checkpoint file for this model."
        )
    return dict(obj)


def check_state_dict_matches(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, model_name: str, path: PathLike
) -> None:
    """Raise CheckpointError unless ``state_dict`` has exactly the model's keys and shapes.

    A strict check with a readable message: loading a ViT-L checkpoint into a ViT-B model
    (or a DINOv2 file into SAM) must say so, not print a 200-line PyTorch traceback.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        k for k in set(expected) & set(state_dict) if tuple(expected[k].shape) != tuple(state_dict[k].shape)
    )
    if not (missing or unexpected or mismatched):
        return
    details = []
    if mismatched:
        k = mismatched[0]
        details.append(
            f"{len(mismatched)} tensors have other shapes (e.g. '{k}': file {tuple(state_dict[k].shape)}, "
            f"model {tuple(expected[k].shape)})"
        )
    if missing:
        details.append(f"{len(missing)} tensors missing (e.g. '{missing[0]}')")
    if unexpected:
        details.append(f"{len(unexpected)} unexpected tensors (e.g. '{unexpected[0]}')")
    raise CheckpointError(
        f"Checkpoint {path} does not fit architecture '{model_name}': " + "; ".join(details)
        + ". Choose the architecture that matches the file (or the file that matches the architecture)."
    )
