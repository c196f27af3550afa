"""A run's supports from a bank: which structures, under which output labels, with features.

Shared by ``protosam segment`` and ``protosam batch`` (``--examples BANK``)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from ..errors import InputError
from .bank import ExampleBank

__all__ = ["open_bank_for_run", "structure_labels", "bank_supports"]


def open_bank_for_run(folder, outputs: Dict[str, Optional[str]]):
    """The bank of ``--examples`` (it must exist), after checking that no output of the run
    (option -> path) lies in it: a run reads a bank and never writes into it."""
    bank = ExampleBank(folder, create=False)
    root = Path(folder).resolve()
    for option, path in outputs.items():
        if path is not None and (Path(path).resolve() == root or root in Path(path).resolve().parents):
            raise InputError(f"{option} {path} is inside the example bank {folder}: write results elsewhere, so the "
                             "bank holds only examples.")
    return bank


def structure_labels(counts: Dict[str, int], spec: Optional[str], taken: List[int]) -> Dict[int, str]:
    """output label -> bank structure name, from ``--structures`` (``spec``) or every structure.

    ``taken``: labels of the support mask (a bank structure may share one: used together)."""
    names = list(counts)
    chosen: List[tuple] = []
    if spec:
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            name, _, label = part.partition("=")
            if name not in counts:
                raise InputError(f"--structures names '{name}', which the bank does not hold; it holds "
                                 f"{', '.join(names) or 'nothing'} ('protosam examples list').")
            try:
                value = int(label) if label else None
            except ValueError:
                raise InputError(f"--structures takes NAME or NAME=LABEL (a positive number), not {part!r}.") from None
            if value is not None and value <= 0:
                raise InputError(f"--structures: label {value} of '{name}' must be a positive number.")
            chosen.append((name, value))
    else:
        chosen = [(name, None) for name in names]
    result: Dict[int, str] = {}
    for name, value in chosen:
        if value is None and name.isdigit() and int(name) > 0:
            value = int(name)
        if value is not None:
            if value in result:
                raise InputError(f"Structures '{result[value]}' and '{name}' would both be label {value}: give each its "
                                 "own label with --structures NAME=LABEL.")
            result[value] = name
    used = set(result) | set(taken)
    following = max(used, default=0) + 1
    for name, value in chosen:
        if name in result.values():
            continue
        result[following] = name
        following += 1
    if not result:
        raise InputError("The example bank is empty: add examples with 'protosam examples add' first.")
    return result


def bank_supports(bank, labels: Dict[int, str], plane: str, engine=None, features=None) -> Dict[int, list]:
    """label -> the bank's examples of its structure in ``plane``, with cached encoder features
    (for ``engine``, or from ``features``: see :meth:`ExampleBank.supports`)."""
    supports = {}
    for label, name in labels.items():
        found = bank.supports(name, plane=plane, engine=engine, features=features)
        if not found:
            planes = sorted({e.plane or f"axis {e.axis}" for e in bank.list(name)})
            raise InputError(f"The bank has no {plane} examples of '{name}' (it has {', '.join(planes)} ones): choose "
                             f"--axis {planes[0]} or add {plane} examples.")
        supports[label] = found
    return supports
