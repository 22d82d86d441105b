"""networkx node-link JSON with a metadata block: what ``load_circuit`` reads."""

from __future__ import annotations

from pathlib import Path

import networkx as nx

from ..graph import Circuit
from ..io import write_json
from .common import JSON_FORMAT_VERSION, _jsonable


# --------------------------------------------------------------------------- node-link JSON

def to_node_link(circuit: Circuit) -> dict:
    """networkx node-link data plus a ``metadata`` block, readable by every networkx reader:
    the edges under both ``edges`` (``node_link_graph``'s default since networkx 3.4) and
    ``links`` (its ``edges="links"`` and older versions), and the metadata also in ``graph``
    (which ``node_link_graph`` keeps as ``G.graph["metadata"]``)."""
    data = nx.node_link_data(circuit.graph, edges="edges")
    data["links"] = data["edges"]
    meta = {
        "format": JSON_FORMAT_VERSION,
        "provenance": _jsonable(circuit.provenance),
        "n_nodes": circuit.n_nodes,
        "n_edges": circuit.n_edges,
        "sites": list(circuit.effects),
    }
    data["graph"] = {**data.get("graph", {}), "metadata": meta}
    data["metadata"] = meta
    return _jsonable(data)


def from_node_link(data: dict) -> nx.DiGraph:
    """The graph of a node-link dict (ours, or one with only ``links`` or only ``edges``)."""
    key = "edges" if "edges" in data else "links"
    body = {k: v for k, v in data.items() if k not in ("metadata", "links" if key == "edges" else "edges")}
    g = nx.DiGraph(nx.node_link_graph(body, directed=True, multigraph=False, edges=key))
    g.graph.pop("metadata", None)  # load_circuit reads it from the top-level block
    return g


def write_json_graph(circuit: Circuit, path: str | Path) -> Path:
    return write_json(path, to_node_link(circuit))
