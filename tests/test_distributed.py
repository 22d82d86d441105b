"""torchrun with 2 CPU processes (gloo) gives the single-process circuit; checkpoints per rank."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def _cli(command: str, tiny_model_dir, out, nproc: int, extra=(), env_extra=None):
    """``featcircuits COMMAND`` on the tiny model, in one process or under torchrun with ``nproc``."""
    cli = ["-m", "featcircuits.cli", command, "--model", str(tiny_model_dir), "--task", "sva-nounpp",
           "--pairs", "8", "--batch-size", "2", "--device", "cpu", "--out", str(out), *extra]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(launch + cli, env=env, capture_output=True, text=True, timeout=300)


def _discover(tiny_model_dir, out, nproc: int, extra=(), env_extra=None):
    return _cli("discover", tiny_model_dir, out, nproc, ["--saes", "identity", "--top-k", "12", *extra], env_extra)


TIMING_KEYS = {"timings", "seconds", "seconds_runs", "passes", "targets", "torch_threads", "provenance"}


def assert_same_numbers(a, b, tol: float = 1e-5, path: str = "") -> int:
    """Two result JSONs hold the same structure and numbers to ``tol`` (timings, pass counts
    (per rank under torchrun) and provenance left out); returns how many numbers were compared."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        return sum(assert_same_numbers(a[k], b[k], tol, f"{path}/{k}") for k in a if k not in TIMING_KEYS)
    if isinstance(a, list):
        assert len(a) == len(b), path
        return sum(assert_same_numbers(x, y, tol, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    if isinstance(a, float) and isinstance(b, (int, float)):
        assert abs(a - b) <= tol, (path, a, b)
        return 1
    assert a == b, (path, a, b)
    return 0


def _edges(graph: dict) -> dict:
    key = "edges" if "edges" in graph else "links"
    return {(e["source"], e["target"]): e["weight"] for e in graph[key]}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """The same discover run in one process and in two (torchrun, gloo)."""
    root = tmp_path_factory.mktemp("torchrun")
    for name, nproc in (("one", 1), ("two", 2)):
        done = _discover(tiny_model_dir, root / name, nproc)
        assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_torchrun_two_ranks_equal_single_process(runs):
    summary = json.loads((runs / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and json.loads((runs / "one" / "summary.json").read_text())["processes"] == 1
    a, b = (load_file(runs / d / "node_effects.safetensors") for d in ("one", "two"))
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-5), k
    ga, gb = (json.loads((runs / d / "graph.json").read_text()) for d in ("one", "two"))
    assert sorted(n["id"] for n in ga["nodes"]) == sorted(n["id"] for n in gb["nodes"])
    ea, eb = _edges(ga), _edges(gb)
    assert set(ea) == set(eb) and ea
    assert max(abs(ea[k] - eb[k]) for k in ea) <= 1e-5
    assert not (runs / "two" / ".checkpoint").exists()  # every rank cleared its own


def test_torchrun_resume_per_rank(runs, tiny_model_dir, tmp_path):
    """Both ranks die after their first edge checkpoint; the resumed run equals an uninterrupted one."""
    killed = _discover(tiny_model_dir, tmp_path / "run", 2, env_extra={"FEATCIRCUITS_FAULT_AFTER": "edges-relp:1"})
    assert killed.returncode != 0
    files = sorted(p.name for p in (tmp_path / "run" / ".checkpoint").iterdir())
    # one file per rank; torchrun may stop the slower rank before it reached its checkpoint,
    # which then redoes its shard from the start: the result is the same either way
    assert files and all(".rank0-of-2" in f or ".rank1-of-2" in f for f in files)
    resumed = _discover(tiny_model_dir, tmp_path / "run", 2, extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ga, gb = (json.loads((d / "graph.json").read_text()) for d in (runs / "two", tmp_path / "run"))
    assert ga["nodes"] == gb["nodes"] and _edges(ga) == _edges(gb)


CURVES = ["--saes", "identity", "--n-eval", "8", "--methods", "relp,random", "--thresholds", "3",
          "--no-progress"]


def test_torchrun_curves_equal_single_process_and_resume(tiny_model_dir, tmp_path):
    """curves under torchrun (node effects, ablation means and F(C) sums sharded and
    all-reduced; the per-case part too) gives the single-process curves.json; both ranks
    killed after their first ablation checkpoint, ``--resume`` gives the same again."""
    runs = {}
    for name, nproc, env in (("one", 1, None), ("two", 2, None),
                             ("killed", 2, {"FEATCIRCUITS_FAULT_AFTER": "curves-ablate-relp:1"})):
        done = _cli("curves", tiny_model_dir, tmp_path / name, nproc, CURVES, env)
        if name == "killed":
            assert done.returncode != 0
            files = sorted(p.name for p in (tmp_path / name / ".checkpoint").iterdir())
            assert files and all(".rank0-of-2" in f or ".rank1-of-2" in f for f in files), files
            done = _cli("curves", tiny_model_dir, tmp_path / name, nproc, [*CURVES, "--resume"])
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = json.loads((tmp_path / name / "curves.json").read_text())
    assert runs["one"]["by_case"]  # the per-case evaluation ran (and was sharded) too
    for name in ("two", "killed"):
        assert assert_same_numbers(runs["one"], runs[name]) > 10
    assert not (tmp_path / "two" / ".checkpoint").exists() and not (tmp_path / "killed" / ".checkpoint").exists()


@pytest.mark.parametrize("granularity", ["components", "features"])
def test_torchrun_agreement_equal_single_process(tiny_model_dir, tmp_path, granularity):
    """agreement under torchrun: the estimators and exact patching (component grid, or the
    feature sample's exact_feature_effects) sharded and all-reduced, rank 0 writing."""
    extra = ["--methods", "atp,relp,ig", "--repeats", "1", "--quiet", "--granularity", granularity]
    results = []
    for name, nproc in (("one", 1), ("two", 2)):
        done = _cli("agreement", tiny_model_dir, tmp_path / name, nproc, extra)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("Pearson r vs exact") == 1  # rank 0 alone reports
        results.append(json.loads((tmp_path / name / "agreement.json").read_text()))
    assert results[0]["by_case"]
    assert assert_same_numbers(*results) > 100
