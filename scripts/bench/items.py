"""The items the suites time: the floor (plain forwards), each estimator, the unembedding, exact
patching samples, the edge stage in parts, and facts about the machine."""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable

import psutil
import torch

from featcircuits import lrp
from featcircuits.attribution import FeatureNode, exact_feature_effects, node_effects
from featcircuits.discover import discover_circuit, versions
from featcircuits.edges import cut_forward, node_scalars, vjps
from featcircuits.graph import Thresholds
from featcircuits.nodes import Acts, NodeSpace
from featcircuits.metric import metric
from featcircuits.tracing import SplicedModel

from . import common
from .common import counted


# --------------------------------------------------------------------------------------
# What is measured


def floor_items(sm: SplicedModel, batch, batch_size: int) -> dict[str, Callable[[], Any]]:
    """The floor and its parts: the HF body alone, the HF model with last-position logits,
    an nnsight trace without hooks, one spliced forward, one spliced forward+backward."""
    hf, lm = sm.model.hf, sm.model.lm
    chunks = batch.chunks(batch_size)
    body = getattr(hf, "model", None) or getattr(hf, "gpt_neox", None) or getattr(hf, "transformer", None)

    def hf_body():
        with torch.no_grad():
            for c in chunks:
                body(**c.inputs("clean"))

    def hf_forward():
        with torch.no_grad():
            for c in chunks:
                hf(**c.inputs("clean"), logits_to_keep=1)

    def trace_bare():
        import nnsight

        with torch.no_grad():
            for c in chunks:
                with lm.trace(dict(c.inputs("clean")), logits_to_keep=1):
                    nnsight.save(lm.output.logits[:, -1, :])

    def spliced_forward():
        for c in chunks:
            sm.cache(c.inputs("clean"))

    def spliced_fwd_bwd():
        for c in chunks:
            logits, leaves = sm.run_with_leaves(c.inputs("clean"))
            m = metric(logits, c.clean_answer, c.patch_answer)
            tensors = [t for s in sm.sites for t in leaves[s.name]]
            sm.grad(m.sum(), tensors, allow_unused=True)

    def spliced_forward_default_threads():
        chosen = torch.get_num_threads()
        torch.set_num_threads(common.DEFAULT_THREADS)
        try:
            spliced_forward()
        finally:
            torch.set_num_threads(chosen)

    n = len(batch)
    items = {"hf_body": hf_body, "hf_forward": hf_forward, "trace_bare": trace_bare,
             "spliced_forward": counted(sm, n, spliced_forward), "spliced_fwd_bwd": counted(sm, n, spliced_fwd_bwd)}
    if common.DEFAULT_THREADS != torch.get_num_threads():
        items["spliced_forward_default_threads"] = spliced_forward_default_threads
    return items


def method_items(sm: SplicedModel, batch, batch_size: int, ig_steps: list[int], subset: list[str] | None,
                 exact: bool, validate_subset: list[str] | None = None) -> dict[str, Callable[[], Any]]:
    """Node effects per method. With ``subset``, exact and IG run on those sites only (to be
    extrapolated); ``validate_subset`` adds IG (10 steps) on a subset beside the full IG, to
    check the extrapolation against a measurement."""
    n = len(batch)
    items: dict[str, Callable[[], Any]] = {}
    if exact:
        items["exact_components"] = counted(sm, n, lambda: node_effects(sm, batch, "exact", batch_size=batch_size,
                                                                           sites=subset, progress=False))
    items["atp"] = counted(sm, n, lambda: node_effects(sm, batch, "atp", batch_size=batch_size, progress=False))
    items["relp"] = counted(sm, n, lambda: node_effects(sm, batch, "relp", batch_size=batch_size, progress=False))
    for steps in ig_steps:
        items[f"ig{steps}"] = counted(sm, n, lambda s=steps: node_effects(sm, batch, "ig", steps=s, sites=subset,
                                                                         batch_size=batch_size, progress=False))
    if validate_subset:
        items["ig10_subset_check"] = counted(sm, n, lambda: node_effects(sm, batch, "ig", steps=10,
                                                                         sites=validate_subset,
                                                                         batch_size=batch_size, progress=False))
    return items


def unembedding_items(sm: SplicedModel, batch, batch_size: int) -> dict[str, Callable[[], Any]]:
    """The last-position unembedding alone (forward, and forward + backward of the metric), on
    random hidden states of the right shape: what computing every vocabulary logit costs when the
    metric reads two of them."""
    head = getattr(sm.model.hf, "lm_head", None) or getattr(sm.model.hf, "embed_out", None)
    if head is None:
        return {}
    chunks = batch.chunks(batch_size)
    d = sm.model.d_model
    # hidden states [b, T, d]; HF slices the last position, a strided [b, 1, d] view
    hs = [torch.randn(len(c), c.seq_len, d) for c in chunks]

    def fwd():
        with torch.no_grad():
            for h in hs:
                head(h[:, -1:, :])

    def fwd_bwd(strided: bool = False):
        for h, c in zip(hs, chunks):
            h = h.clone().requires_grad_(True)
            x = h[:, -1:, :]
            # strided: the path before featcircuits made the unembedding input contiguous
            logits = torch.nn.functional.linear(x, head.weight, head.bias) if strided else head(x)
            m = metric(logits[:, -1], c.clean_answer, c.patch_answer)
            torch.autograd.grad(m.sum(), [h])

    return {"unembed_forward": fwd, "unembed_fwd_bwd": fwd_bwd,
            "unembed_fwd_bwd_strided": lambda: fwd_bwd(True)}


def exact_feature_sample(sm: SplicedModel, batch, batch_size: int, k: int, seed: int = 0):
    """Exact patching of ``k`` sampled features (all positions): cost per node, to extrapolate."""
    g = torch.Generator().manual_seed(seed)
    nodes = []
    for _ in range(k):
        site = sm.sites[int(torch.randint(len(sm.sites), (1,), generator=g))]
        d = sm.dictionary(site)
        nodes.append(FeatureNode(site.name, int(torch.randint(d.d_sae, (1,), generator=g))))
    return counted(sm, len(batch), lambda: exact_feature_effects(sm, batch, nodes, batch_size=batch_size,
                                                                 nodes_per_pass=8, progress=False))


def edges_fixed_part(sm: SplicedModel, batch, bs: int) -> None:
    """What ``edge_effects`` does per chunk before any vector-Jacobian product when it is given
    the node stage's gradients (as in discover): the cut forward that records every direct
    Jacobian, under the LRP rules. The edge micro-items run the RelP authors' rules, which need no
    counterfactual tape; the default two-point rules add the tape's replay, which ``discover_relp``
    (the library's whole path) includes."""
    for c in batch.chunks(bs):
        with lrp.lrp_rules(lrp.PAPER_RULES):
            cut_forward(sm, c)


def vjp_part_items(sm: SplicedModel, chunk, masks: Acts, sg, chunk_nodes: int = 64) -> dict:
    """The vector-Jacobian products of ``edge_effects`` alone, on one chunk: the cut forward and
    the downstream scalars are built once (as ``edge_effects`` builds them), then the VJPs run
    batched (one backward per site and part) or one backward per downstream node. Uses the
    edge stage's public steps (``featcircuits.edges``) so the products are exactly the library's."""
    prepared = []
    with lrp.lrp_rules(lrp.PAPER_RULES):
        real, leaves = cut_forward(sm, chunk)
        for site, m in masks.items():
            nodes = m.nodes()
            ups = sm.adapter.upstream(site)
            if not nodes or not ups:
                continue
            inputs = [t for u in ups for t in leaves[u]]
            for start in range(0, len(nodes), chunk_nodes):
                part = nodes[start:start + chunk_nodes]
                prepared.append((node_scalars(sm.dictionary(site), real[site], sg.grads[site], part), inputs))

    def run(batched: bool):
        with lrp.lrp_rules(lrp.PAPER_RULES):
            for s_, inputs in prepared:
                vjps(sm, s_, inputs, batched)

    return {"vjp_batched": lambda: run(True), "vjp_one_backward_per_node": lambda: run(False)}


def spliced_forwards(sm: SplicedModel, batch, bs: int) -> None:
    for c in batch.chunks(bs):
        sm.cache(c.inputs("clean"))


def discover_relp(sm: SplicedModel, batch, th: Thresholds, bs: int) -> dict:
    c = discover_circuit(sm, batch, "relp", thresholds=th, batch_size=bs, progress=False)
    return {"seconds": c.provenance["seconds"], "n_nodes": c.n_nodes, "n_edges": c.n_edges}


def total_nodes(sm: SplicedModel) -> int:
    """Nodes with aggregation ``sum``: every feature plus one error node per site."""
    return sum(sm.dictionary(s).d_sae + 1 for s in sm.sites)


def spread_sites(sm: SplicedModel, k: int) -> list[str]:
    """``k`` sites evenly spread over the model (for IG extrapolated from a subset of sites)."""
    names = [s.name for s in sm.sites]
    if k >= len(names):
        return names
    idx = sorted({round(i * (len(names) - 1) / (k - 1)) for i in range(k)}) if k > 1 else [len(names) // 2]
    return [names[i] for i in idx]


def downstream_order(sm: SplicedModel, mean: Acts, masks: Acts) -> list[tuple[str, int, float]]:
    """Selected nodes that can have edges (a site with direct upstream), by |effect|, largest first."""
    out = []
    for site, m in masks.items():
        if not sm.adapter.upstream(site):
            continue
        out += [(site, i, abs(mean[site].value(i, t))) for i, t in m.nodes()]
    return sorted(out, key=lambda t: -t[2])


def masks_of(nodes: list[tuple[str, int, float]], masks: Acts) -> Acts:
    """The masks (shaped like ``masks``) of the given (site, index, |effect|) nodes."""
    return NodeSpace.of(masks).from_nodes((site, i, -1) for site, i, _ in nodes)


def edge_diff(a, b) -> dict:
    """Largest absolute and relative (to the largest |weight|) difference between two EdgeEffects."""
    diff, scale = 0.0, 0.0
    for key, (wf, we) in a.weights.items():
        vf, ve = b.weights[key].f, b.weights[key].err
        diff = max(diff, float((wf - vf).abs().max()) if wf.numel() else 0.0, float((we - ve).abs().max()))
        scale = max(scale, float(wf.abs().max()) if wf.numel() else 0.0, float(we.abs().max()))
    return {"max_abs_diff": diff, "max_abs_weight": scale, "max_rel_diff": diff / scale if scale else 0.0,
            "n_weights": sum(wf.numel() + we.numel() for wf, we in a.weights.values())}


def machine_info(dtype: torch.dtype) -> dict:
    vm = psutil.virtual_memory()
    info = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "dtype": str(dtype).replace("torch.", ""), "memory_total_gib": round(vm.total / 2**30, 1),
        "memory_available_gib_at_start": round(vm.available / 2**30, 1), "loadavg_at_start": os.getloadavg(),
        "versions": versions(),
    }
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def other_processes() -> list[dict]:
    """The busiest other processes at the moment (to explain the load, no command lines kept)."""
    me = os.getpid()
    procs = []
    for p in psutil.process_iter(["pid", "name", "cpu_percent"]):
        try:
            if p.pid != me:
                procs.append((p.cpu_percent(interval=None), p))
        except psutil.Error:
            pass
    time.sleep(0.5)
    rows = []
    for _, p in procs:
        try:
            c = p.cpu_percent(interval=None)
            if c > 5:
                rows.append({"name": p.name(), "cpu_percent": round(c)})
        except psutil.Error:
            pass
    return sorted(rows, key=lambda r: -r["cpu_percent"])[:8]
