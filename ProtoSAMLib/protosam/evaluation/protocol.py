"""The SSL-ALPNet / ProtoSAM one-shot evaluation protocol: folds, support and query slices.

Rules (read from the public reference code, re-implemented here):

* **Folds.** Scans are sorted by their numeric id and treated as a circular list. With
  ``n`` scans and 5 folds the boundaries are ``round(i * n / 5)`` (``[0, 6, 12, 18, 24, 30]``
  for the 30 Synapse scans, ``[0, 4, ..., 20]`` for the 20 CHAOS scans). Fold ``f`` queries
  the scans ``[b_f, b_{f+1})`` and takes the next scan, ``b_{f+1}`` (circularly), as support.
* **Support slices.** For ``n_chunks`` parts (3 in the paper) the support slice of part
  ``i`` is ``slices[int(p_i * len(slices))]`` where ``slices`` is the sorted list of the
  support scan's slices that contain the structure and ``p_i = 1/(2n) + i * (1 - 1/n)/(n - 1)``
  (1/6, 1/2, 5/6 for three parts; 1/2 for one part).
* **Query parts.** A query slice ``z`` belongs to part
  ``int((z - z_min) // ((z_max - z_min) / n_chunks))`` clipped to ``[0, n_chunks - 1]``,
  where ``z_min``/``z_max`` are the first/last slices of the *query's own* ground truth
  (0 when ``z_min == z_max``).
* **Evaluated slices.** 2-D Dice: the query slices that contain the structure. 3-D Dice:
  all slices in ``[z_min, z_max]``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

DEFAULT_N_CHUNKS = 3
DEFAULT_N_FOLDS = 5


def chunk_fractions(n_chunks: int = DEFAULT_N_CHUNKS) -> List[float]:
    """Relative positions of the support slices inside the support's organ slice list."""
    if n_chunks < 1:
        raise ValueError(f"n_chunks must be >= 1, got {n_chunks}")
    if n_chunks == 1:
        return [0.5]
    half_part = 1.0 / (n_chunks * 2)
    interval = (1.0 - 1.0 / n_chunks) / (n_chunks - 1)
    return [half_part + interval * i for i in range(n_chunks)]


def support_slice_indices(organ_slices: Sequence[int], n_chunks: int = DEFAULT_N_CHUNKS) -> List[int]:
    """Support slice (an index along the slice axis) for each of ``n_chunks`` parts.

    ``organ_slices``: the support scan's slices that contain the structure (any order).
    """
    ordered = sorted(int(s) for s in organ_slices)
    if not ordered:
        raise ValueError("The support scan does not contain the structure: no support slice.")
    return [ordered[int(fraction * len(ordered))] for fraction in chunk_fractions(n_chunks)]


def query_chunk(slice_index: int, z_min: int, z_max: int, n_chunks: int = DEFAULT_N_CHUNKS) -> int:
    """Part (0-based) of a query slice, from the query's own ground-truth extent."""
    if n_chunks < 1:
        raise ValueError(f"n_chunks must be >= 1, got {n_chunks}")
    if z_max == z_min:
        return 0
    part = int((slice_index - z_min) // ((z_max - z_min) / n_chunks))
    return min(max(part, 0), n_chunks - 1)


def query_chunks(slices: Sequence[int], z_min: int, z_max: int,
                 n_chunks: int = DEFAULT_N_CHUNKS) -> Dict[int, int]:
    """``{slice: part}`` for several query slices (see :func:`query_chunk`)."""
    return {int(s): query_chunk(int(s), z_min, z_max, n_chunks) for s in slices}


def scan_sort_key(scan_id: str) -> Tuple[int, object]:
    """Numeric ids sort numerically (the reference uses the last group of digits)."""
    digits = re.findall(r"\d+", scan_id)
    if digits:
        return (0, int(digits[-1]))
    return (1, scan_id)


def fold_boundaries(n_scans: int, n_folds: int = DEFAULT_N_FOLDS) -> List[int]:
    """``[round(i * n_scans / n_folds) for i in 0..n_folds]``."""
    if n_folds < 1:
        raise ValueError(f"n_folds must be >= 1, got {n_folds}")
    if n_scans < 2:
        raise ValueError(f"Need at least 2 scans (one support, one query), got {n_scans}")
    return [int(round(i * n_scans / n_folds)) for i in range(n_folds + 1)]


@dataclass(frozen=True)
class FoldSplit:
    """Which scan is the support and which scans are queried in one fold."""

    fold: int
    support_scan: str
    query_scans: Tuple[str, ...]


def fold_split(scan_ids: Sequence[str], fold: int = 0, n_folds: int = DEFAULT_N_FOLDS) -> FoldSplit:
    """The reference's fold rule (see module docstring). ``scan_ids`` in any order."""
    ordered = sorted((str(s) for s in scan_ids), key=scan_sort_key)
    if len(set(ordered)) != len(ordered):
        raise ValueError("scan ids must be unique")
    bounds = fold_boundaries(len(ordered), n_folds)
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in [0, {n_folds - 1}], got {fold}")
    n = len(ordered)
    queries = [ordered[i % n] for i in range(bounds[fold], bounds[fold + 1])]
    support = ordered[bounds[fold + 1] % n]
    queries = [q for q in queries if q != support]
    if not queries:
        raise ValueError(f"Fold {fold} of {n_folds} has no query scan with {n} scans; "
                         "use fewer folds or name the support scan explicitly.")
    return FoldSplit(fold=fold, support_scan=support, query_scans=tuple(queries))


def explicit_split(scan_ids: Sequence[str], support_scan: str) -> FoldSplit:
    """Support named by the user; every other scan is a query (fold reported as -1)."""
    ordered = sorted((str(s) for s in scan_ids), key=scan_sort_key)
    if support_scan not in ordered:
        raise ValueError(f"Support scan {support_scan!r} is not in the dataset; "
                         f"known scans: {', '.join(ordered)}")
    queries = tuple(s for s in ordered if s != support_scan)
    if not queries:
        raise ValueError("The dataset has only the support scan; add at least one query scan.")
    return FoldSplit(fold=-1, support_scan=support_scan, query_scans=queries)


@dataclass(frozen=True)
class QueryPlan:
    """Slices of one query scan to segment for one structure under the paper's protocol.

    ``chunk_of_slice``: every slice in ``[z_min, z_max]`` -> its part;
    ``organ_slices``: those of them that contain the structure (2-D Dice set).
    """

    z_min: int
    z_max: int
    chunk_of_slice: Dict[int, int]
    organ_slices: Tuple[int, ...]

    def slices_of_chunk(self, chunk: int) -> List[int]:
        return [s for s, c in sorted(self.chunk_of_slice.items()) if c == chunk]


def plan_query(gt_organ_slices: Sequence[int], n_chunks: int = DEFAULT_N_CHUNKS) -> QueryPlan:
    """Build the :class:`QueryPlan` of a query from its ground-truth organ slices."""
    ordered = sorted(int(s) for s in gt_organ_slices)
    if not ordered:
        raise ValueError("The query scan does not contain the structure.")
    z_min, z_max = ordered[0], ordered[-1]
    chunks = query_chunks(range(z_min, z_max + 1), z_min, z_max, n_chunks)
    return QueryPlan(z_min=z_min, z_max=z_max, chunk_of_slice=chunks, organ_slices=tuple(ordered))


def organ_slice_list(label_volume: np.ndarray, label_value: int, axis: int = 0) -> List[int]:
    """Sorted slice indices along ``axis`` where ``label_volume == label_value`` somewhere."""
    volume = np.asarray(label_volume)
    if volume.ndim != 3:
        raise ValueError(f"label_volume must be 3-D, got shape {volume.shape}")
    other_axes = tuple(a for a in range(3) if a != axis % 3)
    return np.flatnonzero((volume == label_value).any(axis=other_axes)).astype(int).tolist()
