"""Search results: one row per (query, retrieved train row), as columns, with Parquet / JSON / table views.

Columns: ``query`` (0-based query row), ``query_id`` (the query sample's id), ``train`` (0-based train
row), ``train_id`` (the train sample's id), ``rank`` (0 = best for the direction), ``score`` (the exact
influence score, or the aggregate for query-time aggregation; positive = helps), ``unit`` (group name or
aggregation label) and ``kind`` (``proponents`` | ``opponents``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

COLUMNS = ("query", "query_id", "train", "train_id", "rank", "score", "unit", "kind")


@dataclass
class SearchResult:
    """Columnar search results; all arrays have one entry per row."""

    query: np.ndarray
    query_id: np.ndarray
    train: np.ndarray
    train_id: np.ndarray
    rank: np.ndarray
    score: np.ndarray
    unit: np.ndarray
    kind: np.ndarray
    info: dict = field(default_factory=dict)  # method, k, backend, factory, nprobe, aggregation, ...

    def __post_init__(self) -> None:
        self.query = np.asarray(self.query, np.int64)
        self.query_id = np.asarray(self.query_id, np.int64)
        self.train = np.asarray(self.train, np.int64)
        self.train_id = np.asarray(self.train_id, np.int64)
        self.rank = np.asarray(self.rank, np.int64)
        self.score = np.asarray(self.score, np.float64)
        self.unit = np.asarray(self.unit, dtype=object)
        self.kind = np.asarray(self.kind, dtype=object)
        n = len(self.query)
        if any(len(getattr(self, c)) != n for c in COLUMNS):
            raise ValueError("SearchResult columns must all have the same length")

    def __len__(self) -> int:
        return len(self.query)

    @classmethod
    def concat(cls, parts: list["SearchResult"], info: dict | None = None) -> "SearchResult":
        """Stack results (e.g. per query block, or proponents then opponents)."""
        if not parts:
            return cls.empty(info)
        cols = {c: np.concatenate([getattr(p, c) for p in parts]) for c in COLUMNS}
        return cls(**cols, info=dict(info if info is not None else parts[0].info))

    @classmethod
    def empty(cls, info: dict | None = None) -> "SearchResult":
        e = np.empty(0, np.int64)
        return cls(e, e, e, e, e, np.empty(0), np.empty(0, object), np.empty(0, object), info=dict(info or {}))

    def select(self, mask: np.ndarray) -> "SearchResult":
        return SearchResult(**{c: getattr(self, c)[mask] for c in COLUMNS}, info=dict(self.info))

    def topk(self, query: int, unit: str | None = None, kind: str | None = None) -> np.ndarray:
        """Train rows retrieved for ``query`` (optionally one unit/kind), in rank order."""
        m = self.query == query
        if unit is not None:
            m &= self.unit == unit
        if kind is not None:
            m &= self.kind == kind
        sub = self.select(m)
        return sub.train[np.argsort(sub.rank, kind="stable")]

    def to_rows(self) -> list[dict]:
        """JSON-ready rows ``{query, train, rank, score, unit}`` (0-based indices, rank 0 = best)."""
        return [{"query": int(q), "train": int(t), "rank": int(r), "score": float(s), "unit": str(u)}
                for q, t, r, s, u in zip(self.query, self.train, self.rank, self.score, self.unit)]

    def to_arrow(self):
        """A ``pyarrow.Table`` with the columns of this module's docstring (run info in the schema metadata)."""
        import json

        import pyarrow as pa

        table = pa.table({
            "query": pa.array(self.query), "query_id": pa.array(self.query_id),
            "train": pa.array(self.train), "train_id": pa.array(self.train_id),
            "rank": pa.array(self.rank), "score": pa.array(self.score),
            "unit": pa.array(self.unit.astype(str).tolist(), pa.string()).dictionary_encode(),
            "kind": pa.array(self.kind.astype(str).tolist(), pa.string()).dictionary_encode(),
        })
        return table.replace_schema_metadata({"fastinf.search": json.dumps(self.info, default=str)})

    def to_parquet(self, path: str | os.PathLike) -> Path:
        """Write the rows as Parquet (atomically: temp file then rename)."""
        import pyarrow.parquet as pq

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        pq.write_table(self.to_arrow(), tmp)
        os.replace(tmp, path)
        return path

    def table(self, max_queries: int = 5, max_rows: int = 10) -> str:
        """A readable text table: per query, unit and kind, the first ``max_rows`` rows."""
        lines = [f"{'query':>6} {'q_id':>8} {'kind':<10} {'unit':<28} {'rank':>4} {'train':>9} {'train_id':>9} "
                 f"{'score':>12}"]
        queries = np.unique(self.query)
        for q in queries[:max_queries]:
            mq = self.query == q
            for kind in dict.fromkeys(self.kind[mq]):
                for unit in dict.fromkeys(self.unit[mq & (self.kind == kind)]):
                    m = np.flatnonzero(mq & (self.kind == kind) & (self.unit == unit))
                    m = m[np.argsort(self.rank[m], kind="stable")][:max_rows]
                    for i in m:
                        name = str(unit) if len(str(unit)) <= 28 else "…" + str(unit)[-27:]
                        lines.append(f"{q:>6} {self.query_id[i]:>8} {kind:<10} {name:<28} {self.rank[i]:>4} "
                                     f"{self.train[i]:>9} {self.train_id[i]:>9} {self.score[i]:>12.5g}")
        if len(queries) > max_queries:
            lines.append(f"... {len(queries) - max_queries} more queries (use --out FILE.parquet or --json)")
        return "\n".join(lines)
