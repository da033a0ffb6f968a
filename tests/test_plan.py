"""fastinf.plan: per-unit arithmetic, safe sizes that fit the budget, the CLI, and the memory model
validated against the measured peak memory of real capture batches (two configurations, within 20%)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastinf.errors import ConfigError
from fastinf.extraction.plan import MAX_BATCH, auto_batch_size, auto_block_size, format_bytes, parse_bytes, plan
from fastinf.extraction.units import Unit
from tests._models import make_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "measure_capture_memory.py"


def _units():
    return [Unit("emb", "embedding", -1, "embed", d_out=32, d_in=1000, bias=False),
            Unit("b0.q", "linear", 0, "attn.q", d_out=32, d_in=32, bias=True),
            Unit("b0.up", "linear", 0, "mlp.up", d_out=128, d_in=32, bias=True),
            Unit("head", "head", 1, "head", d_out=2, d_in=32, bias=True)]


def test_per_unit_bytes_and_totals():
    p = plan(_units(), "all", "16x8", dtype="fp16", n=1_000_000, m=256, max_length=16, device_memory="4G")
    assert [u.feature_dim for u in p.units] == [128] * 4
    assert all(u.bytes_per_sample == 256 for u in p.units)
    assert p.bytes_per_sample == 1024
    assert all(u.store_bytes == 256 * 1_000_000 for u in p.units)
    assert p.store_bytes == 1024 * 1_000_000 + 29 * 1_000_000       # + ids/label/loss/pred/correct
    assert p.score_file_bytes == 4 * 256 * 1_000_000 * 4
    assert p.precond_bytes == 0 and p.activation_source == "analytic" and p.notes
    exact = plan(_units(), "b0.q,head", "exact", dtype="fp32", n=10, m=3, method="if", device_memory="1G")
    assert [u.feature_dim for u in exact.units] == [32 * 32 + 32, 2 * 32 + 2]
    assert [u.precond_bytes for u in exact.units] == [8 * 1056 ** 2, 8 * 66 ** 2]   # k x k float64
    low = plan(_units(), "b0.q", "exact", n=10, m=3, method="if", rank=16, device_memory="1G")
    assert low.units[0].precond_bytes == 8 * 1056 * 16 + 8 * 16                     # k x r float64
    d = json.loads(json.dumps(p.to_dict()))
    assert d["totals"]["store_bytes"] == p.store_bytes and len(d["units"]) == 4
    assert "b0.up" in p.table() and "largest safe batch" in p.table()


@pytest.mark.parametrize("memory", ["64M", "2G"])
def test_safe_sizes_are_the_largest_that_fit(memory):
    p = plan(_units(), "all", "16x16", n=10**6, m=512, max_length=64, device_memory=memory)
    budget = p.budget
    assert p.safe_batch_size >= 1 and p.safe_block_size >= 1
    assert p.extract_peak_bytes(p.safe_batch_size) <= budget
    assert p.safe_batch_size == MAX_BATCH or budget < p.extract_peak_bytes(p.safe_batch_size + 1)
    assert p.score_bytes(p.safe_block_size) <= budget < p.score_bytes(p.safe_block_size + 1)
    assert p.aggregate_bytes() <= budget
    assert p.batch_size == p.safe_batch_size and p.block_size == p.safe_block_size
    assert auto_block_size([256] * 4, 512, n=10**6, device_memory=memory, cap=10**9) == p.safe_block_size
    huge = plan(_units(), "all", "16x16", n=10**8, m=512, max_length=64, device_memory="1G")
    assert any("aggregating one test row" in note for note in huge.notes)


def test_sizes_shrink_with_memory_and_grow_with_shorter_sequences():
    model = make_model("bert")
    small = plan(model, "all", "8x8", n=10**6, m=64, max_length=64, device_memory="64M")
    large = plan(model, "all", "8x8", n=10**6, m=64, max_length=64, device_memory="1G")
    short = plan(model, "all", "8x8", n=10**6, m=64, max_length=16, device_memory="64M")
    given = plan(model, "all", "8x8", n=10**6, m=64, max_length=64, device_memory="64M", batch_size=3,
                 block_size=5, probe=False)
    assert (given.batch_size, given.block_size, given.activation_source) == (3, 5, "analytic")
    assert small.activation_source == "probe" and small.activation_bytes_per_sample > 0
    assert small.safe_batch_size < large.safe_batch_size
    assert small.safe_block_size < large.safe_block_size
    assert short.activation_bytes_per_sample < small.activation_bytes_per_sample
    assert short.safe_batch_size > small.safe_batch_size
    assert auto_batch_size(model, "all", "8x8", max_length=64, device_memory="64M", cap=10**6) == small.safe_batch_size
    # a selection starting higher in the model saves less: nothing below its lowest unit is differentiated
    top = plan(model, "last", "8x8", n=10, m=1, max_length=64, device_memory="1G")
    assert top.activation_bytes_per_sample < small.activation_bytes_per_sample


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="positive"):
        plan(_units(), n=0, m=1)
    with pytest.raises(ConfigError, match="method"):
        plan(_units(), n=1, m=1, method="magic")
    with pytest.raises(ConfigError, match="16G"):
        parse_bytes("lots")
    assert parse_bytes("1.5G") == 3 * 2**29 and parse_bytes("512MiB") == 2**29 and parse_bytes(77) == 77
    assert format_bytes(3 * 2**29) == "1.5 GiB"


def test_cli_plan_from_config_json(tmp_path, capsys):
    import transformers as tf

    from fastinf.cli.app import main

    tf.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=32).save_pretrained(tmp_path / "cfg")
    rc = main(["plan", "--config", str(tmp_path / "cfg"), "-n", "1000", "-m", "8", "--layers", "middle",
               "--proj", "4x4", "--device-memory", "1G", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["n"] == 1000 and d["totals"]["bytes_per_sample"] == 2 * 16 * len(d["units"])
    assert all(u["block"] in (0, 1) for u in d["units"]) and d["activation_source"] == "analytic"


# The memory model against reality: a fresh process runs one capture batch per configuration; its peak
# RSS above the pre-batch RSS (VmHWM reset via /proc/self/clear_refs; glibc told to return freed tensors
# to the OS) must be within 20% of the plan's batch bytes. Two configurations: a BERT classifier with
# Kronecker features of every unit, and a GPT-2 causal LM with exact gradients of a few units.
CONFIGS = {"bert-kron-all": "bert seq-cls all 16x16 64 128 64 4",
           "gpt2-exact-middle": "gpt2 causal-lm middle,last exact 24 64 32 2"}


@pytest.fixture(scope="module")
def measured():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc peak-RSS reset (clear_refs)")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(SCRIPT), *CONFIGS.values()], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {r["config"]: r for r in rows}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_plan_within_20_percent_of_measured_peak(measured, name):
    r = measured[CONFIGS[name]]
    ratio = r["predicted"] / r["measured"]
    assert 0.8 <= ratio <= 1.2, (f"plan predicts {r['predicted'] / 2**20:.1f} MiB for one batch, measured peak "
                                 f"{r['measured'] / 2**20:.1f} MiB (ratio {ratio:.2f}); activations "
                                 f"{r['activation_per_sample']} B/sample, capture {r['capture_per_sample']} B/sample")
