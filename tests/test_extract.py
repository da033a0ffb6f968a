"""Extraction end to end: store contents, determinism, batch invariance, kill-and-resume, bad input, CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fastinf.data.datasets import TextDataset, load_dataset_spec
from fastinf.errors import ConfigError, DataError, SelectorError, StoreError, StoreMismatchError
from fastinf.extraction.extract import extract
from fastinf.store import GradientStore
from tests._models import make_model
from tests._tokenizer import random_texts, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _data(n=23, seed=0, classes=3):
    rng = np.random.default_rng(seed)
    return TextDataset(texts=random_texts(n, seed), labels=rng.integers(0, classes, n), name="tiny")


def _store_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "extract_config.json"}


def test_store_matches_direct_capture(tmp_path, tok):
    from fastinf.extraction.capture import features_for_batch
    from fastinf.extraction.models import make_task
    from fastinf.extraction.projection import ProjectionSpec, UnitProjector
    from fastinf.extraction.units import discover, select

    model = make_model("bert")
    ds = _data()
    store = extract(model, tok, ds, tmp_path / "s", layers="all", proj="8x4", dtype="fp32", batch_size=5,
                    max_length=16, chunk_size=10, progress=False)
    assert store.n == len(ds)
    units = select(discover(model), "all")
    assert store.unit_names == [u.name for u in units]
    spec = ProjectionSpec.parse("8x4")
    projectors = {u.name: UnitProjector(u, spec) for u in units}
    enc = tok(ds.texts[:6], padding=True, truncation=True, max_length=16, return_tensors="pt")
    batch = {**{k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")},
             "labels": torch.as_tensor(ds.labels[:6])}
    res = features_for_batch(model, units, projectors, batch, make_task("seq-cls"))
    for u in units:
        np.testing.assert_allclose(store.features(u.name)[:6], res.features[u.name].numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(store.meta.label, ds.labels)
    np.testing.assert_allclose(store.meta.loss[:6], res.loss.numpy(), rtol=1e-5)
    assert store.meta.logits.shape == (len(ds), 3)
    np.testing.assert_array_equal(store.meta.correct, store.meta.pred == store.meta.label)
    assert store.verify() == []


def test_deterministic_and_batch_invariant(tmp_path, tok):
    model = make_model("bert")
    ds = _data()
    kw = dict(layers="all", proj="4x4", dtype="fp32", max_length=16, chunk_size=8, progress=False)
    a = extract(model, tok, ds, tmp_path / "a", batch_size=4, **kw)
    b = extract(model, tok, ds, tmp_path / "b", batch_size=4, **kw)
    assert _store_bytes(tmp_path / "a") == _store_bytes(tmp_path / "b")
    c = extract(model, tok, ds, tmp_path / "c", batch_size=7, **kw)
    for name in a.unit_names:
        fa, fc = np.asarray(a.features(name), np.float64), np.asarray(c.features(name), np.float64)
        scale = np.abs(fa).max()
        np.testing.assert_allclose(fa, fc, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import numpy as np
    from fastinf.data.datasets import TextDataset
    from fastinf.extraction.extract import extract
    from fastinf.store import StoreWriter
    from tests._models import make_model
    from tests._tokenizer import random_texts, tiny_tokenizer
    kill_after = int(sys.argv[2])
    if kill_after >= 0:
        orig = StoreWriter.write_chunk
        count = [0]
        def write_chunk(self, *a, **k):
            orig(self, *a, **k)
            count[0] += 1
            if count[0] == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        StoreWriter.write_chunk = write_chunk
    rng = np.random.default_rng(0)
    ds = TextDataset(texts=random_texts(30, 1), labels=rng.integers(0, 3, 30))
    extract(make_model("gpt2"), tiny_tokenizer(sys.argv[3]), ds, sys.argv[1], layers="all", proj="4x4",
            batch_size=4, max_length=16, chunk_size=6, resume=sys.argv[4] == "1", progress=False)
""")


def test_sigkill_then_resume_is_byte_identical(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT.format(root=str(ROOT)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(out, kill_after, resume):
        return subprocess.run([sys.executable, str(script), str(out), str(kill_after), str(tmp_path / "tok"),
                               "1" if resume else "0"], env=env, capture_output=True, text=True, timeout=120)

    ref = run(tmp_path / "ref", -1, False)
    assert ref.returncode == 0, ref.stderr
    killed = run(tmp_path / "part", 2, False)
    assert killed.returncode == -signal.SIGKILL
    with pytest.raises(StoreError, match="incomplete"):
        GradientStore.open(tmp_path / "part")
    resumed = run(tmp_path / "part", -1, True)
    assert resumed.returncode == 0, resumed.stderr
    assert _store_bytes(tmp_path / "part") == _store_bytes(tmp_path / "ref")


def test_existing_store_with_other_projection_is_refused(tmp_path, tok):
    model = make_model("bert")
    ds = _data(8)
    extract(model, tok, ds, tmp_path / "s", proj="4x4", max_length=16, progress=False)
    with pytest.raises(StoreMismatchError, match="different store"):
        extract(model, tok, ds, tmp_path / "s", proj="8x8", max_length=16, progress=False)
    with pytest.raises(StoreMismatchError):
        extract(make_model("bert", seed=1), tok, ds, tmp_path / "s", proj="4x4", max_length=16, progress=False)
    # same arguments on a complete store: nothing recomputed, the same store returned
    again = extract(model, tok, ds, tmp_path / "s", proj="4x4", max_length=16, progress=False)
    assert again.n == 8


def test_bad_inputs(tmp_path, tok):
    model = make_model("bert")
    with pytest.raises(DataError, match="empty"):
        extract(model, tok, TextDataset(texts=[], labels=np.zeros(0)), tmp_path / "e", progress=False)
    with pytest.raises(DataError, match="outside the model's 3 classes"):
        extract(model, tok, _data(5, classes=5), tmp_path / "l", progress=False)
    with pytest.raises(ConfigError, match="max_length"):
        extract(model, tok, _data(5), tmp_path / "m", max_length=0, progress=False)
    with pytest.raises(SelectorError):
        extract(model, tok, _data(5), tmp_path / "u", layers="nonsense[", progress=False)
    with pytest.raises(SelectorError):
        extract(model, tok, _data(5), tmp_path / "v", layers="*.no_such_module", progress=False)
    for p in ("e", "l", "m", "u", "v"):
        assert not (tmp_path / p / "manifest.json").exists()


def test_dataset_files(tmp_path):
    (tmp_path / "sst.tsv").write_text("sentence\tlabel\nit 's \" good \t1\nbad movie \t0\n")
    ds = load_dataset_spec(str(tmp_path / "sst.tsv"))
    # GLUE's trailing space before the tab is stripped; the bare quote survives (quoting is off)
    assert ds.texts == ['it \'s " good', "bad movie"] and ds.labels.tolist() == [1, 0]
    (tmp_path / "mrpc.tsv").write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA b.\tA c.\n")
    ds = load_dataset_spec(str(tmp_path / "mrpc.tsv"))
    assert ds.text_pairs == ["A c."] and ds.labels.tolist() == [1]
    (tmp_path / "d.jsonl").write_text('{"text": "x", "label": "pos"}\n{"text": "y", "label": "neg"}\n')
    ds = load_dataset_spec(str(tmp_path / "d.jsonl"))
    assert ds.labels.tolist() == [1, 0] and ds.label_names == ["neg", "pos"]
    (tmp_path / "nolabel.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match="no label column"):
        load_dataset_spec(str(tmp_path / "nolabel.csv"))
    (tmp_path / "notext.csv").write_text("body,label\nhello,1\n")
    with pytest.raises(DataError, match="no text column"):
        load_dataset_spec(str(tmp_path / "notext.csv"))
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="empty"):
        load_dataset_spec(str(tmp_path / "empty.csv"))


def test_packaged_sms():
    from fastinf.data.datasets import load_sms

    ds = load_sms()
    assert len(ds) == 4862 and set(np.unique(ds.labels)) == {0, 1}
    assert 0.05 < ds.labels.mean() < 0.3  # spam is the minority class


def test_cli_extract_info_verify(tmp_path, tok, capsys):
    from fastinf.cli.app import main

    model = make_model("bert")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    ds = _data(12)
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(ds.texts, ds.labels)))
    rc = main(["extract", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "d.csv"), "--out",
               str(tmp_path / "s"), "--layers", "middle,last", "--proj", "4x4", "--max-length", "16",
               "--num-labels", "3", "--no-progress", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_samples"] == 12 and out["n_units"] > 0
    assert main(["store", "verify", str(tmp_path / "s")]) == 0
    units = tmp_path / "s" / "units" / "0000.npy"
    raw = bytearray(units.read_bytes())
    raw[-1] ^= 0x55
    units.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["store", "verify", str(tmp_path / "s")]) == 1
    assert "checksum mismatch" in capsys.readouterr().out
    assert main(["store", "info", str(tmp_path / "nowhere")]) == 2


def test_nonfinite_gradients_are_recorded_with_sample_ids(tmp_path, tok):
    import torch.nn.functional as F

    from fastinf.errors import NonFiniteError
    from fastinf.extraction.models import CustomLoss

    def loss_fn(model, batch):  # cross-entropy, but NaN for samples labelled 2
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ce = F.cross_entropy(logits, batch["labels"], reduction="none")
        scale = torch.where(batch["labels"] == 2, float("nan"), 1.0)  # not where(): its grad leaks NaN
        return ce * scale, logits

    ds = _data(12)
    ds.ids = np.arange(500, 512)
    store = extract(make_model("bert"), tok, ds, tmp_path / "s", layers="last", proj="4x4", batch_size=5,
                    max_length=16, task=CustomLoss(loss_fn), progress=False)
    bad = np.flatnonzero(ds.labels == 2)
    assert bad.size > 0
    assert [d["id"] for d in store.nonfinite] == (500 + bad).tolist()
    finite = np.flatnonzero(ds.labels != 2)
    assert np.isfinite(np.asarray(store.features(store.unit_names[0]), np.float32)[finite]).all()
    with pytest.raises(NonFiniteError, match=str(500 + bad[0])):
        import fastinf
        fastinf.score(store, store, method="graddot")
