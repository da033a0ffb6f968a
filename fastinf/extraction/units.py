"""Influence units: discover the parameter tensors of a model whose per-sample gradients fastinf captures,
and select subsets of them with a small selector language.

A *unit* is one weight matrix (with its bias, if any): every ``nn.Linear`` and Hugging Face ``Conv1D``
(GPT-2), the input token embedding, peft LoRA ``lora_A`` / ``lora_B`` matrices (separate units), the
pooler and the classification / LM head. ``discover(model)`` returns them ordered by depth with a
stable name (the module path), a kind, a block index, a role and a shape; ``select(units, spec)``
filters them.

Selector language (``select``; union with commas, a leading ``-`` removes what the term matches)::

    all                every unit
    first              the input token embedding (block -1)
    last               the head unit(s): classifier / score / lm_head (kind "head", block L)
    middle             units of blocks b with L//4 <= b < L - L//4 (the inner half of the depth)
    blocks[a:b]        units of blocks a <= b < b' (python slice; a, b optional, negatives count from L)
    block[i]           units of block i
    q1 | q2 | q3 | q4  units of the i-th quartile of the L blocks: block b is in q(floor(4b/L) + 1)
    embedding | linear | lora_a | lora_b | head | lora   units of that kind ("lora": lora_a and lora_b)
    attn | attn.v | mlp | mlp.down | pooler | ...      role filters: the role equals the term or starts
                       with term + "." (so "attn.v" also matches "attn.v.lora_b")
    *.value, re:...    shell globs on the unit name (a term containing * ? or [ that is not blocks[..]),
                       or a regular expression searched in the name after "re:"

Everything here is pure bookkeeping on module names and shapes: no forward pass is run.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from fastinf.errors import ConfigError, SelectorError

KINDS = ("embedding", "linear", "lora_a", "lora_b", "head")

# Containers whose integer child index is the transformer block index.
_BLOCK_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")

# Leaf module name -> role, for modules inside a transformer block. Checked in order; a key matches
# the last path component, or (when it contains a dot) the end of the path.
_ROLE_RULES: tuple[tuple[str, str], ...] = (
    ("attention.output.dense", "attn.o"),   # BERT / RoBERTa / MiniLM
    ("attn.c_proj", "attn.o"),              # GPT-2
    ("mlp.c_proj", "mlp.down"),             # GPT-2
    ("output.dense", "mlp.down"),           # BERT FFN output
    ("intermediate.dense", "mlp.up"),       # BERT FFN input
    ("query", "attn.q"), ("q_proj", "attn.q"), ("q_lin", "attn.q"), ("q", "attn.q"),
    ("key", "attn.k"), ("k_proj", "attn.k"), ("k_lin", "attn.k"), ("k", "attn.k"),
    ("value", "attn.v"), ("v_proj", "attn.v"), ("v_lin", "attn.v"), ("v", "attn.v"),
    ("o_proj", "attn.o"), ("out_lin", "attn.o"), ("out_proj", "attn.o"), ("o", "attn.o"), ("dense", "attn.o"),
    ("c_attn", "attn.qkv"), ("qkv_proj", "attn.qkv"), ("Wqkv", "attn.qkv"), ("query_key_value", "attn.qkv"),
    ("gate_proj", "mlp.gate"), ("w1", "mlp.gate"),
    ("up_proj", "mlp.up"), ("c_fc", "mlp.up"), ("lin1", "mlp.up"), ("fc1", "mlp.up"), ("w3", "mlp.up"),
    ("gate_up_proj", "mlp.gate_up"),
    ("down_proj", "mlp.down"), ("lin2", "mlp.down"), ("fc2", "mlp.down"), ("w2", "mlp.down"),
    ("dense_h_to_4h", "mlp.up"), ("dense_4h_to_h", "mlp.down"),
)

# Last path components of heads (outside the blocks).
_HEAD_NAMES = ("classifier", "score", "lm_head", "pre_classifier", "out_proj", "qa_outputs", "embed_out")
_POOLER_RE = re.compile(r"(?:^|\.)pooler(?:\.|$)")
# Roles of units that live after the last block (block L).
_OUTER_ROLES = ("head", "pooler", "extra")
_LORA_RE = re.compile(r"^(?P<base>.*)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?$")


@dataclass(frozen=True)
class Unit:
    """One influence unit: a weight matrix ``W`` (d_out x d_in) and optionally its bias.

    ``name`` is the module path in the model (``get_module`` resolves it). ``block`` is the transformer
    block index 0..L-1; the input embedding is -1, the pooler and heads are L. ``transposed`` marks a
    GPT-2 ``Conv1D``, which stores ``W`` as (d_in, d_out); fastinf's features always use the (d_out,
    d_in) layout of ``nn.Linear``. For the embedding, ``W`` is ``E^T`` (hidden x vocabulary): the
    unit acts on one-hot tokens.
    """

    name: str
    kind: str
    block: int
    role: str
    d_out: int
    d_in: int
    bias: bool
    transposed: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"Unit {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}.")
        if self.d_out <= 0 or self.d_in <= 0:
            raise ConfigError(f"Unit {self.name!r}: shape must be positive, got ({self.d_out}, {self.d_in}).")

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)``, the layout of the exact per-sample gradient."""
        return (self.d_out, self.d_in)

    @property
    def exact_dim(self) -> int:
        """Length of the exact feature: ``d_out * d_in`` weight entries, then ``d_out`` bias entries."""
        return self.d_out * self.d_in + (self.d_out if self.bias else 0)

    @property
    def n_params(self) -> int:
        return self.exact_dim

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "block": self.block, "role": self.role,
                "d_out": self.d_out, "d_in": self.d_in, "bias": self.bias, "transposed": self.transposed}

    @classmethod
    def from_dict(cls, d: dict) -> "Unit":
        return cls(name=d["name"], kind=d["kind"], block=int(d["block"]), role=d["role"],
                   d_out=int(d["d_out"]), d_in=int(d["d_in"]), bias=bool(d["bias"]),
                   transposed=bool(d.get("transposed", False)))


# ---------------------------------------------------------------------------------------------- discovery

def _is_conv1d(module: nn.Module) -> bool:
    """HF ``Conv1D`` (GPT-2): ``y = x @ W + b`` with ``W`` stored (d_in, d_out). Matched by class name so
    that importing this module never imports transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _block_of(name: str) -> int | None:
    m = _BLOCK_RE.search(name)
    return int(m.group(1)) if m else None


def _role_in_block(path: str) -> str:
    leaf = path.rsplit(".", 1)[-1]
    for key, role in _ROLE_RULES:
        if "." in key:
            if path == key or path.endswith("." + key):
                return role
        elif leaf == key:
            return role
    return "other"


def _input_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Embedding):
            return emb
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding) and name.rsplit(".", 1)[-1] in ("word_embeddings", "wte", "embed_tokens"):
            return mod
    return None


def _is_inactive_copy(name: str) -> bool:
    """peft ``modules_to_save`` keeps the frozen ``original_module`` beside the trained copy; only the
    trained copy runs in the forward pass, so the original is not a unit."""
    return ".original_module" in name or name.endswith("original_module")


def discover(model: nn.Module) -> list[Unit]:
    """The influence units of ``model``, ordered by depth (embedding, blocks 0..L-1, pooler, heads).

    Discovered: the input token embedding (position / token-type embeddings are not units), every
    ``nn.Linear`` and HF ``Conv1D``, peft LoRA ``lora_A`` / ``lora_B`` (kind ``lora_a`` / ``lora_b``,
    role = base role + ".lora_a"/".lora_b"; the frozen base layer stays a ``linear`` unit named
    ``<path>.base_layer``), the pooler (kind ``linear``, role ``pooler``) and the heads (kind
    ``head``). A tied LM head is its own unit; the embedding unit is the input side only.
    Linear layers outside any block that are neither pooler nor head get block L and role "extra";
    unrecognised linear layers inside a block get role "other".
    """
    emb, raw = _unit_modules(model)
    blocks = [b for n, _ in raw if (b := _block_of(n)) is not None]
    L = (max(blocks) + 1) if blocks else 0

    units: list[tuple[tuple, Unit]] = []
    for order, (name, mod) in enumerate(raw):
        unit = _make_unit(name, mod, emb, L)
        units.append(((unit.block, order), unit))
    units.sort(key=lambda t: t[0])
    return [u for _, u in units]


def _unit_modules(model: nn.Module) -> tuple[nn.Module | None, list[tuple[str, nn.Module]]]:
    """(input embedding, [(name, module)] of every candidate unit in module order); raises if none."""
    emb = _input_embedding(model)
    raw: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if not name or _is_inactive_copy(name):
            continue
        if mod is emb or isinstance(mod, nn.Linear) or _is_conv1d(mod):
            raw.append((name, mod))
    if not raw:
        raise ConfigError(f"No influence units found in {type(model).__name__}: expected nn.Linear, HF Conv1D "
                          "or an input nn.Embedding; is this a torch language model?")
    return emb, raw


def _make_unit(name: str, mod: nn.Module, emb: nn.Module | None, L: int) -> Unit:
    """The Unit of one module: embedding, or a linear / Conv1D with its kind, block and role."""
    block = _block_of(name)
    bias = getattr(mod, "bias", None) is not None
    if mod is emb:
        return Unit(name, "embedding", -1, "embed", d_out=mod.embedding_dim, d_in=mod.num_embeddings, bias=False)
    if _is_conv1d(mod):
        d_in, d_out = mod.weight.shape
        transposed = True
    else:
        d_out, d_in = mod.out_features, mod.in_features
        transposed = False
    kind, role, block = _kind_role_block(name, block, L)
    return Unit(name, kind, block, role, d_out=d_out, d_in=d_in, bias=bias, transposed=transposed)


def _kind_role_block(name: str, block: int | None, L: int) -> tuple[str, str, int]:
    """(kind, role, block) of a linear unit: LoRA factor, block layer, pooler, head or extra."""
    lora = _LORA_RE.match(name)
    if lora is not None:
        ab = lora.group("ab").lower()
        kind = f"lora_{ab}"
        base_role = _role_in_block(lora.group("base")) if block is not None else "head"
        role = f"{base_role}.lora_{ab}"
        block = L if block is None else block
    elif block is not None:
        path = name[:-len(".base_layer")] if name.endswith(".base_layer") else name
        kind, role = "linear", _role_in_block(path)
    elif _POOLER_RE.search(name):
        kind, role, block = "linear", "pooler", L
    else:
        path = name[:-len(".base_layer")] if name.endswith(".base_layer") else name
        parts = path.split(".")
        is_head = any(p in _HEAD_NAMES for p in parts) or "modules_to_save" in parts
        kind, role, block = ("head", "head", L) if is_head else ("linear", "extra", L)
    return kind, role, block


def n_blocks(units: Sequence[Unit]) -> int:
    """Number L of transformer blocks spanned by ``units`` (pooler and heads sit at block L)."""
    inner = [u.block for u in units if u.block >= 0 and u.role.split(".")[0] not in _OUTER_ROLES]
    if inner:
        return max(inner) + 1
    outer = [u.block for u in units if u.block >= 0]
    return max(outer) if outer else 0


def get_module(model: nn.Module, unit: Unit | str) -> nn.Module:
    """The module of ``unit`` (or of a unit name) inside ``model``."""
    name = unit.name if isinstance(unit, Unit) else unit
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise ConfigError(f"Unit {name!r} is not a module of {type(model).__name__}; the unit list was "
                          "discovered on a different model (re-run discover(model)).") from e


# ---------------------------------------------------------------------------------------------- selection

_SLICE_RE = re.compile(r"^blocks?\[\s*(-?\d*)\s*(?::\s*(-?\d*)\s*)?\]$")
_QUARTILE_RE = re.compile(r"^q([1-4])$")
_KIND_TERMS = {"embedding": ("embedding",), "linear": ("linear",), "lora_a": ("lora_a",),
               "lora_b": ("lora_b",), "head": ("head",), "lora": ("lora_a", "lora_b")}

SELECTOR_HELP = ("all | first | last | middle | blocks[a:b] | block[i] | q1..q4 | "
                 "kind (embedding, linear, lora_a, lora_b, lora, head) | role prefix (attn, attn.v, mlp, "
                 "mlp.down, pooler, ...) | name glob (*.value) | re:REGEX ; join with commas, prefix - to exclude")


def _split_terms(spec: str | Sequence[str] | None) -> list[str]:
    if spec is None:
        return ["all"]
    items = [spec] if isinstance(spec, str) else list(spec)
    terms: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise SelectorError(f"Layer selector items must be strings, got {type(item).__name__} ({item!r}).")
        # split on commas that are not inside brackets (blocks[2:4] has none, but globs like [ab] may)
        depth, cur = 0, ""
        for ch in item:
            if ch == "[":
                depth += 1
            elif ch == "]":
                depth = max(0, depth - 1)
            if ch == "," and depth == 0:
                terms.append(cur.strip())
                cur = ""
            else:
                cur += ch
        terms.append(cur.strip())
    terms = [t for t in terms if t]
    if not terms:
        raise SelectorError(f"Empty layer selector {spec!r}; valid forms: {SELECTOR_HELP}.")
    return terms


def _term_matcher(term: str, units: Sequence[Unit], L: int):
    """A predicate on units for one selector term; raises SelectorError for an unknown term."""
    t = term.strip()
    low = t.lower()
    pred = _position_matcher(term, t, low, L)
    return pred if pred is not None else _name_matcher(term, t, low, units)


def _position_matcher(term: str, t: str, low: str, L: int):
    """A predicate for a depth term (all, first, last, middle, block[i], blocks[a:b], q1..q4), else None."""
    if low == "all":
        return lambda u: True
    if low == "first":
        return lambda u: u.kind == "embedding"
    if low == "last":
        return lambda u: u.kind == "head"
    if low == "middle":
        lo, hi = L // 4, L - L // 4
        return lambda u: lo <= u.block < hi and u.kind != "head"
    m = _SLICE_RE.match(low)
    if m:
        a_s, b_s = m.group(1), m.group(2)
        if ":" not in t:  # block[i] / blocks[i]: one block, negatives count from L
            if a_s == "":
                raise SelectorError(f"Selector {term!r} needs a block index or slice, e.g. block[3] or blocks[2:4].")
            i = int(a_s) + (L if int(a_s) < 0 else 0)
            return lambda u: u.block == i and 0 <= u.block < L
        chosen = set(range(L)[slice(int(a_s) if a_s else None, int(b_s) if b_s else None)])
        return lambda u: u.block in chosen and u.role.split(".")[0] not in _OUTER_ROLES
    m = _QUARTILE_RE.match(low)
    if m:
        q = int(m.group(1)) - 1
        return lambda u: 0 <= u.block < L and (4 * u.block) // max(L, 1) == q
    return None


def _name_matcher(term: str, t: str, low: str, units: Sequence[Unit]):
    """A predicate for a kind, regex, glob, role or unit-name term; raises SelectorError for an unknown term."""
    if low in _KIND_TERMS:
        kinds = _KIND_TERMS[low]
        return lambda u: u.kind in kinds
    if t.startswith("re:"):
        try:
            rx = re.compile(t[3:])
        except re.error as e:
            raise SelectorError(f"Selector {term!r}: invalid regular expression ({e}).") from e
        return lambda u: rx.search(u.name) is not None
    if any(c in t for c in "*?["):
        return lambda u: fnmatch.fnmatchcase(u.name, t)
    roles = {u.role for u in units}
    role_prefixes = {".".join(r.split(".")[:i]) for r in roles for i in range(1, len(r.split(".")) + 1)}
    if t in role_prefixes or re.fullmatch(r"(attn|mlp)(\.[a-z_]+)*", t):
        return lambda u: u.role == t or u.role.startswith(t + ".")
    names = {u.name for u in units}
    if t in names:
        return lambda u: u.name == t
    raise SelectorError(
        f"Unknown layer selector {term!r}. Valid forms: {SELECTOR_HELP}. Roles in this model: "
        f"{', '.join(sorted(roles))}.")


def select(units: Sequence[Unit], spec: str | Sequence[str] | None) -> list[Unit]:
    """The units matched by ``spec`` (see the module docstring), in discovery order.

    Terms are applied left to right: a plain term adds its matches, a ``-term`` removes them (a spec
    that starts with ``-`` starts from ``all``). ``None`` means ``all``. Raises ``SelectorError`` for an
    unknown term (listing the valid forms) and when the selection is empty.
    """
    units = list(units)
    if not units:
        raise SelectorError("Cannot select layers from an empty unit list; discover(model) found no units.")
    terms = _split_terms(spec)
    L = n_blocks(units)
    chosen: set[str] = set() if not terms[0].startswith("-") else {u.name for u in units}
    for term in terms:
        neg = term.startswith("-")
        body = term[1:].strip() if neg else term
        if not body:
            raise SelectorError(f"Selector {spec!r} has an empty term after '-'; valid forms: {SELECTOR_HELP}.")
        pred = _term_matcher(body, units, L)
        hit = {u.name for u in units if pred(u)}
        chosen = chosen - hit if neg else chosen | hit
    out = [u for u in units if u.name in chosen]
    if not out:
        raise SelectorError(
            f"Layer selector {spec!r} matches no unit of this model ({len(units)} units over {L} blocks; "
            f"kinds: {', '.join(sorted({u.kind for u in units}))}). Run `fastinf layers MODEL` to list them.")
    return out

