"""Score sources and unit groups of aggregation: what is read, and which units form each group.

``_Source`` gives uniform block / column reads over a ScoreSet-like object or a plain (units, test, train)
array (with its unit metadata and per-test correctness); ``_resolve_group(s)`` turn the ``groups=``
argument of :func:`fastinf.aggregation.aggregate.aggregate_all` (selectors, unit names or indices) into
unit indices. They sit apart from the aggregation pass so that evaluation (``layer_table``) can resolve
groups the same way.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np

from fastinf.aggregation.inputs import check_numeric
from fastinf.errors import ConfigError, SelectorError

#: A group: a selector string (``"middle"``, ``"first,last"``, ``"blocks[2:4]"``; see
#: :func:`fastinf.units.select`), or an explicit list of unit indices or unit names.
GroupSpec = Union[str, Sequence[int], Sequence[str]]


class _Source:
    """Uniform read access to a ScoreSet-like object or a plain (U, M, N) array."""

    def __init__(self, scores: Any, units: Sequence[Any] | None, test_correct: np.ndarray | None) -> None:
        self._open: tuple[int, Any] = (-1, None)
        if isinstance(scores, np.ndarray) or (hasattr(scores, "__array__") and not hasattr(scores, "unit_scores")):
            correct = self._init_array(np.asarray(scores), units, test_correct)
        elif all(hasattr(scores, a) for a in ("unit_names", "n_test", "n_train", "unit_scores")):
            correct = self._init_set(scores, units, test_correct)
        else:
            raise ConfigError(
                f"scores: expected a ScoreSet (from fastinf.score) or a (units, test, train) array, "
                f"found {type(scores).__name__}"
            )
        if not self.unit_names:
            raise ConfigError("scores: expected at least one unit, found none")
        if self.n_train < 1 or self.n_test < 1:
            raise ConfigError(f"scores: expected at least one test and one train sample, found M={self.n_test}, "
                              f"N={self.n_train}")
        self.test_correct = None if correct is None else _flags(correct)
        if self.test_correct is not None and self.test_correct.shape[0] != self.n_test:
            raise ConfigError(f"test_correct: expected {self.n_test} flags (one per test sample), found "
                              f"{self.test_correct.shape[0]}")

    def _init_array(self, arr: np.ndarray, units: Sequence[Any] | None, test_correct: np.ndarray | None) -> Any:
        """Read a plain (U, M, N) array with optional unit metadata; returns the correctness flags."""
        check_numeric(arr.dtype, "scores")
        if arr.ndim != 3:
            raise ConfigError(
                f"scores: expected per-unit scores of shape (units, test, train), found shape {arr.shape}; "
                "for a single unit use arr[None]"
            )
        self._arr: np.ndarray | None = arr
        self._set = None
        n_units, self.n_test, self.n_train = arr.shape
        self.units = list(units) if units is not None else None
        if self.units is not None and len(self.units) != n_units:
            raise ConfigError(f"units: expected {n_units} entries (one per score unit), found {len(self.units)}")
        if self.units is None:
            self.unit_names = [f"unit{i}" for i in range(n_units)]
        else:
            self.unit_names = [u if isinstance(u, str) else u.name for u in self.units]
        self.unit_objs = [u for u in (self.units or []) if not isinstance(u, str)] or None
        return test_correct

    def _init_set(self, scores: Any, units: Sequence[Any] | None, test_correct: np.ndarray | None) -> Any:
        """Read a ScoreSet-like object (its units and test_correct unless overridden); returns the flags."""
        self._arr = None
        self._set = scores
        self.unit_names = list(scores.unit_names)
        self.n_test, self.n_train = int(scores.n_test), int(scores.n_train)
        objs = units if units is not None else getattr(scores, "units", None)
        self.unit_objs = [u for u in objs if not isinstance(u, str)] if objs is not None else None
        if self.unit_objs is not None and len(self.unit_objs) != len(self.unit_names):
            self.unit_objs = None
        return test_correct if test_correct is not None else getattr(scores, "test_correct", None)

    def _unit(self, u: int) -> Any:
        """The [M, N] scores of unit ``u`` (a view / memory map; the last one is kept open)."""
        if self._arr is not None:
            return self._arr[u]
        if self._open[0] != u:
            self._open = (u, self._set.unit_scores(self.unit_names[u]))
        return self._open[1]

    def block(self, u: int, m0: int, m1: int) -> np.ndarray:
        """Scores of unit ``u`` for test rows ``m0:m1``; (m1 - m0, N)."""
        return np.asarray(self._unit(u)[m0:m1])

    def columns(self, u: int, rows: np.ndarray, c0: int, c1: int) -> np.ndarray:
        """Scores of unit ``u`` for test ``rows`` and train columns ``c0:c1``; (len(rows), c1 - c0)."""
        return np.asarray(self._unit(u)[:, c0:c1])[rows]


def _flags(correct: Any) -> np.ndarray:
    """Per-test correctness as bool [M]; refuses non-numeric values (strings would all read as True)."""
    arr = np.asarray(correct)
    check_numeric(arr.dtype, "test_correct")
    return arr.astype(bool).reshape(-1)


def _resolve_group(spec: GroupSpec, src: _Source) -> list[int]:
    """Unit indices (in score order) selected by one group spec."""
    names = src.unit_names
    if isinstance(spec, str) and not spec.strip(" ,+"):
        raise SelectorError(f"group: expected a selector (e.g. 'first', 'middle', 'all'), found {spec!r}")
    if not isinstance(spec, (str, Sequence, np.ndarray)):
        raise SelectorError(f"group: expected a selector string or a list of unit names / indices, found {spec!r}")
    if isinstance(spec, str):
        terms = [t.strip() for t in spec.split(",") if t.strip()]
        if terms and all(t in names for t in terms):  # exact unit names (and unions of them)
            return sorted({names.index(t) for t in terms})
        if spec.strip() == "all":
            return list(range(len(names)))
        if src.unit_objs is None:
            raise SelectorError(
                f"group {spec!r}: layer selectors need unit metadata (a ScoreSet, or units=[Unit, ...] with a "
                f"plain array), but these scores carry only unit names {names[:4]}{'...' if len(names) > 4 else ''}"
                "; give the group as unit names or indices instead"
            )
        from fastinf.extraction.units import select  # local: units imports torch-free helpers only when needed

        chosen = {u.name for u in select(src.unit_objs, spec)}
        idx = [i for i, n in enumerate(names) if n in chosen]
        if not idx:
            raise SelectorError(f"group {spec!r} matches none of the {len(names)} scored units; "
                                "check the selector (e.g. 'first', 'middle', 'last', 'all', 'blocks[2:4]')")
        return idx
    items = list(spec)
    if not items:
        raise SelectorError("group: expected a selector or a non-empty list of units, found an empty list")
    idx: list[int] = []
    for it in items:
        if isinstance(it, (int, np.integer)) and not isinstance(it, bool):
            if not 0 <= int(it) < len(names):
                raise SelectorError(f"group: unit index {int(it)} is out of range for {len(names)} scored units")
            idx.append(int(it))
        elif isinstance(it, str) and it in names:
            idx.append(names.index(it))
        else:
            raise SelectorError(f"group: {it!r} is neither a unit index nor one of the scored unit names")
    return sorted(set(idx))


def _group_name(spec: Any) -> str:
    """The name of a group given as a list of units (its members joined by commas)."""
    if not isinstance(spec, (Sequence, np.ndarray)):
        raise SelectorError(f"groups: expected each group to be a selector string or a list of unit names / "
                            f"indices, found {spec!r}")
    return ",".join(map(str, spec))


def _resolve_groups(groups: Any, src: _Source) -> dict[str, list[int]]:
    if groups is None:
        return {"all": list(range(len(src.unit_names)))}
    if isinstance(groups, str):
        return {groups: _resolve_group(groups, src)}
    if isinstance(groups, Mapping):
        items = [(str(k), v) for k, v in groups.items()]
    elif not isinstance(groups, (Sequence, np.ndarray)):
        raise SelectorError(f"groups: expected None, a selector, a list of selectors / unit lists or a mapping "
                            f"name -> selector, found {groups!r}")
    else:
        seq = list(groups)
        if seq and all(isinstance(g, (int, np.integer)) for g in seq):
            items = [("group", seq)]  # a single list of indices
        else:
            items = [(g if isinstance(g, str) else _group_name(g), g) for g in seq]
    if not items:
        raise SelectorError("groups: expected at least one group, found none")
    return {name: _resolve_group(spec, src) for name, spec in items}
