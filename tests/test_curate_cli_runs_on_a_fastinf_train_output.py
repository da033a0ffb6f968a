"""`fastinf train` then `fastinf curate --model <train output>` (its selected checkpoint) on a CSV: the CLI
writes the results table, the report and the cleaned CSV, prints a JSON summary, and a rerun of the same
command line recomputes nothing."""
from __future__ import annotations

import csv
import json

from tests.test_train import make_sentiment, make_tiny_model_dir


def test_train_then_curate_from_the_command_line(tmp_path, capsys) -> None:
    from fastinf.cli import main

    model = make_tiny_model_dir(tmp_path / "bert")
    ds = make_sentiment(60, seed=11)
    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "source"])
        w.writerows([t, int(y), f"s{i}"] for i, (t, y) in enumerate(zip(ds.texts, ds.labels)))
    rc = main(["train", "--model", model, "--data", str(tmp_path / "train.csv"), "--full", "--epochs", "1",
               "--max-length", "16", "--out", str(tmp_path / "trained"), "--json"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    argv = ["curate", "--train", str(tmp_path / "train.csv"), "--model", str(tmp_path / "trained"),
            "--reference-fraction", "0.25", "--drop-lowest", "10", "--max-length", "16", "--out",
            str(tmp_path / "cur"), "--json"]
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["scored"] == 45 and summary["n_flagged"] == 5 and summary["cleaned"].endswith("cleaned.csv")
    with open(summary["cleaned"], newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["text", "label", "source"] and len(rows) == 1 + 60 - 5
    assert "trained/ckpt-" in (tmp_path / "cur" / "report.md").read_text()
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["ran"] == []
