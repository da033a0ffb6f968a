"""The retrain grid (``evaluate.retrain_grid``): does NDR predict retrained accuracy better than the
cancellation ratio (the paper's claim 3)?

For one seed, every setting of the product ``methods x how x groups x p`` ranks the training samples by the
(method, aggregation, group) influence score, removes the lowest ``p``% and fine-tunes again from the seed's
initial checkpoint with the run's recipe (:mod:`.retrain_jobs`); the retrained model's accuracy is measured on
an **evaluation split** that neither defined the influence scores nor selected a checkpoint. With
``references`` the grid also retrains on everything (``none``) and after removing ``p``% at random.

Which samples play which part (recorded in ``grid.json`` and in every row as ``eval_split``):

- ``data.heldout`` other than ``shared`` (:mod:`.splits`): influence = the run's influence split (the test
  store), checkpoint selection = its selection split, accuracy = its evaluation split;
- ``shared`` (one held-out pool): the pool is split here, deterministically (``default_rng([split_seed, 2])``),
  into an evaluation part (``eval_fraction``) and an influence part; the grid's scores are re-aggregated
  over the influence part's test rows only (a sub-store of the test store, ``influence_store/``), the
  retrains select their checkpoint on the influence part, and accuracy is measured on the evaluation part.

Each setting row also holds the headline NDR and AUC_NDR of the score it removed by and the cancellation
ratio of its group (:func:`fastinf.aggregation.evaluate.group_cancellation`), the inputs of claim 3
(:mod:`.claims`). Layout under ``seed-<s>/retrain_grid/``: ``scores.npz`` (+ ``scores.json``: its digest),
``influence_store/``, ``results/<key>.json`` (one per finished setting), ``work/`` (retrains in progress).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fastinf.errors import ConfigError
from fastinf.experiment.config import AGGREGATIONS, RunConfig, config_hash, to_dict
from fastinf.experiment.retrain_jobs import GridJob, read_result, run_jobs

__all__ = ["Setting", "check_grid", "grid_settings", "grid_heldout", "run_grid", "GRID_DIR"]

GRID_DIR = "retrain_grid"


@dataclass(frozen=True)
class Setting:
    """One retrain of the grid: ``strategy`` influence (by method/how/group), none or random; ``p`` percent."""

    strategy: str
    method: str
    how: str
    group: str
    p: float

    @property
    def key(self) -> str:
        name = f"{self.strategy}-{self.method}-{self.how}-{self.group}-p{self.p:g}"
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


def check_grid(cfg: RunConfig) -> None:
    """Refuse a grid naming an unscored method or an aggregation the one-pass scorer lacks (before any work)."""
    from fastinf.scoring.fused import FUSED_HOWS

    g = cfg.evaluate.retrain_grid
    if not g.enabled:
        return
    bad = [m for m in (g.methods or []) if m not in cfg.score.methods]
    if bad:
        raise ConfigError(f"evaluate.retrain_grid.methods: {bad[0]!r} is not in score.methods "
                          f"({', '.join(cfg.score.methods)}); add it there or drop it from the grid")
    bad = [h for h in g.how if h not in AGGREGATIONS or h not in FUSED_HOWS]
    if bad:
        raise ConfigError(f"evaluate.retrain_grid.how: {bad[0]!r} is not one of {', '.join(FUSED_HOWS)}")


def grid_settings(cfg: RunConfig) -> list[Setting]:
    """The product methods x how x groups x p, then (``references``) none once and random per p."""
    g = cfg.evaluate.retrain_grid
    methods = g.methods or list(cfg.score.methods)
    out = [Setting("influence", m, h, grp, float(p)) for m, h, grp, p in itertools.product(methods, g.how, g.groups, g.p)]
    if g.references:
        out += [Setting("none", "-", "-", "-", 0.0)] + [Setting("random", "-", "-", "-", float(p)) for p in g.p]
    return out


def grid_heldout(cfg: RunConfig, test: Any) -> tuple[Any, Any, np.ndarray | None, dict[str, Any]]:
    """(selection split, evaluation split, influence rows of ``test`` to re-aggregate over or None, the
    record of which is which); see the module docstring."""
    heldout = getattr(cfg.data, "heldout", "shared")
    if heldout != "shared":
        from fastinf.experiment.splits import load_named_splits

        s = load_named_splits(cfg)
        return s.select, s.evaluation, None, {
            "heldout": heldout, "influence": "the influence split (the test store)",
            "select": "the selection split", "evaluation": "the evaluation split",
            "sizes": {"influence": len(s.influence), "select": len(s.select), "evaluation": len(s.evaluation)}}
    m = len(test)
    n_eval = int(round(cfg.evaluate.retrain_grid.eval_fraction * m))
    if not 1 <= n_eval < m:
        raise ConfigError(f"evaluate.retrain_grid.eval_fraction {cfg.evaluate.retrain_grid.eval_fraction} of "
                          f"{m} held-out samples leaves no influence or no evaluation sample; raise data.n_test")
    perm = np.random.default_rng([cfg.data.split_seed, 2]).permutation(m)
    ev, inf = np.sort(perm[:n_eval]), np.sort(perm[n_eval:])
    return test.subset(inf, f"{test.name}:influence"), test.subset(ev, f"{test.name}:evaluation"), inf, {
        "heldout": "shared", "influence": f"{inf.size} rows of the held-out pool (also selects checkpoints)",
        "select": "the influence rows", "evaluation": f"the other {ev.size} rows",
        "influence_rows": inf.tolist(), "evaluation_rows": ev.tolist(),
        "sizes": {"influence": int(inf.size), "select": int(inf.size), "evaluation": int(ev.size)}}


def _influence_store(test_store: Any, rows: np.ndarray, path: Path) -> Any:
    """The test store restricted to ``rows`` (same identity, so it scores against the train store); reused
    when it exists for the same rows."""
    from fastinf.store import GradientStore
    from fastinf.store.writer import StoreWriter

    digest = hashlib.sha256(rows.astype(np.int64).tobytes()).hexdigest()
    rec = path.with_name(path.name + ".json")
    if (path / "manifest.json").is_file() and rec.is_file() and json.loads(rec.read_text()).get("rows") == digest:
        try:
            return GradientStore.open(path)
        except Exception:    # noqa: BLE001 - an interrupted one: write it again below
            pass
    meta = test_store.meta
    fields = {"ids": meta.ids, "label": meta.label, "loss": meta.loss, "pred": meta.pred, "correct": meta.correct}
    if meta.logits is not None:
        fields["logits"] = meta.logits
    w = StoreWriter(path, identity=test_store.identity, units=test_store.units,
                    feature_dims={u: test_store.feature_dim(u) for u in test_store.unit_names}, n=int(rows.size),
                    dtype=test_store.dtype, chunk_size=int(rows.size),
                    n_classes=None if meta.logits is None else int(meta.logits.shape[1]), overwrite=path.exists())
    with w:
        w.write_chunk(0, {u: test_store.gather(u, rows) for u in test_store.unit_names},
                      {k: np.asarray(v)[rows] for k, v in fields.items()})
        store = w.finalize()
    rec.write_text(json.dumps({"rows": digest}) + "\n")
    return store


def _grid_scores(cfg: RunConfig, gdir: Path, stores: dict[str, Any], spec: dict[str, list[str]],
                 test_store: Any) -> dict[tuple[str, str, str], np.ndarray]:
    """(method, how, group) -> train scores aggregated over ``test_store``'s rows: one fused pass per method,
    cached in ``scores.npz`` under the digest of what they depend on."""
    from fastinf.scoring.fused import influence

    g, a = cfg.evaluate.retrain_grid, cfg.aggregate
    methods = g.methods or list(cfg.score.methods)
    digest = config_hash({"methods": methods, "how": g.how, "spec": spec, "vote_p": a.vote_p,
                          "correct_only": a.correct_only, "test": test_store.fingerprint,
                          "train": stores["train"].fingerprint, "n_test": test_store.n}, length=64)
    path, rec = gdir / "scores.npz", gdir / "scores.json"
    keys = [(m, h, grp) for m in methods for h in g.how for grp in spec]
    if path.is_file() and rec.is_file() and json.loads(rec.read_text()).get("digest") == digest:
        with np.load(path, allow_pickle=False) as z:
            return {k: z["|".join(k)] for k in keys}
    out = {}
    for m in methods:
        res = influence(test_store, stores["train"], m, list(g.how), spec, vote_p=a.vote_p, correct_only=a.correct_only)
        out.update({(m, h, grp): np.asarray(res.get(grp, h), np.float64) for h in g.how for grp in spec})
    tmp = gdir / ".scores.npz.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **{"|".join(k): v for k, v in out.items()})
    tmp.replace(path)
    rec.write_text(json.dumps({"digest": digest}) + "\n")
    return out


def _group_units(cfg: RunConfig, units: list[Any]) -> dict[str, list[str]]:
    """The grid's groups resolved to unit names (a group selecting no unit is a ConfigError)."""
    from fastinf.errors import SelectorError
    from fastinf.extraction.units import select

    out = {}
    for grp in cfg.evaluate.retrain_grid.groups:
        try:
            out[grp] = [u.name for u in select(units, grp)]
        except SelectorError as e:
            raise ConfigError(f"evaluate.retrain_grid.groups entry {grp!r} selects no extracted unit: {e}") from e
    return out


def _drop(s: Setting, scores: dict[tuple[str, str, str], np.ndarray], n: int, seed: int) -> np.ndarray:
    """Training rows a setting removes: the k lowest-scored (stable), k seeded random ones, or none."""
    k = int(round(s.p / 100 * n))
    if s.strategy == "influence":
        return np.sort(np.argsort(scores[(s.method, s.how, s.group)], kind="stable")[:k])
    if s.strategy == "random":
        return np.sort(np.random.default_rng([seed, 7919, int(round(s.p * 1000))]).choice(n, size=k, replace=False))
    return np.array([], dtype=np.int64)


def _setting_row(cfg: RunConfig, s: Setting, seed: int, drop: np.ndarray, mask: np.ndarray,
                 scores: dict, canc: dict) -> dict[str, Any]:
    """A setting's fields before retraining: what was removed, and the NDR / cancellation of its score."""
    from fastinf.aggregation import evaluate as ev

    head = f"ndr@{cfg.evaluate.ndr_at[0]:g}"
    row: dict[str, Any] = {"seed": seed, "key": s.key, "strategy": s.strategy, "method": s.method, "how": s.how,
                           "group": s.group, "p": s.p, "n_removed": int(drop.size),
                           "noisy_removed": int(mask[drop].sum()), "ndr_metric": head}
    if s.strategy == "influence":
        sc = scores[(s.method, s.how, s.group)]
        c = canc[s.group]
        row.update({"ndr": float(ev.ndr(sc, mask, at=cfg.evaluate.ndr_at[0])), "auc_ndr": float(ev.auc_ndr(sc, mask)),
                    "cancellation": float(c.l1), "cancellation_l2": float(c.l2)})
    return row


def _grid_recipe(cfg: RunConfig, sdir: Path) -> Any:
    """The run's fine-tuning recipe (``epochs`` shortened by the grid's), ``lr: auto`` pinned (:func:`seed_recipe`)."""
    return seed_recipe(cfg, sdir, cfg.evaluate.retrain_grid.epochs)


def seed_recipe(cfg: RunConfig, sdir: Path, epochs: int | None = None) -> Any:
    """The run's fine-tuning recipe for a retrain of seed directory ``sdir`` (``epochs`` overridden if given)
    with ``lr: auto`` pinned to the rate the seed's sweep chose (``train/lr_sweep.json``), so that every retrain
    (grid, filter-and-retrain, datamodels) uses the run's learning rate instead of sweeping again."""
    tcfg = cfg.train if epochs is None else replace(cfg.train, epochs=epochs)
    if tcfg.lr == "auto":
        try:
            chosen = json.loads((sdir / "train" / "lr_sweep.json").read_text())["chosen"]
        except (OSError, ValueError, KeyError):
            chosen = None
        if chosen is None:
            raise ConfigError(f"{sdir}/train/lr_sweep.json holds no chosen learning rate for train.lr: auto; "
                              "rerun the train stage (or set train.lr)")
        tcfg = replace(tcfg, lr=float(chosen))
    return tcfg


def run_grid(cfg: RunConfig, seed: int, sdir: Path, noisy_train: Any, test: Any, noise: Any, stores: dict[str, Any],
             echo: Callable[[str], None]) -> dict[str, Any]:
    """Retrain every grid setting of one seed (resuming finished ones); returns ``{"rows", "heldout"}``."""
    from fastinf.aggregation.evaluate import group_cancellation
    from fastinf.store.ownership import make_output_dir

    g = cfg.evaluate.retrain_grid
    gdir = make_output_dir(sdir / GRID_DIR)
    (gdir / "results").mkdir(exist_ok=True)
    select_ds, eval_ds, inf_rows, record = grid_heldout(cfg, test)
    test_store = stores["test"] if inf_rows is None else _influence_store(stores["test"], inf_rows,
                                                                          gdir / "influence_store")
    spec = _group_units(cfg, stores["train"].units)
    scores = _grid_scores(cfg, gdir, stores, spec, test_store)
    canc, _ = group_cancellation(stores["train"], spec)
    tcfg = _grid_recipe(cfg, sdir)
    base = {"model": to_dict(cfg.model), "train": to_dict(tcfg), "train_fp": noisy_train.fingerprint(),
            "select_fp": select_ds.fingerprint(), "eval_fp": eval_ds.fingerprint(), "seed": seed,
            "n_classes": int(noise.n_classes)}
    rows, jobs, settings = [], [], grid_settings(cfg)
    for s in settings:
        drop = _drop(s, scores, len(noisy_train), seed)
        row = {**_setting_row(cfg, s, seed, drop, noise.mask, scores, canc), "eval_split": record["evaluation"]}
        recipe = config_hash({**base, "drop": hashlib.sha256(drop.astype(np.int64).tobytes()).hexdigest()}, length=64)
        dest = gdir / "results" / f"{s.key}.json"
        rows.append((dest, recipe))
        if read_result(dest, recipe) is None:
            jobs.append(GridJob(s.key, row, drop, cfg.model, tcfg, noisy_train, select_ds, eval_ds,
                                int(noise.n_classes), seed, recipe, str(gdir / "work" / s.key), str(dest)))
    run_jobs(jobs, len(settings), g.workers, echo)
    tmp = gdir / ".grid.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(gdir / "grid.json")
    return {"rows": [{k: v for k, v in read_result(d, rc).items() if k != "recipe"} for d, rc in rows],
            "heldout": record}
