"""A seeded 10-class templated sentence-transformation task for causal-LM influence evaluation.

Each sample is a ``prompt`` (an instruction template filled with a sentence) and a ``target`` (the sentence
transformed); its class is the transformation type. The ten transformations (``TRANSFORMS``) act on the
words of short generated sentences ("the small dog sees the red ball"): reverse the words, uppercase,
pluralise the nouns, negate the verb, sort the words, capitalise each word, drop the first word, swap the
first and last word, repeat every word, keep each word's first letter. Every class has three instruction
templates, so that the class is not one fixed prefix. The sentences come from a fixed vocabulary (articles,
adjectives, nouns, verbs) by a ``numpy`` generator seeded with ``seed``: the same ``seed`` gives the same
samples, in the same order; classes are exactly balanced (``n_per_class`` each, interleaved by class).

Why this task: train samples of the same transformation are the ones that should help a test sample of that
transformation, so "same class" is a ground truth for influence rankings (the seed paper's causal-LM
evaluation; :mod:`fastinf.experiment.generation` measures ROC-AUC and recall@k against it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["TRANSFORMS", "CLASS_NAMES", "TemplatedTask", "make_templated_task", "templated_splits", "tiny_causal_lm"]

ADJ = ["small", "red", "old", "happy", "quiet", "bright", "cold", "green"]
NOUN = ["dog", "cat", "bird", "ball", "tree", "car", "book", "cup"]
VERB = ["sees", "likes", "finds", "moves", "holds", "wants"]
SENTENCES = ["the {a} {n} {v} the {n2}", "a {a} {n} {v} a {a2} {n2}", "the {n} {v} the {a} {n2}"]


def _plural(w: str) -> str:
    return w + "s" if w in NOUN else w


def _negate(ws: list[str]) -> list[str]:
    i = next(i for i, w in enumerate(ws) if w in VERB)
    return ws[:i] + ["does", "not", ws[i][:-1]] + ws[i + 1:]


TRANSFORMS: dict[str, tuple[Callable[[list[str]], list[str]], tuple[str, ...]]] = {
    "reverse": (lambda ws: ws[::-1], ("reverse the words :", "say it backwards :", "words in reverse order :")),
    "uppercase": (lambda ws: [w.upper() for w in ws], ("uppercase :", "shout it :", "in capitals :")),
    "pluralise": (lambda ws: [_plural(w) for w in ws], ("pluralise :", "make the nouns plural :", "more of them :")),
    "negate": (_negate, ("negate :", "say the opposite :", "deny it :")),
    "sort": (lambda ws: sorted(ws), ("sort the words :", "alphabetical order :", "order the words :")),
    "capitalise": (lambda ws: [w.capitalize() for w in ws], ("capitalise :", "title case :", "capital initials :")),
    "drop_first": (lambda ws: ws[1:], ("drop the first word :", "skip the first word :", "remove word one :")),
    "swap_ends": (lambda ws: [ws[-1]] + ws[1:-1] + [ws[0]], ("swap the ends :", "swap first and last :",
                                                             "exchange the outer words :")),
    "repeat": (lambda ws: [x for w in ws for x in (w, w)], ("repeat each word :", "say every word twice :",
                                                             "double the words :")),
    "initials": (lambda ws: [w[0] for w in ws], ("first letters :", "initials only :", "abbreviate :")),
}
CLASS_NAMES = tuple(TRANSFORMS)


@dataclass(frozen=True)
class TemplatedTask:
    """Prompts, targets and class labels (``labels[i]`` indexes ``class_names``)."""

    prompts: list[str]
    targets: list[str]
    labels: np.ndarray
    class_names: tuple[str, ...] = CLASS_NAMES

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def texts(self) -> list[str]:
        """``prompt + " " + target``: the full sequence a causal LM is trained and scored on."""
        return [p + " " + t for p, t in zip(self.prompts, self.targets)]

    def vocabulary(self) -> list[str]:
        """Every whitespace-separated token of the prompts and targets, sorted (for word-level tokenizers)."""
        return sorted({w for s in self.prompts + self.targets for w in s.split()})


def _sentence(rng: np.random.Generator) -> list[str]:
    tpl = SENTENCES[int(rng.integers(len(SENTENCES)))]
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    return tpl.format(a=pick(ADJ), a2=pick(ADJ), n=pick(NOUN), n2=pick(NOUN), v=pick(VERB)).split()


def make_templated_task(n_per_class: int, seed: int = 0) -> TemplatedTask:
    """``n_per_class`` samples of each of the ten transformations, seeded, interleaved by class."""
    if not isinstance(n_per_class, int) or n_per_class < 1:
        from fastinf.errors import ConfigError

        raise ConfigError(f"n_per_class must be a positive integer; got {n_per_class!r}")
    rng = np.random.default_rng(seed)
    prompts, targets, labels = [], [], []
    for _ in range(n_per_class):
        for c, (fn, templates) in enumerate(TRANSFORMS.values()):
            words = _sentence(rng)
            prompts.append(f"{templates[int(rng.integers(len(templates)))]} {' '.join(words)} =>")
            targets.append(" ".join(fn(words)))
            labels.append(c)
    return TemplatedTask(prompts, targets, np.asarray(labels, dtype=np.int64))


def templated_splits(n_train_per_class: int, n_test_per_class: int, seed: int = 0
                     ) -> tuple[TemplatedTask, TemplatedTask]:
    """(train, test) from one seeded stream: the first ``n_train_per_class`` rounds train, the rest test."""
    full = make_templated_task(n_train_per_class + n_test_per_class, seed)
    cut = n_train_per_class * len(CLASS_NAMES)
    part = lambda a, b: TemplatedTask(full.prompts[a:b], full.targets[a:b], full.labels[a:b])  # noqa: E731
    return part(0, cut), part(cut, len(full))


def tiny_causal_lm(words: Sequence[str], *, seed: int = 0, hidden: int = 32, layers: int = 2) -> tuple[Any, Any]:
    """A seeded random tiny Llama causal LM and a whitespace word-level tokenizer over ``words`` (plus
    ``<pad>``, ``<unk>``, ``<eos>``): for smoke runs and tests that need no downloaded model."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>"] + sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                           eos_token="<eos>")
    cfg = tf.LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=0, eos_token_id=2, bos_token_id=2,
                         tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(cfg).float().eval(), tokenizer
