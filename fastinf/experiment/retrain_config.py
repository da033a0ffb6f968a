"""The ``evaluate.retrain_grid:`` section of a run config (kept out of config.py, which is near its size limit).

A grid of filter-and-retrain settings: every (method, aggregation, unit group, p) of the product of its
lists removes the p% lowest-scored training samples and fine-tunes again from the run's initial checkpoint;
the retrained accuracy on the evaluation split is what claim 3 correlates NDR and the cancellation ratio
with (:mod:`fastinf.experiment.retrain_grid`). This module only validates shapes and ranges; that the
methods were scored and the aggregations exist is checked against the whole config by
:func:`fastinf.experiment.retrain_grid.check_grid` before a run starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fastinf.errors import ConfigError

__all__ = ["RetrainGridConfig"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _strings(v: object) -> bool:
    return v is None or (isinstance(v, list) and bool(v) and all(isinstance(x, str) and x for x in v))


@dataclass
class RetrainGridConfig:
    """methods x how x groups x p filter-and-retrain settings (default 12 per method: 3 aggregations x
    first/middle/last/all x p=20), plus a no-removal and a random-removal retrain per p as references."""

    enabled: bool = False
    methods: list[str] | None = None     # None: every score.methods entry
    how: list[str] = field(default_factory=lambda: ["mean", "rank", "vote"])
    groups: list[str] = field(default_factory=lambda: ["first", "middle", "last", "all"])
    p: list[float] = field(default_factory=lambda: [20.0])   # percent of the training set removed
    epochs: int | None = None            # None: the fine-tune's epochs
    workers: int = 1                     # parallel retrain processes (1 torch thread each)
    references: bool = True              # also retrain on everything and after removing p% at random
    eval_fraction: float = 0.5           # heldout: shared only: the share of the pool held out for evaluation
    n_boot: int = 2000                   # bootstrap resamples of the claim-3 correlation intervals

    def __post_init__(self) -> None:
        w = "evaluate.retrain_grid"
        _check(isinstance(self.enabled, bool), f"{w}.enabled must be true or false; got {self.enabled!r}")
        for name in ("methods", "how", "groups"):
            _check(_strings(getattr(self, name)) and (name == "methods" or getattr(self, name) is not None),
                   f"{w}.{name} must be a non-empty list of names; got {getattr(self, name)!r}")
        _check(isinstance(self.p, list) and bool(self.p) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < 100 for x in self.p),
            f"{w}.p must be a non-empty list of percentages in (0, 100); got {self.p!r}")
        _check(self.epochs is None or (isinstance(self.epochs, int) and self.epochs >= 1),
               f"{w}.epochs must be a positive integer or null; got {self.epochs!r}")
        _check(isinstance(self.workers, int) and not isinstance(self.workers, bool) and self.workers >= 1,
               f"{w}.workers must be a positive integer; got {self.workers!r}")
        _check(isinstance(self.eval_fraction, (int, float)) and 0.0 < self.eval_fraction < 1.0,
               f"{w}.eval_fraction must lie in (0, 1); got {self.eval_fraction!r}")
        _check(isinstance(self.n_boot, int) and self.n_boot >= 1, f"{w}.n_boot must be >= 1; got {self.n_boot!r}")
