"""networkx node-link JSON with a metadata block: what ``load_circuit`` reads."""

from __future__ import annotations

from pathlib import Path

import networkx as nx

from ..graph import Circuit
from ..io import write_json
from .common import JSON_FORMAT_VERSION, _jsonable


# --------------------------------------------------------------------------- node-link JSON

def to_node_link(circuit: Circuit) -> dict:
    """networkx node-link data (``nodes``, ``links``) plus a ``metadata`` block."""
    data = nx.node_link_data(circuit.graph, edges="links")
    data["metadata"] = {
        "format": JSON_FORMAT_VERSION,
        "provenance": _jsonable(circuit.provenance),
        "n_nodes": circuit.n_nodes,
        "n_edges": circuit.n_edges,
        "sites": list(circuit.effects),
    }
    return _jsonable(data)


def from_node_link(data: dict) -> nx.DiGraph:
    g = nx.node_link_graph({k: v for k, v in data.items() if k != "metadata"}, directed=True,
                           multigraph=False, edges="links")
    return nx.DiGraph(g)


def write_json_graph(circuit: Circuit, path: str | Path) -> Path:
    return write_json(path, to_node_link(circuit))
