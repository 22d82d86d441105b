"""The circuit: thresholding node and edge effects into a ``networkx.DiGraph``.

Node ids: ``resid_5/1234`` (feature 1234 at resid_5), ``resid_5/err`` (the error node),
``resid_5/1234@7`` at position 7 when aggregation is ``none``, and the sink ``metric``.
Node attributes: ``site``, ``layer``, ``kind`` (feature | error | embed | metric),
``feature`` (-1 for error nodes), ``position`` (-1 when summed over positions), ``effect``,
optional ``label``. Edge attribute: ``weight``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

import networkx as nx
import torch

from .adapters import site_kind, site_layer
from .errors import UserError
from .nodes import METRIC, Acts, NodeSpace, count_nodes, node_id, parse_node_id  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from .activation_sums import ActivationSums


DEFAULT_TOP_K = 100  # nodes kept when no threshold is given


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

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def with_default(cls, node: float | None = None, edge: float | None = None, top_k: int | None = None,
                     share: float | None = None) -> "Thresholds":
        """The thresholds given, with ``top_k=DEFAULT_TOP_K`` when no node rule is given (the CLI's way)."""
        if node is None and top_k is None and share is None:
            top_k = DEFAULT_TOP_K
        return cls(node=node, edge=edge, top_k=top_k, share=share)

    def validate(self) -> "Thresholds":
        """Checked once, when the thresholds are made (a clear error naming the flag)."""
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


def select_nodes(effects: Acts, thresholds: Thresholds) -> Acts:
    """Masks of the nodes that pass the node thresholds (absolute, top-k, cumulative share);
    ``thresholds`` must be validated (``Thresholds.validate``) by the caller."""
    space = NodeSpace.of(effects)
    score = space.flatten(effects).abs()
    keep = torch.ones_like(score, dtype=torch.bool)
    if thresholds.node is not None:
        keep &= NodeSpace.absolute(score, thresholds.node)
    if thresholds.top_k is not None:
        keep &= NodeSpace.top_k(score, thresholds.top_k)
    if thresholds.share is not None:
        keep &= NodeSpace.share(score, thresholds.share)
    keep &= score > 0  # a node of exactly zero effect is no part of any circuit (top-k would pad with them)
    return space.unflatten(keep)


def size_report(requested: int | None, available: int, selected: int, kept: int) -> dict:
    """Why a circuit has fewer nodes than ``--top-k`` asked for: ``zero_effect`` (nodes of zero
    effect among the top ``requested``), ``pruned`` (selected, but no path to the metric), and
    ``available`` (every node there is: ``requested`` may exceed it)."""
    top = min(requested, available) if requested else 0
    return {"requested": requested, "available": available, "zero_effect": max(0, top - selected),
            "pruned": selected - kept, "kept": kept}


def describe_size(report: dict) -> str | None:
    """``67 of 100 nodes: 20 had zero effect, 13 were pruned (no path to the metric)``, or None
    when the circuit has the nodes asked for."""
    if not report.get("requested") or report["kept"] >= report["requested"]:
        return None
    more = f"; there are only {report['available']} nodes" if report["available"] < report["requested"] else ""
    return (f"{report['kept']} of {report['requested']} nodes: {report['zero_effect']} had zero effect, "
            f"{report['pruned']} were pruned (no path to the metric){more}")


def build_graph(
    effects: Acts,
    masks: Acts,
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
    g.add_node(METRIC, site=METRIC, layer=_metric_layer(masks), kind="metric", feature=-1, position=-1, effect=0.0,
               label="metric")
    for site, mask in masks.items():
        kind_site = site_kind(site)
        for index, position in mask.nodes():
            nid = node_id(site, index, position)
            kind = "error" if index < 0 else ("embed" if kind_site == "embed" else "feature")
            attrs = dict(site=site, layer=site_layer(site), kind=kind, feature=index, position=position,
                         effect=effects[site].value(index, position))
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


def _metric_layer(masks: Acts) -> int:
    """The metric sits one layer above the last layer of the sites."""
    return max((site_layer(s) for s in masks), default=-1) + 1


def prune_graph(g: nx.DiGraph) -> nx.DiGraph:
    """Remove nodes with no path to the metric (in place)."""
    if METRIC not in g:
        return g
    reach = nx.ancestors(g, METRIC) | {METRIC}
    g.remove_nodes_from([n for n in list(g) if n not in reach])
    return g


def graph_nodes(g: nx.DiGraph) -> list[tuple[str, int, int]]:
    """(site, index, position) of every node of ``g`` but the metric."""
    return [(d["site"], int(d["feature"]), int(d["position"])) for _, d in g.nodes(data=True)
            if d.get("kind") != "metric"]


@dataclass
class Circuit:
    """A circuit graph with the dense node effects it was cut from and its provenance.

    ``effects[site]``: aggregated node effects (``f`` [d_sae] and ``err`` [] for aggregation
    ``sum``; [T, d_sae] and [T] for ``none``). ``provenance``: model, dictionaries, task,
    method, thresholds, aggregation, seed, versions, timings.
    """

    graph: nx.DiGraph
    effects: Acts
    provenance: dict = field(default_factory=dict)
    # the discovery pairs' activation sums from the attribution's forwards (node facts read
    # them instead of running the model again); not saved
    activations: "ActivationSums | None" = field(default=None, repr=False, compare=False)

    @property
    def n_nodes(self) -> int:
        return sum(1 for _, d in self.graph.nodes(data=True) if d.get("kind") != "metric")

    @property
    def n_edges(self) -> int:
        return self.graph.number_of_edges()

    def masks(self) -> Acts:
        """Which nodes of each site are in the circuit (for evaluation / ablation)."""
        return NodeSpace.of(self.effects).from_nodes(graph_nodes(self.graph))

    def __repr__(self) -> str:
        """One line: method, task, nodes, edges and the error nodes' share of |effect| in the circuit."""
        p = self.provenance or {}
        effects = [(d.get("kind"), abs(float(d.get("effect", 0.0)))) for _, d in self.graph.nodes(data=True)
                   if d.get("kind") != "metric"]
        total = sum(e for _, e in effects)
        share = f"{sum(e for k, e in effects if k == 'error') / total:.0%}" if total else "n/a"
        return (f"Circuit(method={p.get('method')!r}, task={p.get('task')!r}, nodes={self.n_nodes}, "
                f"edges={self.n_edges}, error share={share})")

    def top_nodes(self, k: int = 10) -> list[tuple[str, float]]:
        nodes = [(n, d["effect"]) for n, d in self.graph.nodes(data=True) if d.get("kind") != "metric"]
        return sorted(nodes, key=lambda t: -abs(t[1]))[:k]
