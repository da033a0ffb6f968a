"""Bad input to `fastinf aggregate` / `fastinf ndr` and to `fastinf.aggregate` is a one-line FastinfError
(the CLI: `fastinf CMD: error: ...`, exit 2, no traceback), raised before any score is read, and leaves no
output file behind. User files are never unpickled: an object `.npy` is refused by its header."""
from __future__ import annotations

import json

import numpy as np
import pytest

import fastinf
from fastinf.aggregation.aggregate import aggregate_all
from fastinf.aggregation.evaluate import load_noise_mask, ndr
from fastinf.cli.app import main
from fastinf.errors import ConfigError, FastinfError

N, M, U = 40, 5, 3


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    mask = np.zeros(N, bool)
    mask[::5] = True
    np.save(tmp_path / "scores.npy", rng.standard_normal((U, M, N)).astype(np.float32))
    np.save(tmp_path / "final.npy", rng.standard_normal(N))
    np.save(tmp_path / "mask.npy", mask)
    return tmp_path


def _cli_fails(capsys, argv, *needles):
    """The command exits 2 with one `fastinf CMD: error:` line naming every needle, and no traceback."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"fastinf {argv[0]}: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _object_npy(path, values):
    np.save(path, np.array(values, dtype=object), allow_pickle=True)
    return path


# -------------------------------------------------------------------------------- malicious / broken .npy
def test_object_npy_as_noise_mask_or_scores_is_refused_unread(files, capsys, monkeypatch):
    """Never unpickled: np.load is not even reached for an object array (its header names the dtype)."""
    mask = _object_npy(files / "objmask.npy", ["yes", "no"] * (N // 2))
    scores = _object_npy(files / "objscores.npy", ["a", "b"])
    real_load = np.load

    def guarded(*a, **kw):
        assert kw.get("allow_pickle") is False, "np.load without allow_pickle=False"
        return real_load(*a, **kw)

    monkeypatch.setattr(np, "load", guarded)
    _cli_fails(capsys, ["ndr", files / "final.npy", "--noise-mask", mask], "objmask.npy", "object")
    _cli_fails(capsys, ["ndr", scores, "--noise-mask", files / "mask.npy"], "objscores.npy", "numeric")
    _cli_fails(capsys, ["aggregate", scores, "--out", files / "a.parquet"], "objscores.npy")
    assert not (files / "a.parquet").exists()


@pytest.mark.parametrize("kind", ["strings", "truncated", "garbage", "padded", "complex"])
def test_damaged_or_non_numeric_npy_is_named(files, capsys, kind):
    p = files / f"{kind}.npy"
    if kind == "strings":
        np.save(p, np.array(["1.5"] * N))                  # numeric-looking strings must not become numbers
    elif kind == "complex":
        np.save(p, np.ones(N, np.complex64))
    else:
        np.save(p, np.arange(N, dtype=np.float64))
        raw = p.read_bytes()
        p.write_bytes({"truncated": raw[:-7], "garbage": b"not a numpy file at all", "padded": raw + b"\0" * 8}[kind])
    _cli_fails(capsys, ["ndr", p, "--noise-mask", files / "mask.npy"], f"{kind}.npy")
    _cli_fails(capsys, ["ndr", files / "final.npy", "--noise-mask", p], f"{kind}.npy")


# ------------------------------------------------------------------------------------------- noise masks
@pytest.mark.parametrize("name,content,needle", [
    ("short.npy", np.ones(N - 1, bool), "expected 40 flags"),
    ("values.npy", np.arange(N), "0/1"),
    ("twod.npy", np.ones((N // 2, 2), bool), "shape"),
    ("nan.npy", np.full(N, np.nan), "0/1"),
    ("latin1.txt", "1 0 caf\xe9".encode("latin-1"), "not UTF-8"),
    ("bad.json", b"[1, 0,", "not valid JSON"),
    ("strs.json", json.dumps(["1", "0"] * (N // 2)).encode(), "non-numbers"),
    ("idx.json", json.dumps({"noisy_indices": [1, 2], "n": "many"}).encode(), "'n'"),
    ("range.json", json.dumps({"noisy_indices": [1, 99], "n": N}).encode(), "indices must lie"),
    ("broken.npz", b"PK\x03\x04 not really a zip", "damaged"),
    ("none.txt", b"1 0 maybe", "0/1 or true/false"),
    ("mask.bin", b"\x01\x00", "unknown format"),
])
def test_bad_noise_mask_is_named(files, capsys, name, content, needle):
    p = files / name
    if isinstance(content, np.ndarray):
        np.save(p, content)
    else:
        p.write_bytes(content)
    with pytest.raises(ConfigError, match="noise mask") as e:
        load_noise_mask(p, N)
    assert needle in str(e.value) and name in str(e.value)
    _cli_fails(capsys, ["ndr", files / "final.npy", "--noise-mask", p], name, needle)


def test_npz_with_a_pickled_mask_is_refused(files, capsys):
    p = files / "pickled.npz"
    np.savez(p, mask=np.array([True, "x"] * (N // 2), dtype=object))
    _cli_fails(capsys, ["ndr", files / "final.npy", "--noise-mask", p], "pickled.npz", "pickled")


def test_api_masks_and_scores_of_strings_or_objects_are_refused():
    mask = np.zeros(N, bool)
    mask[0] = True
    with pytest.raises(ConfigError, match="dtype"):
        ndr(np.array(["1.0"] * N), mask)
    with pytest.raises(ConfigError, match="dtype"):
        ndr(np.zeros(N), np.array(["True"] * N))
    with pytest.raises(ConfigError, match="dtype"):
        ndr(np.zeros(N), [True, None] * (N // 2))


# --------------------------------------------------------------------------------------- --out paths
def test_out_naming_a_directory_or_a_path_under_a_file_is_refused_before_reading(files, capsys, monkeypatch):
    import fastinf.cli.aggregate as agg_cli

    monkeypatch.setattr(agg_cli, "load_scores", lambda *_: pytest.fail("scores read before --out was checked"))
    (files / "dir.parquet").mkdir()
    (files / "afile").write_text("mine")
    _cli_fails(capsys, ["aggregate", files / "scores.npy", "--out", files / "dir.parquet"], "is a directory")
    _cli_fails(capsys, ["aggregate", files / "scores.npy", "--out", files / "afile" / "x" / "a.parquet"],
               "afile is a file")
    _cli_fails(capsys, ["aggregate", files / "scores.npy", "--out", files / "a.csv"], ".parquet")
    assert (files / "afile").read_text() == "mine" and list((files / "dir.parquet").iterdir()) == []


def test_out_in_a_missing_directory_is_created(files):
    out = files / "new" / "deeper" / "agg.parquet"
    assert main(["aggregate", str(files / "scores.npy"), "--out", str(out)]) == 0
    assert out.is_file() and (out.parent.stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize("argv,needle", [
    (["--how", "best"], "how"), (["--how", ","], "how"), (["--vote-p", "1.5"], "vote_p"),
    (["--vote-p", "nan"], "vote_p"), (["--groups", ",,"], "--groups"), (["--groups", "+"], "--groups"),
    (["--threads", "0"], "--threads"), (["--groups", "nonsense"], "nonsense"),
])
def test_bad_aggregation_flags_are_refused_and_write_nothing(files, capsys, argv, needle):
    out = files / "x.parquet"
    _cli_fails(capsys, ["aggregate", files / "scores.npy", *argv, "--out", out], needle)
    assert not out.exists() and not list(files.glob(".x.parquet*"))
    _cli_fails(capsys, ["ndr", files / "scores.npy", "--noise-mask", files / "mask.npy", *argv], needle)


# ------------------------------------------------------------------------------------------ API args
class _Untouchable:
    """A ScoreSet-like object whose scores must not be read (every check comes first)."""

    unit_names, n_test, n_train, units, test_correct = ["a", "b"], M, N, None, None

    def unit_scores(self, name):
        raise AssertionError("scores were read before the arguments were checked")


@pytest.mark.parametrize("kwargs,needle", [
    ({"how": None}, "how"), ({"how": 3}, "how"), ({"how": ["rank", None]}, "how"), ({"how": []}, "how"),
    ({"how": "rank,best"}, "best"), ({"vote_p": None}, "vote_p"), ({"vote_p": 0}, "vote_p"),
    ({"vote_p": True}, "vote_p"), ({"groups": 5}, "groups"), ({"groups": [None]}, "group"),
    ({"groups": {"g": 2.5}}, "group"), ({"groups": ""}, "group"), ({"groups": []}, "groups"),
    ({"groups": [[]]}, "group"), ({"groups": [7]}, "out of range"), ({"rrf_k": None}, "rrf_k"),
    ({"rrf_k": -1}, "rrf_k"), ({"block_bytes": 0}, "block_bytes"), ({"median_budget_bytes": "x"}, "median"),
    ({"backend": "gpu"}, "backend"), ({"n_threads": 0}, "n_threads"), ({"correct_only": "yes"}, "correct_only"),
    ({"test_correct": ["yes"] * M}, "test_correct"), ({"test_correct": [True] * (M + 1)}, "test_correct"),
])
def test_bad_aggregate_arguments_fail_before_any_score_is_read(kwargs, needle):
    with pytest.raises(FastinfError, match=needle):
        aggregate_all(_Untouchable(), **{"how": "rank", **kwargs})
    with pytest.raises(FastinfError, match=needle):
        fastinf.aggregate(_Untouchable(), **{"how": "rank", **kwargs})


@pytest.mark.parametrize("arr", [np.array([[["a"]]]), np.ones((1, 2, 3), np.complex64), np.zeros((2, 3))])
def test_score_arrays_of_the_wrong_kind_are_refused(arr):
    with pytest.raises(ConfigError, match="scores"):
        aggregate_all(arr)
