"""Exports as real clients read them: networkx's node-link reader with its current defaults
and with ``edges="links"``, igraph's and graph-tool's GraphML readers (graph-level data
before the edges; graph-tool is not on PyPI, so its rule is checked on the XML), the GraphML
types Gephi's importer accepts, ``abs_weight``/``sign`` per edge, and DOT edges drawn visibly."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import networkx as nx
import pytest

from featcircuits import export
from test_export import make_circuit  # noqa: E402 (tests/ is on sys.path under pytest)

NS = "{http://graphml.graphdrawing.org/xmlns}"
#: Gephi's GraphML importer: key types it maps (others are skipped with a warning)
GEPHI_TYPES = {"boolean", "int", "long", "float", "double", "string"}


@pytest.fixture(params=["sum", "none"])
def circuit(request):
    return make_circuit(request.param)


def test_node_link_read_with_networkx_defaults_and_links(circuit, tmp_path):
    data = json.loads(export.write_json_graph(circuit, tmp_path / "graph.json").read_text())
    for kwargs in ({}, {"edges": "links"}):
        g = nx.node_link_graph(data, **kwargs)  # networkx 3.6 default: edges="edges"
        assert set(g.nodes) == set(circuit.graph.nodes)
        assert {(u, v) for u, v in g.edges} == set(circuit.graph.edges)
        assert g.graph["metadata"]["provenance"]["method"] == circuit.provenance["method"]
        assert g.graph["metadata"]["n_edges"] == circuit.n_edges
    # and load_circuit still reads it (metadata not duplicated into the graph attributes)
    back = export.from_node_link(data)
    assert "metadata" not in back.graph and set(back.edges) == set(circuit.graph.edges)


def test_graphml_graph_data_first_and_gephi_types(circuit, tmp_path):
    path = export.write_graphml(circuit, tmp_path / "graph.graphml")
    root = ET.parse(path).getroot()
    keys = {k.get("id"): k for k in root.iter(f"{NS}key")}
    assert {k.get("for") for k in keys.values()} <= {"node", "edge", "graph"}
    assert {k.get("attr.type") for k in keys.values() if k.get("for") != "graph"} <= GEPHI_TYPES
    graph = root.find(f"{NS}graph")
    tags = [c.tag[len(NS):] for c in graph]
    first_node = tags.index("node")
    assert tags[:first_node] and set(tags[:first_node]) == {"data"}  # graph data before nodes and edges
    assert "data" not in tags[first_node:]
    assert all(keys[c.get("key")].get("for") == "graph" for c in graph if c.tag == f"{NS}data")
    names = {k.get("attr.name"): k.get("for") for k in keys.values()}
    assert names["abs_weight"] == "edge" and names["sign"] == "edge"
    g = nx.read_graphml(path)
    for u, v, d in circuit.graph.edges(data="weight"):
        e = g.edges[u, v]
        assert e["abs_weight"] == abs(d) >= 0 and e["sign"] == (1 if d > 0 else -1 if d < 0 else 0)


def test_graphml_read_by_igraph(circuit, tmp_path):
    igraph = pytest.importorskip("igraph")
    path = export.write_graphml(circuit, tmp_path / "graph.graphml")
    g = igraph.Graph.Read_GraphML(str(path))
    assert g.is_directed() and g.vcount() == circuit.graph.number_of_nodes() and g.ecount() == circuit.n_edges
    assert g["provenance.method"] == "relp" and g["format"] == export.JSON_FORMAT_VERSION  # graph attributes
    assert min(g.es["abs_weight"]) >= 0 and set(g.es["sign"]) <= {-1, 0, 1}


def test_dot_edges_visible(circuit):
    dot = export.to_dot(circuit)
    alphas = [int(a, 16) for a in re.findall(r'color="#[0-9a-f]{6}([0-9a-f]{2})"', dot)]
    assert len(alphas) == circuit.n_edges and min(alphas) >= 0x60


def test_picture_names_features_by_label_with_text_in_svg(tmp_path):
    c = make_circuit("none")
    for n, d in c.graph.nodes(data=True):
        if d["kind"] == "error":
            d["effect"] = 100.0 * (1 if d["effect"] >= 0 else -1)  # error nodes far larger than features
        elif d["kind"] in ("feature", "embed"):
            d["label"] = f"plural nouns {n} → are|were|have many more words"
    from featcircuits.draw import MAX_LABEL, draw_circuit

    (svg,) = draw_circuit(c, tmp_path / "circuit", formats=("svg",), n_labels=5)
    text = svg.read_text()
    assert "<text" in text  # svg.fonttype none: text, not glyph paths
    shown = re.findall(r"plural nouns [^<]*", text)
    assert len(shown) == 5 and all(len(t.strip()) <= MAX_LABEL for t in shown)  # features named, not errors
    assert "sva-simple" in text and "feature effect" in text and "error-node effect" in text


def test_picture_leaves_out_label_tokens_its_font_cannot_draw(tmp_path):
    """Output tokens in scripts the picture's font lacks (Hangul here) are left out of the drawn
    label instead of showing as boxes; tokens it can draw stay."""
    from featcircuits.draw import _font_chars, draw_circuit

    assert ord("그") not in _font_chars()  # matplotlib's bundled DejaVu Sans has no Hangul
    c = make_circuit("sum")
    for n, d in c.graph.nodes(data=True):
        if d["kind"] in ("feature", "embed"):
            d["label"] = "her|Alice → she|그녀|herself"
    (svg,) = draw_circuit(c, tmp_path / "circuit", formats=("svg",), n_labels=3)
    text = svg.read_text()
    assert "she|herself" in text and "그" not in text
