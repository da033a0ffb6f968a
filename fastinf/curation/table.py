"""The curation results table and the datasets written back (cleaned: rows removed; flagged: annotated).

Results table (``results.parquet``, one row per scored train sample, in input order): ``id`` (row position
in the input), ``text``, ``label``, ``predicted_label``, ``loss`` (the model's, from the train store),
``score`` (aggregated influence; lowest = most detrimental), ``rank`` (1 = most detrimental; ties by row
order) and ``flagged`` (among the lowest ``P`` percent of ``--flag-lowest`` / ``--drop-lowest``).

Written datasets keep the input's format, every original column and row order: ``cleaned`` drops the
lowest ``P`` percent of the scored rows (held-out reference rows are kept); ``flagged`` keeps all rows and
adds ``fastinf_score``, ``fastinf_rank`` (0 = not scored), ``fastinf_flagged`` and ``fastinf_reference``.
Both go through :func:`fastinf.data.write_like` (a ``TextDataset`` passed in the API, which that refuses,
goes through the private fallback :mod:`fastinf.curation._write_back`, which also covers a data layer
without ``write_like``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastinf.errors import ConfigError

__all__ = ["Ranking", "rank_scores", "n_lowest", "check_percent", "write_results", "write_dataset"]


@dataclass
class Ranking:
    """Scores of the scored rows with their ranks (1 = most detrimental) and the flagged mask."""

    rows: np.ndarray       # int64 row positions in the input
    score: np.ndarray      # float64
    rank: np.ndarray       # int64, 1-based
    flagged: np.ndarray    # bool


def check_percent(p: Any, flag: str) -> float | None:
    """``p`` as a percentage in (0, 100), or None; a one-line ConfigError otherwise."""
    if p is None:
        return None
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 100 or math.isnan(p):
        raise ConfigError(f"{flag}: expected a percentage in (0, 100), e.g. 5 for the lowest 5%, found {p!r}")
    return float(p)


def n_lowest(p: float | None, n: int) -> int:
    """How many rows are the lowest ``p`` percent of ``n`` (rounded half up; 0 without ``p``)."""
    return 0 if p is None else int(math.floor(p * n / 100.0 + 0.5))


def rank_scores(rows: np.ndarray, score: np.ndarray, n_flag: int) -> Ranking:
    """Ascending ranks of ``score`` (stable: ties keep row order) and the ``n_flag`` lowest flagged."""
    order = np.argsort(score, kind="stable")
    rank = np.empty(len(score), np.int64)
    rank[order] = np.arange(1, len(score) + 1)
    return Ranking(np.asarray(rows, np.int64), np.asarray(score, np.float64), rank, rank <= n_flag)


def _columns(full: Any, r: Ranking, meta: Any) -> dict[str, Any]:
    """The results-table columns (besides ``id``) of the scored rows."""
    from fastinf.curation.inputs import texts_at

    texts = texts_at(full, r.rows)
    return {"text": texts, "label": np.asarray(full.labels, np.int64)[r.rows],
            "predicted_label": np.asarray(meta.pred, np.int64), "loss": np.asarray(meta.loss, np.float32),
            "score": r.score, "rank": r.rank, "flagged": r.flagged}


def write_results(path: Path, full: Any, r: Ranking, meta: Any) -> None:
    """Write ``results.parquet`` (atomically): via ``fastinf.data.results_table`` when available."""
    cols = _columns(full, r, meta)
    tmp = path.with_name(f".{path.name}.tmp")
    import fastinf.data as data

    results_table = getattr(data, "results_table", None)
    if results_table is not None:
        results_table(r.rows, cols, as_="parquet", path=tmp)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": r.rows, **cols}), tmp)
    tmp.replace(path)


def annotations(n: int, r: Ranking) -> dict[str, np.ndarray]:
    """The ``fastinf_*`` columns over all ``n`` input rows (reference rows: NaN score, rank 0)."""
    score = np.full(n, np.nan)
    rank = np.zeros(n, np.int64)
    flagged = np.zeros(n, bool)
    ref = np.ones(n, bool)
    score[r.rows], rank[r.rows], flagged[r.rows], ref[r.rows] = r.score, r.rank, r.flagged, False
    return {"fastinf_score": score, "fastinf_rank": rank, "fastinf_flagged": flagged, "fastinf_reference": ref}


def write_dataset(source: Any, dest: Path, keep: np.ndarray, extra: dict[str, np.ndarray] | None) -> Path:
    """Write the input ``source`` (rows ``keep``, plus ``extra`` columns) to ``dest`` in its own format."""
    import fastinf.data as data
    from fastinf.curation import _write_back

    fallback = isinstance(source, data.TextDataset)      # an API TextDataset: write_like takes files and tables
    write_like = _write_back.write_like if fallback else data.write_like
    write_like(source, dest, keep=keep, extra_columns=extra or {}, overwrite=True)
    return dest


def output_name(source: Any, stem: str) -> str:
    """``stem`` plus the input's suffix (a directory source gives a directory ``stem``; in-memory: .parquet)."""
    from fastinf.curation.inputs import is_hf_disk_dir

    if isinstance(source, (str, Path)) and not is_hf_disk_dir(source):
        return stem + "".join(Path(source).suffixes[-1:]).lower()
    return stem if isinstance(source, (str, Path)) else stem + ".parquet"
