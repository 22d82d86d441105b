"""Comparing two circuits (tests and debugging)."""

from __future__ import annotations

import math

import torch

from ..graph import Circuit
from .common import _jsonable, _plain


def circuits_equal(a: Circuit, b: Circuit, atol: float = 0.0) -> bool:
    """Same nodes, edges, attributes, dense effects and (JSON-normalised) provenance."""
    return not circuit_diff(a, b, atol=atol)


def circuit_diff(a: Circuit, b: Circuit, atol: float = 0.0) -> list[str]:
    """What differs between two circuits (empty when equal); for tests and debugging."""
    diffs = []
    ga, gb = a.graph, b.graph
    if set(ga.nodes) != set(gb.nodes):
        diffs.append(f"nodes differ: {sorted(set(ga.nodes) ^ set(gb.nodes))[:10]}")
    if set(ga.edges) != set(gb.edges):
        diffs.append(f"edges differ: {sorted(set(ga.edges) ^ set(gb.edges))[:10]}")
    for n in set(ga.nodes) & set(gb.nodes):
        if not _attrs_close(ga.nodes[n], gb.nodes[n], atol):
            diffs.append(f"node {n}: {ga.nodes[n]} != {gb.nodes[n]}")
    for e in set(ga.edges) & set(gb.edges):
        if not _attrs_close(ga.edges[e], gb.edges[e], atol):
            diffs.append(f"edge {e}: {ga.edges[e]} != {gb.edges[e]}")
    for name, part in (("features", "f"), ("errors", "err")):
        da = {s: getattr(v, part) for s, v in a.effects.items()}
        db = {s: getattr(v, part) for s, v in b.effects.items()}
        if list(da) != list(db):
            diffs.append(f"{name} sites differ: {list(da)} != {list(db)}")
        for s in set(da) & set(db):
            if da[s].shape != db[s].shape or da[s].dtype != db[s].dtype or \
                    not torch.allclose(da[s], db[s], atol=atol, rtol=0):
                diffs.append(f"{name}[{s}] differs")
    if _jsonable(a.provenance) != _jsonable(b.provenance):
        diffs.append("provenance differs")
    return diffs


def _attrs_close(x: dict, y: dict, atol: float) -> bool:
    x = {k: _plain(v) for k, v in x.items() if _plain(v) is not None}
    y = {k: _plain(v) for k, v in y.items() if _plain(v) is not None}
    if set(x) != set(y):
        return False
    for k in x:
        vx, vy = x[k], y[k]
        if isinstance(vx, float) or isinstance(vy, float):
            if not (isinstance(vx, (int, float)) and isinstance(vy, (int, float))):
                return False
            if not (math.isclose(vx, vy, abs_tol=atol, rel_tol=0) or (math.isnan(vx) and math.isnan(vy))):
                return False
        elif vx != vy or type(vx) is not type(vy):
            return False
    return True
