"""The curated view of a finished ``fastinf run`` (what ``fastinf demo`` prints after its NDR table).

From the run's own stores (no new extraction) one fused pass with the run's recommended (group, method,
how) (else ``all`` / graddot / rank) ranks the training samples; the lowest ranked are the suspects. For
each: the text, the label it was trained with, whether that label is one of the injected flips (and the
dataset's original label), and the model's prediction. A suspect whose label was *not* flipped but that the
model predicts otherwise is a candidate mislabel of the dataset itself (SMS spam has some): the summary lists
the lowest-ranked samples whose label was not flipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Suspect", "run_suspects", "format_suspects"]


@dataclass
class Suspect:
    """One of the lowest-ranked training samples of a run."""

    rank: int
    id: int
    text: str
    label: str            # the (possibly flipped) label it was trained with
    original: str         # the dataset's own label
    injected: bool        # the label is one of the injected flips
    predicted: str


def _choice(results: dict[str, Any]) -> tuple[str, str, str]:
    """The recommended (group, method, how), or (all, graddot, rank)."""
    rec = (results.get("recommendation") or {}).get("recommended") or {}
    return str(rec.get("group", "all")), str(rec.get("method", "graddot")), str(rec.get("how", "rank"))


def run_suspects(cfg: Any, results: dict[str, Any], *, seed: int | None = None,
                 top: int = 10) -> tuple[list[Suspect], dict[str, Any]]:
    """The ``top`` most detrimental training samples of the run ``cfg`` (finished, in ``cfg.out``), and a
    summary (choice of group/method/how, injected count among them, noise rate)."""
    from fastinf.curation.scoring import influence_scores
    from fastinf.curation.table import rank_scores
    from fastinf.data.noise import load_noise
    from fastinf.experiment.pipeline import load_splits
    from fastinf.store import GradientStore

    seed = cfg.seeds[0] if seed is None else seed
    sdir = Path(cfg.out) / f"seed-{seed}"
    train_store, test_store = (GradientStore.open(sdir / "stores" / s) for s in ("train", "test"))
    group, method, how = _choice(results)
    score = influence_scores(train_store, test_store, method=method, how=how, group=group)
    ranking = rank_scores(np.arange(train_store.n), score, 0)
    train, _ = load_splits(cfg)
    noise = load_noise(sdir / "noise.npz")
    pos = {int(i): j for j, i in enumerate(np.asarray(train.ids))}
    names = list(train.label_names or [str(c) for c in range(int(noise.labels.max()) + 1)])
    meta = train_store.meta
    every = []
    for r in np.argsort(ranking.rank):
        j = pos[int(meta.ids[r])]
        every.append(Suspect(rank=int(ranking.rank[r]), id=int(meta.ids[r]), text=train.texts[j],
                             label=names[int(noise.labels[j])], original=names[int(noise.clean_labels[j])],
                             injected=bool(noise.mask[j]), predicted=names[int(meta.pred[r])]))
    out = every[:top]
    summary = {"group": group, "method": method, "how": how, "n_train": int(train_store.n),
               "n_reference": int(test_store.n), "noise_rate": float(noise.mask.mean()),
               "injected": sum(s.injected for s in out),
               "unflipped": [s for s in every if not s.injected][:max(1, top // 2)]}
    return out, summary


def _short(text: str, width: int) -> str:
    t = " ".join(text.split())
    return t if len(t) <= width else t[:width - 1] + "…"


def format_suspects(suspects: list[Suspect], summary: dict[str, Any], width: int = 72) -> str:
    """The demo's text block: one line per suspect, then what it means."""
    lines = [f"Curated: the {len(suspects)} most detrimental of {summary['n_train']} training messages "
             f"({summary['group']} layers, {summary['method']}, {summary['how']}; lowest influence on "
             f"{summary['n_reference']} held-out messages)",
             f"  {'rank':>4}  {'label':<6} {'injected?':<17} {'model':<6} text"]
    for s in suspects:
        tag = f"yes (was {s.original})" if s.injected else "no"
        lines.append(f"  {s.rank:>4}  {s.label:<6} {tag:<17} {s.predicted:<6} {_short(s.text, width)}")
    lines.append(f"  {summary['injected']} of {len(suspects)} are injected flips ({summary['noise_rate']:.0%} of the "
                 f"training labels were flipped, so {summary['noise_rate'] * len(suspects):.0f} would be chance).")
    lines.append("  The most detrimental messages that keep the dataset's own label (candidate real mislabels or "
                 "odd cases of SMS spam; 'model' is the fine-tuned prediction):")
    for s in summary.get("unflipped", []):
        flag = "  <- model disagrees" if s.predicted != s.label else ""
        lines.append(f"  {s.rank:>4}  {s.label:<6} {'no':<17} {s.predicted:<6} {_short(s.text, width)}{flag}")
    lines.append("  Curate your own data: fastinf curate --train DATA --model TRAINED --reference-fraction 0.1 "
                 "--drop-lowest 5 --out DIR")
    return "\n".join(lines)
