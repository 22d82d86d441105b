"""Edge effects between sites, direct paths only.

Edge ``u -> d`` = ``grad_d m . (dd/du) . (u_p - u_c)`` at the clean run, where every site
between ``u`` and ``d`` is held fixed. We get all direct Jacobians from *one* forward pass
in which every site's real output ``x_D`` is recorded (a function of the sites feeding it)
and then replaced, for everything downstream, by fresh gradient leaves built from its
detached value. So ``x_D`` depends only on the leaves of its direct upstream sites:

    sequential family: attn_l <- resid_{l-1};  mlp_l <- resid_{l-1}, attn_l;
                       resid_l <- resid_{l-1}, attn_l, mlp_l
    parallel family:   attn_l <- resid_{l-1};  mlp_l <- resid_{l-1};
                       resid_l <- resid_{l-1}, attn_l, mlp_l      (resid_{-1} = embed)

An attention site read at hook_z (``Site.reads``) is cut at ``o_proj``'s input: its leaves are
z features and the z error, ``o_proj`` (and Gemma's post-attention norm) lie on the direct path
from it to ``mlp_l`` and ``resid_l``, and its own value depends on ``resid_{l-1}`` through the
attention, so the same wiring holds with no special case.

For a downstream node ``j`` at ``D`` the scalar ``s_j = sum g_j * node_j(x_D)`` (``g`` the
metric's gradient at D, ``node_j`` = ``encode(x_D)_j`` or the error ``x_D - decode(encode(x_D))``)
is backpropagated to those leaves, and multiplied by ``u_p - u_c``. The reference does one
backward per downstream node (``batched=False``); the default stacks the downstream nodes'
vector-Jacobian products into one batched backward (``is_grads_batched``).

RelP edges run forward and backward under the LRP rules with RelP's ``g``; IG edges use the
IG mean gradient for ``g`` and plain Jacobians; AtP uses plain gradients throughout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

import torch
from tqdm.auto import tqdm

from . import distributed, lrp
from .checkpoint import PassCounter
from .adapters import Site
from .attribution import GRADIENT_METHODS, check_aggregation, check_method, site_gradients
from .devices import ACCUMULATE
from .nodes import Act, Acts, node_id
from .tasks import Batch
from .tracing import SplicedModel, grad_leaves

if TYPE_CHECKING:
    from .gradient_store import GradientStore
    from .checkpoint import Checkpoint


@dataclass
class EdgeEffects:
    """Dense edge weights into selected downstream nodes, mean over examples.

    ``weights[(U, D)]``: an ``Act`` (features, error) with shapes [K_D, d_U] and [K_D] (aggregation
    ``sum``) or [K_D, T, d_U] and [K_D, T] (``none``), K_D = the selected nodes of D in the
    order of ``downstream[D]`` (``(index, position)`` pairs, index -1 = error)."""

    downstream: dict[str, list[tuple[int, int]]]
    weights: dict[tuple[str, str], Act]
    aggregation: str
    n: int
    seconds: float = 0.0
    passes: dict = field(default_factory=dict)

    def edge_list(self, upstream_masks: Acts | None = None) -> list[tuple[str, str, float]]:
        """(u_id, d_id, weight) for every upstream node (or those in ``upstream_masks``)."""
        out = []
        for (u, d), (wf, we) in self.weights.items():
            keep = upstream_masks.get(u) if upstream_masks is not None else None
            ups = keep.nodes() if keep is not None else None
            for k, (index, position) in enumerate(self.downstream[d]):
                did = node_id(d, index, position)
                if ups is None:
                    if self.aggregation == "sum":
                        ups_k = [(i, -1) for i in range(wf.shape[-1])] + [(-1, -1)]
                    else:
                        T = wf.shape[1]
                        ups_k = [(i, t) for t in range(T) for i in range(wf.shape[-1])] + [(-1, t) for t in range(T)]
                else:
                    ups_k = ups
                for i, t in ups_k:
                    if i < 0:
                        w = we[k] if t < 0 else we[k, t]
                    else:
                        w = wf[k, i] if t < 0 else wf[k, t, i]
                    out.append((node_id(u, i, t), did, float(w)))
        return out


def node_scalars(d, x: torch.Tensor, g: Act, nodes: list[tuple[int, int]]) -> torch.Tensor:
    """s_k = sum over examples (and positions, for summed nodes) of g * node value: [K]."""
    f = d.encode(x)
    out = []
    feat_nodes = [(k, i, t) for k, (i, t) in enumerate(nodes) if i >= 0]
    err_nodes = [(k, t) for k, (i, t) in enumerate(nodes) if i < 0]
    s = torch.zeros(len(nodes), dtype=x.dtype, device=x.device)
    if feat_nodes:
        idx = torch.tensor([i for _, i, _ in feat_nodes], device=x.device)
        prod = g.f[..., idx] * f[..., idx]  # [b, T, k]
        pos = torch.tensor([t for _, _, t in feat_nodes], device=x.device)
        summed = prod.sum((0, 1))
        at_pos = prod.sum(0)[pos.clamp(min=0), torch.arange(len(feat_nodes), device=x.device)]
        vals = torch.where(pos < 0, summed, at_pos)
        s = s.index_put((torch.tensor([k for k, _, _ in feat_nodes], device=x.device),), vals.to(s.dtype))
    if err_nodes:
        err = x - d.decode(f)
        per_pos = (g.err * err).sum(-1).sum(0)  # [T]
        vals = torch.stack([per_pos.sum() if t < 0 else per_pos[t] for _, t in err_nodes])
        s = s.index_put((torch.tensor([k for k, _ in err_nodes], device=x.device),), vals.to(s.dtype))
    out.append(s)
    return out[0]


def edge_effects(
    sm: SplicedModel,
    batch: Batch,
    masks: Acts,
    method: str = "relp",
    *,
    steps: int = 10,
    rules: Iterable[str] | str | None = None,
    aggregation: str = "sum",
    batch_size: int = 16,
    batched: bool = True,
    chunk_nodes: int = 64,
    progress: bool = True,
    checkpoint: "Checkpoint | None" = None,
    gradients: "GradientStore | None" = None,
) -> EdgeEffects:
    """Edges into every selected downstream node from every node of its direct upstream sites.

    With a ``checkpoint`` the running sums are saved after every chunk of examples.
    ``gradients``: the ``GradientStore`` that ``node_effects`` filled for the same method,
    batch and batch size, so the metric's gradients are not computed twice (a chunk it does
    not hold is recomputed). The store is only read: it may serve several calls."""
    check_method(method, GRADIENT_METHODS)
    check_aggregation(aggregation)
    adapter = sm.adapter
    downstream = {s.name: masks[s.name].nodes() for s in sm.sites if s.name in masks}
    downstream = {s: nodes for s, nodes in downstream.items() if nodes and adapter.upstream(s)}
    rule_set = lrp.parse_rules(rules) if method == "relp" else frozenset()
    weights: dict[tuple[str, str], Act] = {}
    t0 = time.perf_counter()
    chunks = batch.chunks(batch_size)
    mine = distributed.shard(chunks)  # this rank's block (all chunks in one process)
    total = len(mine) * sum((len(v) + chunk_nodes - 1) // chunk_nodes if batched else len(v)
                              for v in downstream.values())
    done = 0
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        done, state = saved
        weights = {tuple(k.split("|")): Act(v["f"], v["e"]) for k, v in state["weights"].items()}
    passes = PassCounter(sm, state.get("passes") if saved is not None else None)
    per_chunk = total // max(len(mine), 1)
    bar = tqdm(total=total, desc=f"edges ({method}{'' if batched else ', one backward per node'})",
               disable=not progress, leave=False, initial=done * per_chunk)
    for k, (ci, chunk) in enumerate(mine[done:], start=done):
        sg = gradients.get(ci) if gradients is not None else None
        if sg is None:
            sg = site_gradients(sm, chunk, method, sm.sites, steps=steps, rules=rule_set)
        with lrp.lrp_rules(rule_set), lrp.replaying(sg.reference):
            real, leaves = cut_forward(sm, chunk)
            for d_site, nodes in downstream.items():
                ups = adapter.upstream(d_site)
                inputs = [t for u in ups for t in leaves[u]]
                deltas = [(sg.patch[u].to(ACCUMULATE) - sg.clean[u].to(ACCUMULATE)).map(lambda t: t.unsqueeze(0))
                          for u in ups]
                for start in range(0, len(nodes), chunk_nodes):
                    part = nodes[start:start + chunk_nodes]
                    s = node_scalars(sm.dictionary(d_site), real[d_site], sg.grads[d_site], part)
                    grads = vjps(sm, s, inputs, batched)
                    for ui, u in enumerate(ups):
                        # [K, b, T, d_U], [K, b, T, d_model] -> edge weights [K, b, T, d_U], [K, b, T]
                        w = Act(grads[2 * ui], grads[2 * ui + 1]).to(ACCUMULATE).effect(deltas[ui])
                        w = w.sum((1, 2)) if aggregation == "sum" else w.sum(1)
                        key = (u, d_site)
                        if key not in weights:
                            weights[key] = Act(torch.zeros(len(nodes), *w.f.shape[1:], device=w.f.device),
                                               torch.zeros(len(nodes), *w.err.shape[1:], device=w.f.device))
                        weights[key].f[start:start + len(part)] += w.f.detach()
                        weights[key].err[start:start + len(part)] += w.err.detach()
                    bar.update(1 if batched else len(part))
        if checkpoint is not None:
            checkpoint.save(k + 1, {"weights": {f"{u}|{d}": {"f": w.f, "e": w.err} for (u, d), w in weights.items()},
                                     "passes": passes.counts()})
    bar.close()
    n = len(batch)
    distributed.all_reduce_sum([t for w in weights.values() for t in w])  # same keys, same order on every rank
    weights = {k: (w / n).map(torch.Tensor.cpu) for k, w in weights.items()}
    return EdgeEffects(downstream, weights, aggregation, n, time.perf_counter() - t0,
                       passes.counts())


def vjps(sm: SplicedModel, s: torch.Tensor, inputs: list[torch.Tensor], batched: bool = True) -> list[torch.Tensor]:
    """d s_k / d inputs for every k: [K, *input.shape] per input (zeros where unused); one
    batched backward (``batched``) or one backward per k (the reference)."""
    K = s.shape[0]
    if batched:
        eye = torch.eye(K, dtype=s.dtype, device=s.device)
        grads = sm.grad(s, inputs, grad_outputs=eye, is_grads_batched=True, retain_graph=True, allow_unused=True)
        return [torch.zeros(K, *x.shape, dtype=x.dtype, device=x.device) if g is None else g
                for g, x in zip(grads, inputs)]
    per_k = []
    for k in range(K):
        g = sm.grad(s[k], inputs, retain_graph=True, allow_unused=True)
        per_k.append([torch.zeros_like(x) if gi is None else gi for gi, x in zip(g, inputs)])
    return [torch.stack([row[i] for row in per_k]) for i in range(len(inputs))]


def cut_forward(sm: SplicedModel, chunk: Batch) -> tuple[dict[str, torch.Tensor], Acts]:
    """One clean forward where each site's real output is recorded and then replaced by
    fresh leaves (value unchanged), cutting every path that goes through another site."""
    real: dict[str, torch.Tensor] = {}
    leaves: Acts = {}

    def cut(site: Site, x: torch.Tensor) -> torch.Tensor:
        real[site.name] = x
        out, leaves[site.name] = grad_leaves(sm.dictionary(site), x.detach())
        return out

    sm.run(chunk.inputs("clean"), cut)
    return real, leaves
