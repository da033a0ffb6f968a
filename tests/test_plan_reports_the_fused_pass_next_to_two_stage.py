"""`fastinf plan` reports the fused score -> aggregate pass (memory, disk) next to the two-stage score files,
with the blocks the pass really uses: the planned test block and set size equal ``fastinf.influence``'s on
real stores of the same shapes, and its result file is no larger than planned."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fastinf.extraction.plan import plan
from fastinf.extraction.sizes import fused_atoms, fused_costs
from fastinf.extraction.units import Unit
from fastinf.scoring.fused import influence
from fastinf.store import GradientStore


def _units(n_units: int) -> list[Unit]:
    out = [Unit(name="emb", kind="embedding", block=-1, role="embed", d_out=8, d_in=50, bias=False)]
    out += [Unit(name=f"b{i}.v", kind="linear", block=i, role="attn.v", d_out=8, d_in=8, bias=False)
            for i in range(n_units - 2)]
    return out + [Unit(name="head", kind="head", block=n_units - 2, role="head", d_out=2, d_in=8, bias=True)]


@pytest.mark.parametrize("n, m, block_bytes, slab_bytes", [(500, 40, 256 << 20, 1 << 30), (3000, 70, 1 << 16, 1 << 17),
                                                           (5000, 33, 1 << 16, 1)])
def test_planned_blocks_are_the_blocks_influence_uses(tmp_path, n, m, block_bytes, slab_bytes):
    units = _units(6)
    rng = np.random.default_rng(0)
    k = 16
    mk = lambda rows: {u.name: rng.standard_normal((rows, k)).astype(np.float32) for u in units}
    train = GradientStore.from_arrays(tmp_path / "train", mk(n), units=units, dtype="float16")
    test = GradientStore.from_arrays(tmp_path / "test", mk(m), units=units, dtype="float16")
    groups, hows = ["first", "middle", "last", "all"], ["rank", "vote", "mean"]
    out = tmp_path / "agg.parquet"
    res = influence(test, train, "graddot", hows, groups, block_bytes=block_bytes, slab_bytes=slab_bytes, out=out)
    atoms = fused_atoms(units, groups)
    memberships = {frozenset(g for g, us in res.groups.items() if u.name in us) for u in units} - {frozenset()}
    assert atoms == len(memberships)
    c = fused_costs(n, m, [k] * len(units), 2, atoms, len(groups), len(hows), block_bytes=block_bytes,
                    slab_bytes=slab_bytes)
    assert c["test_block"] == res.meta["fused"]["test_block"]
    assert c["set_blocks"] == min(res.meta["fused"]["set_blocks"], -(-m // c["test_block"]))
    assert out.stat().st_size <= c["result_bytes"] and c["state_bytes"] == atoms * len(hows) * n * 8


def test_plan_table_and_json_put_fused_next_to_two_stage(tmp_path, capsys):
    import transformers as tf

    from fastinf.cli.app import main

    tf.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                  intermediate_size=32).save_pretrained(tmp_path / "cfg")
    args = ["plan", "--config", str(tmp_path / "cfg"), "-n", "1000000", "-m", "1000", "--proj", "4x4",
            "--device-memory", "8G", "--groups", "first,middle,last+first", "--aggregate", "rank,vote"]
    assert main([*args, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    f, t = d["fused"], d["totals"]
    assert f["groups"] == 3 and f["hows"] == 2 and f["atoms"] >= 3
    assert t["fused_disk_bytes"] == f["disk_bytes"] < t["score_file_bytes"] / 100
    assert f["memory_bytes"] < 8 << 30 and f["test_block"] * 1_000_000 * 4 <= 256 << 20
    assert main(args) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("fused score->aggregate"))
    assert "vs two-stage score files" in line and "train pass(es) per unit" in line


def test_groups_outside_the_planned_units_do_not_count():
    units = _units(5)
    assert fused_atoms(units, ["first"]) == 1
    assert fused_atoms(units[1:], ["first", "all"]) == 1          # no embedding planned: "first" is empty
    p = plan(units[1:], layers="all", proj="4x4", n=100, m=10, device_memory="1G", groups=["first", "all"])
    assert p.fused["atoms"] == 1
