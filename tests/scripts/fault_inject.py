"""Fault injection: SIGKILL fastinf commands at random (seeded) points, resume them, compare with a reference.

Targets (each on tiny inputs: a tiny random BERT saved like ``tests/scripts/assets.py`` does, synthetic
stores and JSONL data):

==============  ===============================================  ======================================
target          killed command                                   resumed with
==============  ===============================================  ======================================
``extract``     ``fastinf extract`` (30 chunks of 4 rows)         the same command + ``--resume``
``score``       ``fastinf score --method datainf``                ``--resume`` when ``fastinf score`` has
                                                                 it, else ``--overwrite`` (a rerun)
``dist_score``  ``python -m fastinf.dist_score`` (many blocks)   the same command + ``--resume``
``index``       ``fastinf index build`` (6 IVF groups, a pause   the same command + ``--resume``
                after each FAISS write: slow_index_build.py)
``run``         a small ``fastinf run`` (LoRA fine-tune,         the same command again (stages are
                extract, two methods, aggregate, NDR)            cached; an unfinished one restarts)
==============  ===============================================  ======================================

For every target an uninterrupted reference run is made first (its wall time and progress events give the
range the kill points are drawn from). Each trial starts the command into a fresh
directory and SIGKILLs its process group at a random point (from ``--seed``): after a random number of the
progress events the reference showed (chunk / block lines, FAISS group files, stage markers, checkpoints)
plus a random fraction of the time between two events; one trial in ten kills during start-up (a fixed
delay) instead. It optionally kills the resume once more
(``--double``), resumes to the end and compares every file with the reference: byte for byte, except JSON
fields that hold wall-clock times, ``.npz`` archives (compared array by array: zip entries carry dates) and
the run report's timing-dependent files (``costs.json``, ``report.*``, plots; ``results.json`` by its rows).

Usage::

    python tests/scripts/fault_inject.py --kills 25 --seed 0 [--targets extract,score,...] [--work DIR]

Prints one line per trial and the counts ("faults injected N, survived M"); exits 1 on any mismatch or
failed resume, 0 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PY = sys.executable
#: JSON keys holding wall-clock times or values derived from them (dropped before comparing)
CLOCK_KEYS = {"seconds", "seconds_extract", "score_s", "fused_score_s", "created", "timings", "wall_s",
              "elapsed"}
#: flags of the replayable command records (``*_config.json``) that the resumed command adds
RESUME_FLAGS = {"resume", "overwrite"}
#: run files that depend on measured timings (group costs, the report that shows them)
RUN_TIMED = {"costs.json", "report.md", "report.html", "report.done.json"}


def env() -> dict[str, str]:
    """The subprocess environment: offline, one thread (bit-reproducible fp32 and FAISS), the repo importable."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# --------------------------------------------------------------------------------------- comparison
def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in CLOCK_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _files(d: Path) -> dict[str, Path]:
    """Every file under ``d`` except lock files (a killed writer's stale lock is taken over, then removed)."""
    return {p.relative_to(d).as_posix(): p for p in sorted(d.rglob("*"))
            if p.is_file() and "locks" not in p.relative_to(d).parts}


def _same_npz(a: Path, b: Path) -> bool:
    import numpy as np

    with np.load(a, allow_pickle=False) as x, np.load(b, allow_pickle=False) as y:
        return sorted(x.files) == sorted(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files)


def _json(path: Path, root: Path) -> Any:
    """A JSON file with its own output directory's path replaced by ``<OUT>`` (manifests record paths)."""
    return json.loads(path.read_text().replace(json.dumps(str(root))[1:-1], "<OUT>"))


def _same_file(name: str, a: Path, b: Path, roots: tuple[Path, Path], run: bool) -> bool:
    base = name.rsplit("/", 1)[-1]
    if run and (base in RUN_TIMED or base.endswith(".png")):
        return True
    if base.endswith(".npz"):
        return _same_npz(a, b)
    if base.endswith(".json"):
        x, y = _json(a, roots[0]), _json(b, roots[1])
        if run and base == "results.json":
            return x["rows"] == y["rows"] and x["config_hash"] == y["config_hash"]
        if base.endswith("_config.json"):            # the replayable command line: it differs by --resume
            x, y = ({k: v for k, v in d.items() if k not in RESUME_FLAGS} for d in (x, y))
        return _strip(x) == _strip(y)
    if base.endswith(".parquet"):
        return _same_parquet(a, b, roots)
    return a.read_bytes() == b.read_bytes()


def _same_parquet(a: Path, b: Path, roots: tuple[Path, Path]) -> bool:
    """Same columns and values, and the same schema metadata once each run's output root (which fastinf
    records as provenance, e.g. the store paths of a fused result) is replaced by ``<OUT>``."""
    import pyarrow.parquet as pq

    ta, tb = pq.read_table(a), pq.read_table(b)
    if not ta.equals(tb):
        return False

    def meta(t: Any, root: Path) -> dict:
        return {k: _strip_json(v.decode(), root) for k, v in (t.schema.metadata or {}).items()}

    return meta(ta, roots[0]) == meta(tb, roots[1])


def _strip_json(text: str, root: Path) -> Any:
    text = text.replace(json.dumps(str(root))[1:-1], "<OUT>")
    try:
        return _strip(json.loads(text))
    except ValueError:
        return text


def compare(ref: Path, out: Path, *, run: bool = False) -> list[str]:
    """The differences between two output directories (empty = the same result)."""
    a, b = _files(ref), _files(out)
    diffs = [f"missing {n}" for n in sorted(set(a) - set(b))] + [f"extra {n}" for n in sorted(set(b) - set(a))]
    diffs += [f"differs {n}" for n in sorted(set(a) & set(b)) if not _same_file(n, a[n], b[n], (ref, out), run)]
    return diffs


# ------------------------------------------------------------------------------------------ targets
@dataclass
class Target:
    """One command under test: how to start it into ``out``, how to resume it, how to compare."""

    name: str
    cmd: Callable[[Path], list[str]]
    resume: Callable[[Path], list[str]]
    run_like: bool = False
    t_first: float = 0.0
    t_end: float = 0.0
    events: int = 0
    ref: Path | None = None
    stats: dict[str, int] = field(default_factory=lambda: {"injected": 0, "survived": 0, "missed": 0})


def _score_has_resume() -> bool:
    out = subprocess.run([PY, "-m", "fastinf", "score", "--help"], capture_output=True, text=True, env=env())
    return "--resume" in out.stdout


def make_targets(work: Path, names: list[str]) -> list[Target]:
    """Build the inputs of the chosen targets under ``work`` and describe their commands."""
    from tests.scripts.assets import make_assets

    assets = make_assets(work / "assets", n_train=120, n_test=24)
    targets: list[Target] = []
    if "extract" in names:
        ex = ["-m", "fastinf", "extract", "--model", str(assets["model"]), "--data", str(assets["train"]),
              "--proj", "4x4", "--batch-size", "4", "--chunk-size", "4", "--max-length", "16", "--dtype", "fp32",
              "--no-progress"]
        targets.append(Target("extract", lambda o: [PY, *ex, "--out", str(o)],
                              lambda o: [PY, *ex, "--out", str(o), "--resume"]))
    if {"score", "dist_score"} & set(names):
        test, train = _synthetic_stores(work)
    if "score" in names:
        sc = ["-m", "fastinf", "score", "--test", str(test), "--train", str(train), "--method", "datainf",
              "--block-mb", "1", "--no-progress"]
        again = "--resume" if _score_has_resume() else "--overwrite"
        targets.append(Target("score", lambda o: [PY, *sc, "--out", str(o)],
                              lambda o: [PY, *sc, "--out", str(o), again]))
    if "dist_score" in names:
        ds = ["-m", "fastinf.dist_score", "--test", str(test), "--train", str(train), "--method", "datainf",
              "--block-size", "16"]
        targets.append(Target("dist_score", lambda o: [PY, *ds, "--out", str(o)],
                              lambda o: [PY, *ds, "--out", str(o), "--resume"]))
    if "index" in names:
        store = _index_store(work)
        ib = [str(ROOT / "tests" / "scripts" / "slow_index_build.py"), "0.3", "--", str(store), "--factory",
              "IVF4,Flat", "--seed", "3"]
        targets.append(Target("index", lambda o: [PY, *ib, "--out", str(o)],
                              lambda o: [PY, *ib, "--out", str(o), "--resume"]))
    if "run" in names:
        cfg = _run_config(work, assets)
        rn = ["-m", "fastinf", "run", str(cfg), "--no-progress"]
        targets.append(Target("run", lambda o: [PY, *rn, "--out", str(o)],
                              lambda o: [PY, *rn, "--out", str(o)], run_like=True))
    return targets


def _synthetic_stores(work: Path) -> tuple[Path, Path]:
    import numpy as np

    from fastinf.store import GradientStore

    rng = np.random.default_rng(7)
    names = [f"u{i}" for i in range(3)]
    train = GradientStore.from_arrays(work / "score_train", {u: rng.standard_normal((3000, 32)).astype(np.float32)
                                                             for u in names}, chunk_size=256, overwrite=True)
    test = GradientStore.from_arrays(work / "score_test", {u: rng.standard_normal((48, 32)).astype(np.float32)
                                                           for u in names}, chunk_size=16, overwrite=True)
    return test.path, train.path


def _index_store(work: Path) -> Path:
    import numpy as np

    from fastinf.store import GradientStore

    rng = np.random.default_rng(5)
    feats = {f"u{i}": rng.standard_normal((500, 8)).astype(np.float32) for i in range(6)}
    return GradientStore.from_arrays(work / "index_train", feats, chunk_size=128, overwrite=True).path


def _run_config(work: Path, assets: dict[str, Path]) -> Path:
    import yaml

    cfg = {"name": "fault-injection", "out": str(work / "run-default"), "seeds": [0],
           "data": {"train": str(assets["train"]), "test": str(assets["test"])},
           "noise": {"rate": 0.25},
           "model": {"name": str(assets["model"]), "max_length": 16},
           "train": {"epochs": 2, "batch_size": 8, "lr": 1e-2,
                     "lora": {"r": 2, "alpha": 4, "target_modules": ["query", "value"]}},
           "extract": {"layers": "all", "proj": "4x4", "batch_size": 8, "cost_samples": 8, "cost_repeats": 1},
           "score": {"methods": ["graddot", "datainf"]},
           "aggregate": {"how": ["mean", "rank", "vote"], "groups": ["first", "last", "all"]}}
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------------------- trials
def _run_to_end(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout)


def progress(out: Path) -> int:
    """Work done so far, as seen on disk: chunk/block lines of ``progress/*.jsonl``, FAISS group files,
    stage markers and checkpoints (each command shows some of these)."""
    if not out.exists():
        return 0
    n = 0
    try:
        for p in out.rglob("*"):
            if p.parent.name == "progress" and p.suffix == ".jsonl":
                n += p.read_bytes().count(b"\n")
            elif p.suffix == ".faiss" or p.name.endswith(".done.json") or p.name == "checkpoint.json":
                n += 1
    except OSError:      # a file renamed or removed while we looked
        pass
    return n


WORK_MARKER = ".fastinf-fault-inject"


def _claim_work(work: Path) -> Path:
    """``--work`` must be new, empty, or a directory this script made (it holds ``WORK_MARKER``): the script
    removes its own ``<target>/ref`` and ``<target>/trial-N`` directories there and nothing else."""
    if work.exists() and (not work.is_dir() or (any(work.iterdir()) and not (work / WORK_MARKER).is_file())):
        sys.exit(f"fault_inject: --work {work} exists and was not made by this script; give a new or empty "
                 "directory")
    work.mkdir(parents=True, exist_ok=True)
    (work / WORK_MARKER).write_text("made by tests/scripts/fault_inject.py\n")
    return work


def reference(t: Target, work: Path) -> None:
    """The uninterrupted run; records when its first output appeared, when it ended, and how many
    progress events (:func:`progress`) it showed at most."""
    out = work / t.name / "ref"
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(t.cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    first, events = None, 0
    while proc.poll() is None:
        if first is None and out.exists():
            first = time.monotonic() - t0
        events = max(events, progress(out))
        time.sleep(0.005)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"reference {t.name} failed (rc {proc.returncode}): {err.decode()[-2000:]}")
    t.t_end = time.monotonic() - t0
    t.t_first = first if first is not None else 0.0
    t.events = events
    t.ref = out


def _kill_when(cmd: list[str], out: Path, events: int | None, delay: float) -> bool:
    """Start ``cmd``; SIGKILL its process group ``delay`` s after ``events`` progress events were seen
    (``None``: ``delay`` s after the start). False if it ended on its own first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(),
                            start_new_session=True)
    try:
        while events is not None and proc.poll() is None and progress(out) < events:
            time.sleep(0.003)
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def _kill_point(t: Target, rng: random.Random) -> tuple[int | None, float, str]:
    """(events to wait for, then seconds to wait, a description): mostly after a random number of progress
    events (plus a fraction of a second, to land between two of them); now and then during start-up."""
    if t.events < 2 or rng.random() < 0.1:
        lo, hi = (0.3 * t.t_first, t.t_first) if t.events else (0.3 * t.t_first, t.t_end)
        delay = rng.uniform(lo, hi)
        return None, delay, f"{delay:.2f}s"
    k = rng.randint(1, t.events - 1)
    delay = rng.uniform(0.0, min(0.3, (t.t_end - t.t_first) / t.events))
    return k, delay, f"event {k}/{t.events} + {delay * 1000:.0f}ms"


def trial(t: Target, work: Path, i: int, rng: random.Random, double: bool) -> tuple[bool, str]:
    """One kill (or two, with ``double``) + resume + compare; returns (survived, a one-line description)."""
    out = work / t.name / f"trial-{i}"
    shutil.rmtree(out, ignore_errors=True)
    points = []
    for _ in range(4):
        events, delay, where = _kill_point(t, rng)
        if _kill_when(t.cmd(out), out, events, delay):
            points.append(where)
            break
        shutil.rmtree(out, ignore_errors=True)          # it finished before the kill: draw another point
    else:
        t.stats["missed"] += 1
        return True, f"{t.name} #{i}: finished before every kill point (not counted)"
    t.stats["injected"] += 1
    if double and rng.random() < 0.5 and _kill_when(t.resume(out), out, None, rng.uniform(0.3, 1.0) * t.t_end):
        points.append("resume killed")
        t.stats["injected"] += 1
    res = _run_to_end(t.resume(out))
    if res.returncode != 0:
        return False, f"{t.name} #{i} killed at {', '.join(points)}: resume failed (rc {res.returncode}): " \
                      f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else '?'}"
    diffs = compare(t.ref, out, run=t.run_like)
    if diffs:
        return False, f"{t.name} #{i} killed at {', '.join(points)}: {len(diffs)} differences: {diffs[:4]}"
    survived = 1 + (points[-1] == "resume killed")
    t.stats["survived"] += survived
    shutil.rmtree(out, ignore_errors=True)
    return True, f"{t.name} #{i} killed at {', '.join(points)}: resumed, identical to the reference"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10, help="trials in all, spread over the targets (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill points (default 0)")
    p.add_argument("--targets", default="extract,score,dist_score,index,run")
    p.add_argument("--double", action="store_true", help="also kill half of the resumes once")
    p.add_argument("--work", default=None, help="working directory (default: a temporary one, removed)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = set(names) - {"extract", "score", "dist_score", "index", "run"}
    if unknown or not names or args.kills < 1:
        p.error(f"--targets: unknown {sorted(unknown)}" if unknown else "--kills must be >= 1 and --targets non-empty")
    work = _claim_work(Path(args.work)) if args.work else Path(tempfile.mkdtemp(prefix="fastinf-faults-"))
    try:
        return _main(work, names, args)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def _main(work: Path, names: list[str], args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    targets = make_targets(work, names)
    for t in targets:
        reference(t, work)
        print(f"reference {t.name}: first output at {t.t_first:.2f}s, done at {t.t_end:.2f}s, "
              f"{t.events} progress events", flush=True)
    failures = 0
    for i in range(args.kills):
        t = targets[i % len(targets)]
        ok, line = trial(t, work, i, rng, args.double)
        failures += not ok
        print(("ok   " if ok else "FAIL ") + line, flush=True)
    injected = sum(t.stats["injected"] for t in targets)
    survived = sum(t.stats["survived"] for t in targets)
    per = ", ".join(f"{t.name} {t.stats['survived']}/{t.stats['injected']}" for t in targets)
    print(f"faults injected: {injected}, survived: {survived} ({per}); "
          f"{sum(t.stats['missed'] for t in targets)} trial(s) finished before the kill; {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
