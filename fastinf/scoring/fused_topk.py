"""Per-test top-k proponents and opponents per unit group, from the slabs of the fused pass (no extra GEMM).

For test sample j and group g the score of train sample i is the mean over g's units of the unit scores
``S_u[j, i]`` (summed in float32 in unit order, divided in float64). While a task (one test-block set, every
unit) runs, each group keeps one m x N float32 sum per test block of the set; when the task ends, each used
test row yields its k highest (proponents, most helpful first) and k lowest (opponents, most harmful
first) train samples. Ties are broken by the lower train index, exactly (no partial-selection ambiguity),
so the lists equal a full stable sort of the same sums. Memory: groups x set blocks x m x N float32.

Parquet columns: ``test`` (kept test row), ``test_id``, ``group``, ``side`` (``proponent`` / ``opponent``),
``position`` (0 = first), ``train`` (kept train row), ``train_id``, ``score``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fastinf.errors import ConfigError

__all__ = ["TopK", "top_indices", "MAX_TOP_K", "write_topk", "merge_rows"]

MAX_TOP_K = 1000
_COLUMNS = ("test", "group", "side", "position", "train", "score")


def top_indices(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries of ``row``, largest first, ties by ascending index (exact)."""
    n = len(row)
    k = min(k, n)
    if k == n:
        return np.lexsort((np.arange(n), -row))
    v = row[np.argpartition(-row, k - 1)[:k]].min()
    strict = np.flatnonzero(row > v)
    sel = np.concatenate([strict, np.flatnonzero(row == v)[:k - len(strict)]])
    return sel[np.lexsort((sel, -row[sel]))]


class TopK:
    """The group sums of the current task and the rows found so far."""

    def __init__(self, run: Any, k: int, groups: dict[str, list[int]]) -> None:
        self.run, self.k = run, int(k)
        self.groups = groups                                        # group -> plan unit indices
        self.of_unit: dict[int, list[str]] = {}
        for g, idx in groups.items():
            for u in idx:
                self.of_unit.setdefault(u, []).append(g)
        self.sums: dict[str, list[np.ndarray]] = {}
        self.rows: list[dict[str, np.ndarray]] = []

    def start(self, task: Any) -> None:
        """Zero the group sums for the test blocks of ``task``."""
        n = self.run.atoms[0].n
        plan = self.run.plan
        self.sums = {g: [np.zeros((int(keep.sum()), n), np.float32) for _, _, keep in task.blocks]
                     for g in self.groups}
        self.m0s = [plan.row_offset(r0) for r0, _, _ in task.blocks]

    def add(self, ui: int, i: int, slab: np.ndarray) -> None:
        """Add unit ``ui``'s slab of test block ``i`` to the sums of its groups."""
        for g in self.of_unit.get(ui, ()):
            self.sums[g][i] += slab

    def finish(self) -> None:
        """Select the top-k lists of every used test row of the task and free its sums."""
        rows_ok = self.run.rows_ok
        for g, blocks in self.sums.items():
            div = float(len(self.groups[g]))
            for m0, s in zip(self.m0s, blocks):
                for r in np.flatnonzero(rows_ok[m0:m0 + len(s)]):
                    for side, row in (("proponent", s[r]), ("opponent", -s[r])):
                        idx = top_indices(row, self.k)
                        self.rows.append({"test": np.full(len(idx), m0 + r, np.int64), "group": g, "side": side,
                                          "position": np.arange(len(idx), dtype=np.int32), "train": idx,
                                          "score": s[r][idx].astype(np.float64) / div})
        self.sums = {}


def merge_rows(parts: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of several ranks in test-row order (each rank's rows are already ordered)."""
    rows = [r for p in parts for r in p]
    return sorted(rows, key=lambda r: (int(r["test"][0]), r["group"], r["side"]))


def write_topk(rows: list[dict[str, Any]], path: str | Path, test_ids: np.ndarray, train_ids: np.ndarray,
               group_order: list[str]) -> int:
    """Write the rows (ordered by test row, group order, proponents first) as Parquet, atomically."""
    import pyarrow as pa

    from fastinf.aggregation.parquet import _write_atomically, check_out_path

    order = {g: i for i, g in enumerate(group_order)}
    rows = sorted(rows, key=lambda r: (int(r["test"][0]), order[r["group"]], r["side"] != "proponent"))
    cols: dict[str, Any] = {}
    for c in _COLUMNS:
        if c in ("group", "side"):
            cols[c] = np.concatenate([np.full(len(r["train"]), r[c], dtype=object) for r in rows] or [[]])
        else:
            cols[c] = np.concatenate([r[c] for r in rows]) if rows else np.zeros(0)
    test = cols["test"].astype(np.int64)
    train = cols["train"].astype(np.int64)
    table = pa.table({"test": test, "test_id": np.asarray(test_ids)[test], "group": cols["group"].astype(str),
                      "side": cols["side"].astype(str), "position": cols["position"].astype(np.int32),
                      "train": train, "train_id": np.asarray(train_ids)[train],
                      "score": cols["score"].astype(np.float64)})
    _write_atomically(table, check_out_path(path, "top_k_out"))
    return table.num_rows


def check_topk(top_k: Any, top_k_out: Any, out: Any) -> None:
    """Refuse a bad ``top_k`` / ``top_k_out`` before any work."""
    if top_k_out is None:
        return
    from fastinf.aggregation.parquet import check_out_path

    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise ConfigError(f"top_k: expected an integer in 1..{MAX_TOP_K}, found {top_k!r}")
    if not str(top_k_out).endswith(".parquet"):
        raise ConfigError(f"top_k_out: expected a .parquet path, found {str(top_k_out)!r}")
    check_out_path(top_k_out, "top_k_out")
    if out is not None and Path(out).resolve() == Path(top_k_out).resolve():
        raise ConfigError(f"top_k_out {top_k_out} is also the aggregate output; give two different files")
