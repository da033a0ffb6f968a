"""The on-disk form of a factor set (K-FAC statistics per unit) and its reader, :class:`Factors`.

A factor set is what ``fastinf factors`` / :func:`fastinf.fit_factors` writes: per unit the bias-augmented
input covariance ``A = Σ_tokens x̃x̃ᵀ / tokens`` and the output-gradient covariance
``S = Σ_tokens g gᵀ / samples`` (so that ``A ⊗ S`` is the K-FAC approximation of the empirical Fisher
``E_n[vec ∇W_n vec ∇W_nᵀ]`` of per-sample gradients ``∇W_n = Σ_t g_t x̃_tᵀ``), with their
eigendecompositions, in float64. A directory::

    factors.json        identity (model and dataset fingerprints, rows, units, task, max_length), chunk
                        size, completion flag, per-unit token/sample counts and file checksums, fingerprint
    state/rank-<r>.npz  (while fitting) rank r's running float64 sums and the chunks they hold; replaced
                        atomically after every chunk, so a killed pass resumes where it stopped
    units/<i>.npz       (complete) unit i: A (embedding: the token-frequency diagonal ``a_diag``), S and the
                        eigenpairs (columns, eigenvalues descending, signs fixed)

Embedding units: the input is a one-hot token, so ``A`` is diagonal (token frequencies) and is stored as a
vector; its eigenbasis is the token basis. ``FACTORS_KIND`` is what ``--overwrite`` may replace.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fastinf.errors import ConfigError, CorruptStoreError, StoreError
from fastinf.extraction.units import Unit
from fastinf.store.durable import atomic_write_json, fsync_dir
from fastinf.store.format import _unit_from_dict
from fastinf.store.ownership import ArtifactKind

__all__ = ["Factors", "UnitFactors", "FACTORS_KIND", "MANIFEST", "FORMAT", "save_state", "load_state",
           "write_unit", "eigh_desc", "fingerprint_of",
           "content_digest", "write_manifest", "read_manifest"]

FORMAT = "fastinf-factors"
VERSION = 1
MANIFEST = "factors.json"
_TEMP = re.compile(r"factors\.json\.\d+\.tmp")


def _is_entry(name: str) -> bool:
    return name in (MANIFEST, "state", "units") or bool(_TEMP.fullmatch(name))


FACTORS_KIND = ArtifactKind("factor set", MANIFEST, entries=_is_entry,
                            is_own=lambda m: m.get("format") == FORMAT)


def eigh_desc(m: np.ndarray, device: Any = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of a symmetric PSD matrix (float64, torch's LAPACK/cuSOLVER on ``device``): eigenvalues
    descending (clipped at 0), eigenvectors as columns with signs fixed (the largest-magnitude entry of each
    is positive), so the basis is unique."""
    import torch

    t = torch.as_tensor(m, dtype=torch.float64, device=device)
    vals, vecs = torch.linalg.eigh((t + t.T) / 2)
    vals, vecs = vals.flip(0).clamp_min(0.0).cpu().numpy(), vecs.flip(1).cpu().numpy()
    pivot = np.argmax(np.abs(vecs), axis=0)
    signs = np.sign(vecs[pivot, np.arange(vecs.shape[1])])
    signs[signs == 0] = 1.0
    return np.ascontiguousarray(vals), np.ascontiguousarray(vecs * signs)


# ---------------------------------------------------------------------------------------- running state

def save_state(path: Path, sums: dict[str, np.ndarray], done: list[int]) -> None:
    """Write one rank's running sums and finished chunks atomically (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, __done__=np.asarray(sorted(done), dtype=np.int64), **sums)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load_state(path: Path) -> tuple[dict[str, np.ndarray], list[int]]:
    """The sums and finished chunks of a rank state file (none: empty)."""
    if not path.is_file():
        return {}, []
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise CorruptStoreError(f"factor pass state {path} is unreadable ({e}); remove it to redo its chunks "
                                "or rerun with --overwrite") from e
    done = arrays.pop("__done__").tolist()
    return arrays, [int(c) for c in done]


def content_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 of the arrays' names, dtypes, shapes and bytes (zip members carry timestamps; contents do not)."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def write_unit(root: Path, index: int, arrays: dict[str, np.ndarray]) -> str:
    """Write ``units/<index>.npz`` atomically; returns its content digest."""
    path = root / "units" / f"{index}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return content_digest(arrays)


def fingerprint_of(identity: Mapping[str, Any], checksums: list[str]) -> str:
    """A digest identifying the factors: their identity and the contents of every unit file."""
    blob = json.dumps({"identity": identity, "checksums": checksums}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def write_manifest(root: Path, manifest: Mapping[str, Any]) -> None:
    atomic_write_json(root / MANIFEST, dict(manifest))


def read_manifest(root: Path) -> dict | None:
    """The parsed manifest of a factor set at ``root``, or None when there is none."""
    p = Path(root) / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CorruptStoreError(f"{p} is unreadable ({e}); rerun `fastinf factors` with --overwrite") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise StoreError(f"{p} is not a fastinf factor set manifest; point --factors at a `fastinf factors` output")
    return m


# ---------------------------------------------------------------------------------------- reader

@dataclass
class UnitFactors:
    """One unit's factors (float64). ``A`` is ``(d_in + bias)²`` (None for the embedding, whose ``A`` is the
    diagonal ``a_diag`` [vocabulary]); eigenvectors are columns, eigenvalues descending."""

    unit: Unit
    S: np.ndarray
    s_evals: np.ndarray
    s_evecs: np.ndarray
    A: np.ndarray | None
    a_evals: np.ndarray | None
    a_evecs: np.ndarray | None
    a_diag: np.ndarray | None
    tokens: int
    samples: int


class Factors:
    """A finished factor set (``Factors.open(path)``): provenance, units and per-unit factors."""

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.identity: dict = manifest["identity"]
        self.fingerprint: str = manifest["fingerprint"]
        self.units: list[Unit] = [_unit_from_dict(u) for u in manifest["identity"]["units"]]
        self.unit_names = [u.name for u in self.units]
        self._cache: dict[str, UnitFactors] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Factors":
        """Open a complete factor set; a missing, foreign or unfinished one is refused naming what to do."""
        p = Path(path)
        m = read_manifest(p)
        if m is None:
            raise ConfigError(f"no factor set at {p} (no {MANIFEST}); fit one with `fastinf factors --model M "
                              f"--data TRAIN --out {p}` (or fastinf.fit_factors)")
        if not m.get("complete"):
            raise StoreError(f"the factor set at {p} is incomplete (an interrupted pass); finish it with "
                             "`fastinf factors ... --resume`")
        return cls(p, m)

    @property
    def model_fingerprint(self) -> str:
        return str(self.identity["model"]["fingerprint"])

    @property
    def tokens(self) -> int:
        return int(self.manifest["tokens"])

    def __repr__(self) -> str:
        return f"Factors({str(self.path)!r}, units={len(self.units)}, tokens={self.tokens}, fp={self.fingerprint})"

    def unit(self, name: str) -> UnitFactors:
        """The factors of unit ``name`` (checksum-verified on first read, then cached)."""
        if name in self._cache:
            return self._cache[name]
        if name not in self.unit_names:
            raise ConfigError(f"the factor set at {self.path} has no unit {name!r} (it has "
                              f"{len(self.unit_names)}: {', '.join(self.unit_names[:6])}"
                              f"{' ...' if len(self.unit_names) > 6 else ''}); fit factors with --layers covering it")
        i = self.unit_names.index(name)
        path = self.path / "units" / f"{i}.npz"
        try:
            with np.load(path) as z:
                a = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError):
            a = None
        if a is None or content_digest(a) != self.manifest["checksums"][i]:
            raise CorruptStoreError(f"factor file {path} is missing or does not match its checksum; refit the "
                                    "factors (`fastinf factors ... --overwrite`)")
        counts = self.manifest["counts"][i]
        uf = UnitFactors(unit=self.units[i], S=a["S"], s_evals=a["s_evals"], s_evecs=a["s_evecs"],
                         A=a.get("A"), a_evals=a.get("a_evals"), a_evecs=a.get("a_evecs"), a_diag=a.get("a_diag"),
                         tokens=int(counts["tokens"]), samples=int(counts["samples"]))
        self._cache[name] = uf
        return uf
