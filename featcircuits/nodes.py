"""Nodes: one value type for "features + error at a site" and one space of all nodes.

``Act(f, err)`` holds one site's features and error term; what they are depends on the
stage: activations (``f`` [b, T, d_sae], ``err`` [b, T, d_model]), gradients of the metric
(same shapes), node effects (``f`` [T, d_sae] or [d_sae], ``err`` [T] or []), masks of the
nodes in a circuit (the same shapes, bool) or ablation values. ``Acts`` maps site names to
``Act`` in forward site order. ``Act`` has the arithmetic the stages need (``+ - * /``,
``~ & |``, ``abs``, ``sum``, ``map``, ``to``) so a stage writes ``(patch - clean).effect(grad)``
instead of handling two tensors (as Sparse Feature Circuits' ``SparseAct`` does).

A *node* is one feature or the error of a site, at one position or summed over positions.
Node ids (``resid_5/1234``, ``resid_5/err``, ``resid_5/1234@7``, ``metric``) are written and
read only here (``node_id``, ``parse_node_id``). ``NodeSpace`` flattens ``Acts`` to one
vector and back and selects nodes (absolute threshold, top-k, cumulative share, random),
returning masks of the same type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

METRIC = "metric"
ERROR = -1  # the ``index`` of a site's error node
SUMMED = -1  # the ``position`` of a node summed over positions


def _binary(op: Callable) -> Callable:
    """An operator of ``Act``: ``op`` on both parts, the other operand an ``Act`` or a scalar/tensor."""
    def method(self: "Act", other: Any) -> "Act":
        if isinstance(other, Act):
            return Act(op(self.f, other.f), op(self.err, other.err))
        return Act(op(self.f, other), op(self.err, other))
    return method


@dataclass
class Act:
    """Features ``f`` and error ``err`` of one site (see the module docstring for shapes)."""

    f: torch.Tensor
    err: torch.Tensor

    # arithmetic: elementwise on both parts
    __add__ = _binary(torch.add)
    __sub__ = _binary(torch.sub)
    __mul__ = _binary(torch.mul)
    __truediv__ = _binary(torch.div)
    __and__ = _binary(torch.logical_and)
    __or__ = _binary(torch.logical_or)

    def __invert__(self) -> "Act":
        return Act(~self.f, ~self.err)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.f, self.err))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Act":
        """``fn`` applied to both parts."""
        return Act(fn(self.f), fn(self.err))

    def abs(self) -> "Act":
        return self.map(torch.abs)

    def sum(self, dim: int | tuple[int, ...]) -> "Act":
        """Sum over leading dimensions (examples, positions), which both parts share."""
        return self.map(lambda t: t.sum(dim))

    def to(self, dtype: torch.dtype) -> "Act":
        return self.map(lambda t: t.to(dtype))

    def detach(self) -> "Act":
        return self.map(torch.Tensor.detach)

    def clone(self) -> "Act":
        return self.map(torch.Tensor.clone)

    def effect(self, grad: "Act") -> "Act":
        """Node effects of this change (``a_p - a_c``) with gradient ``grad``: features
        elementwise, the error node the dot product over d_model (DESIGN.md)."""
        return Act(self.f * grad.f, (self.err * grad.err).sum(-1))

    def count(self) -> int:
        """Selected nodes of a mask."""
        return int(self.f.sum()) + int(self.err.sum())

    def nodes(self) -> list[tuple[int, int]]:
        """The (index, position) pairs a mask selects; index ``ERROR`` = the error node,
        position ``SUMMED`` when the mask has no position axis. Features first, then errors."""
        f, e = self.f, self.err
        if f.ndim == 1:
            out = [(int(i), SUMMED) for i in torch.nonzero(f).flatten()]
            return out + [(ERROR, SUMMED)] if bool(e) else out
        out = [(int(i), int(t)) for t, i in torch.nonzero(f).tolist()]
        return out + [(ERROR, int(t)) for t in torch.nonzero(e).flatten()]

    def value(self, index: int, position: int) -> float:
        """The entry of one node (``index``/``position`` as in ``nodes``)."""
        if index == ERROR:
            v = self.err if position == SUMMED else self.err[position]
        else:
            v = self.f[index] if position == SUMMED else self.f[position, index]
        return float(v)


Acts = dict[str, Act]


def acts_map(fn: Callable[[Act], Act], acts: Acts) -> Acts:
    """``fn`` applied to every site's value."""
    return {s: fn(v) for s, v in acts.items()}


def count_nodes(masks: Acts) -> int:
    """Nodes selected by a set of site masks."""
    return sum(m.count() for m in masks.values())


def pack(features: dict[str, torch.Tensor], errors: dict[str, torch.Tensor]) -> Acts:
    """``Acts`` from a features and an errors dict (the layout of the effects file)."""
    return {s: Act(features[s], errors[s]) for s in features}


# ------------------------------------------------------------------------- node ids

def node_id(site: str, index: int, position: int | None = None) -> str:
    """``resid_5/1234``, ``resid_5/err`` (index -1), ``resid_5/1234@7`` (position 7)."""
    base = f"{site}/{'err' if index < 0 else index}"
    return base if position is None or position < 0 else f"{base}@{position}"


def parse_node_id(nid: str) -> tuple[str, int, int]:
    """``"resid_5/12@3"`` -> ("resid_5", 12, 3); error index -1; no position -1."""
    site, _, rest = nid.partition("/")
    idx, _, pos = rest.partition("@")
    return site, (ERROR if idx == "err" else int(idx)), (int(pos) if pos else SUMMED)


# ------------------------------------------------------------------------- the node space

class NodeSpace:
    """Every node of some sites, flattened to one vector in site order.

    ``layout="blocks"``: per site all features (row-major) then all errors;
    ``layout="interleaved"``: per site and position the features then the error (the error
    is the last column of a [.., d_sae + 1] block). Both are kept because selections that
    break ties or draw at random by flat index (graph and curves: blocks; agreement:
    interleaved) must keep giving the same nodes.
    """

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], layout: str = "blocks"):
        if layout not in ("blocks", "interleaved"):
            raise ValueError(f"layout must be 'blocks' or 'interleaved', got {layout!r}")
        self.shapes = dict(shapes)
        self.layout = layout
        self.offset: dict[str, int] = {}
        n = 0
        for s, (sf, se) in self.shapes.items():
            self.offset[s] = n
            n += math.prod(sf) + math.prod(se)
        self.size = n

    @classmethod
    def of(cls, acts: Acts, layout: str = "blocks") -> "NodeSpace":
        """The space of the nodes of ``acts`` (its sites, in its order, its shapes)."""
        return cls({s: (tuple(v.f.shape), tuple(v.err.shape)) for s, v in acts.items()}, layout)

    @property
    def sites(self) -> list[str]:
        return list(self.shapes)

    def site_range(self, site: str) -> tuple[int, int]:
        sf, se = self.shapes[site]
        start = self.offset[site]
        return start, start + math.prod(sf) + math.prod(se)

    def site_mask(self, sites: Iterable[str]) -> torch.Tensor:
        """Flat bool vector: True at the nodes of ``sites``."""
        out = torch.zeros(self.size, dtype=torch.bool)
        for s in sites:
            a, b = self.site_range(s)
            out[a:b] = True
        return out

    def flatten(self, acts: Acts) -> torch.Tensor:
        parts = []
        for s in self.shapes:
            v = acts[s]
            if self.layout == "blocks":
                parts += [v.f.flatten(), v.err.flatten()]
            else:
                parts.append(torch.cat([v.f, v.err.unsqueeze(-1)], -1).flatten())
        return torch.cat(parts)

    def unflatten(self, flat: torch.Tensor) -> Acts:
        out: Acts = {}
        for s, (sf, se) in self.shapes.items():
            a, b = self.site_range(s)
            part = flat[a:b]
            if self.layout == "blocks":
                nf = math.prod(sf)
                out[s] = Act(part[:nf].view(sf), part[nf:].view(se))
            else:
                block = part.view(*se, sf[-1] + 1)
                out[s] = Act(block[..., :-1], block[..., -1])
        return out

    def locate(self, i: int) -> tuple[str, int, int]:
        """(site, index, position) of flat index ``i`` (position ``SUMMED`` without positions)."""
        for s, (sf, se) in self.shapes.items():
            a, b = self.site_range(s)
            if not a <= i < b:
                continue
            local = i - a
            if self.layout == "interleaved":
                w = sf[-1] + 1
                pos, j = divmod(local, w) if se else (SUMMED, local)
                return s, (ERROR if j == w - 1 else j), pos
            nf = math.prod(sf)
            if local < nf:
                return (s, local, SUMMED) if len(sf) == 1 else (s, local % sf[-1], local // sf[-1])
            return s, ERROR, (local - nf if se else SUMMED)
        raise IndexError(i)

    def empty(self) -> Acts:
        """A mask with no node selected."""
        return self.unflatten(torch.zeros(self.size, dtype=torch.bool))

    def from_nodes(self, nodes: Iterable[tuple[str, int, int]]) -> Acts:
        """The mask of the given (site, index, position) nodes (position -1: no position axis)."""
        masks = self.empty()
        for site, index, position in nodes:
            m = masks[site]
            if index == ERROR:
                if position == SUMMED:
                    m.err.fill_(True)
                else:
                    m.err[position] = True
            elif position == SUMMED:
                m.f[index] = True
            else:
                m.f[position, index] = True
        return masks

    # -- selections: each returns a flat bool vector (``keep``), ``unflatten`` makes masks
    @staticmethod
    def absolute(scores: torch.Tensor, threshold: float) -> torch.Tensor:
        """Nodes whose score exceeds ``threshold``."""
        return scores > threshold

    @staticmethod
    def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k`` nodes of largest finite score (ties broken by ``torch.topk``, deterministic)."""
        keep = torch.zeros(scores.numel(), dtype=torch.bool)
        k = min(k, int(torch.isfinite(scores).sum()))
        if k > 0:
            keep[scores.topk(k).indices] = True
        return keep

    @staticmethod
    def share(scores: torch.Tensor, share: float) -> torch.Tensor:
        """The fewest nodes whose scores add up to ``share`` of the total (circuit-tracer's way)."""
        order = scores.argsort(descending=True)
        cum = scores[order].cumsum(0)
        total = cum[-1] if cum.numel() else torch.tensor(0.0)
        n_keep = int((cum < share * total).sum()) + 1
        keep = torch.zeros(scores.numel(), dtype=torch.bool)
        keep[order[:n_keep]] = True
        return keep

    @staticmethod
    def random(scores: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        """``k`` nodes of finite score drawn uniformly without replacement."""
        cand = torch.nonzero(torch.isfinite(scores)).flatten()
        keep = torch.zeros(scores.numel(), dtype=torch.bool)
        k = min(k, cand.numel())
        keep[cand[torch.randperm(cand.numel(), generator=generator)[:k]]] = True
        return keep
