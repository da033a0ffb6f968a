"""Unit groups of a retrieval index: turning ``layers`` / ``groups`` / ``weights`` into ``GroupSpec``s.

An index holds one inner-product index per *group* of units (features concatenated, each unit scaled by
its weight). ``_resolve_groups`` accepts the forms ``build_index`` documents (``"unit"``, ``"joint"``, a
list of selectors, ``{name: selector}``) and validates names and weights; ``_spec_name`` / ``_slug`` derive
the group and default index names from selectors.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from fastinf.errors import ConfigError
from fastinf.retrieval.index_store import GroupSpec


def _resolve_groups(store: Any, layers: str | Sequence[str] | None, groups: Any,
                    weights: Mapping[str, float] | None) -> list[GroupSpec]:
    """Turn (layers, groups, weights) into GroupSpecs; see ``build_index`` for the accepted forms."""
    from fastinf.extraction.units import select

    chosen = [u.name for u in select(store.units, layers)]
    named = _named_groups(store, chosen, layers, groups)
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(chosen))
    if unknown:
        raise ConfigError(f"weights name units that are not selected: {unknown[:5]}; selected: {chosen[:8]}")
    if any(not np.isfinite(w) or w <= 0 for w in weights.values()):
        raise ConfigError(f"unit weights must be positive finite numbers; got {weights}")
    if not named:
        raise ConfigError(f"groups {groups!r} name no group; give 'unit', 'joint', selectors (CLI: separated by "
                          "';', e.g. 'attn.v;mlp.down') or a {name: selector} dict")
    empty = [n for n, us in named if not us]
    if empty:
        raise ConfigError(f"group(s) {empty[:5]} select no unit; selected units: {chosen[:8]}")
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ConfigError(f"group names must be unique; got {names}")
    return [GroupSpec(name=n, units=tuple(us), weights=tuple(float(weights.get(u, 1.0)) for u in us),
                      dims=tuple(store.feature_dim(u) for u in us)) for n, us in named]


def _named_groups(store: Any, chosen: list[str], layers: str | Sequence[str] | None,
                  groups: Any) -> list[tuple[str, list[str]]]:
    """``(group name, unit names)`` pairs for the accepted ``groups`` forms, over the ``chosen`` units."""
    if groups is None or groups == "unit":
        return [(u, [u]) for u in chosen]
    if groups == "joint":
        return [("joint" if layers is None else _spec_name(layers), chosen)]
    if isinstance(groups, Mapping):
        return [(str(k), _select_names(store, chosen, v)) for k, v in groups.items()]
    if isinstance(groups, (list, tuple)):
        return [(_spec_name(v), _select_names(store, chosen, v)) for v in groups]
    raise ConfigError(f"groups must be 'unit', 'joint', a list of selectors or a {{name: selector}} dict; "
                      f"got {groups!r}")


def _select_names(store: Any, chosen: list[str], spec: Any) -> list[str]:
    from fastinf.extraction.units import select

    pool = [u for u in store.units if u.name in set(chosen)]
    return [u.name for u in select(pool, spec)]


def _spec_name(spec: Any) -> str:
    return spec if isinstance(spec, str) else ",".join(spec)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80] or "index"
