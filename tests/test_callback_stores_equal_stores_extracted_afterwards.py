"""Training-time capture (``fastinf.CheckpointCapture`` / ``fastinf.StoreCallback``) writes, at each chosen
checkpoint, the very stores ``fastinf.extract`` writes afterwards from the saved weights (the same feature and
meta bytes, the same weight fingerprint), records the optimiser's lr, and leaves training untouched: the
final weights with and without the capture are identical (dropout on: the RNG is not disturbed), the
``.grad`` tensors and the train/eval modes are what they were."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastinf.data.datasets import TextDataset
from fastinf.errors import ConfigError
from fastinf.extraction.callback import CheckpointCapture, StoreCallback
from fastinf.extraction.extract import extract
from fastinf.store import GradientStore
from tests._models import NUM_LABELS, make_model
from tests._tokenizer import random_texts, tiny_tokenizer

KW = dict(layers="all", proj="4x4", dtype="fp32", batch_size=4, max_length=16)


def _data(seed: int, n: int) -> TextDataset:
    return TextDataset(texts=random_texts(n, seed), labels=np.arange(n) % NUM_LABELS, name=f"d{seed}")


def _same_store(a: Path, b: Path) -> None:
    """Every unit and meta array holds the same bytes; the weight fingerprints agree."""
    sa, sb = GradientStore.open(a), GradientStore.open(b)
    for sub in ("units", "meta"):
        names = sorted(p.name for p in (a / sub).iterdir())
        assert names == sorted(p.name for p in (b / sub).iterdir()) and names
        for n in names:
            assert (a / sub / n).read_bytes() == (b / sub / n).read_bytes(), (sub, n)
    fa, fb = sa.manifest["identity"]["model"], sb.manifest["identity"]["model"]
    assert fa["fingerprint"] == fb["fingerprint"]


def _train_loop(tok, cap: CheckpointCapture | None, steps: int = 4, between: bool = False):
    """A plain AdamW loop (dropout on) over fixed batches; the weights saved after every step."""
    torch.manual_seed(0)
    model = make_model("bert").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    texts = random_texts(16, 7)
    saved = {}
    for step in range(1, steps + 1):
        rows = [(4 * step + i) % 16 for i in range(4)]
        enc = tok([texts[i] for i in rows], padding=True, return_tensors="pt")
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    labels=torch.tensor([i % NUM_LABELS for i in rows]))
        out.loss.backward()
        if between and cap is not None:          # a capture between backward and step: grads must survive
            before = [p.grad.clone() for p in model.parameters()]
            cap.capture(model, opt, step)
            assert all(torch.equal(b, p.grad) for b, p in zip(before, model.parameters()))
            assert model.training and all(m.training for m in model.modules())
        opt.step()
        sched.step()
        opt.zero_grad()
        saved[step] = copy.deepcopy(model.state_dict())
        if cap is not None and not between:
            cap.step(model, opt, step)
    return model, saved


def test_plain_loop_capture_equals_later_extraction_and_leaves_training_unchanged(tmp_path):
    tok = tiny_tokenizer(tmp_path / "v")
    train, test = _data(1, 8), _data(2, 4)
    cap = CheckpointCapture(tmp_path / "cap", tok, train=train, test=test, steps=[2], every=4, **KW)
    model, saved = _train_loop(tok, cap)
    ref_model, _ = _train_loop(tok, None)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    index = json.loads((tmp_path / "cap" / "capture.json").read_text())
    assert [c["step"] for c in index["checkpoints"]] == [2, 4]
    lrs = [c["lr"] for c in index["checkpoints"]]
    assert lrs == pytest.approx([1e-2 / 3, 1e-2 / 5])      # the optimiser's lr after step s: lr / (1 + s)
    for step in (2, 4):
        fresh = make_model("bert")
        fresh.load_state_dict(saved[step])
        for split, ds in (("train", train), ("test", test)):
            later = tmp_path / f"later-{step}-{split}"
            extract(fresh, tok, ds, later, progress=False, **KW)
            _same_store(tmp_path / "cap" / f"step-{step:08d}" / split, later)


def test_capture_between_backward_and_step_keeps_grads_modes_and_weights(tmp_path):
    tok = tiny_tokenizer(tmp_path / "v")
    cap = CheckpointCapture(tmp_path / "cap", tok, train=_data(1, 6), every=1, **KW)
    model, _ = _train_loop(tok, cap, steps=2, between=True)
    ref, _ = _train_loop(tok, None, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_capture_refuses_bad_schedules_and_foreign_directories(tmp_path):
    tok = tiny_tokenizer(tmp_path / "v")
    with pytest.raises(ConfigError, match="choose the checkpoints"):
        CheckpointCapture(tmp_path / "a", tok, train=_data(1, 4))
    with pytest.raises(ConfigError, match="train= and/or test="):
        CheckpointCapture(tmp_path / "a", tok, every=2)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not a fastinf capture"):
        CheckpointCapture(foreign, tok, train=_data(1, 4), every=1, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep"
    CheckpointCapture(tmp_path / "c", tok, train=_data(1, 4), every=1, **KW)
    with pytest.raises(ConfigError, match="other settings"):
        CheckpointCapture(tmp_path / "c", tok, train=_data(1, 4), every=1, **{**KW, "proj": "2x2"})


class _Rows(torch.utils.data.Dataset):
    def __init__(self, tok, ds: TextDataset) -> None:
        self.enc = [tok(t, truncation=True, max_length=16) for t in ds.texts]
        self.labels = ds.labels

    def __len__(self) -> int:
        return len(self.enc)

    def __getitem__(self, i: int) -> dict:
        return {**self.enc[i], "labels": int(self.labels[i])}


def _trainer(tok, out: Path, callbacks: list):
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    model = make_model("bert").train()
    args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_strategy="steps", save_steps=2, save_only_model=True, report_to=[],
                             use_cpu=True, disable_tqdm=True, logging_strategy="no", seed=0,
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(tok, _data(5, 12)),
                      data_collator=DataCollatorWithPadding(tok), callbacks=callbacks)
    trainer.train()
    return model


def test_trainer_callback_stores_equal_stores_from_the_saved_checkpoints(tmp_path):
    from transformers import AutoModelForSequenceClassification

    tok = tiny_tokenizer(tmp_path / "v")
    train, test = _data(1, 6), _data(2, 4)
    cb = StoreCallback(tmp_path / "cap", tok, train=train, test=test, every=2, **KW)
    model = _trainer(tok, tmp_path / "hf", [cb])
    ref = _trainer(tok, tmp_path / "hf-ref", [])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert [c["step"] for c in cb.capture.checkpoints] == [2, 4]
    for step in (2, 4):
        saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf" / f"checkpoint-{step}",
                                                                   attn_implementation="eager").eval()
        for split, ds in (("train", train), ("test", test)):
            later = tmp_path / f"later-{step}-{split}"
            extract(saved, tok, ds, later, progress=False, **KW)
            _same_store(tmp_path / "cap" / f"step-{step:08d}" / split, later)
