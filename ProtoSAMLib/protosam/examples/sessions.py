"""From a correction session into a bank: its fixed slices (painted or corrected, whole masks)."""
from __future__ import annotations

from typing import Hashable, List, Optional, Sequence

import numpy as np

from ..errors import InputError
from .bank import Example, ExampleBank

__all__ = ["add_session_slices"]


def add_session_slices(bank: ExampleBank, session, structure: Hashable, name: Optional[str] = None, *,
                       slices: Optional[Sequence[int]] = None, terminology: Optional[str] = None) -> List[Example]:
    """Add ``session``'s fixed slices of ``structure`` (the slices painted or corrected there;
    ``slices`` picks some of them) to ``bank`` as examples of ``name`` (default: the key as
    text). Each is the slice as the session normalised it with the slice's whole mask as it
    stands; slices where the structure is absent are skipped (nothing to teach)."""
    fixed = session.fixed_slices(structure)
    chosen = fixed if slices is None else [int(k) for k in slices]
    outside = sorted(set(chosen) - set(fixed))
    if outside:
        raise InputError(f"Slice(s) {outside} of '{structure}' were neither painted nor corrected: only those "
                         f"become examples (fixed slices: {fixed}).")
    mask = np.moveaxis(session.mask(structure), session.axis, 0)
    chosen = [k for k in chosen if mask[k].any()]
    if not chosen:
        raise InputError(f"'{structure}' has no painted or corrected slice showing it: nothing to add.")
    return bank.add_slices(str(structure) if name is None else name, session.volume, mask, chosen, axis=session.axis,
                           terminology=terminology, modality=session.modality)
