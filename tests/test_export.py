"""Exports of a circuit (GraphML, DOT, node-link JSON, circuit-tracer JSON, safetensors,
summary), reading a run folder back, the ``export`` subcommand, and the picture.

All on small synthetic circuits built by hand: no model is loaded."""

from __future__ import annotations

import json
import math

import networkx as nx
import pydot
import pytest
import torch

from featcircuits import export
from featcircuits.cli import main
from featcircuits.draw import _title, circuit_layout, draw_circuit
from featcircuits.errors import UserError
from featcircuits.graph import METRIC, Circuit, Thresholds, build_graph, node_id, select_nodes
from featcircuits.nodes import pack

SITES = ["embed"] + [f"{k}_{layer}" for layer in range(2) for k in ("attn", "mlp", "resid")]


def make_circuit(aggregation: str = "sum", d_sae: int = 6, n_pos: int = 3, seed: int = 0) -> Circuit:
    """Features, error nodes and embed nodes at every site, edges between consecutive sites,
    a label with characters that need quoting, and the metric sink."""
    gen = torch.Generator().manual_seed(seed)
    if aggregation == "sum":
        feats = {s: torch.randn(d_sae, generator=gen) for s in SITES}
        errs = {s: torch.randn((), generator=gen) + 2.0 for s in SITES}  # every error node passes
    else:
        feats = {s: torch.randn(n_pos, d_sae, generator=gen) for s in SITES}
        errs = {s: torch.randn(n_pos, generator=gen) + 3.0 for s in SITES}
    masks = select_nodes(pack(feats, errs), Thresholds(node=0.7))
    ids = {s: [node_id(s, i, p) for i, p in masks[s].nodes()] for s in SITES}
    edges = [(u, v, float(torch.randn((), generator=gen)))  # a sparse random subset: pydot parses slowly
             for a, b in zip(SITES, SITES[1:]) for u in ids[a] for v in ids[b]
             if float(torch.rand((), generator=gen)) < (0.5 if aggregation == "sum" else 0.15)]
    labels = {ids["resid_1"][0]: 'plural "noun" <&> \\ detector', ids["embed"][0]: "the token ' keys'"}
    graph = build_graph(pack(feats, errs), masks, edges, last_resid="resid_1", labels=labels)
    prov = {"model": "tiny-gemma3", "dictionaries": "identity", "task": "sva-simple", "method": "relp",
            "aggregation": aggregation, "seed": seed,
            "thresholds": {"node": 0.7, "edge": None, "top_k": None, "share": None},
            "seconds": {"nodes": 1.25, "edges": 2.5, "total": 4.0},
            "versions": {"torch": torch.__version__, "networkx": nx.__version__}}
    return Circuit(graph=graph, effects=pack(feats, errs), provenance=prov)


@pytest.fixture(params=["sum", "none"])
def circuit(request) -> Circuit:
    return make_circuit(request.param)


def test_synthetic_circuit_has_every_kind(circuit):
    kinds = {d["kind"] for _, d in circuit.graph.nodes(data=True)}
    assert kinds == {"feature", "error", "embed", "metric"}
    assert circuit.n_edges > 20
    if circuit.provenance["aggregation"] == "none":
        assert any("@" in n for n in circuit.graph)


def _assert_same_graph(expected: nx.DiGraph, got: nx.DiGraph) -> None:
    assert set(got.nodes) == set(expected.nodes)
    assert set(got.edges) == set(expected.edges)
    for n, d in expected.nodes(data=True):
        assert got.nodes[n] == d, n
        for k, v in d.items():
            assert type(got.nodes[n][k]) is type(v), (n, k)
    for u, v, d in expected.edges(data=True):
        assert got.edges[u, v] == d
        assert isinstance(got.edges[u, v]["weight"], float)


def test_graphml_round_trip(circuit, tmp_path):
    path = export.write_graphml(circuit, tmp_path / "graph.graphml")
    g = export.read_graphml(path)  # drops the derived abs_weight / sign (tests/test_export_clients.py)
    assert g.is_directed()
    _assert_same_graph(circuit.graph, g)
    # provenance as graph attributes (nested keys joined with dots, null as JSON text)
    assert g.graph["provenance.method"] == "relp"
    assert g.graph["provenance.thresholds.node"] == 0.7
    assert g.graph["provenance.thresholds.edge"] == "null"
    assert g.graph["provenance.seconds.total"] == 4.0


def test_graphml_drops_none_and_types_odd_values(tmp_path):
    c = make_circuit("sum")
    n = next(n for n, d in c.graph.nodes(data=True) if d["kind"] == "feature" and "label" not in d)
    c.graph.nodes[n]["label"] = None  # optional value set to None: left out of GraphML
    c.graph.nodes[n]["effect"] = torch.tensor(0.5)  # a 0-d tensor slipping in
    g = nx.read_graphml(export.write_graphml(c, tmp_path / "g.graphml"))
    assert "label" not in g.nodes[n]
    assert g.nodes[n]["effect"] == 0.5


def _unquote(v: str) -> str:
    return v[1:-1].replace('\\"', '"').replace("\\\\", "\\") if v.startswith('"') else v


def test_dot_parses_with_pydot_and_keeps_graph(circuit, tmp_path):
    path = export.write_dot(circuit, tmp_path / "graph.dot")
    (dot,) = pydot.graph_from_dot_file(str(path))
    nodes = {_unquote(n.get_name()): {k: _unquote(v) for k, v in n.get_attributes().items()}
             for n in dot.get_nodes() if n.get_name() not in ("node", "edge", "graph")}
    edges = {(_unquote(e.get_source()), _unquote(e.get_destination())): e.get_attributes()
             for e in dot.get_edges()}
    assert set(nodes) == set(circuit.graph.nodes)
    assert set(edges) == set(circuit.graph.edges)
    for n, d in circuit.graph.nodes(data=True):
        got = nodes[n]
        assert got["site"] == d["site"] and got["kind"] == d["kind"]
        assert int(got["circuit_layer"]) == d["layer"]
        assert int(got["feature"]) == d["feature"] and int(got["position"]) == d["position"]
        assert float(got["effect"]) == d["effect"]
        assert got.get("circuit_label") == d.get("label")
        assert got["shape"] == {"error": "box", "metric": "doubleoctagon"}.get(d["kind"], "ellipse")
    for (u, v), d in circuit.graph.edges.items():
        assert float(_unquote(edges[u, v]["circuit_weight"])) == d["weight"]
        colour = _unquote(edges[u, v]["color"])
        assert colour.startswith("#1f5ac8" if d["weight"] >= 0 else "#d62b2b")  # blue +, red -


def test_json_round_trip(circuit, tmp_path):
    path = export.write_json_graph(circuit, tmp_path / "graph.json")
    data = json.loads(path.read_text())
    assert {"nodes", "links", "metadata"} <= set(data)
    assert data["metadata"]["provenance"]["method"] == "relp"
    assert data["metadata"]["n_nodes"] == circuit.n_nodes
    # plain networkx reads it (the metadata block is ignored)
    g = nx.node_link_graph(data, directed=True, multigraph=False, edges="links")
    _assert_same_graph(circuit.graph, g)
    _assert_same_graph(circuit.graph, export.from_node_link(data))


def test_effects_safetensors(circuit, tmp_path):
    from safetensors.torch import load_file

    path = export.write_effects(circuit, tmp_path / "node_effects.safetensors")
    flat = load_file(str(path))
    assert set(flat) == {f"features/{s}" for s in SITES} | {f"errors/{s}" for s in SITES}
    effects, meta = export.read_effects(path)
    assert list(effects) == SITES  # site order kept, not alphabetical
    for s in SITES:
        assert torch.equal(effects[s].f, circuit.effects[s].f) and torch.equal(effects[s].err, circuit.effects[s].err)
    assert json.loads(meta["provenance"])["task"] == "sva-simple"


def test_save_load_round_trip(circuit, tmp_path):
    summary = export.save_circuit(circuit, tmp_path / "run")
    loaded = export.load_circuit(tmp_path / "run")
    assert export.circuit_diff(circuit, loaded) == []
    _assert_same_graph(circuit.graph, loaded.graph)
    assert loaded.provenance == circuit.provenance
    assert loaded.n_nodes == summary["n_nodes"] and loaded.n_edges == summary["n_edges"]
    # masks (what evaluation ablates) agree too
    for s, m in circuit.masks().items():
        assert torch.equal(loaded.masks()[s].f, m.f)
        assert torch.equal(loaded.masks()[s].err, m.err)
    # nothing half-written left behind
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_circuit_diff_sees_changes(tmp_path):
    a, b = make_circuit("sum"), make_circuit("sum")
    assert export.circuits_equal(a, b)
    u, v = next(iter(b.graph.edges))
    b.graph.edges[u, v]["weight"] += 1e-3
    assert not export.circuits_equal(a, b)
    c = make_circuit("sum")
    c.graph.nodes[next(iter(c.graph))]["kind"] = "other"
    assert not export.circuits_equal(a, c)


def test_summary(tmp_path, monkeypatch):
    c = make_circuit("sum")
    monkeypatch.setattr(export.dot, "graphviz_available", lambda: False)
    summary = export.save_circuit(c, tmp_path, extra={"faithfulness": 0.9, "method": "relp"})
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert on_disk["n_nodes"] == c.n_nodes and on_disk["n_edges"] == c.n_edges
    assert on_disk["method"] == "relp" and on_disk["model"] == "tiny-gemma3"
    assert on_disk["seconds"] == {"nodes": 1.25, "edges": 2.5, "total": 4.0}
    assert on_disk["faithfulness"] == 0.9
    assert sum(on_disk["n_nodes_by_kind"].values()) == c.n_nodes
    assert any("graphviz" in n for n in on_disk["notes"])
    assert not (tmp_path / "graph.svg").exists()
    assert {"graph.graphml", "graph.dot", "graph.json", "graph.circuit-tracer.json", "node_effects.safetensors",
            "summary.json"} <= set(on_disk["files"])


def test_summary_fills_missing_timings(tmp_path):
    c = make_circuit("sum")
    del c.provenance["seconds"]
    s = export.save_circuit(c, tmp_path, formats=("summary",))
    assert s["seconds"] == {"nodes": None, "edges": None, "total": None}


@pytest.mark.skipif(not export.graphviz_available(), reason="graphviz `dot` binary not installed")
def test_graphviz_renders_dot(tmp_path):
    s = export.save_circuit(make_circuit("sum"), tmp_path, formats=("dot",))
    assert (tmp_path / "graph.svg").read_text().lstrip().startswith("<?xml")
    assert (tmp_path / "graph.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "notes" not in s


def test_unknown_save_format(tmp_path):
    with pytest.raises(UserError, match="unknown export format"):
        export.save_circuit(make_circuit("sum"), tmp_path, formats=("graphml", "gexf"))


def test_load_circuit_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        export.load_circuit(tmp_path / "nope")
    with pytest.raises(UserError, match="no graph.json"):
        export.load_circuit(tmp_path)
    (tmp_path / "graph.json").write_text("{not json")
    with pytest.raises(UserError, match="not a readable"):
        export.load_circuit(tmp_path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    c = make_circuit("none")
    export.save_circuit(c, d)
    return c, d


@pytest.mark.parametrize("fmt", ["graphml", "dot", "json", "circuit-tracer"])
def test_cli_export_writes_format(saved, tmp_path, fmt, capsys):
    c, d = saved
    suffix = {"circuit-tracer": "circuit-tracer.json"}.get(fmt, fmt)
    out = tmp_path / f"out.{suffix}"
    assert main(["export", str(d), "--format", fmt, "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    if fmt == "graphml":
        _assert_same_graph(c.graph, export.read_graphml(out))
    elif fmt == "dot":  # (pydot parsing is tested above; it is slow)
        text = out.read_text()
        assert text.startswith("digraph circuit {") and text.count(" -> ") == c.n_edges
    elif fmt == "json":
        _assert_same_graph(c.graph, export.from_node_link(json.loads(out.read_text())))
    else:
        assert len(json.loads(out.read_text())["links"]) == c.n_edges


def test_cli_export_default_path_and_pictures(saved, tmp_path, capsys):
    c, d = saved
    assert main(["export", str(d), "--format", "json", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "graph.json").exists()
    for fmt in ("png", "svg"):
        out = tmp_path / f"pic.v2.{fmt}"
        assert main(["export", str(d), "-f", fmt, "-o", str(out), "--max-nodes", "30"]) == 0
        assert out.exists() and out.stat().st_size > 1000
    assert (tmp_path / "pic.v2.png").read_bytes()[:4] == b"\x89PNG"
    assert "<svg" in (tmp_path / "pic.v2.svg").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--format", "gexf"], "unknown format 'gexf'"),
    (["--format", "png", "--out", "x.pdf"], "must end in .png"),
    (["--format", "json", "--graphviz"], "--graphviz only applies"),
])
def test_cli_export_user_errors(saved, argv, message, capsys):
    _, d = saved
    assert main(["export", str(d), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0


def test_cli_export_missing_folder(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--format", "json"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_draw_writes_png_and_svg(tmp_path):
    c = make_circuit("none")
    paths = draw_circuit(c, tmp_path / "circuit")
    assert [p.name for p in paths] == ["circuit.png", "circuit.svg"]
    assert paths[0].read_bytes()[:4] == b"\x89PNG" and "<svg" in paths[1].read_text()


def test_draw_layout_and_cap():
    c = make_circuit("sum")
    xy, grid = circuit_layout(c)
    g = c.graph
    # bottom to top: embed < attn_l < mlp_l < resid_l < attn_{l+1} ... < metric
    rows = {d["site"]: xy[n][1] for n, d in g.nodes(data=True)}
    order = ["embed", "attn_0", "mlp_0", "resid_0", "attn_1", "mlp_1", "resid_1", METRIC]
    present = [s for s in order if s in rows]
    assert [rows[s] for s in present] == sorted(rows[s] for s in present)
    assert xy[METRIC][1] == max(y for _, y in xy.values())
    assert "showing the 5 nodes" in _title(c, 5)
    assert "showing" not in _title(c, c.n_nodes)
    assert "sva-simple" in _title(c, c.n_nodes) and "RelP" in _title(c, c.n_nodes)


def test_empty_circuit_exports_and_draws(tmp_path):
    c = make_circuit("sum")
    c.graph.remove_nodes_from([n for n in list(c.graph) if n != METRIC])
    s = export.save_circuit(c, tmp_path, formats=("graphml", "dot", "json", "circuit-tracer", "effects", "summary",
                                                    "png"))
    assert s["n_nodes"] == 0 and s["n_edges"] == 0
    assert (tmp_path / "circuit.png").exists()
    assert export.circuit_diff(c, export.load_circuit(tmp_path)) == []
