"""The circuit-tracer export against circuit-tracer's own pydantic models (strict: no field
coerced), and the feature files its local server serves from our cards.

circuit-tracer is installed with ``pip install --no-deps circuit-tracer`` (its graph and
feature models need only pydantic; its full install would replace transformers 5 by 4.57),
so the test skips where it is absent and .ci/run installs it that way.
"""

from __future__ import annotations

import json
import math

import pytest

from featcircuits import export
from featcircuits.adapters import site_row
from test_export import make_circuit  # noqa: E402 (tests/ is on sys.path under pytest)

graph_models = pytest.importorskip("circuit_tracer.frontend.graph_models")
feature_models = pytest.importorskip("circuit_tracer.frontend.feature_models")


@pytest.fixture(params=["sum", "none"])
def circuit(request):
    c = make_circuit(request.param)
    c.provenance["prompt_tokens"] = ["", " keys", " to"]  # make_circuit: 3 positions, the first padding
    c.provenance["answer_probability"] = {"clean_answer_on_clean": 0.25, "patch_answer_on_clean": 0.05}
    for n, d in c.graph.nodes(data=True):
        if d.get("kind") in ("feature", "embed"):
            d["activation_clean"] = 1.5
            d["label"] = f"label of {n}"
    return c


def test_validates_strictly_against_circuit_tracer(circuit, tmp_path):
    path = export.write_circuit_tracer(circuit, tmp_path / "graph.circuit-tracer.json")
    data = json.loads(path.read_text())
    model = graph_models.Model.model_validate(data, strict=True)
    assert model.metadata.schema_version == 1
    assert model.metadata.prompt_tokens == [str(t) for t in circuit.provenance["prompt_tokens"]]
    for link in data["links"]:
        graph_models.Link.model_validate(link, strict=True)
    nodes = data["nodes"]
    ours = [n for n in nodes if "our_id" in n and n["our_id"] != "metric"]
    assert len(ours) == circuit.n_nodes
    # featureId (layer_feature_ctx) is the front end's key: unique, and feature ids never collide across sites
    keys = [f"{n['layer']}_{n['feature']}_{n['ctx_idx']}" for n in nodes]
    assert len(keys) == len(set(keys))
    for n in ours:
        d = circuit.graph.nodes[n["our_id"]]
        assert n["layer"] == ("E" if d["site"] == "embed" else str(d["layer"]))  # the model layer
        assert n["site_kind"] == d["site"].split("_")[0]
        if d["kind"] == "error":
            assert n["feature_type"] == f"{n['site_kind']} reconstruction error" and n["feature"] < 0
        else:
            x, y = site_row(d["site"]), d["feature"]
            assert n["feature"] == (x + y) * (x + y + 1) // 2 + y  # Cantor pairing of (site row, index)
            assert n["feature_type"] == "cross layer transcoder" and n["activation"] == 1.5
            assert n["clerp"] == d["label"]
    emb = [n for n in nodes if n["feature_type"] == "embedding"]
    assert [n["ctx_idx"] for n in emb] == [i for i, t in enumerate(model.metadata.prompt_tokens) if t]
    (logit,) = [n for n in nodes if n["feature_type"] == "logit"]
    assert logit["is_target_logit"] and logit["token_prob"] == 0.25 and "(p=0.250)" in logit["clerp"]
    assert all(0 <= n["ctx_idx"] < len(model.metadata.prompt_tokens) for n in nodes)
    infl = sorted(n["influence"] for n in ours)
    assert math.isclose(infl[-1], 1.0)
    by_id = {n["node_id"]: n for n in nodes}
    assert len(data["links"]) == circuit.n_edges
    for link in data["links"]:
        assert circuit.graph.edges[by_id[link["source"]]["our_id"], by_id[link["target"]]["our_id"]]["weight"] \
            == link["weight"]


def test_slug_unique_per_run_and_served_folder(tmp_path):
    a, b = make_circuit("sum"), make_circuit("sum", seed=1)
    b.provenance["metric_clean"] = 1.234  # another run
    assert export.run_slug(a) != export.run_slug(b)
    assert export.run_slug(a) == export.run_slug(make_circuit("sum"))
    for c in (a, b):
        export.write_circuit_tracer(c, tmp_path / "graph.circuit-tracer.json")
    serve = tmp_path / export.SERVE_DIR
    index = json.loads((serve / "graph-metadata.json").read_text())
    slugs = [g["slug"] for g in index["graphs"]]
    assert slugs == [export.run_slug(a), export.run_slug(b)]
    for s in slugs:  # the front end loads ./graph_data/<slug>.json
        graph_models.Model.model_validate(json.loads((serve / f"{s}.json").read_text()), strict=True)


def test_feature_files_from_cards(tmp_path):
    c = make_circuit("none")
    feats = [(n, d) for n, d in c.graph.nodes(data=True) if d.get("kind") in ("feature", "embed")]
    cards = {}
    for n, d in feats:
        ex = {"tokens": ["a", "<b>", "c"], "acts": [0.0, 2.0, 0.5], "peak": 1, "value": 2.0}
        cards[n] = {"site": d["site"], "feature": d["feature"], "top": [ex], "quantiles": [dict(ex, value=1.0)],
                    "promoted": [{"token": " are", "value": 1.0}], "suppressed": [{"token": " is", "value": -1.0}],
                    "max": 2.0, "density": 0.1}
    export.write_circuit_tracer(c, tmp_path / "graph.circuit-tracer.json", cards=cards)
    data = json.loads((tmp_path / "graph.circuit-tracer.json").read_text())
    scan = data["metadata"]["scan"]
    # the front end fetches `${scan}/${feature}.json` when scan starts with './', and the local
    # server maps ./graph_data/ to its data dir; './features/' would be sent to a CDN
    assert scan.startswith("./graph_data/") and not scan.startswith("./features/")
    folder = tmp_path / export.SERVE_DIR / scan[len("./graph_data/"):]
    by_our = {n["our_id"]: n for n in data["nodes"] if "our_id" in n}
    for n, _ in feats:
        f = json.loads((folder / f"{by_our[n]['feature']}.json").read_text())
        m = feature_models.Model.model_validate(f, strict=True)
        assert m.index == by_our[n]["feature"] and m.top_logits == [" are"]
        assert m.examples_quantiles[0].examples[0].tokens == ["a", "<b>", "c"]
