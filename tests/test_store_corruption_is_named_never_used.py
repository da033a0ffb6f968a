"""Every corruption of a store is detected and named (file, field, chunk) — by ``open``, by the reader's
accessors (``meta``, ``extra``, ``gather``, ``iter_blocks``) and by ``fastinf store verify`` — never used
silently: a flipped id or label in ``meta/``, a manifest without (or with mis-shaped) ``checksums``, an
``.npy`` header whose dtype changed with the same item size, a manifest that is JSON but not an object."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fastinf.cli.app import main
from fastinf.errors import CorruptStoreError
from fastinf.store import GradientStore

N = 40


def _store(path, **kw):
    rng = np.random.default_rng(0)
    feats = {"u0": rng.standard_normal((N, 4)).astype(np.float32)}
    meta = {"ids": np.arange(100, 100 + N), "label": rng.integers(0, 3, N),
            "logits": rng.standard_normal((N, 3)).astype(np.float32)}
    extras = {"tokens": rng.integers(0, 50, (N, 5)).astype(np.int32)}
    return GradientStore.from_arrays(path, feats, meta=meta, extras=extras, chunk_size=16, dtype="fp32", **kw)


def _flip(path, offset_from_end):
    raw = bytearray(path.read_bytes())
    raw[len(raw) - offset_from_end] ^= 0x01
    path.write_bytes(bytes(raw))


def _manifest(s, edit):
    p = s / "manifest.json"
    m = json.loads(p.read_text())
    edit(m)
    p.write_text(json.dumps(m))


@pytest.mark.parametrize("field,offset,chunk", [("ids", 8 * 3, 2), ("label", 8 * 30, 0),
                                                ("loss", 4 * 20, 1), ("logits", 4, 2)])
def test_a_flipped_meta_value_is_named_by_the_reader_and_verify(tmp_path, capsys, field, offset, chunk):
    s = tmp_path / "s"
    _store(s)
    _flip(s / "meta" / f"{field}.npy", offset)
    store = GradientStore.open(s)
    with pytest.raises(CorruptStoreError, match=rf"meta '{field}' \(meta/{field}.npy\) chunk {chunk}"):
        store.meta
    with pytest.raises(CorruptStoreError, match=f"meta/{field}.npy"):
        store.summary()                                          # `store info` never shows a corrupt id
    assert main(["store", "verify", str(s)]) == 1
    assert f"meta '{field}'" in capsys.readouterr().out


def test_corrupt_extra_and_gathered_rows_are_named(tmp_path):
    s = tmp_path / "s"
    _store(s)
    _flip(s / "extras" / "tokens.npy", 4)
    _flip(s / "units" / "0000.npy", 4 * 4 * 30)                  # row 10: chunk 0
    store = GradientStore.open(s)
    with pytest.raises(CorruptStoreError, match=r"extra 'tokens'.*chunk 2"):
        store.extra("tokens")
    with pytest.raises(CorruptStoreError, match=r"unit 'u0'.*chunk 0 \(rows 0:16\)"):
        store.gather("u0", np.array([3, 35]))
    np.testing.assert_array_equal(store.gather("u0", np.array([20, 35])), np.asarray(store.features("u0"))[[20, 35]])


@pytest.mark.parametrize("edit,what", [
    (lambda m: m.pop("checksums"), "no 'checksums'"),
    (lambda m: m.__setitem__("checksums", []), "no 'checksums'"),
    (lambda m: m["checksums"].pop("meta:ids"), "checksums.meta:ids"),
    (lambda m: m["checksums"]["unit:u0"].pop(), "checksums.unit:u0"),
    (lambda m: m["checksums"]["meta:label"].__setitem__(0, 7), "checksums.meta:label"),
    (lambda m: m.pop("arrays"), "'arrays'"),
    (lambda m: m.__setitem__("n_samples", "40"), "'n_samples'"),
    (lambda m: m["units"][0].pop("feature_dim"), "units\\[0\\].feature_dim"),
    (lambda m: m["arrays"]["unit:u0"].__setitem__("path", "../../etc/passwd"), "arrays.unit:u0.path"),
    (lambda m: m["identity"].pop("model"), "'identity'"),
])
def test_a_damaged_manifest_is_refused_naming_the_field(tmp_path, capsys, edit, what):
    s = tmp_path / "s"
    _store(s)
    _manifest(s, edit)
    with pytest.raises(CorruptStoreError, match=what):
        GradientStore.open(s)
    assert main(["store", "verify", str(s)]) == 1                # named, never a KeyError traceback
    out = capsys.readouterr().out
    assert "problem" in out and "manifest.json" in out
    assert main(["store", "info", str(s)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastinf store: error:") and len(err.splitlines()) == 1


@pytest.mark.parametrize("old,new", [(b"'<f4'", b"'<i4'"), (b"'<i8'", b"'<u8'"), (b"'|b1'", b"'|u1'")])
def test_an_npy_header_dtype_change_of_the_same_item_size_is_detected(tmp_path, capsys, old, new):
    s = tmp_path / "s"
    _store(s)
    target = {b"'<f4'": "units/0000.npy", b"'<i8'": "meta/ids.npy", b"'|b1'": "meta/correct.npy"}[old]
    p = s / target
    raw = p.read_bytes()
    assert old in raw[:128]
    p.write_bytes(raw.replace(old, new, 1))                      # same size, same data bytes, same checksum
    with pytest.raises(CorruptStoreError, match=rf"{target}.*header.*dtype"):
        GradientStore.open(s)
    assert main(["store", "verify", str(s), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and target in report["problems"][0]


@pytest.mark.parametrize("text", ["[]", "42", '"store"', "null", "\udcff", "{"])
def test_a_manifest_that_is_not_a_json_object_is_a_clean_error(tmp_path, capsys, text):
    s = tmp_path / "s"
    _store(s)
    (s / "manifest.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(CorruptStoreError, match="manifest.json"):
        GradientStore.open(s)
    assert main(["store", "info", str(s)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastinf store: error:") and "manifest.json" in err and len(err.splitlines()) == 1
