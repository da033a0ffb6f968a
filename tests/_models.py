"""Tiny random Hugging Face models and tokenizer-free batches, shared by the whole test suite.

Every factory returns a seeded, float32, eval-mode model with a few layers, hidden size 16-32 and a
vocabulary of 64 tokens, so that a forward+backward takes milliseconds on CPU. ``make_model(family,
task)`` is the single entry point; ``FAMILIES`` lists the families and the tasks each supports.

``make_batch`` builds a padded batch (``input_ids``, ``attention_mask``, ``labels``) directly from
random token ids, right-padded with ``PAD_ID``; sample ``b`` has length ``lengths[b]``.
"""
from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import transformers as tf

VOCAB = 64
PAD_ID = 0
NUM_LABELS = 3
MAX_POS = 64

# family -> tasks it is built for ("seq-cls", "causal-lm")
FAMILIES: dict[str, tuple[str, ...]] = {
    "bert": ("seq-cls",),
    "roberta": ("seq-cls",),
    "distilbert": ("seq-cls",),
    "gpt2": ("seq-cls", "causal-lm"),
    "llama": ("seq-cls", "causal-lm"),
    "qwen2": ("seq-cls", "causal-lm"),
    "mistral": ("seq-cls", "causal-lm"),
    "gemma": ("seq-cls", "causal-lm"),
    "bert-lora": ("seq-cls",),
}

# (family, task) pairs for parametrised tests
CASES: list[tuple[str, str]] = [(f, t) for f, ts in FAMILIES.items() for t in ts]


def _decoder_kwargs(hidden: int = 16) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=MAX_POS,
                pad_token_id=PAD_ID, tie_word_embeddings=False)


def _config(family: str, task: str) -> tf.PretrainedConfig:
    common = dict(num_labels=NUM_LABELS, pad_token_id=PAD_ID)
    if family in ("bert", "bert-lora"):
        return tf.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=MAX_POS, type_vocab_size=2,
                             **common)
    if family == "roberta":
        # RoBERTa positions start after the padding index, so it needs pad_token_id + 1 extra slots.
        return tf.RobertaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=MAX_POS + 2, type_vocab_size=1,
                                **common)
    if family == "distilbert":
        return tf.DistilBertConfig(vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                                   max_position_embeddings=MAX_POS, **common)
    if family == "gpt2":
        # GPT-2 ties lm_head to wte (kept: the tied case is tested)
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=MAX_POS,
                             bos_token_id=1, eos_token_id=1, **common)
    if family == "llama":
        return tf.LlamaConfig(**_decoder_kwargs(), num_labels=NUM_LABELS)
    if family == "qwen2":
        return tf.Qwen2Config(**_decoder_kwargs(), num_labels=NUM_LABELS)
    if family == "mistral":
        return tf.MistralConfig(**_decoder_kwargs(), num_labels=NUM_LABELS)
    if family == "gemma":
        kw = _decoder_kwargs() | {"tie_word_embeddings": True}  # Gemma ties its LM head to the embedding
        return tf.GemmaConfig(**kw, head_dim=8, num_labels=NUM_LABELS)
    raise KeyError(f"unknown tiny model family {family!r}; expected one of {sorted(FAMILIES)}")


_CLASSES = {
    ("bert", "seq-cls"): tf.BertForSequenceClassification,
    ("bert-lora", "seq-cls"): tf.BertForSequenceClassification,
    ("roberta", "seq-cls"): tf.RobertaForSequenceClassification,
    ("distilbert", "seq-cls"): tf.DistilBertForSequenceClassification,
    ("gpt2", "seq-cls"): tf.GPT2ForSequenceClassification,
    ("gpt2", "causal-lm"): tf.GPT2LMHeadModel,
    ("llama", "seq-cls"): tf.LlamaForSequenceClassification,
    ("llama", "causal-lm"): tf.LlamaForCausalLM,
    ("qwen2", "seq-cls"): tf.Qwen2ForSequenceClassification,
    ("qwen2", "causal-lm"): tf.Qwen2ForCausalLM,
    ("mistral", "seq-cls"): tf.MistralForSequenceClassification,
    ("mistral", "causal-lm"): tf.MistralForCausalLM,
    ("gemma", "seq-cls"): tf.GemmaForSequenceClassification,
    ("gemma", "causal-lm"): tf.GemmaForCausalLM,
}


def make_model(family: str, task: str = "seq-cls", seed: int = 0) -> torch.nn.Module:
    """A tiny random ``family`` model with a ``task`` head ("seq-cls" or "causal-lm"), float32, eval mode.

    Biases and LayerNorm/RMSNorm parameters are re-drawn at random so that every gradient term
    (including the bias terms) is non-trivial. ``bert-lora`` wraps BERT with peft LoRA (r=4) on the
    query and value projections, with random ``lora_B`` (peft initialises it to zero).
    """
    if (family, task) not in _CLASSES:
        raise KeyError(f"no tiny model for ({family!r}, {task!r}); available: {sorted(_CLASSES)}")
    torch.manual_seed(seed)
    config = _config(family, task)
    config._attn_implementation = "eager"
    model = _CLASSES[(family, task)](config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen) + (1.0 if "weight" in name else 0.0))
    if family == "bert-lora":
        import peft

        lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0,
                               task_type="SEQ_CLS")
        model = peft.get_peft_model(model, lcfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model.float().eval()


def make_batch(lengths: Sequence[int], seed: int = 0, *, task: str = "seq-cls",
               pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """A right-padded batch of random tokens: ``input_ids``, ``attention_mask`` and ``labels``.

    ``labels`` are class ids in ``[0, NUM_LABELS)`` for "seq-cls" and a copy of ``input_ids`` for
    "causal-lm" (the task shifts them). Token ids avoid ``PAD_ID``; padded positions hold ``PAD_ID``.
    """
    T = max(lengths) if pad_to is None else pad_to
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), T), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(lengths), T), dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(1, VOCAB, (n,), generator=gen)
        mask[b, :n] = 1
    if task == "seq-cls":
        labels = torch.randint(0, NUM_LABELS, (len(lengths),), generator=gen)
    else:
        labels = ids.clone()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sub_batch(batch: dict[str, torch.Tensor], rows: Sequence[int], T: int | None = None) -> dict[str, torch.Tensor]:
    """Rows ``rows`` of ``batch``, optionally cut (or right-padded with ``PAD_ID``) to length ``T``."""
    idx = torch.as_tensor(list(rows), dtype=torch.long)
    out = {k: v[idx] for k, v in batch.items()}
    if T is not None:
        cur = out["input_ids"].shape[1]
        for k in ("input_ids", "attention_mask") + (("labels",) if out["labels"].dim() == 2 else ()):
            v = out[k]
            if T <= cur:
                out[k] = v[:, :T].contiguous()
            else:
                pad = torch.full((v.shape[0], T - cur), PAD_ID if k != "attention_mask" else 0, dtype=v.dtype)
                out[k] = torch.cat([v, pad], dim=1)
    return out


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """Run a test module's tiny-model math on one thread (restored afterwards): for 16-wide layers a
    thread pool only adds synchronisation, which on a busy 2-core box costs several times the math."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
