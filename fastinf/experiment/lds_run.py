"""``fastinf.lds(config)`` / ``fastinf lds CONFIG``: a run with datamodel retrains and the LDS of every estimate.

It is ``fastinf run`` with an ``lds:`` section (:mod:`.lds`): everything the run already computed is reused,
the retrains are cached per subset, and the LDS rows of every seed are returned next to the report.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from fastinf.experiment.config import RunConfig
from fastinf.experiment.lds import apply_lds_overrides
from fastinf.experiment.pipeline import run_experiment

__all__ = ["lds"]


def lds(config: RunConfig | str | Path, out: str | Path | None = None, *, m: int | None = None,
        alpha: float | None = None, seed: int | None = None, workers: int | None = None,
        epochs: int | None = None, overwrite: bool = False, progress: bool = False,
        echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the experiment of ``config`` with datamodel retrains and LDS; returns a summary:
    ``{"out", "rows": [LDS rows of every seed], "report": report.md path}``.

    Everything the run already computed is reused (stages are cached); the retrains are cached per subset,
    so a killed or extended (larger ``m``) call redoes only what is missing. Overrides of the ``lds:``
    section: ``m`` subsets, fraction ``alpha``, subset ``seed``, ``workers`` processes, ``epochs``.
    """
    cfg = config if isinstance(config, RunConfig) else RunConfig.from_yaml(config)
    cfg = apply_lds_overrides(cfg, m=m, alpha=alpha, seed=seed, workers=workers, epochs=epochs)
    res = run_experiment(cfg, out, progress=progress, echo=echo, overwrite=overwrite)
    rows = [r for s in cfg.seeds for r in json.loads((res.out / f"seed-{s}" / "lds.json").read_text())]
    return {"out": str(res.out), "rows": rows, "report": str(res.report.markdown)}
