"""Model identity for stores: a hash of every parameter's bytes, computed once per model state.

``model_fingerprint(model)`` names the model a store was extracted with (class, config hash, and a sha256
over every state-dict tensor's bytes); ``check_compatible`` and resume compare it. Hashing all parameters
costs ~0.1 s per 100 MB, which used to be paid on every ``extract`` call (a 64-row test extraction paid it
again after the train extraction). The result is therefore cached per model object (weakly: the cache
never keeps a model alive) and reused while the model's config and *state key* are unchanged:

* every state-dict entry's name, shape, dtype, device and storage address (``data_ptr``): replacing a
  tensor (``load_state_dict`` into new tensors, ``p.data = ...``, ``.to(...)``) changes it;
* every tensor's autograd version counter (``_version``): in-place writes through the tensor itself
  (``optimizer.step()``, ``load_state_dict`` copying in place, ``with torch.no_grad(): p.add_(...)``)
  bump it;
* a strided sample of up to 64 values of every tensor: writes through ``p.data`` (which bypass the
  version counter), e.g. a hand-written ``p.data -= lr * g``, change every value and so the sample.

Only an in-place write through ``.data`` that leaves all sampled values unchanged (a few isolated
elements) escapes the key; call :func:`forget` after such an edit (or pass a fresh model object).
"""
from __future__ import annotations

import hashlib
import weakref

import torch

__all__ = ["model_fingerprint", "forget", "state_key"]

_SAMPLE = 64
_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, dict]]" = weakref.WeakKeyDictionary()


def state_key(model: torch.nn.Module) -> tuple:
    """What identifies the model's current weights cheaply (see the module docstring): per tensor its
    name, shape, dtype, device, storage address, version counter and a strided sample of its values."""
    key = []
    for name, t in model.state_dict(keep_vars=True).items():
        if not torch.is_tensor(t):
            continue
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLE)
        sample = flat[::step][:_SAMPLE].to("cpu", copy=True)
        key.append((name, tuple(t.shape), str(t.dtype), str(t.device), t.data_ptr() if t.numel() else 0,
                    t._version, sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b""))
    return tuple(key)


def model_fingerprint(model: torch.nn.Module) -> dict:
    """Identity of a model: class, config hash and a hash of every parameter's bytes (cached per state)."""
    cfg = getattr(model, "config", None)
    key = (state_key(model), cfg.to_json_string(use_diff=False) if hasattr(cfg, "to_json_string") else "")
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == key:
        return dict(hit[1])
    fp = _fingerprint_uncached(model)
    _CACHE[model] = (key, fp)
    return dict(fp)


def forget(model: torch.nn.Module) -> None:
    """Drop the cached fingerprint (and probe results) of ``model``: the next call hashes it again."""
    _CACHE.pop(model, None)
    from fastinf.extraction.probe import forget_probe

    forget_probe(model)


def _fingerprint_uncached(model: torch.nn.Module) -> dict:
    """The full hash: every state-dict tensor's name, dtype and bytes, in name order."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        if not torch.is_tensor(p):
            continue
        h.update(name.encode())
        t = p.detach().to("cpu").contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    cfg = getattr(model, "config", None)
    cfg_json = cfg.to_json_string(use_diff=False) if hasattr(cfg, "to_json_string") else ""
    name = getattr(cfg, "_name_or_path", "") or type(model).__name__
    return {"name": str(name), "class": type(model).__name__,
            "config_hash": hashlib.sha256(cfg_json.encode()).hexdigest()[:16],
            "fingerprint": h.hexdigest()[:32]}
