"""Node effects: exact activation patching, AtP, RelP and Integrated Gradients.

For a node ``a`` (an SAE feature at a site and position, or a site's error vector) with
clean value ``a_c`` and counterfactual value ``a_p``:

- ``exact``: ``m(clean | do(a = a_p)) - m(clean)``: one forward per node, the ground truth.
- ``atp``:   ``(a_p - a_c) . dm/da`` at the clean run (2 forward + 1 backward).
- ``relp``:  the same product with ``dm/da`` computed under the LRP rules (``featcircuits.lrp``).
- ``ig``:    per site, ``steps`` forwards at ``a_c + alpha (a_p - a_c)``, alpha = k/steps,
             k = 0..steps-1; effect = ``(a_p - a_c) . mean grad`` (Sparse Feature Circuits).

Feature effects are elementwise products; an error node's effect is the dot product over
d_model. The metric and its sign live in ``featcircuits.metric``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from tqdm.auto import tqdm

from . import distributed, lrp
from .activation_sums import ActivationSums, answer_probs
from .checkpoint import PassCounter
from .adapters import Site
from .devices import ACCUMULATE
from .errors import UserError
from .metric import metric
from .tasks import Batch
from .nodes import Act, Acts, pack
from .tracing import SplicedModel, check_finite, join

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .gradient_store import GradientStore

METHODS = ("exact", "atp", "relp", "ig")
GRADIENT_METHODS = ("atp", "relp", "ig")


@dataclass
class NodeEffects:
    """Node effects summed over examples (divide by ``n`` for the mean).

    ``effects[site]``: ``f`` [T, d_sae], ``err`` [T] (T = padded prompt length, aligned at
    the last token).
    """

    method: str
    effects: Acts
    n: int
    metric_clean: float  # mean discovery metric on the clean prompts
    metric_patch: float
    seconds: float = 0.0
    passes: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    # the node facts' activation sums, from the same forwards (gradient methods; None when a
    # checkpoint without them was resumed: node facts then run their own forwards)
    activations: ActivationSums | None = None

    def mean(self, aggregation: str = "sum") -> Acts:
        """Aggregate: ``sum`` (sum over positions, mean over examples -> ``f`` [d_sae], ``err`` [])
        or ``none`` (mean over examples, keep positions -> [T, d_sae], [T])."""
        check_aggregation(aggregation)
        out = {s: v / self.n for s, v in self.effects.items()}
        return {s: v.sum(0) for s, v in out.items()} if aggregation == "sum" else out

    def components(self) -> dict[str, torch.Tensor]:
        """Per-site effect per position, summed over features and error: [T] (mean over examples).
        With identity dictionaries this is the component (layer x position) effect."""
        return {s: (v.f.sum(-1) + v.err) / self.n for s, v in self.effects.items()}


AGGREGATIONS = ("sum", "none")


def check_aggregation(aggregation: str) -> None:
    """A clear error for an aggregation other than ``sum`` or ``none``."""
    if aggregation not in AGGREGATIONS:
        raise UserError(f"aggregation must be 'sum' or 'none', got {aggregation!r}")


def check_method(method: str, allowed: tuple[str, ...] = METHODS) -> None:
    """A clear error for a method outside ``allowed``."""
    if method not in allowed:
        what = "edges need a gradient method" if allowed == GRADIENT_METHODS else "unknown method"
        raise UserError(f"{what} {method!r}; choose from {', '.join(allowed)}")


def _check_finite(name: str, t: torch.Tensor, what: str) -> None:
    check_finite(f"{what} of {name}" if name != "metric" else "the metric", t)


def _add(acc: Acts, site: str, value: Act) -> None:
    value = value.to(ACCUMULATE)  # sums in float32 whatever the model's dtype
    acc[site] = acc[site] + value if site in acc else value.clone()


def node_effects(
    sm: SplicedModel,
    batch: Batch,
    method: str = "relp",
    *,
    steps: int = 10,
    rules: Iterable[str] | str | None = None,
    batch_size: int = 16,
    sites: Iterable[str] | None = None,
    progress: bool = True,
    checkpoint: "Checkpoint | None" = None,
    gradients: "GradientStore | None" = None,
) -> NodeEffects:
    """Node effects of every feature and error node at every site (or ``sites``), by ``method``.

    ``rules``: the LRP rule set for ``relp`` (default LN + identity + half). ``exact`` here
    patches every *component* position (whole site vector at one position); for exact
    effects of individual features use ``exact_feature_effects``. With a ``checkpoint``, the
    running sums are saved after every chunk and a resumed run skips the chunks done.
    ``gradients``: a ``GradientStore`` this call fills with each chunk's ``SiteGradients``
    (nothing for chunks restored from a checkpoint), to hand to ``edge_effects`` so the
    metric's gradients are not computed twice; the store keeps chunks in memory up to its
    budget and spills the rest to disk, so memory stays flat in the number of pairs.
    """
    check_method(method)
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    chosen = [s for s in sm.sites if sites is None or s.name in set(sites)]
    rule_set = lrp.parse_rules(rules) if method == "relp" else frozenset()
    acc: Acts = {}
    m_clean = m_patch = 0.0
    t0 = time.perf_counter()
    chunks = batch.chunks(batch_size)
    if gradients is not None:
        gradients.reset(len(chunks))
    mine = distributed.shard(chunks)  # all chunks in one process; a contiguous block per rank under torchrun
    done = 0
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        done, state = saved
        acc = pack(state["features"], state["errors"])
        m_clean, m_patch = state["m_clean"], state["m_patch"]
    sums = ActivationSums() if saved is None else ActivationSums.from_state(state.get("activations"))
    if method not in GRADIENT_METHODS:
        sums = None
    passes = PassCounter(sm, state.get("passes") if saved is not None else None)
    # IG runs one forward and backward per site and chunk: its bar counts sites, the others chunks
    per_chunk = len(chosen) if method == "ig" else 1
    bar = tqdm(desc=f"node effects ({method})", disable=not progress, leave=False,
               initial=done * per_chunk, total=len(mine) * per_chunk)
    two_point = lrp.needs_reference(rule_set)
    for k, (i, chunk) in enumerate(mine[done:], start=done):
        tape = lrp.ReferenceTape() if two_point else None
        with torch.no_grad(), lrp.recording(tape):
            logits_p, patch_vals = sm.cache(chunk.inputs("patch"))
        m_patch += float(metric(logits_p, chunk.clean_answer, chunk.patch_answer).sum())
        if method in GRADIENT_METHODS:
            sg = site_gradients(sm, chunk, method, chosen, steps=steps, rules=rule_set, patch_vals=patch_vals,
                                reference=tape, on_site=lambda: bar.update(1) if method == "ig" else None)
            mc = _accumulate_effects(sg, chosen, acc)
            if sums is not None:
                _add_activations(sums, sg, chosen, chunk)
            if gradients is not None:
                gradients.put(i, sg)
        else:
            mc = _exact_component_effects(sm, chunk, patch_vals, chosen, acc)
        m_clean += mc
        if method != "ig":
            bar.update(1)
        if checkpoint is not None:
            checkpoint.save(k + 1, {"features": {s: v.f for s, v in acc.items()},
                                    "errors": {s: v.err for s, v in acc.items()}, "m_clean": m_clean, "m_patch": m_patch,
                                    "passes": passes.counts(), "activations": None if sums is None else sums.state()})
    bar.close()
    if distributed.world()[1] > 1:
        distributed.all_reduce_sum([t for v in acc.values() for t in v])
        m_clean, m_patch = distributed.all_reduce_floats(m_clean, m_patch, device=next(iter(acc.values())).f.device)
        if sums is not None:  # every rank ran the same sites: the same tensors in the same order
            distributed.all_reduce_sum(sums.tensors())
            sums.p_clean_answer, sums.p_patch_answer, n = distributed.all_reduce_floats(
                sums.p_clean_answer, sums.p_patch_answer, float(sums.n))
            sums.n = int(n)
    acc = {s: v.map(torch.Tensor.cpu) for s, v in acc.items()}  # small; selection and graphs run on the CPU
    for s, v in acc.items():
        _check_finite(s, v.f.unsqueeze(0), "feature effects")
        _check_finite(s, v.err.unsqueeze(0), "error effects")
    return NodeEffects(
        method=method, effects=acc, n=len(batch), metric_clean=m_clean / len(batch),
        metric_patch=m_patch / len(batch), seconds=time.perf_counter() - t0,
        passes=passes.counts(),
        params={"steps": steps if method == "ig" else None, "rules": sorted(rule_set) if method == "relp" else None},
        activations=sums,
    )


def _add_activations(sums: ActivationSums, sg: "SiteGradients", chosen: list[Site], chunk: Batch) -> None:
    """Fold one chunk's clean and patch features (already computed) into the node facts' sums."""
    for side, values in (("clean", sg.clean), ("patch", sg.patch)):
        mask = chunk.inputs(side)["attention_mask"]
        for s in chosen:
            sums.add(side, s.name, values[s.name].f, mask)
    sums.add_answers(sg.answer_probs)


@dataclass
class SiteGradients:
    """Per-example gradients of the metric and the clean values, for one chunk of examples.

    ``grads[site]`` holds dm/df [b, T, d_sae] and dm/derr [b, T, d_model] (for IG: the mean
    over the interpolation points); ``clean``/``patch`` the sites' features and errors."""

    grads: dict[str, Act]
    clean: dict[str, Act]
    patch: dict[str, Act]
    metric_clean: torch.Tensor  # [b]
    answer_probs: torch.Tensor  # [b, 2]: probabilities of the clean and the patch answer on the clean prompts
    reference: "lrp.ReferenceTape | None" = None  # the counterfactual values two-point rules read

    def nbytes(self) -> int:
        """Memory this chunk's gradients, values and tape hold (for the keep-or-spill budget)."""
        tensors = [t for part in (self.grads, self.clean, self.patch) for v in part.values() for t in v]
        if self.reference is not None:
            tensors += [t for _, values in self.reference.items for t in values]
        return sum(t.numel() * t.element_size() for t in tensors)


def site_gradients(sm: SplicedModel, chunk: Batch, method: str, chosen: list[Site], *, steps: int = 10,
                   rules: Iterable[str] | str | None = None,
                   patch_vals: dict[str, Act] | None = None,
                   reference: "lrp.ReferenceTape | None" = None,
                   on_site: Callable[[], None] | None = None) -> SiteGradients:
    """The gradients node effects and edges are made of: AtP (plain), RelP (LRP rules, default
    set when ``rules`` is None) or IG (mean over ``steps`` interpolation points, per site).

    Two-point rules (``lrp.needs_reference``) read ``reference``, the tape recorded during the
    counterfactual forward that produced ``patch_vals``; without ``patch_vals`` both are made here.
    ``on_site`` is called after each site's IG pass (progress bars)."""
    rule_set = lrp.parse_rules(rules) if method == "relp" else frozenset()
    if patch_vals is None:
        reference = lrp.ReferenceTape() if lrp.needs_reference(rule_set) else None
        with torch.no_grad(), lrp.recording(reference):
            _, patch_vals = sm.cache(chunk.inputs("patch"))
    if method == "ig":
        return _ig_gradients(sm, chunk, patch_vals, chosen, steps, on_site)
    with lrp.lrp_rules(rule_set), lrp.replaying(reference):
        logits, leaves = sm.run_with_leaves(chunk.inputs("clean"))
        m = metric(logits, chunk.clean_answer, chunk.patch_answer)
        _check_finite("metric", m, "metric")
        tensors = [t for s in chosen for t in (leaves[s.name].f, leaves[s.name].err)]
        grads = sm.grad(m.sum(), tensors, allow_unused=True)
    out, clean = {}, {}
    for i, s in enumerate(chosen):
        c = leaves[s.name]
        gf, ge = grads[2 * i], grads[2 * i + 1]
        out[s.name] = Act(torch.zeros_like(c.f) if gf is None else gf,
                                 torch.zeros_like(c.err) if ge is None else ge)
        clean[s.name] = Act(c.f.detach(), c.err.detach())
    return SiteGradients(out, clean, patch_vals, m.detach(), answer_probs(logits, chunk.clean_answer,
                                                                          chunk.patch_answer), reference)


def _ig_gradients(sm: SplicedModel, chunk: Batch, patch_vals: dict[str, Act], chosen: list[Site],
                  steps: int, on_site: Callable[[], None] | None = None) -> SiteGradients:
    """IG per site: the ``steps`` interpolation points stacked along the batch in one forward."""
    with torch.no_grad():
        logits_c, clean_vals = sm.cache(chunk.inputs("clean"))
    b = len(chunk)
    inputs = {k: v.repeat(steps, 1) for k, v in chunk.inputs("clean").items()}
    ca, pa = chunk.clean_answer.repeat(steps), chunk.patch_answer.repeat(steps)
    ref = next(iter(clean_vals.values())).f
    alphas = (torch.arange(steps, dtype=torch.float32, device=ref.device).view(steps, 1, 1, 1) / steps).to(ref.dtype)
    out = {}
    for s in chosen:
        c, p = clean_vals[s.name], patch_vals[s.name]
        f = (c.f.unsqueeze(0) + alphas * (p.f - c.f).unsqueeze(0)).flatten(0, 1).requires_grad_(True)
        e = (c.err.unsqueeze(0) + alphas * (p.err - c.err).unsqueeze(0)).flatten(0, 1).requires_grad_(True)
        d = sm.dictionary(s)
        logits = sm.run(inputs, lambda site, x, d=d, f=f, e=e: join(d, Act(f, e)).to(x.dtype), [s])
        m = metric(logits, ca, pa)
        gf, ge = sm.grad(m.sum(), [f, e], allow_unused=True)
        gf = torch.zeros_like(f) if gf is None else gf
        ge = torch.zeros_like(e) if ge is None else ge
        out[s.name] = Act(gf.view(steps, b, *gf.shape[1:]).mean(0), ge.view(steps, b, *ge.shape[1:]).mean(0))
        if on_site is not None:
            on_site()
    m_c = metric(logits_c, chunk.clean_answer, chunk.patch_answer)
    return SiteGradients(out, clean_vals, patch_vals, m_c, answer_probs(logits_c, chunk.clean_answer, chunk.patch_answer))


def _accumulate_effects(sg: SiteGradients, chosen: list[Site], acc: Acts) -> float:
    """Node effect = (a_p - a_c) * grad, summed over the chunk's examples."""
    for s in chosen:
        delta = sg.patch[s.name].to(ACCUMULATE) - sg.clean[s.name].to(ACCUMULATE)
        _add(acc, s.name, delta.effect(sg.grads[s.name].to(ACCUMULATE)).sum(0))
    return float(sg.metric_clean.sum())


def _exact_component_effects(sm: SplicedModel, chunk: Batch, patch_vals: dict[str, Act],
                             chosen: list[Site], acc: Acts) -> float:
    """Exact patching of each site's whole vector at one position at a time (all positions of
    a site stacked along the batch in one forward). Stored as an 'error' effect per position
    with feature effects zero: with identity dictionaries the site vector is the component.
    Positions where no example's value changes (e.g. before the first token in which the
    prompts differ) need no forward: patching a value with itself changes nothing, effect 0."""
    with torch.no_grad():
        logits_c, clean_vals = sm.cache(chunk.inputs("clean"))
        m_c = metric(logits_c, chunk.clean_answer, chunk.patch_answer)
        b, T = chunk.clean_ids.shape
        for s in chosen:
            d = sm.dictionary(s)
            x_c = join(d, clean_vals[s.name])
            x_p = join(d, patch_vals[s.name])
            pos = torch.nonzero((x_p != x_c).any(-1).any(0)).flatten()  # positions that change
            delta = torch.zeros(T, b, device=m_c.device)
            if pos.numel():
                P = pos.numel()
                stacked = x_c.unsqueeze(0).repeat(P, 1, 1, 1)  # [P(which position), b, T, d]
                stacked[torch.arange(P), :, pos, :] = x_p[:, pos, :].transpose(0, 1)
                stacked = stacked.flatten(0, 1)
                inputs = {k: v.repeat(P, 1) for k, v in chunk.inputs("clean").items()}
                ca, pa = chunk.clean_answer.repeat(P), chunk.patch_answer.repeat(P)
                logits = sm.run(inputs, lambda site, x, v=stacked: v.to(x.dtype), [s])
                delta[pos] = (metric(logits, ca, pa) - m_c.repeat(P)).view(P, b)  # [position, example]
            _add(acc, s.name, Act(torch.zeros(T, d.d_sae, device=m_c.device), delta.sum(1)))
    return float(m_c.sum())


@dataclass(frozen=True)
class FeatureNode:
    """One node for exact patching: a feature (``index``) or the error (``index = -1``) at a
    site, at one position (``position``) or at all positions (``None``, aggregation ``sum``)."""

    site: str
    index: int
    position: int | None = None


def exact_feature_effects(sm: SplicedModel, batch: Batch, nodes: list[FeatureNode], *, batch_size: int = 16,
                          nodes_per_pass: int = 8, progress: bool = True) -> torch.Tensor:
    """Exact activation-patching effect of each node, mean over examples: [len(nodes)].

    The node's clean value is replaced by its counterfactual value (all other features and
    the error of the site keep their clean values); several nodes run stacked in one forward.
    """
    out = torch.zeros(len(nodes))
    by_site: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        by_site.setdefault(node.site, []).append(i)
    mine = distributed.shard(batch.chunks(batch_size))  # a contiguous block of chunks per rank under torchrun
    total = sum((len(v) + nodes_per_pass - 1) // nodes_per_pass for v in by_site.values()) * len(mine)
    bar = tqdm(total=total, desc="exact patching", disable=not progress, leave=False)
    for _, chunk in mine:
        with torch.no_grad():
            logits_c, clean_vals = sm.cache(chunk.inputs("clean"))
            _, patch_vals = sm.cache(chunk.inputs("patch"))
            m_c = metric(logits_c, chunk.clean_answer, chunk.patch_answer)
            b = len(chunk)
            for site_name, idxs in by_site.items():
                d = sm.dictionary(site_name)
                c, p = clean_vals[site_name], patch_vals[site_name]
                site = sm.site(site_name)
                for start in range(0, len(idxs), nodes_per_pass):
                    group = idxs[start:start + nodes_per_pass]
                    fs, es = [], []
                    for i in group:
                        node = nodes[i]
                        f, e = c.f.clone(), c.err.clone()
                        pos = slice(None) if node.position is None else node.position
                        if node.index < 0:
                            e[:, pos] = p.err[:, pos]
                        else:
                            f[:, pos, node.index] = p.f[:, pos, node.index]
                        fs.append(f)
                        es.append(e)
                    value = join(d, Act(torch.cat(fs), torch.cat(es)))
                    k = len(group)
                    inputs = {key: v.repeat(k, 1) for key, v in chunk.inputs("clean").items()}
                    logits = sm.run(inputs, lambda s_, x, v=value: v.to(x.dtype), [site])
                    delta = metric(logits, chunk.clean_answer.repeat(k), chunk.patch_answer.repeat(k)) - m_c.repeat(k)
                    out[group] += delta.view(k, b).sum(1).cpu()
                    bar.update(1)
    bar.close()
    out = torch.tensor(distributed.all_reduce_floats(*out.tolist(), device=sm.model.device), dtype=out.dtype)
    return out / len(batch)
