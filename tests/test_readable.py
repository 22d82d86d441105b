"""discover's readable circuit: labels, node facts, cards, circuit.html and the quick evaluation,
end to end through the CLI on a tiny Gemma 3 saved as an HF folder with random sae-lens
dictionaries and a small .txt corpus; node facts checked against the plain cache pass."""

from __future__ import annotations

import json
import random

from pathlib import Path

import pytest
import torch

from featcircuits.cli import main
from featcircuits.dictionaries import load_dictionary_set
from featcircuits.discover import discover_circuit
from featcircuits.evaluation.quick import error_share
from featcircuits.graph import Thresholds
from featcircuits.models import load_model
from featcircuits.readable import is_feature, node_facts
from featcircuits.tasks import make_pairs, task_vocabulary, tokenize_pairs
from featcircuits.testing import random_saelens_set
from featcircuits.tracing import SplicedModel


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("readable")
    model = load_model(str(tiny_model_dir))
    random_saelens_set(model, tmp / "set", width=24)
    rng = random.Random(0)
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(task_vocabulary()) for _ in range(50)) for _ in range(40)))
    return model, tmp / "set", corpus, tmp


def _discover(setup, out, *extra):
    model_dir = setup[0].spec
    return main(["discover", "--model", str(model_dir), "--saes", str(setup[1]), "--corpus", str(setup[2]),
                 "--card-tokens", "1024", "--n", "12", "--top-k", "30", "--aggregation", "none",
                 "--out", str(out), *extra])


def test_discover_writes_a_readable_circuit(setup, capsys):
    out = setup[3] / "run"
    annotations = setup[3] / "notes.json"
    assert _discover(setup, out / "probe", "--no-eval", "--no-cards") == 0
    probe = json.loads((out / "probe" / "graph.json").read_text())
    feature = next(n["id"] for n in probe["nodes"] if n["kind"] == "feature")
    annotations.write_text(json.dumps({feature.partition("@")[0]: "my <b>label</b>"}))
    capsys.readouterr()
    assert _discover(setup, out / "full", "--annotations", str(annotations)) == 0
    printed = capsys.readouterr()
    assert "building cards for the circuit's" in printed.err  # the subset mode says so
    run = out / "full"
    for name in ("circuit.html", "cards.json", "graph.json", "summary.json", "circuit-tracer"):
        assert (run / name).exists(), name
    data = json.loads((run / "graph.json").read_text())
    cards = json.loads((run / "cards.json").read_text())
    feats = [n for n in data["nodes"] if is_feature(n)]
    assert feats
    for n in feats:
        assert n["label"] and n["label"] != n["id"]
        assert isinstance(n["activation_clean"], float) and isinstance(n["activation_patch"], float)
        assert n["token"] == data["metadata"]["provenance"]["prompt_tokens"][n["position"]]
        if n["id"] != feature:
            assert n["id"] in cards and n["label"] == _auto(cards[n["id"]])
    assert next(n for n in data["nodes"] if n["id"] == feature)["label"] == "my <b>label</b>"
    for n in data["nodes"]:
        if n["kind"] == "error":
            assert n["label"].startswith(f"error at {n['site']}")
    summary = json.loads((run / "summary.json").read_text())
    q = summary["quality"]
    assert {"faithfulness", "completeness", "error_share", "n_eval"} <= set(q)
    errs = sum(abs(n["effect"]) for n in data["nodes"] if n["kind"] == "error")
    total = sum(abs(n["effect"]) for n in data["nodes"] if n["kind"] != "metric")
    assert q["error_share"] == pytest.approx(errs / total)
    assert f"faithfulness {q['faithfulness']:.3f}" in printed.out
    if q["faithfulness"] < 0.5:
        assert "warning: faithfulness" in printed.err and "sweep" in q
    assert summary["cards"]["subset"] and summary["cards"]["n_cards"] == len(cards)
    html = (run / "circuit.html").read_text()
    assert "my \\u003cb\\u003elabel" in html and "my <b>label" not in html  # escaped into the page
    # export --format html from the saved folder reads cards.json
    assert main(["export", str(run), "--format", "html", "--out", str(setup[3] / "again.html")]) == 0
    assert json.dumps(cards[feats[-1]["id"]]["top"][0]["tokens"][0])[1:-1].replace("<", "\\u003c") \
        in (setup[3] / "again.html").read_text()
    # --no-cards --no-eval: labels only for error nodes, no quality block, no cards.json
    assert not (out / "probe" / "cards.json").exists()
    assert "quality" not in json.loads((out / "probe" / "summary.json").read_text())


def _auto(card):
    from featcircuits.labels import auto_label

    return auto_label(card)


def test_node_facts_match_the_cache_pass(setup):
    model, set_dir = setup[0], setup[1]
    sm = SplicedModel(model, load_dictionary_set(str(set_dir), model.adapter))
    batch, _ = tokenize_pairs(make_pairs("sva-simple", 6, seed=1), model.tokenizer)
    for agg in ("none", "sum"):
        c = discover_circuit(sm, batch, "relp", thresholds=Thresholds(top_k=20), aggregation=agg, progress=False)
        node_facts(sm, batch, c, c.provenance["prompt_tokens"], batch_size=4)
        for side in ("clean", "patch"):
            _, cache = sm.cache(batch.inputs(side))
            mask = batch.inputs(side)["attention_mask"].bool()
            for n, d in c.graph.nodes(data=True):
                if not is_feature(d):
                    continue
                f = cache[d["site"]].f[..., d["feature"]]
                want = f[:, d["position"]].mean() if d["position"] >= 0 else f[mask].mean()
                assert d[f"activation_{side}"] == pytest.approx(float(want), abs=1e-5)
        p = c.provenance["answer_probability"]["clean_answer_on_clean"]
        logits, _ = sm.cache(batch.inputs("clean"))
        want = logits.float().softmax(-1)[torch.arange(len(batch)), batch.clean_answer].mean()
        assert p == pytest.approx(float(want), abs=1e-5)
        assert 0 <= (error_share(c) or 0) <= 1


@pytest.mark.parametrize("method", ["relp", "ig"])
def test_node_facts_reuse_the_attribution_forwards(setup, method):
    """With the sums the attribution made, node facts run no forward at all, and they are the
    facts the node-facts pass's own forwards give (to float rounding: the RelP forward
    reads its values under the LRP rules, whose forward equals the plain one)."""
    model, set_dir = setup[0], setup[1]
    sm = SplicedModel(model, load_dictionary_set(str(set_dir), model.adapter))
    batch, _ = tokenize_pairs(make_pairs("sva-simple", 6, seed=2), model.tokenizer)
    c = discover_circuit(sm, batch, method, thresholds=Thresholds(top_k=15), aggregation="none", steps=3,
                         batch_size=4, progress=False)
    assert c.activations is not None and c.activations.n == len(batch)
    before = sm.counters()
    node_facts(sm, batch, c, batch_size=4)
    assert sm.counters() == before  # nothing ran
    reused = {n: dict(d) for n, d in c.graph.nodes(data=True)}
    reused_p = dict(c.provenance["answer_probability"])
    c.activations = None
    node_facts(sm, batch, c, batch_size=4)
    assert sm.counters()[0] == before[0] + 2 * 2  # the fallback: a forward per chunk and side
    feats = [n for n, d in c.graph.nodes(data=True) if is_feature(d)]
    assert feats
    for n in feats:
        for side in ("clean", "patch"):
            assert reused[n][f"activation_{side}"] == pytest.approx(c.graph.nodes[n][f"activation_{side}"],
                                                                    rel=1e-5, abs=1e-6), (n, side)
    for k, v in c.provenance["answer_probability"].items():
        assert reused_p[k] == pytest.approx(v, abs=1e-6)


def test_features_command_and_user_errors(setup, capsys, tmp_path):
    model_dir = setup[0].spec
    args = ["features", "--model", str(model_dir), "--saes", str(setup[1]), "--corpus", str(setup[2]),
            "--tokens", "512"]
    assert main(args + ["--out", str(tmp_path / "copy")]) == 0
    assert "feature store:" in capsys.readouterr().out
    assert (tmp_path / "copy" / "store.safetensors").is_file() and (tmp_path / "copy" / "store.json").is_file()
    assert main(args[:-2] + ["--tokens", "0"]) == 2
    assert main(args[:5] + ["--corpus", str(tmp_path / "nope.txt")]) == 2
    assert main(["discover", "--model", str(model_dir), "--saes", str(setup[1]), "--corpus",
                 str(tmp_path / "nope.txt"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err
    # a set with no recorded training text: --corpus set says why in one line; auto says which corpus it used
    assert main(args[:5] + ["--corpus", "set", "--tokens", "512"]) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # after the model's loading bars
    assert "records no training corpus" in last and last.startswith("featcircuits") and "Traceback" not in err
    assert main(args[:5] + ["--corpus", str(setup[2]), "--tokens", "512"]) == 0
    assert f"tokens of {Path(str(setup[2])).name} " in capsys.readouterr().out


def test_readable_results_reuses_a_finished_run_only_of_the_same_set_and_pairs(tmp_path):
    """scripts/readable_results.py: a run left by another set (the previous `starter`) or with
    another pair count is rerun, never reported as this set's."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "readable_results.py"
    spec = importlib.util.spec_from_file_location("readable_results", path)
    rr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rr)
    summary = tmp_path / "summary.json"
    assert rr.reuse_problem(summary, "abc", 64) == "no run yet"
    summary.write_text(json.dumps({"dictionaries_sha256": "old", "pairs_requested": 64}))
    assert "dictionaries old" in rr.reuse_problem(summary, "abc", 64)
    summary.write_text(json.dumps({"dictionaries_sha256": "abc", "pairs_requested": 32}))
    assert "32 pairs" in rr.reuse_problem(summary, "abc", 64)
    summary.write_text(json.dumps({"dictionaries_sha256": "abc", "pairs_requested": 64}))
    assert rr.reuse_problem(summary, "abc", 64) is None
