"""Invariant: an interrupted index build resumed with the same request equals an uninterrupted build byte
for byte (finished group files are kept, not rebuilt); any other request is refused with
StoreMismatchError naming the differing field, and leaves the partial build as it was.

Interruptions here are simulated in-process (a FAISS write that dies half-way, leaving a temp file);
tests/test_kill_resume.py SIGKILLs a real `fastinf index build` subprocess.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fastinf.retrieval import backends as sb
from fastinf.errors import ConfigError, StoreError, StoreLockedError, StoreMismatchError
from fastinf.retrieval.build import build_index
from fastinf.retrieval.index import open_index
from fastinf.store import GradientStore, WriterLock
from tests._retrieval_util import make_stores

DIMS = {"u0": 8, "u1": 8, "u2": 4}


class _Crash(RuntimeError):
    """Stands in for the process dying inside a FAISS write."""


def interrupted_build(monkeypatch: pytest.MonkeyPatch, store: Any, out: Path, *, after: int, **kwargs: Any) -> Path:
    """Run ``build_index`` until ``after`` group files are written; the next write leaves a half-written
    temp file and dies. Returns the index directory (build.json, ``after`` group files, a temp file)."""
    real = sb.write
    calls = []

    def dying_write(index: Any, path: str) -> None:
        calls.append(path)
        if len(calls) > after:  # the temp file of a process that died (another pid than the resuming one)
            Path(path.replace(f".{os.getpid()}.tmp", ".1.tmp")).write_bytes(b"half a faiss file")
            raise _Crash(path)
        real(index, path)

    with monkeypatch.context() as m:
        m.setattr(sb, "write", dying_write)
        with pytest.raises(_Crash):
            build_index(store, out=out, **kwargs)
    assert not (out / "manifest.json").exists() and len(list(out.glob("g*.faiss"))) == after
    assert len(list(out.glob(".g*.faiss.1.tmp"))) == 1
    return out


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _without_clock(manifest: bytes) -> dict:
    """The manifest minus its wall-clock fields (creation time, build seconds); keys are serialised sorted,
    so equal dicts are equal bytes."""
    m = json.loads(manifest)
    m.pop("created"), m["build"].pop("seconds")
    return m


@pytest.fixture(autouse=True)
def faiss_one_thread():
    """One FAISS (OpenMP) thread: tiny k-means runs are ~5x slower with spinning threads on a busy machine."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture()
def stores(tmp_path):
    return make_stores(tmp_path, n=240, m=4, dims=DIMS)


@pytest.mark.parametrize("kwargs", [
    {"factory": "IVF4,Flat", "seed": 3},
    {"factory": "Flat", "method": "datainf", "groups": ["u0,u1", "u2"], "weights": {"u1": 0.5}},
], ids=["ivf-unit-groups", "datainf-weighted-groups"])
def test_resume_after_crash_equals_uninterrupted_build(stores, tmp_path, monkeypatch, kwargs):
    train, test = stores
    out = interrupted_build(monkeypatch, train, tmp_path / "idx", after=1, **kwargs)
    kept = (out / "g0.faiss").stat()
    resumed = build_index(train, out=out, resume=True, **kwargs)
    assert (out / "g0.faiss").stat().st_mtime_ns == kept.st_mtime_ns, "resume rebuilt a finished group file"
    ref = build_index(train, out=tmp_path / "ref", **kwargs)
    a, b = _files(ref.directory), _files(out)
    assert sorted(a) == sorted(b), "resume left extra files (temp files, lock) or missed some"
    assert [f for f in a if f != "manifest.json" and a[f] != b[f]] == []
    assert _without_clock(a["manifest.json"]) == _without_clock(b["manifest.json"])
    got, want = resumed.search(test, k=5, direction="both"), ref.search(test, k=5, direction="both")
    assert np.array_equal(got.train, want.train) and np.array_equal(got.score, want.score)


BASE = {"factory": "IVF4,Flat", "seed": 3, "method": "if", "precond_kwargs": {"damping": 1e-3}}


@pytest.mark.parametrize("change, field", [
    ({"seed": 4}, r"\(seed: the interrupted build used 3, this request 4\)"),
    ({"factory": "IVF8,Flat"}, r"\(factory: .*\"IVF4,Flat\".*\"IVF8,Flat\""),
    ({"method": "datainf", "precond_kwargs": None}, r"\(method: "),
    ({"precond_kwargs": {"damping": 1e-2}}, r"\(precond_kwargs: "),
    ({"weights": {"u1": 2.0}}, r"\(groups\[1\]\.weights: the interrupted build used \[1\.0\], this request \[2\.0\]"),
    ({"groups": "joint"}, r"\(groups: the interrupted build had 3 groups"),
    ({"layers": "u0,u2"}, r"\(groups: .* this request 2 "),
    ({"block_size": 64}, r"\(block_size: "),
    ({"train_size": 100}, r"\(train_size: "),
    ({"nprobe": 2}, r"\(nprobe: "),
    ({"backend": "exact"}, r"\(backend: "),
])
def test_resume_with_another_request_is_refused_and_changes_nothing(stores, tmp_path, monkeypatch, change, field):
    train, _ = stores
    out = interrupted_build(monkeypatch, train, tmp_path / "idx", after=1, **BASE)
    before = _files(out)
    with pytest.raises(StoreMismatchError, match=f"(?s)cannot resume the index build in .*{field}.*--resume"):
        build_index(train, out=out, resume=True, **{**BASE, **change})
    assert _files(out) == before


def test_resume_refuses_a_changed_store_or_preconditioner(stores, tmp_path, monkeypatch):
    train, _ = stores
    out = interrupted_build(monkeypatch, train, tmp_path / "idx", after=2, **BASE)
    before = _files(out)
    with monkeypatch.context() as m:  # the cached preconditioner under <store>/precond changed
        m.setattr("fastinf.retrieval.precond._precond_fingerprint", lambda pre: "another preconditioner")
        with pytest.raises(StoreMismatchError, match=r"\(precond_fingerprints: "):
            build_index(train, out=out, resume=True, **BASE)
    other, _ = make_stores(tmp_path / "other", n=240, m=4, dims=DIMS, seed=1)  # same shapes, other rows
    with pytest.raises(StoreMismatchError, match=r"\(store_fingerprint: "):
        build_index(other, out=out, resume=True, **BASE)
    assert _files(out) == before
    build_index(train, out=out, resume=True, **BASE)
    open_index(out, train)


def test_resume_of_a_new_or_finished_index(stores, tmp_path):
    train, test = stores
    fresh = build_index(train, out=tmp_path / "new" / "idx", resume=True, factory="IVF4,Flat")  # nothing to resume
    ref = build_index(train, out=tmp_path / "ref", factory="IVF4,Flat")
    a, b = _files(ref.directory), _files(fresh.directory)
    assert sorted(a) == sorted(b) and all(a[f] == b[f] for f in a if f != "manifest.json")
    before = _files(fresh.directory)
    again = build_index(train, out=fresh.directory, resume=True, factory="IVF4,Flat")  # already complete
    assert _files(fresh.directory) == before
    assert np.array_equal(again.search(test, k=3).train, fresh.search(test, k=3).train)
    with pytest.raises(StoreMismatchError, match=r"\(seed: "):
        build_index(train, out=fresh.directory, resume=True, factory="IVF4,Flat", seed=9)


def test_resume_refusals_for_unresumable_directories(stores, tmp_path, monkeypatch):
    train, _ = stores
    out = interrupted_build(monkeypatch, train, tmp_path / "idx", after=1, factory="Flat")
    with pytest.raises(ConfigError, match="already exists.*--resume.*--overwrite"):
        build_index(train, out=out, factory="Flat")
    with pytest.raises(ConfigError, match="exclude each other"):
        build_index(train, out=out, factory="Flat", resume=True, overwrite=True)
    lock = WriterLock(out / "locks" / "build.lock")  # a live builder (this process) holds the directory
    lock.acquire()
    try:
        with pytest.raises(StoreLockedError, match=f"{out} is being written by another process"):
            build_index(train, out=out, factory="Flat", resume=True)
    finally:
        lock.release()
    (out / "build.json").write_text("{not json")
    with pytest.raises(StoreError, match="build.json is unreadable.*--overwrite"):
        build_index(train, out=out, factory="Flat", resume=True)
    (out / "build.json").unlink()  # as left by a fastinf without resumable builds
    with pytest.raises(StoreError, match=r"no build\.json .*rebuild it with --overwrite"):
        build_index(train, out=out, factory="Flat", resume=True)
    build_index(train, out=out, factory="Flat", overwrite=True)
    assert sorted(os.listdir(out)) == ["build.json", "g0.faiss", "g1.faiss", "g2.faiss", "manifest.json"]


def test_cli_resume(stores, tmp_path, monkeypatch, capsys):
    from fastinf.cli.app import main

    train, _ = stores
    out = interrupted_build(monkeypatch, train, tmp_path / "idx", after=2, factory="Flat", groups="unit")
    args = ["index", "build", str(train.path), "--out", str(out)]
    with pytest.raises(SystemExit):  # argparse: --resume and --overwrite are exclusive
        main([*args, "--resume", "--overwrite"])
    assert main([*args, "--resume", "--seed", "1"]) == 2
    assert "(seed: the interrupted build used 0, this request 1)" in capsys.readouterr().err
    assert main([*args, "--resume", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["groups"][2]["file"] == "g2.faiss"
    assert isinstance(open_index(out).store, GradientStore)
