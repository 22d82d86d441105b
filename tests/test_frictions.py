"""What a new user hit: a circuit saved from Python, --compare, --threads, print(circuit),
a circuit smaller than --top-k, dictionaries that do not fit the model."""

import json

import pytest

from featcircuits.cli import main


@pytest.fixture(scope="module")
def python_circuit(tiny_model_dir):
    from featcircuits.dictionaries import load_dictionary_set
    from featcircuits.discover import discover_circuit
    from featcircuits.graph import Thresholds
    from featcircuits.models import load_model
    from featcircuits.tasks import make_pairs, tokenize_pairs
    from featcircuits.tracing import SplicedModel

    model = load_model(str(tiny_model_dir))
    sm = SplicedModel(model, load_dictionary_set("identity", model.adapter))
    batch, _ = tokenize_pairs(make_pairs("sva-nounpp", 6), model.tokenizer)
    return discover_circuit(sm, batch, "atp", thresholds=Thresholds(top_k=6), edges=False, progress=False)


def test_save_circuit_records_what_evaluate_needs(python_circuit, tiny_model_dir, tmp_path, capsys):
    from featcircuits.export import save_circuit

    bare = tmp_path / "bare"
    save_circuit(python_circuit, bare)
    assert (bare / "circuit.png").is_file() and (bare / "circuit.svg").is_file()  # as `discover` writes
    assert main(["evaluate", "--circuit", str(bare), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model MODEL" in err and "--task TASK" in err
    assert main(["evaluate", "--circuit", str(bare), "--no-progress", "--model", str(tiny_model_dir),
                 "--task", "sva-nounpp", "--saes", "identity"]) == 0
    flagged = json.loads((bare / "evaluation.json").read_text())

    full = tmp_path / "full"
    save_circuit(python_circuit, full, model=str(tiny_model_dir), task="sva-nounpp", saes="identity")
    assert "model" not in python_circuit.provenance  # the caller's circuit is left as it was
    assert json.loads((full / "summary.json").read_text())["task"] == "sva-nounpp"
    assert main(["evaluate", "--circuit", str(full), "--no-progress"]) == 0
    recorded = json.loads((full / "evaluation.json").read_text())
    assert recorded["faithfulness"] == pytest.approx(flagged["faithfulness"])


def test_compare_circuits_counts_and_correlates(python_circuit):
    import copy

    from featcircuits.compare import compare_circuits

    same = compare_circuits(python_circuit, python_circuit)
    n = python_circuit.n_nodes
    assert same == {"nodes_a": n, "nodes_b": n, "nodes_shared": n, "jaccard": 1.0, "pearson_effects": 1.0}
    other = copy.deepcopy(python_circuit)
    dropped = next(node for node in other.graph if node != "metric")
    other.graph.remove_node(dropped)
    for act in other.effects.values():  # flip the sign of every effect: r = -1
        act.f.neg_()
        act.err.neg_()
    c = compare_circuits(python_circuit, other)
    assert c["nodes_shared"] == n - 1 and c["jaccard"] == pytest.approx((n - 1) / n)
    assert c["pearson_effects"] == pytest.approx(-1.0)


def test_discover_compare_reports_overlap(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["discover", "--model", str(tiny_model_dir), "--saes", "identity", "--task", "sva-nounpp", "--n", "4",
                 "--top-k", "6", "--no-edges", "--compare", "atp", "--out", str(out)]) == 0
    c = json.loads((out / "summary.json").read_text())["compare"]
    assert c["method"] == "atp" and 0 <= c["nodes_shared"] <= 6 and 0 <= c["jaccard"] <= 1
    assert -1 <= c["pearson_effects"] <= 1
    assert f"{c['nodes_shared']} nodes shared" in capsys.readouterr().out
