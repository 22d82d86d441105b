"""The main job end to end through the CLI on a tiny model: every output file, reading an
SFC task file, resume after an injected kill, export of a saved circuit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import networkx as nx

from featcircuits.cli import main
from featcircuits.export import load_circuit

FILES = ["graph.graphml", "graph.dot", "graph.json", "graph.circuit-tracer.json", "node_effects.safetensors",
         "summary.json", "circuit.png", "circuit.svg"]


def test_discover_sfc_file_end_to_end(tiny_model_dir, shared_sfc, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["discover", "--model", str(tiny_model_dir), "--saes", "identity", "--task",
                 str(shared_sfc / "simple_train.json"), "--n", "12", "--top-k", "30", "--out", str(out)])
    assert code == 0
    for name in FILES:
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "relp" and summary["n_nodes"] > 0 and summary["n_edges"] > 0
    assert set(summary["seconds"]) >= {"nodes", "edges", "total"}
    g = nx.read_graphml(out / "graph.graphml")
    assert g.number_of_nodes() == summary["n_nodes"] + 1  # + the metric sink
    circuit = load_circuit(out)
    assert circuit.n_nodes == summary["n_nodes"] and circuit.n_edges == summary["n_edges"]
    assert main(["export", str(out), "--format", "graphml", "--out", str(tmp_path / "again.graphml")]) == 0


def test_discover_killed_then_resumed_equals_uninterrupted(tiny_model_dir, tmp_path):
    args = [sys.executable, "-m", "featcircuits.cli", "discover", "--model", str(tiny_model_dir), "--saes",
            "identity", "--task", "sva-nounpp", "--n", "8", "--batch-size", "2", "--top-k", "10"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ref = subprocess.run(args + ["--out", str(tmp_path / "ref")], env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    killed = subprocess.run(args + ["--out", str(tmp_path / "run")], capture_output=True, text=True,
                            env={**env, "FEATCIRCUITS_FAULT_AFTER": "edges-relp:2"})
    assert killed.returncode == 137
    assert not (tmp_path / "run" / "summary.json").exists()
    resumed = subprocess.run(args + ["--out", str(tmp_path / "run"), "--resume"], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "ref" / "graph.json").read_text())
    b = json.loads((tmp_path / "run" / "graph.json").read_text())
    key = "edges" if "edges" in a else "links"
    assert a["nodes"] == b["nodes"] and a[key] == b[key]
