"""GraphML: nodes and edges with typed attributes, the provenance as graph attributes."""

from __future__ import annotations

from pathlib import Path

import networkx as nx

from ..graph import Circuit
from ..io import atomic_write
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
        g.add_edge(str(u), str(v), **attrs)
    return g


def write_graphml(circuit: Circuit, path: str | Path) -> Path:
    g = to_graphml_graph(circuit)
    return atomic_write(path, lambda p: nx.write_graphml(g, str(p), infer_numeric_types=False))


def read_graphml(path: str | Path) -> nx.DiGraph:
    """Read a ``graph.graphml`` back (node ids are strings, attributes typed)."""
    g = nx.read_graphml(str(path))
    return nx.DiGraph(g)
