"""Unit discovery and the selector language on tiny models of every family."""
from __future__ import annotations

import pytest
import torch

from _models import CASES, make_model, one_thread  # noqa: F401
from fastinf.errors import ConfigError, SelectorError
from fastinf.extraction.units import Unit, discover, get_module, n_blocks, select

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def units_of():
    cache: dict = {}

    def get(fam: str, task: str = "seq-cls"):
        if (fam, task) not in cache:
            model = make_model(fam, task)
            cache[(fam, task)] = (model, discover(model))
        return cache[(fam, task)]

    return get


@pytest.mark.parametrize("fam,task", CASES)
def test_discovery_matches_modules(units_of, fam, task):
    """Every Linear/Conv1D and the input embedding is a unit, with the module's true shape and bias."""
    model, units = units_of(fam, task)
    names = [u.name for u in units]
    assert len(names) == len(set(names))
    emb = [u for u in units if u.kind == "embedding"]
    assert len(emb) == 1 and get_module(model, emb[0]) is model.get_input_embeddings()
    assert emb[0].block == -1 and emb[0].d_in == model.get_input_embeddings().num_embeddings
    expected = {n for n, m in model.named_modules()
                if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and "original_module" not in n}
    assert {u.name for u in units if u.kind != "embedding"} == expected
    for u in units:
        m = get_module(model, u)
        if u.kind == "embedding":
            continue
        w = m.weight.T if u.transposed else m.weight
        assert tuple(w.shape) == u.shape, u.name
        assert u.bias == (getattr(m, "bias", None) is not None), u.name
        assert u.transposed == (type(m).__name__ == "Conv1D"), u.name
    L = n_blocks(units)
    assert L == 2
    heads = [u for u in units if u.kind == "head"]
    assert heads and all(u.block == L for u in heads)
    blocks = [u.block for u in units]
    assert blocks == sorted(blocks), "units must be ordered by depth"
    for u in units:
        if u.kind in ("linear", "lora_a", "lora_b") and u.role not in ("pooler",):
            assert 0 <= u.block < L, u.name


def test_roles_per_family(units_of):
    roles = lambda fam, task="seq-cls": {u.role for u in units_of(fam, task)[1]}  # noqa: E731
    assert {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down", "pooler", "head"} <= roles("bert")
    assert {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down", "head"} <= roles("distilbert")
    assert {"attn.qkv", "attn.o", "mlp.up", "mlp.down", "head"} == roles("gpt2", "causal-lm") - {"embed"}
    assert {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "head"} == \
        roles("llama", "causal-lm") - {"embed"}
    assert "other" not in roles("roberta") | roles("qwen2") | roles("gemma") | roles("mistral")
    lora = [u for u in units_of("bert-lora")[1] if u.kind.startswith("lora")]
    assert {u.role for u in lora} == {"attn.q.lora_a", "attn.q.lora_b", "attn.v.lora_a", "attn.v.lora_b"}
    a = next(u for u in lora if u.kind == "lora_a")
    assert a.shape == (4, 16) and not a.bias


def test_gpt2_tied_head_is_its_own_unit(units_of):
    model, units = units_of("gpt2", "causal-lm")
    head = next(u for u in units if u.kind == "head")
    emb = next(u for u in units if u.kind == "embedding")
    assert get_module(model, head).weight is get_module(model, emb).weight  # tied
    assert head.name == "lm_head" and head.shape == (64, 16) and emb.shape == (16, 64)


def _names(units, spec):
    return [u.name for u in select(units, spec)]


def test_selectors(units_of):
    _, units = units_of("bert")
    by = lambda pred: [u.name for u in units if pred(u)]  # noqa: E731
    assert _names(units, "first") == ["bert.embeddings.word_embeddings"]
    assert _names(units, "last") == ["classifier"]
    assert _names(units, "all") == [u.name for u in units] == _names(units, None)
    assert _names(units, "blocks[1:2]") == by(lambda u: u.block == 1)
    assert _names(units, "block[-1]") == by(lambda u: u.block == 1)
    assert _names(units, "blocks[:1]") == by(lambda u: u.block == 0)
    assert _names(units, "attn.v") == by(lambda u: u.role == "attn.v")
    assert _names(units, "attn") == by(lambda u: u.role.startswith("attn."))
    assert _names(units, "mlp") == by(lambda u: u.role in ("mlp.up", "mlp.down"))
    assert _names(units, "*.value") == by(lambda u: u.name.endswith(".value"))
    assert _names(units, "re:layer\\.0\\..*query") == ["bert.encoder.layer.0.attention.self.query"]
    assert _names(units, "first,last") == [units[0].name, units[-1].name]
    assert _names(units, ["first", "last"]) == [units[0].name, units[-1].name]
    assert _names(units, "all,-attn,-first") == by(lambda u: u.kind != "embedding" and not u.role.startswith("attn"))
    assert _names(units, "-head") == by(lambda u: u.kind != "head")
    assert _names(units, "pooler") == ["bert.pooler.dense"]
    assert _names(units, "bert.pooler.dense") == ["bert.pooler.dense"]


def test_middle_and_quartiles_follow_stated_rule():
    """middle = blocks L//4 <= b < L - L//4; quartile of block b is floor(4b/L) + 1 (checked for L = 8)."""
    units = [Unit("emb", "embedding", -1, "embed", 4, 10, False)]
    units += [Unit(f"layers.{b}.{r}", "linear", b, f"attn.{r}", 4, 4, True) for b in range(8) for r in "qv"]
    units += [Unit("score", "head", 8, "head", 2, 4, False)]
    assert n_blocks(units) == 8
    blocks = lambda spec: sorted({u.block for u in select(units, spec)})  # noqa: E731
    assert blocks("middle") == [2, 3, 4, 5]
    assert [blocks(f"q{i}") for i in range(1, 5)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert blocks("q1,q4") == [0, 1, 6, 7]
    assert blocks("blocks[-2:]") == [6, 7]
    assert _names(units, "middle,attn.v") != _names(units, "middle")


def test_lora_selectors(units_of):
    _, units = units_of("bert-lora")
    assert {u.kind for u in select(units, "lora_b")} == {"lora_b"}
    assert {u.kind for u in select(units, "lora")} == {"lora_a", "lora_b"}
    assert {u.role for u in select(units, "attn.v")} == {"attn.v", "attn.v.lora_a", "attn.v.lora_b"}
    assert len(select(units, "attn.v.lora_b")) == 2


def test_selector_errors(units_of):
    _, units = units_of("bert")
    with pytest.raises(SelectorError, match="Unknown layer selector 'firts'.*first.*blocks\\[a:b\\]"):
        select(units, "firts")
    with pytest.raises(SelectorError, match="matches no unit"):
        select(units, "lora_b")
    with pytest.raises(SelectorError, match="matches no unit"):
        select(units, "blocks[5:9]")
    with pytest.raises(SelectorError, match="matches no unit"):
        select(units, "all,-all")
    with pytest.raises(SelectorError, match="Empty layer selector"):
        select(units, " , ")
    with pytest.raises(SelectorError, match="regular expression"):
        select(units, "re:(")
    with pytest.raises(SelectorError, match="must be strings"):
        select(units, [3])
    with pytest.raises(SelectorError, match="empty unit list"):
        select([], "all")
    assert issubclass(SelectorError, ConfigError)


def test_unit_validation_and_roundtrip():
    u = Unit("a.b", "linear", 3, "attn.q", 8, 4, True)
    assert u.exact_dim == 8 * 4 + 8 and u.shape == (8, 4)
    assert Unit.from_dict(u.to_dict()) == u
    with pytest.raises(ConfigError, match="kind must be one of"):
        Unit("x", "conv", 0, "other", 2, 2, False)
    with pytest.raises(ConfigError, match="shape must be positive"):
        Unit("x", "linear", 0, "other", 0, 2, False)
    with pytest.raises(ConfigError, match="not a module"):
        get_module(torch.nn.Linear(2, 2), "missing.layer")


def test_layers_command_table_and_json(tmp_path, capsys):
    """`fastinf layers DIR` builds the model skeleton from its config (meta device) and reports each
    selected unit's feature dim and store bytes; totals add up."""
    import json

    from fastinf.cli.app import main

    make_model("gpt2", "causal-lm").config.save_pretrained(tmp_path / "tiny")
    assert main(["layers", str(tmp_path / "tiny"), "--task", "causal-lm", "--layers", "first,attn.qkv,last",
                 "--proj", "8x4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [u["role"] for u in out["units"]] == ["embed", "attn.qkv", "attn.qkv", "head"]
    assert all(u["feature_dim"] == 32 and u["bytes_per_sample"] == 64 for u in out["units"])
    assert out["total"]["bytes_per_sample"] == 4 * 64 and out["n_blocks"] == 2
    assert main(["layers", str(tmp_path / "tiny"), "--task", "causal-lm", "--proj", "exact", "--dtype", "fp32"]) == 0
    text = capsys.readouterr().out
    assert "transformer.h.1.mlp.c_proj" in text and "16x64+b" in text and "10 units over 2 blocks" in text
    assert main(["layers", str(tmp_path / "tiny"), "--layers", "nonsense"]) == 2
    assert "Unknown layer selector 'nonsense'" in capsys.readouterr().err
