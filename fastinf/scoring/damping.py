"""Damping: the λ of ``H = GᵀG/N + λI``, absolute or relative to the mean eigenvalue of ``GᵀG/N``.

Its own module because every solver (``fastinf.scoring.curvature``), ``score()`` and the distributed
scorer parse and describe damping the same way (CLI ``--damping 1e-3`` or ``--damping rel:0.1``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from fastinf.errors import ConfigError

__all__ = ["Damping", "DEFAULT_IF_DAMPING", "DATAINF_DAMPING"]


@dataclass(frozen=True)
class Damping:
    """The damping λ of ``H = GᵀG/N + λI``: absolute, or ``value`` × the mean eigenvalue of ``GᵀG/N``."""

    value: float
    relative: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value) and self.value > 0):
            raise ConfigError(f"damping must be a finite number > 0; got {self.value!r}. Use e.g. 1e-3 "
                              f"(absolute) or 'rel:0.1' (0.1 x the mean eigenvalue of the Gauss-Newton matrix)")

    @classmethod
    def parse(cls, spec: Damping | float | str | None, default: Damping | None = None) -> Damping | None:
        """``1e-3`` / ``"1e-3"`` → absolute; ``"rel:0.1"`` → relative; ``None`` → ``default``."""
        if spec is None:
            return default
        if isinstance(spec, Damping):
            return spec
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            return cls(float(spec))
        if isinstance(spec, str):
            text = spec.strip().lower()
            relative = text.startswith("rel:")
            try:
                value = float(text[4:] if relative else text)
            except ValueError:
                raise ConfigError(f"cannot parse damping {spec!r}: expected a number (absolute, e.g. 1e-3) "
                                  f"or 'rel:X' (X times the mean eigenvalue, e.g. rel:0.1)") from None
            return cls(value, relative)
        raise ConfigError(f"damping must be a number, 'rel:X' or a Damping; got {type(spec).__name__}")

    def resolve(self, mean_eigenvalue: float) -> float:
        """The absolute λ for a unit whose ``GᵀG/N`` has this mean eigenvalue."""
        if not self.relative:
            return float(self.value)
        lam = float(self.value) * float(mean_eigenvalue)
        if not lam > 0:
            raise ConfigError(f"relative damping {self.value} x mean eigenvalue {mean_eigenvalue:g} gives "
                              f"λ = {lam:g}, which is not > 0 (all train features are zero?); give an "
                              f"absolute damping instead")
        return lam

    def describe(self) -> str:
        return f"rel:{self.value:g}" if self.relative else f"{self.value:g}"


DEFAULT_IF_DAMPING = Damping(0.1, relative=True)
DATAINF_DAMPING = Damping(0.1, relative=True)   # λ = 0.1 · Σ‖g‖² / (N·k), DataInf's closed form
