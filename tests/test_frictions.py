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


def test_threads_on_every_computing_command():
    from featcircuits.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in ("discover", "agreement", "evaluate", "curves"):
        assert "--threads" in sub.choices[name]._option_string_actions, name


def test_threads_applied_and_checked(tiny_model_dir, tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["discover", "--model", str(tiny_model_dir), "--saes", "identity", "--task", "sva-nounpp",
                     "--n", "2", "--top-k", "3", "--no-edges", "--threads", "1", "--out", str(tmp_path / "a")]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert main(["agreement", "--threads", "0", "--out", str(tmp_path / "b")]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err


def test_circuit_repr_is_one_line(python_circuit):
    text = repr(python_circuit)
    assert "\n" not in text and len(text) < 200
    assert f"nodes={python_circuit.n_nodes}" in text and "method='atp'" in text and "error share=" in text


def test_ig_progress_counts_sites(tiny_model_dir, monkeypatch):
    """The bar advances once per site and chunk (IG's unit of work), not once per chunk."""
    from featcircuits import attribution
    from featcircuits.attribution import node_effects
    from featcircuits.dictionaries import load_dictionary_set
    from featcircuits.models import load_model
    from featcircuits.tasks import make_pairs, tokenize_pairs
    from featcircuits.tracing import SplicedModel

    updates, totals = [], []

    class Bar:
        def __init__(self, *a, total=None, **k):
            totals.append(total)

        def update(self, n=1):
            updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(attribution, "tqdm", Bar)
    model = load_model(str(tiny_model_dir))
    sm = SplicedModel(model, load_dictionary_set("identity", model.adapter))
    batch, _ = tokenize_pairs(make_pairs("sva-nounpp", 4), model.tokenizer)
    node_effects(sm, batch, "ig", steps=2, batch_size=2)
    assert totals == [2 * len(sm.sites)] and sum(updates) == 2 * len(sm.sites)


def test_circuit_smaller_than_top_k_says_why(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["discover", "--model", str(tiny_model_dir), "--saes", "identity", "--task", "sva-nounpp", "--n", "2",
                 "--top-k", "100000", "--out", str(out)]) == 0
    size = json.loads((out / "summary.json").read_text())["circuit_size"]
    assert size["requested"] == 100000 and size["kept"] + size["zero_effect"] + size["pruned"] == size["available"]
    assert size["zero_effect"] > 0 and size["available"] < 100000
    line = f"{size['kept']} of 100000 nodes: {size['zero_effect']} had zero effect, {size['pruned']} were pruned"
    assert line in capsys.readouterr().out


def test_dictionaries_checked_before_the_weights_load(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A set for another width, or naming a site the model lacks, fails on the config alone."""
    from featcircuits import models
    from featcircuits.testing import random_saelens_set, tiny_model

    saes = tmp_path / "wide"
    random_saelens_set(tiny_model("gemma3", scale=0.1), saes, width=8, sites=["resid_0"])
    cfg = json.loads((saes / "resid_0" / "cfg.json").read_text())
    (saes / "resid_0" / "cfg.json").write_text(json.dumps({**cfg, "d_in": cfg["d_in"] + 16}))  # another model's width
    (saes / "resid_99").mkdir()
    (saes / "resid_99" / "cfg.json").write_text(json.dumps({"d_in": 1}))

    def no_weights(*a, **k):
        raise AssertionError("the model's weights were loaded before the dictionaries were checked")

    monkeypatch.setattr(models, "load_model", no_weights)
    args = ["discover", "--model", str(tiny_model_dir), "--saes", str(saes), "--task", "sva-nounpp", "--n", "2",
            "--out", str(tmp_path / "run")]
    assert main(args) == 2
    assert "sites this model lacks: resid_99" in capsys.readouterr().err
    (saes / "resid_99" / "cfg.json").unlink()
    (saes / "resid_99").rmdir()
    assert main(args) == 2
    assert "dictionary for site resid_0 reads width" in capsys.readouterr().err
