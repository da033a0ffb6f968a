"""Curvature-aware methods in ``fastinf run``: the factor pass stage, the stores each method scores, the checks.

``extract.proj`` may be a curvature-aware projection (``pca16x16``, ``pcamix16x16``, ``kfac16x16``: never with
``@DIR``) and ``score.methods`` may hold ``kfac`` / ``ekfac``. Then each seed runs a **factor pass**
(``stages.stage_factors``: :func:`fastinf.extraction.factors.fit_factors`) on its (noisy) train split with the scored checkpoint, once,
into ``seed-<s>/stores/factors/`` (a cached stage; an interrupted pass resumes, a pass of another checkpoint is
replaced). Its fingerprint is part of the extraction stages' dependencies, and every store records it, so a
refit re-extracts and stores of other factors are refused when scored.

Each method scores the stores of the projection it needs (:func:`method_projection`): ``kfac`` the
``kfac{K}`` stores (its inverse is folded into the features), ``ekfac`` the ``pca{K}`` (eigenbasis) stores,
the others ``extract.proj``. When that differs from ``extract.proj`` the extra pair is extracted under
``seed-<s>/stores/<proj>/`` (``stages.extract_method_stores``); :func:`stores_for` hands each scoring path the
right pair. The per-unit scores then go through the same fused / two-stage aggregation, Rank / Vote, groups
and report as every other method. The two stages themselves (``stage_factors``, ``extract_method_stores``)
live in :mod:`.stages`; this module holds the pure rules and imports no run config (the config's checks call it).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastinf.errors import ConfigError

__all__ = ["check_run_projection", "check_run_methods", "method_projection", "needs_factors", "factors_dir",
           "run_proj", "factor_deps", "stores_for"]

_PROJ_RE = re.compile(r"^\s*(pca|pcamix|kfac)?\s*(\d+)\s*[xX×]\s*(\d+)\s*$", re.IGNORECASE)
_CURVED_KINDS = ("pca", "pcamix", "kfac")
_NEEDS = {"kfac": "kfac", "ekfac": "pca"}     # the store projection kind of each curvature-aware method


def _split(proj: str) -> tuple[str, str]:
    """``("pca", "16x16")`` for ``"pca16x16"``; ``("kron", "16x16")`` for ``"16x16"``; ``("exact", "")``."""
    if proj.strip().lower() == "exact":
        return "exact", ""
    m = _PROJ_RE.match(proj)
    if m is None:
        raise ConfigError(f"extract.proj must be KOUTxKIN (e.g. 16x16), 'exact', or pcaKxK / pcamixKxK / kfacKxK; "
                          f"got {proj!r}")
    return (m.group(1) or "kron").lower(), f"{int(m.group(2))}x{int(m.group(3))}"


def check_run_projection(proj: Any, factor_samples: Any) -> None:
    """``extract.proj`` parses, carries no ``@DIR`` (the run fits its own factors), ``factor_samples`` is valid."""
    if not isinstance(proj, str):
        raise ConfigError(f"extract.proj must be a string like '16x16' or 'pca16x16'; got {proj!r}")
    if "@" in proj:
        raise ConfigError(f"extract.proj {proj!r}: a run fits its own factors (once per seed, on the train split); "
                          f"drop the '@DIR' part (e.g. {proj.split('@')[0]!r})")
    _split(proj)
    if factor_samples is not None and (isinstance(factor_samples, bool) or not isinstance(factor_samples, int)
                                       or factor_samples < 1):
        raise ConfigError(f"extract.factor_samples must be a positive integer or null; got {factor_samples!r}")


def check_run_methods(proj: str, methods: list[str]) -> None:
    """``kfac`` / ``ekfac`` fold into a Kronecker projection: refuse them with ``extract.proj: exact``."""
    bad = [m for m in methods if m in _NEEDS]
    if bad and _split(proj)[0] == "exact":
        raise ConfigError(f"score.methods {bad} need a Kronecker projection (extract.proj like 16x16 or pca16x16, "
                          "not 'exact'): their K-FAC factors fold into its matrices")


def method_projection(proj: str, method: str) -> str:
    """The projection of the stores ``method`` scores: ``kfac{K}`` / ``pca{K}`` for kfac / ekfac, else ``proj``."""
    need = _NEEDS.get(method)
    kind, dims = _split(proj)
    return proj if need is None or kind == need else f"{need}{dims}"


def needs_factors(cfg: Any) -> bool:
    """Whether a seed of ``cfg`` needs a factor pass (a curvature projection, or kfac / ekfac)."""
    projs = {cfg.extract.proj} | {method_projection(cfg.extract.proj, m) for m in cfg.score.methods}
    return any(_split(p)[0] in _CURVED_KINDS for p in projs)


def factors_dir(sdir: Path) -> Path:
    """Where a seed's factor set lives (inside ``stores/``: a run directory entry)."""
    return Path(sdir) / "stores" / "factors"


def run_proj(proj: str, sdir: Path) -> str:
    """``proj`` as ``extract`` takes it: curvature kinds get the seed's factor directory (``pca16x16@DIR``)."""
    return f"{proj}@{factors_dir(sdir)}" if _split(proj)[0] in _CURVED_KINDS else proj


def factor_deps(ctx: Any) -> dict[str, Any]:
    """Extraction-stage dependencies on the factors: their fingerprint (empty when the seed has none)."""
    from fastinf.extraction.factors_format import read_manifest

    m = read_manifest(factors_dir(ctx.sdir)) if factors_dir(ctx.sdir).is_dir() else None
    return {"factors": m["fingerprint"]} if m is not None and m.get("complete") else {}


def stores_for(cfg: Any, stores: dict[str, Any], method: str) -> tuple[Any, Any]:
    """``(test, train)`` stores that ``method`` scores (see :func:`method_projection`)."""
    proj = method_projection(cfg.extract.proj, method)
    pair = stores if proj == cfg.extract.proj else stores[proj]
    return pair["test"], pair["train"]
