"""How two circuits of the same task relate (``discover --compare``): the nodes they share
and how their node effects correlate over every node, kept or not."""

from __future__ import annotations

import math

from .agreement import pearson
from .graph import Circuit
from .nodes import METRIC, NodeSpace


def compare_circuits(a: Circuit, b: Circuit) -> dict:
    """``nodes_a``, ``nodes_b``, ``nodes_shared``, ``jaccard`` (shared / union of the kept
    nodes) and ``pearson_effects``: Pearson r of the two methods' node effects over *all*
    nodes of the dense effects (None where either is constant, or the node spaces differ)."""
    na = {n for n in a.graph if n != METRIC}
    nb = {n for n in b.graph if n != METRIC}
    shared = na & nb
    union = na | nb
    r = None
    if a.effects and b.effects:
        sa, sb = NodeSpace.of(a.effects), NodeSpace.of(b.effects)
        va, vb = sa.flatten(a.effects), sb.flatten(b.effects)
        if va.shape == vb.shape:
            value = pearson(va, vb)
            r = None if math.isnan(value) else round(value, 6)
    return {"nodes_a": len(na), "nodes_b": len(nb), "nodes_shared": len(shared),
            "jaccard": round(len(shared) / len(union), 6) if union else None, "pearson_effects": r}
