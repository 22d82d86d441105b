"""torchrun with 2 CPU processes (gloo) gives the single-process circuit; checkpoints per rank."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def _discover(tiny_model_dir, out, nproc: int, extra=(), env_extra=None):
    cli = ["-m", "featcircuits.cli", "discover", "--model", str(tiny_model_dir), "--saes", "identity",
           "--task", "sva-nounpp", "--pairs", "8", "--batch-size", "2", "--top-k", "12", "--device", "cpu",
           "--out", str(out), *extra]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(launch + cli, env=env, capture_output=True, text=True, timeout=300)


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
