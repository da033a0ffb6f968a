"""Files aggregation and evaluation read from users: ``.npy`` score arrays and noise masks.

Every reader here refuses what it cannot trust with a one-line :class:`~fastinf.errors.ConfigError` naming
the file: user files are never unpickled (``allow_pickle=False`` everywhere; an object / string ``.npy``
is refused by its header, before any data is read), a truncated or foreign ``.npy`` / ``.npz`` is named as
such, non-UTF-8 or malformed text and JSON are named, and a mask must be one boolean (or 0/1) flag per train
sample. :func:`as_noise_mask` and :func:`load_noise_mask` are re-exported by :mod:`.evaluate`.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fastinf.errors import ConfigError, DataError

__all__ = ["load_npy", "check_numeric", "as_noise_mask", "load_noise_mask"]

_NUMERIC = "biuf"  # bool, int, uint, float: the dtype kinds a score or mask may have


def check_numeric(dtype: np.dtype, what: str) -> None:
    """Refuse object, string, complex, void and datetime dtypes (``what`` names the input)."""
    if dtype.hasobject or dtype.kind not in _NUMERIC:
        raise ConfigError(f"{what}: expected a numeric array, found dtype {dtype} "
                          f"({'Python objects' if dtype.hasobject else 'not numbers'}); save plain numbers "
                          "with np.save(path, np.asarray(values, dtype=float))")


def _npy_header(p: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from a ``.npy`` header, without reading the data."""
    with open(p, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        return shape, dtype, f.tell()


def load_npy(path: str | Path, what: str, *, mmap: bool = True) -> np.ndarray:
    """A numeric ``.npy`` array (memory-mapped when ``mmap``); never unpickles.

    Raises ConfigError naming ``path`` when the file is missing, not a ``.npy``, truncated / padded, or of a
    non-numeric (object, string, ...) dtype.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p}: no such file")
    try:
        shape, dtype, offset = _npy_header(p)
    except (OSError, ValueError, EOFError) as e:
        raise ConfigError(f"{what} {p}: not a .npy file written by numpy ({e}); pass the file np.save wrote") from None
    check_numeric(dtype, f"{what} {p}")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = p.stat().st_size
    if size != expected:
        raise ConfigError(f"{what} {p}: the file is {'truncated' if size < expected else 'longer than its header says'}"
                          f" ({size} bytes, its header promises {expected}); it is damaged — write it again")
    try:
        return np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ConfigError(f"{what} {p}: cannot read it as a .npy array ({e})") from None


def as_noise_mask(noise_mask: Any, n: int) -> np.ndarray:
    """Validates a noise mask (bools or 0/1 values, one per train sample) and returns it as bool [N]."""
    mask = np.asarray(noise_mask)
    if mask.dtype.hasobject or mask.dtype.kind not in _NUMERIC:
        raise ConfigError(f"noise_mask: expected booleans or 0/1 values, found dtype {mask.dtype}; pass one "
                          "flag per train sample (e.g. NoiseResult.mask)")
    if mask.ndim != 1:
        raise ConfigError(f"noise_mask: expected a 1-D mask with one flag per train sample, found shape {mask.shape}")
    if mask.shape[0] != n:
        raise ConfigError(f"noise_mask: expected {n} flags (one per train sample), found {mask.shape[0]}; "
                          "the mask must come from the same training set as the scores")
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise ConfigError("noise_mask: expected booleans or 0/1 values, found other values; pass a mask, "
                              "not a list of indices (use np.isin(np.arange(N), indices))")
        mask = mask.astype(bool)
    if not mask.any():
        raise DataError("noise_mask: no sample is marked noisy; NDR needs at least one noisy sample "
                        "(inject label noise first, e.g. fastinf.inject_noise)")
    return mask


def load_noise_mask(path: str | Any, n: int | None = None) -> np.ndarray:
    """Reads a noise mask (bool [N]) from a file.

    Formats: ``.npz`` written by :meth:`fastinf.noise.NoiseResult.save` (its ``mask``), ``.npy`` (bools or
    0/1), ``.txt`` (0/1 or true/false separated by whitespace or commas), ``.json`` (a list of flags, or
    an object with ``"mask"`` / ``"noise_mask"`` flags, or ``"noisy_indices"`` / ``"indices"`` together
    with ``n``). Validated with :func:`as_noise_mask` when ``n`` is given. Every problem with the file
    (missing, damaged, pickled, not UTF-8, malformed, wrong length or values) is a ConfigError naming it.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"noise mask {p}: no such file; expected .npz (fastinf.inject_noise), .npy, .txt or .json")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        mask = _npz_mask(p)
    elif suffix == ".npy":
        mask = load_npy(p, "noise mask", mmap=False)
    elif suffix == ".json":
        mask = _json_mask(p, n)
    elif suffix in (".txt", ".csv", ""):
        mask = _text_mask(p)
    else:
        raise ConfigError(f"noise mask {p}: unknown format {suffix!r}; use .npz, .npy, .txt or .json")
    mask = np.asarray(mask)
    if sum(d != 1 for d in mask.shape) > 1:
        raise ConfigError(f"noise mask {p}: expected one flag per train sample (a 1-D array), found shape "
                          f"{mask.shape}")
    mask = mask.reshape(-1)
    try:
        return as_noise_mask(mask, n if n is not None else mask.shape[0])
    except ConfigError as e:
        raise ConfigError(f"noise mask {p}: {str(e).removeprefix('noise_mask: ')}") from None


def _npz_mask(p: Path) -> np.ndarray:
    """The ``mask`` array of an ``.npz`` (or its only array); damaged archives and object arrays are named."""
    try:
        with np.load(p, allow_pickle=False) as z:
            key = "mask" if "mask" in z.files else (z.files[0] if len(z.files) == 1 else None)
            if key is None:
                raise ConfigError(f"noise mask {p}: expected an array named 'mask', found {z.files}")
            return z[key]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as e:
        raise ConfigError(f"noise mask {p}: cannot read it as an .npz of plain arrays ({e}); it is damaged, or "
                          "holds pickled objects fastinf will not load — write it again with NoiseResult.save")


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"noise mask {p}: not UTF-8 text (byte {e.start}); save the mask as 0/1 text, "
                          ".json, .npy or .npz") from None
    except OSError as e:
        raise ConfigError(f"noise mask {p}: cannot read it ({e.strerror})") from None


def _text_mask(p: Path) -> np.ndarray:
    words = _read_text(p).replace(",", " ").split()
    table = {"0": False, "1": True, "false": False, "true": True}
    bad = [w for w in words if w.lower() not in table]
    if bad:
        raise ConfigError(f"noise mask {p}: expected 0/1 or true/false values, found {bad[:3]}")
    return np.array([table[w.lower()] for w in words], dtype=bool)


def _json_mask(p: Path, n: int | None) -> np.ndarray:
    """The mask of a ``.json`` noise file: a list of flags, or an object with flags or noisy indices."""
    try:
        obj = json.loads(_read_text(p))
    except ValueError as e:
        raise ConfigError(f"noise mask {p}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        return _flags(obj, p)
    flags = obj.get("mask", obj.get("noise_mask"))
    idx = obj.get("noisy_indices", obj.get("indices"))
    if flags is None and idx is None:
        raise ConfigError(f"noise mask {p}: expected a list or an object with 'mask' or 'noisy_indices', "
                          f"found keys {sorted(obj)}")
    if flags is not None:
        return _flags(flags, p)
    size = obj.get("n", n)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"noise mask {p}: noisy indices need the number of train samples ('n', a positive "
                          f"integer), found {size!r}")
    if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        raise ConfigError(f"noise mask {p}: 'noisy_indices' must be a list of integers")
    arr = np.asarray(idx, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= size):
        raise ConfigError(f"noise mask {p}: indices must lie in [0, {size}), found {int(arr.min())}..{int(arr.max())}")
    out = np.zeros(size, dtype=bool)
    out[arr] = True
    return out


def _flags(obj: Any, p: Path) -> np.ndarray:
    """A JSON list of flags (bools or 0/1) as an array; anything else is named."""
    if not isinstance(obj, list) or not all(isinstance(v, (bool, int, float)) for v in obj):
        raise ConfigError(f"noise mask {p}: expected a list of flags (true/false or 0/1), found "
                          f"{type(obj).__name__ if not isinstance(obj, list) else 'a list holding non-numbers'}")
    return np.asarray(obj)
