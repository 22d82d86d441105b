"""The circuit: thresholding node and edge effects into a ``networkx.DiGraph``.

Node ids: ``resid_5/1234`` (feature 1234 at resid_5), ``resid_5/err`` (the error node),
``resid_5/1234@7`` at position 7 when aggregation is ``none``, and the sink ``metric``.
Node attributes: ``site``, ``layer``, ``kind`` (feature | error | embed | metric),
``feature`` (-1 for error nodes), ``position`` (-1 when summed over positions), ``effect``,
optional ``label``. Edge attribute: ``weight``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

import networkx as nx
import torch

from .adapters import site_kind, site_layer
from .errors import UserError

METRIC = "metric"


class SiteMask(NamedTuple):
    """Which nodes of one site are in a circuit: features [d_sae] or [T, d_sae], error [] or [T]."""

    features: torch.Tensor
    error: torch.Tensor


def node_id(site: str, index: int, position: int | None = None) -> str:
    base = f"{site}/{'err' if index < 0 else index}"
    return base if position is None or position < 0 else f"{base}@{position}"


def parse_node_id(nid: str) -> tuple[str, int, int]:
    """``"resid_5/12@3"`` -> ("resid_5", 12, 3); error index -1; no position -1."""
    site, _, rest = nid.partition("/")
    idx, _, pos = rest.partition("@")
    return site, (-1 if idx == "err" else int(idx)), (int(pos) if pos else -1)


@dataclass
class Thresholds:
    """How nodes and edges are kept. Any combination; a node must pass every one given.

    ``node``/``edge``: absolute thresholds on |effect| (the SFC way); ``top_k``: the k nodes
    of largest |effect|; ``share``: the fewest nodes whose |effect| adds up to this share of
    the total (the circuit-tracer way)."""

    node: float | None = None
    edge: float | None = None
    top_k: int | None = None
    share: float | None = None

    def validate(self) -> "Thresholds":
        for name in ("node", "edge"):
            v = getattr(self, name)
            if v is not None and (v < 0 or v != v):
                raise UserError(f"--{name}-threshold must be a non-negative number, got {v}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k must be at least 1, got {self.top_k}")
        if self.share is not None and not 0 < self.share <= 1:
            raise UserError(f"--share must be in (0, 1], got {self.share}")
        return self

    def as_dict(self) -> dict:
        return {"node": self.node, "edge": self.edge, "top_k": self.top_k, "share": self.share}


def _flat(feats: dict[str, torch.Tensor], errs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[tuple[str, str, int]]]:
    """All node effects in one vector, with (site, 'f'|'e', offset) spans to map back."""
    parts, spans = [], []
    for site in feats:
        parts += [feats[site].flatten(), errs[site].flatten()]
        spans += [(site, "f", feats[site].numel()), (site, "e", errs[site].numel())]
    return torch.cat(parts), spans


def select_nodes(feats: dict[str, torch.Tensor], errs: dict[str, torch.Tensor],
                 thresholds: Thresholds) -> dict[str, SiteMask]:
    """Masks of the nodes that pass the node thresholds (absolute, top-k, cumulative share)."""
    thresholds.validate()
    values, spans = _flat(feats, errs)
    score = values.abs()
    keep = torch.ones_like(score, dtype=torch.bool)
    if thresholds.node is not None:
        keep &= score > thresholds.node
    if thresholds.top_k is not None:
        k = min(thresholds.top_k, score.numel())
        top = torch.zeros_like(keep)
        top[score.topk(k).indices] = True
        keep &= top
    if thresholds.share is not None:
        order = score.argsort(descending=True)
        cum = score[order].cumsum(0)
        total = cum[-1] if cum.numel() else torch.tensor(0.0)
        n_keep = int((cum < thresholds.share * total).sum()) + 1
        share = torch.zeros_like(keep)
        share[order[:n_keep]] = True
        keep &= share
    if thresholds.node is None and thresholds.top_k is None and thresholds.share is None:
        keep &= score > 0
    masks: dict[str, SiteMask] = {}
    offset = 0
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for site, part, size in spans:
        shape = feats[site].shape if part == "f" else errs[site].shape
        pending.setdefault(site, {})[part] = keep[offset:offset + size].view(shape)
        offset += size
    for site, parts in pending.items():
        masks[site] = SiteMask(parts["f"], parts["e"])
    return masks


def mask_nodes(mask: SiteMask) -> list[tuple[int, int]]:
    """The (index, position) pairs a site mask selects; index -1 = error, position -1 = summed."""
    out = []
    f, e = mask.features, mask.error
    if f.ndim == 1:
        out += [(int(i), -1) for i in torch.nonzero(f).flatten()]
        if bool(e):
            out.append((-1, -1))
    else:
        out += [(int(i), int(t)) for t, i in torch.nonzero(f).tolist()]
        out += [(-1, int(t)) for t in torch.nonzero(e).flatten()]
    return out


def count_nodes(masks: dict[str, SiteMask]) -> int:
    return sum(int(m.features.sum()) + int(m.error.sum()) for m in masks.values())


def _effect(feats: dict, errs: dict, site: str, index: int, position: int) -> float:
    if index < 0:
        v = errs[site] if position < 0 else errs[site][position]
    else:
        v = feats[site][index] if position < 0 else feats[site][position, index]
    return float(v)


def build_graph(
    feats: dict[str, torch.Tensor],
    errs: dict[str, torch.Tensor],
    masks: dict[str, SiteMask],
    edges: Iterable[tuple[str, str, float]] = (),
    last_resid: str | None = None,
    edge_threshold: float | None = None,
    labels: dict[str, str] | None = None,
    prune: bool = True,
) -> nx.DiGraph:
    """A DiGraph of the selected nodes, the edges between them whose |weight| passes
    ``edge_threshold``, and the sink ``metric`` fed by the nodes of ``last_resid`` (edge
    weight = their node effect). With ``prune``, nodes without a path to the metric go."""
    g = nx.DiGraph()
    g.add_node(METRIC, site=METRIC, layer=_metric_layer(masks), kind="metric", feature=-1, position=-1, effect=0.0, label="metric")
    for site, mask in masks.items():
        kind_site = site_kind(site)
        for index, position in mask_nodes(mask):
            nid = node_id(site, index, position)
            kind = "error" if index < 0 else ("embed" if kind_site == "embed" else "feature")
            attrs = dict(site=site, layer=site_layer(site), kind=kind, feature=index, position=position,
                         effect=_effect(feats, errs, site, index, position))
            if labels and nid in labels:
                attrs["label"] = labels[nid]
            g.add_node(nid, **attrs)
            if site == last_resid:
                g.add_edge(nid, METRIC, weight=attrs["effect"])
    for u, d, w in edges:
        if u in g and d in g and (edge_threshold is None or abs(w) > edge_threshold):
            g.add_edge(u, d, weight=float(w))
    if prune:
        prune_graph(g)
    return g


def _metric_layer(masks: dict[str, SiteMask]) -> int:
    """The metric sits one layer above the last layer of the sites."""
    return max((site_layer(s) for s in masks), default=-1) + 1


def prune_graph(g: nx.DiGraph) -> nx.DiGraph:
    """Remove nodes with no path to the metric (in place)."""
    if METRIC not in g:
        return g
    reach = nx.ancestors(g, METRIC) | {METRIC}
    g.remove_nodes_from([n for n in list(g) if n not in reach])
    return g


def graph_masks(g: nx.DiGraph, feats: dict[str, torch.Tensor], errs: dict[str, torch.Tensor]) -> dict[str, SiteMask]:
    """Site masks (same shapes as the effects) of the nodes present in ``g``."""
    masks = {s: SiteMask(torch.zeros_like(feats[s], dtype=torch.bool), torch.zeros_like(errs[s], dtype=torch.bool))
             for s in feats}
    for nid, data in g.nodes(data=True):
        if data.get("kind") == "metric":
            continue
        site, index, position = data["site"], int(data["feature"]), int(data["position"])
        m = masks[site]
        if index < 0:
            if position < 0:
                m.error.fill_(True)
            else:
                m.error[position] = True
        elif position < 0:
            m.features[index] = True
        else:
            m.features[position, index] = True
    return masks


@dataclass
class Circuit:
    """A circuit graph with the dense node effects it was cut from and its provenance.

    ``features[site]`` / ``errors[site]``: aggregated node effects ([d_sae] and [] for
    aggregation ``sum``; [T, d_sae] and [T] for ``none``). ``provenance``: model,
    dictionaries, task, method, thresholds, aggregation, seed, versions, timings.
    """

    graph: nx.DiGraph
    features: dict[str, torch.Tensor]
    errors: dict[str, torch.Tensor]
    provenance: dict = field(default_factory=dict)

    @property
    def n_nodes(self) -> int:
        return sum(1 for _, d in self.graph.nodes(data=True) if d.get("kind") != "metric")

    @property
    def n_edges(self) -> int:
        return self.graph.number_of_edges()

    def masks(self) -> dict[str, SiteMask]:
        """Which nodes of each site are in the circuit (for evaluation / ablation)."""
        return graph_masks(self.graph, self.features, self.errors)

    def top_nodes(self, k: int = 10) -> list[tuple[str, float]]:
        nodes = [(n, d["effect"]) for n, d in self.graph.nodes(data=True) if d.get("kind") != "metric"]
        return sorted(nodes, key=lambda t: -abs(t[1]))[:k]
