"""Fine-tuning: loss goes down, checkpoints and the lr log are written, runs are deterministic, the
scored checkpoint is the held-out-loss minimum, LoRA trains only adapters + head, and bad input fails."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fastinf.experiment.config import LoraSettings, ModelConfig, TrainConfig
from fastinf.data.datasets import TextDataset
from fastinf.errors import ConfigError, DataError
from fastinf.experiment.train import TrainResult, build_model, evaluate_model, finetune, load_checkpoint, lr_lambda

POS, NEG = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]
FILLER = ["the", "a", "movie", "film", "is", "was", "very", "not"]


def make_tiny_model_dir(path: Path, n_classes: int = 2, n_layers: int = 2) -> str:
    """A random BERT (``n_layers`` blocks, hidden 16) with a word-level vocabulary, saved as an HF directory."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POS + NEG + FILLER
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=n_layers, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=n_classes,
                     initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(path)
    return str(path)


def make_sentiment(n: int, seed: int = 0) -> TextDataset:
    """Six-word texts whose label is given by two sentiment words among four fillers."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        y = int(rng.integers(2))
        words = list(rng.choice(FILLER, 4)) + list(rng.choice(POS if y else NEG, 2))
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(y)
    return TextDataset(texts=texts, labels=np.array(labels), name=f"sentiment{seed}")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, which only spin against other processes."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "bert")


FULL = TrainConfig(epochs=3, batch_size=16, lr=1e-2, warmup_ratio=0.2, lora=None)


@pytest.fixture(scope="module")
def full_run(tiny_dir, tmp_path_factory) -> TrainResult:
    out = tmp_path_factory.mktemp("full")
    return finetune(ModelConfig(name=tiny_dir, max_length=16), FULL, make_sentiment(160), make_sentiment(48, 1),
                    out, seed=0)


def test_finetune_lowers_loss_and_writes_checkpoints_and_lr_log(full_run):
    out = Path(full_run.out)
    assert [c.epoch for c in full_run.checkpoints] == [0, 1, 2, 3]
    for c in full_run.checkpoints:
        assert (Path(c.path) / "trainable.safetensors").is_file() and (Path(c.path) / "checkpoint.json").is_file()
    initial, best = full_run.initial.heldout_loss, full_run.best.heldout_loss
    assert best < initial - 0.05, f"held-out loss did not drop: {initial:.4f} -> {best:.4f}"
    assert full_run.history[-1]["train_loss"] < full_run.history[0]["train_loss"]
    log = json.loads((out / "lr_log.json").read_text())
    assert [e["epoch"] for e in log] == [1, 2, 3]
    # the logged lr is the one the schedule gives at the epoch's last optimizer step
    steps_per_epoch, total = math.ceil(160 / 16), 3 * math.ceil(160 / 16)
    warmup = int(round(0.2 * total))
    for e in log:
        assert e["step"] == e["epoch"] * steps_per_epoch
        assert e["lr"] == pytest.approx(FULL.lr * lr_lambda(e["step"] - 1, total, warmup, "cosine"), rel=1e-9)
    assert TrainResult.load(out).best_epoch == full_run.best_epoch


def test_scored_checkpoint_is_the_heldout_loss_minimum(full_run):
    trained = full_run.checkpoints[1:]
    assert full_run.best.heldout_loss == min(c.heldout_loss for c in trained)


def test_checkpoint_reloads_to_the_same_model(full_run, tiny_dir):
    model, tok = load_checkpoint(full_run.best.path)
    loss, acc = evaluate_model(model, tok, make_sentiment(48, 1), max_length=16)
    assert loss == pytest.approx(full_run.best.heldout_loss, abs=1e-6)
    assert acc == pytest.approx(full_run.best.heldout_acc)


def test_finetune_is_deterministic_for_a_seed(full_run, tiny_dir, tmp_path):
    again = finetune(ModelConfig(name=tiny_dir, max_length=16), FULL, make_sentiment(160), make_sentiment(48, 1),
                     tmp_path, seed=0)
    assert again.history == full_run.history
    from safetensors.torch import load_file

    a = load_file(str(Path(full_run.best.path) / "trainable.safetensors"))
    b = load_file(str(Path(again.best.path) / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lr_schedule_warmup_then_cosine_to_zero():
    total, warmup = 100, 10
    lam = [lr_lambda(s, total, warmup, "cosine") for s in range(total)]
    assert lam[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert lam[warmup] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lam[warmup:], lam[warmup + 1:])), "cosine part must not increase"
    assert lr_lambda(total, total, warmup, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_lambda(55, total, warmup, "linear") == pytest.approx(0.5)
    assert lr_lambda(55, total, warmup, "constant") == 1.0


def test_lora_trains_only_adapters_and_head(tiny_dir, tmp_path):
    lora = LoraSettings(r=2, alpha=4.0, target_modules=["query", "value"])
    cfg = TrainConfig(epochs=1, batch_size=16, lr=1e-2, lora=lora)
    res = finetune(ModelConfig(name=tiny_dir, max_length=16), cfg, make_sentiment(64), make_sentiment(16, 1),
                   tmp_path, seed=1)
    from safetensors.torch import load_file

    init = load_file(str(Path(res.initial.path) / "trainable.safetensors"))
    final = load_file(str(Path(res.best.path) / "trainable.safetensors"))
    assert init.keys() == final.keys()
    assert all("lora_" in k or ".classifier." in k for k in final), sorted(final)
    assert sum("lora_A" in k for k in final) == 4 and sum("lora_B" in k for k in final) == 4
    assert any(not torch.equal(init[k], final[k]) for k in final if "lora_B" in k), "LoRA B never moved"
    model, _ = load_checkpoint(res.best.path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(final)


def test_lora_target_matching_no_module_is_refused(tiny_dir):
    with pytest.raises(ConfigError, match=r"'qkv'.*matches no linear layer.*query"):
        build_model(ModelConfig(name=tiny_dir), 2, LoraSettings(target_modules=["qkv"]))


def test_single_class_training_set_is_refused(tiny_dir, tmp_path):
    ds = make_sentiment(20)
    one = ds.with_labels(np.zeros(20, dtype=np.int64))
    with pytest.raises(DataError, match="single class"):
        finetune(ModelConfig(name=tiny_dir, max_length=16), FULL, one, None, tmp_path)


@pytest.mark.parametrize("lengths", [None, np.random.default_rng(0).integers(3, 40, size=203)])
def test_epoch_batches_cover_every_sample_once_and_are_seeded(lengths):
    from fastinf.experiment.train import epoch_batches

    a = epoch_batches(203, 16, torch.Generator().manual_seed(1), lengths, pool=4)
    b = epoch_batches(203, 16, torch.Generator().manual_seed(1), lengths, pool=4)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert sorted(torch.cat(a).tolist()) == list(range(203))
    if lengths is not None:   # grouped batches pad less than random ones
        pad = lambda bs: sum(len(x) * lengths[x.numpy()].max() - lengths[x.numpy()].sum() for x in bs)
        rand = epoch_batches(203, 16, torch.Generator().manual_seed(1), None)
        assert pad(a) < 0.5 * pad(rand)


def test_train_cli_writes_checkpoints_noise_and_replayable_config(tiny_dir, tmp_path, capsys):
    from fastinf.cli.app import main
    from fastinf.experiment.config import RunConfig

    ds = make_sentiment(48)
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(ds.texts, ds.labels)))
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_dir, "--data", str(data), "--noise", "0.25", "--epochs", "1",
                 "--full", "--lr", "1e-2", "--max-length", "16", "--out", str(out)]) == 0
    assert "scored checkpoint" in capsys.readouterr().out
    for name in ("ckpt-0", "ckpt-1", "lr_log.json", "train.json", "noise.npz", "config.yaml"):
        assert (out / name).exists(), name
    cfg = RunConfig.from_yaml(out / "config.yaml")
    assert (cfg.noise.rate, cfg.train.lora, cfg.train.epochs) == (0.25, None, 1)
    assert np.load(out / "noise.npz")["mask"].sum() == round(0.25 * 41)   # 48 minus a 15% held-out split


def test_load_model_accepts_a_checkpoint_directory(full_run):
    from fastinf.extraction.checkpoint import is_fastinf_checkpoint
    from fastinf.extraction.models import load_model

    assert is_fastinf_checkpoint(full_run.best.path)
    model, tok = load_model(full_run.best.path)
    ref, _ = load_checkpoint(full_run.best.path)
    ref_state = ref.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in model.state_dict().items())
    assert not model.training
