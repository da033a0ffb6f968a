"""A damaged fine-tuning checkpoint or noise file is detected and named, never silently used: the checkpoint's
tensors carry a sha256 in ``checkpoint.json``, a truncated or garbled file is a clean error naming it, and a
noise file whose mask does not mark the changed labels is refused (NDR would be evaluated against it).
"""
from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

from fastinf.data.noise import inject_noise, load_noise
from fastinf.errors import ConfigError, DataError
from fastinf.experiment.config import ModelConfig
from fastinf.extraction.checkpoint import build_model, load_checkpoint, save_checkpoint
from fastinf.extraction.models import load_model
from tests._hf_dirs import same_state, save_tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    base = save_tiny(root / "base", "headless")
    cfg = ModelConfig(name=str(base), max_length=16)
    model, _ = build_model(cfg, 2, None, seed=0)
    for p in model.parameters():
        p.requires_grad_(p.ndim == 2 and p.shape[0] == 2)       # the head weight only: a small checkpoint
    save_checkpoint(model, root / "ckpt-0", {"model": asdict(cfg), "lora": None, "n_classes": 2, "seed": 0})
    return root / "ckpt-0", model


def _copy(ckpt_dir, tmp_path):
    import shutil

    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt_dir, dst)
    return dst


def test_an_intact_checkpoint_loads_and_records_its_hash(ckpt) -> None:
    path, model = ckpt
    meta = json.loads((path / "checkpoint.json").read_text())
    assert len(meta["trainable_sha256"]) == 64
    loaded, _ = load_model(path)
    assert same_state(loaded, model)


def test_a_flipped_byte_in_the_tensors_is_named(ckpt, tmp_path) -> None:
    d = _copy(ckpt[0], tmp_path)
    f = d / "trainable.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10                      # a value byte: safetensors itself would load it silently
    f.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"trainable\.safetensors do not match the sha256"):
        load_checkpoint(d)


def test_truncated_tensors_without_a_hash_are_named(ckpt, tmp_path) -> None:
    d = _copy(ckpt[0], tmp_path)
    meta = json.loads((d / "checkpoint.json").read_text())
    meta.pop("trainable_sha256")          # a checkpoint written before hashes existed
    (d / "checkpoint.json").write_text(json.dumps(meta))
    f = d / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(ConfigError, match=r"trainable\.safetensors are damaged"):
        load_checkpoint(d)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"model": {}}'])
def test_a_damaged_recipe_is_named(ckpt, tmp_path, text) -> None:
    d = _copy(ckpt[0], tmp_path)
    (d / "checkpoint.json").write_text(text)
    with pytest.raises(ConfigError, match=r"checkpoint\.json"):
        load_checkpoint(d)


@pytest.fixture()
def noise_file(tmp_path):
    nz = inject_noise(np.arange(40) % 3, 0.25, seed=1)
    return nz, nz.save(tmp_path / "noise.npz")


def test_an_intact_noise_file_round_trips(noise_file) -> None:
    nz, path = noise_file
    back = load_noise(path)
    assert np.array_equal(back.mask, nz.mask) and np.array_equal(back.labels, nz.labels)


def test_a_noise_mask_that_does_not_mark_the_changed_labels_is_refused(noise_file) -> None:
    nz, path = noise_file
    mask = nz.mask.copy()
    mask[np.flatnonzero(mask)[0]] = False                   # one corrupted sample dropped from the truth
    np.savez(path, labels=nz.labels, clean_labels=nz.clean_labels, mask=mask)
    with pytest.raises(DataError, match=r"noise\.npz is inconsistent"):
        load_noise(path)


def test_a_truncated_noise_file_is_named(noise_file) -> None:
    _, path = noise_file
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DataError, match=r"noise\.npz is damaged"):
        load_noise(path)


def test_a_missing_noise_sidecar_is_named(noise_file) -> None:
    _, path = noise_file
    path.with_suffix(".json").unlink()
    with pytest.raises(DataError, match=r"noise\.json are missing or damaged"):
        load_noise(path)
