"""GraphML: nodes and edges with typed attributes, the provenance as graph attributes.

Gephi's importer (``ImporterGraphML``) skips keys declared ``for="graph"``, logging an issue
per key, and never reads graph-level ``data``: in Gephi the provenance is absent (the README
says so; summary.json and graph.json hold it). Node and edge keys use only the types it maps.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx

from ..graph import Circuit
from ..io import write_text
from .common import JSON_FORMAT_VERSION, _flatten, _jsonable, _plain, _scalar_for_graphml, _typed_node_attrs


# --------------------------------------------------------------------------- GraphML

def to_graphml_graph(circuit: Circuit) -> nx.DiGraph:
    """A copy of the circuit graph that ``networkx.write_graphml`` can write losslessly:
    typed node/edge attributes, None values left out, provenance as graph attributes."""
    g = nx.DiGraph()
    g.graph.update(_flatten(_jsonable(circuit.provenance), "provenance"))
    g.graph["format"] = JSON_FORMAT_VERSION
    for n, data in circuit.graph.nodes(data=True):
        g.add_node(str(n), **{k: _scalar_for_graphml(v) for k, v in _typed_node_attrs(data).items()})
    for u, v, data in circuit.graph.edges(data=True):
        attrs = {k: _scalar_for_graphml(x) for k, x in data.items() if _plain(x) is not None}
        if "weight" in attrs:
            attrs["weight"] = float(attrs["weight"])
            # for tools that reject negative weights (Gephi warns, layouts need w >= 0)
            attrs["abs_weight"] = abs(attrs["weight"])
            attrs["sign"] = 1 if attrs["weight"] > 0 else -1 if attrs["weight"] < 0 else 0
        g.add_edge(str(u), str(v), **attrs)
    return g


def graphml_text(circuit: Circuit) -> str:
    """The GraphML document, with the graph's own ``<data>`` before its nodes and edges.

    networkx writes graph data after the edges; graph-tool then files those keys as
    properties of the last edge. Moving them first is valid GraphML (the schema allows
    ``data`` anywhere in ``graph``) and what graph-tool and igraph read as graph attributes.
    """
    import io
    import xml.etree.ElementTree as ET

    ns = "http://graphml.graphdrawing.org/xmlns"
    ET.register_namespace("", ns)
    ET.register_namespace("xsi", "http://www.w3.org/2001/XMLSchema-instance")
    buf = io.BytesIO()
    nx.write_graphml(to_graphml_graph(circuit), buf, infer_numeric_types=False)
    root = ET.fromstring(buf.getvalue())
    graph = root.find(f"{{{ns}}}graph")
    data = [c for c in graph if c.tag == f"{{{ns}}}data"]
    for c in data:
        graph.remove(c)
    for i, c in enumerate(data):
        graph.insert(i, c)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_graphml(circuit: Circuit, path: str | Path) -> Path:
    text = graphml_text(circuit)
    return write_text(path, text)


def read_graphml(path: str | Path) -> nx.DiGraph:
    """Read a ``graph.graphml`` back (node ids are strings, attributes typed)."""
    g = nx.DiGraph(nx.read_graphml(str(path)))
    for _, _, d in g.edges(data=True):  # derived from weight on writing
        d.pop("abs_weight", None)
        d.pop("sign", None)
    return g
