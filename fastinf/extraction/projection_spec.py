"""``ProjectionSpec``: how unit gradients become features — parsing, validation and the store identity.

Kinds: ``kron`` (random Kronecker, ``"16x16"``), ``exact`` (``"exact"``), and the curvature-aware Kronecker
projections built from a factor set (``fastinf factors``): ``pca``, ``pcamix`` and ``kfac``
(``"pca16x16"`` with ``factors=DIR`` or ``"pca16x16@DIR"``; matrices in ``fastinf.extraction.factors_proj``).
A store manifest records ``to_dict()``: the factors by fingerprint (never by path), so that stores of
different factors are refused as incompatible while a copied factor directory still works.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from fastinf.errors import ConfigError

__all__ = ["ProjectionSpec", "CURVATURE_KINDS", "store_spec"]

_SPEC_RE = re.compile(r"^\s*(pca|pcamix|kfac)?\s*(\d+)\s*[xX×]\s*(\d+)\s*(?:@(.+))?$", re.IGNORECASE)
CURVATURE_KINDS = ("pca", "pcamix", "kfac")   # Kronecker projections built from a factor set
_KINDS = ("kron", "exact") + CURVATURE_KINDS


@dataclass(frozen=True)
class ProjectionSpec:
    """How unit gradients become features.

    ``kind="kron"``: a ``k_out × k_in`` Kronecker two-sided random projection (feature dim ``k_out*k_in``);
    ``kind="exact"``: the unprojected gradient (feature dim ``unit.exact_dim``); ``"pca"`` / ``"pcamix"`` /
    ``"kfac"``: Kronecker projections built from a factor set (``fastinf factors``; see
    ``fastinf.extraction.factors_proj``). ``seed`` selects the random matrices; stores built with different
    seeds, or different factors (``factors_fp``, their fingerprint), are not comparable. ``factors`` is the
    factor directory (where to read them; not part of the identity); ``damping`` is kfac's ``λ_A``/``λ_S``.
    """

    kind: str = "kron"
    k_out: int = 16
    k_in: int = 16
    seed: int = 0
    factors: str | None = field(default=None, compare=False)
    factors_fp: str | None = None
    damping: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ConfigError(f"Projection kind must be one of {', '.join(_KINDS)}, got {self.kind!r}.")
        if self.kind != "exact" and (int(self.k_out) <= 0 or int(self.k_in) <= 0):
            raise ConfigError(f"Projection dims must be positive, got {self.k_out}x{self.k_in}; use e.g. 16x16.")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"Projection seed must be a non-negative int, got {self.seed!r}.")
        if self.kind in CURVATURE_KINDS:
            self._resolve_factors()
        elif self.factors is not None or self.factors_fp is not None or self.damping is not None:
            raise ConfigError(f"factors/damping apply to the pca, pcamix and kfac projections, not {self.kind!r}")

    def _resolve_factors(self) -> None:
        """Read the factor set's fingerprint (or check it against the recorded one); kfac damping parses."""
        from fastinf.extraction.factors_format import Factors

        if self.kind == "kfac":
            from fastinf.scoring.damping import Damping

            object.__setattr__(self, "damping", Damping.parse(self.damping or "rel:0.1").describe())
        elif self.damping is not None:
            raise ConfigError(f"damping applies to the kfac projection only, not {self.kind!r}")
        if self.factors is None:
            if self.factors_fp is None:
                raise ConfigError(f"projection {self} needs a factor set: pass factors=DIR (CLI: --proj {self}@DIR); "
                                  "fit one on the train set with `fastinf factors`")
            return
        fp = Factors.open(self.factors).fingerprint
        if self.factors_fp is not None and self.factors_fp != fp:
            raise ConfigError(f"the factors at {self.factors} (fingerprint {fp}) are not the ones recorded "
                              f"({self.factors_fp}); use the factor set the stores were extracted with")
        object.__setattr__(self, "factors", str(self.factors))
        object.__setattr__(self, "factors_fp", fp)

    @classmethod
    def parse(cls, text: "str | ProjectionSpec", seed: int = 0, *, factors: str | None = None,
              damping: str | float | None = None) -> "ProjectionSpec":
        """``"16x16"`` / ``"64x32"`` (k_out x k_in), ``"exact"``, or ``"pca16x16"`` / ``"pcamix16x16"`` /
        ``"kfac16x16"`` with ``factors=DIR`` (or a ``"@DIR"`` suffix); a ProjectionSpec passes through."""
        if isinstance(text, ProjectionSpec):
            return text
        if not isinstance(text, str):
            raise ConfigError(f"Projection must be a string like '16x16' or 'exact', got {type(text).__name__}.")
        if text.strip().lower() == "exact":
            return cls(kind="exact", k_out=0, k_in=0, seed=seed)
        m = _SPEC_RE.match(text)
        if not m:
            raise ConfigError(f"Cannot parse projection {text!r}: expected 'KOUTxKIN' (e.g. '16x16', '64x32'), "
                              "'exact', or pcaKxK / pcamixKxK / kfacKxK with factors")
        kind = (m.group(1) or "kron").lower()
        where = m.group(4) or (None if factors is None else str(factors))
        return cls(kind=kind, k_out=int(m.group(2)), k_in=int(m.group(3)), seed=seed, factors=where,
                   damping=None if damping is None else str(damping))

    def __str__(self) -> str:
        return "exact" if self.kind == "exact" else f"{'' if self.kind == 'kron' else self.kind}{self.k_out}x{self.k_in}"

    def to_dict(self) -> dict:
        """The identity recorded in a store manifest (the factors by fingerprint, never by path)."""
        d = {"kind": self.kind, "k_out": self.k_out, "k_in": self.k_in, "seed": self.seed}
        if self.kind in CURVATURE_KINDS:
            d["factors"] = self.factors_fp
        if self.kind == "kfac":
            d["damping"] = self.damping
        return d

    @classmethod
    def from_dict(cls, d: dict, factors: str | None = None) -> "ProjectionSpec":
        return cls(kind=d["kind"], k_out=int(d["k_out"]), k_in=int(d["k_in"]), seed=int(d.get("seed", 0)),
                   factors=factors, factors_fp=d.get("factors"), damping=d.get("damping"))

    def identity(self, model_id: dict) -> dict:
        """``to_dict()`` for the store of a model with fingerprint ``model_id``; factors fitted on another model
        are refused (before any store file is written)."""
        if self.kind in CURVATURE_KINDS:
            from fastinf.extraction.factors_format import Factors

            if self.factors is None:
                raise ConfigError(f"projection {self} needs its factor directory to extract: pass factors=DIR")
            f = Factors.open(self.factors)
            if f.model_fingerprint != model_id.get("fingerprint"):
                raise ConfigError(f"the factors at {f.path} were fitted on another model (fingerprint "
                                  f"{f.model_fingerprint}, this model {model_id.get('fingerprint')}); fit them "
                                  "for this model with `fastinf factors`")
        return self.to_dict()


def store_spec(store: object, factors: str | None = None) -> ProjectionSpec:
    """The ``ProjectionSpec`` a GradientStore was extracted with, to extract more rows the same way (queries,
    score-while-extracting). A pca / pcamix / kfac store records its factors by fingerprint only, so it needs
    ``factors`` (the directory): a factor set other than the recorded one is refused naming both."""
    d = store.manifest["identity"]["projection"]      # type: ignore[attr-defined]
    kind = d.get("kind")
    if kind in CURVATURE_KINDS:
        if factors is None:
            raise ConfigError(f"store {getattr(store, 'path', '?')} has the {kind} projection: pass the factor "
                              "directory it was extracted with (factors=DIR, CLI --factors DIR)")
        return ProjectionSpec.from_dict(d, factors=str(factors))
    if factors is not None:
        raise ConfigError(f"factors=DIR applies to pca/pcamix/kfac stores; store {getattr(store, 'path', '?')} "
                          f"has the {kind} projection: drop --factors")
    return ProjectionSpec.from_dict(d)
