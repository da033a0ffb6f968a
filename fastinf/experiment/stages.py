"""The stage cache of ``fastinf run``: ``<stage>.done.json`` markers and the runner that consults them.

Every stage writes its outputs under ``<out>/seed-<s>/`` and a ``<stage>.done.json`` marker holding
the hash of what the stage depends on (its configuration ``deps`` and the hashes of the ``upstream``
stages' markers) plus its wall time. :meth:`StageRunner.stage` skips a stage whose marker matches and
otherwise runs it and writes the marker; chaining ``upstream`` hashes is what makes a change re-run a
stage *and everything after it*. Kept apart from the per-seed stages (:mod:`.seed_stages`) so the
caching rules can be read on their own.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from fastinf.errors import ConfigError, StoreError
from fastinf.experiment.config import RunConfig, config_hash
from fastinf.experiment.curvature_stage import factor_deps, factors_dir, method_projection, needs_factors, run_proj

__all__ = ["StageRunner", "stage_factors", "extract_method_stores"]

_DONE = ".done.json"


# ----------------------------------------------------------------------------------------------
# stage bookkeeping


def _done_path(stage_dir: Path, name: str) -> Path:
    return stage_dir / f"{name}{_DONE}"


def _cached(stage_dir: Path, name: str, digest: str) -> dict[str, Any] | None:
    path = _done_path(stage_dir, name)
    if not path.exists():
        return None
    marker = json.loads(path.read_text())
    return marker if marker.get("hash") == digest else None


def _mark(stage_dir: Path, name: str, digest: str, seconds: float, run_hash: str, **info: Any) -> dict[str, Any]:
    stage_dir.mkdir(parents=True, exist_ok=True)
    marker = {"stage": name, "hash": digest, "config_hash": run_hash, "seconds": seconds, **info}
    tmp = _done_path(stage_dir, name).with_suffix(".tmp")
    tmp.write_text(json.dumps(marker, indent=2, default=str) + "\n")
    tmp.replace(_done_path(stage_dir, name))
    return marker


def _invalidate(stage_dir: Path, name: str) -> None:
    _done_path(stage_dir, name).unlink(missing_ok=True)


def marker_hash(stage_dir: Path, name: str) -> str | None:
    """The hash in stage ``name``'s marker (``None`` when it has none): the ``upstream`` of later stages."""
    p = _done_path(stage_dir, name)
    return json.loads(p.read_text())["hash"] if p.exists() else None


# ----------------------------------------------------------------------------------------------
# the runner


class StageRunner:
    """One ``fastinf run``'s settings (config, output directory, progress, echo) and its stage log."""

    def __init__(self, cfg: RunConfig, out: Path, progress: bool, echo: Callable[[str], None]) -> None:
        self.cfg, self.out, self.progress, self.echo = cfg, out, progress, echo
        self.run_hash = config_hash(cfg)
        self.ran: list[str] = []
        self.cached: list[str] = []

    # a stage: run ``fn`` unless its marker matches ``deps``; always returns the marker
    def stage(self, stage_dir: Path, name: str, deps: Any, fn: Callable[[], dict[str, Any]],
              upstream: Sequence[str] = ()) -> dict[str, Any]:
        digest = config_hash({"deps": deps, "upstream": list(upstream)})
        marker = _cached(stage_dir, name, digest)
        label = f"{stage_dir.name}/{name}"
        if marker is not None:
            self.cached.append(label)
            return marker
        t0 = time.perf_counter()
        info = fn() or {}
        self.ran.append(label)
        return _mark(stage_dir, name, digest, time.perf_counter() - t0, self.run_hash, **info)


# ----------------------------------------------------------------------------------------------
# the curvature-aware stages of a seed (kfac / ekfac, pca / pcamix / kfac projections: curvature_stage)


def stage_factors(r: Any, ctx: Any) -> None:
    """The factor pass of one seed (cached stage ``factors``) when the run needs one; sets ``ctx.timings``."""
    if not needs_factors(r.cfg):
        return
    ex = r.cfg.extract
    deps = {"layers": ex.layers, "max_length": r.cfg.model.max_length, "batch_size": ex.batch_size,
            "factor_samples": ex.factor_samples}

    def do() -> dict[str, Any]:
        return {"fingerprint": _fit(r, ctx).fingerprint}

    m = r.stage(ctx.sdir, "factors", deps, do, upstream=[marker_hash(ctx.sdir, "train")])
    ctx.timings["factors"] = ctx.timings.get("factors", 0.0) + m["seconds"]
    r.echo(f"seed {ctx.seed}: K-FAC factors {m['fingerprint'][:12]} ({m['seconds']:.1f}s)")


def _fit(r: Any, ctx: Any) -> Any:
    """Fit (or resume) the seed's factors; a factor set of another checkpoint or request is replaced."""
    from fastinf.extraction.factors import fit_factors

    model, tok = ctx.model()
    ex = r.cfg.extract
    kw = dict(layers=ex.layers, max_length=r.cfg.model.max_length, batch_size=ex.batch_size,
              max_samples=ex.factor_samples, progress=r.progress)
    out = factors_dir(ctx.sdir)
    try:
        return fit_factors(model, tok, ctx.noisy_train, out, resume=True, **kw)
    except (ConfigError, StoreError):      # factors of an earlier checkpoint / request (fastinf's own): refit
        if not out.exists():
            raise
        return fit_factors(model, tok, ctx.noisy_train, out, overwrite=True, **kw)


def extract_method_stores(r: Any, ctx: Any) -> None:
    """Extract the stores of every projection some method needs besides ``extract.proj`` (cached stages),
    into ``ctx.stores[proj]`` (``{"train": ..., "test": ...}``); their markers join ``ctx.upstream``."""
    from fastinf.store import GradientStore

    main = r.cfg.extract.proj
    extra = sorted({method_projection(main, m) for m in r.cfg.score.methods} - {main})
    for proj in extra:
        for split, ds in (("train", ctx.noisy_train), ("test", ctx.test)):
            _extract_one(r, ctx, proj, split, ds)
        ctx.stores[proj] = {s: GradientStore.open(ctx.sdir / "stores" / proj / s) for s in ("train", "test")}


def extract_resuming(model: Any, tok: Any, ds: Any, path: Path, **kw: Any) -> None:
    """A run's store at ``path``: resume an interrupted one, start over when it cannot be resumed (a store of an
    earlier checkpoint or request, fastinf's own), or extract it new."""
    from fastinf.extraction.extract import extract

    resume = (path / "manifest.json").exists()
    try:
        extract(model, tok, ds, path, resume=resume, overwrite=not resume, **kw)
    except StoreError:
        if not resume:
            raise
        extract(model, tok, ds, path, overwrite=True, **kw)


def _extract_one(r: Any, ctx: Any, proj: str, split: str, ds: Any) -> None:
    """One cached, resumable extraction stage ``extract_<proj>_<split>``."""
    from fastinf.experiment.config_io import to_dict

    ex = r.cfg.extract
    deps = {"extract": {k: v for k, v in to_dict(ex).items() if not k.startswith("cost_")}, "proj": proj,
            "max_length": r.cfg.model.max_length, **factor_deps(ctx)}
    path = ctx.sdir / "stores" / proj / split

    def do() -> dict[str, Any]:
        model, tok = ctx.model()
        extract_resuming(model, tok, ds, path, layers=ex.layers, proj=run_proj(proj, ctx.sdir), dtype=ex.dtype,
                         batch_size=ex.batch_size, max_length=r.cfg.model.max_length, seed=0, progress=r.progress)
        return {}

    name = f"extract_{proj}_{split}"
    m = r.stage(ctx.sdir, name, deps, do, upstream=[marker_hash(ctx.sdir, "train")])
    ctx.timings[f"extract_{split}"] = ctx.timings.get(f"extract_{split}", 0.0) + m["seconds"]
    ctx.upstream = list(ctx.upstream) + [marker_hash(ctx.sdir, name)]
