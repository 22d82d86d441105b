"""The main job: task -> node effects -> thresholds -> edges -> circuit graph.

``discover_circuit`` runs the stages in order and returns a ``graph.Circuit`` with the time
each stage took; ``featcircuits.export.save_circuit`` writes it out.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Iterable

import torch

from . import __version__, distributed, lrp
from .batching import resolve_batch_size
from .devices import dtype_name
from .attribution import GRADIENT_METHODS, check_method, node_effects
from .edges import edge_effects
from .gradient_store import GradientStore
from .graph import (DEFAULT_TOP_K, METRIC, Circuit, Thresholds, build_graph, count_nodes, select_nodes,
                    NodeSpace, size_report)
from .tasks import Batch
from .tracing import SplicedModel


def versions() -> dict[str, str]:
    """Versions of the libraries that decide the numbers (recorded in every summary)."""
    import nnsight
    import sae_lens
    import transformers

    return {"featcircuits": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "nnsight": getattr(nnsight, "__version__", "?"), "sae_lens": sae_lens.__version__,
            "python": platform.python_version()}


def discover_circuit(
    sm: SplicedModel,
    batch: Batch,
    method: str = "relp",
    *,
    thresholds: Thresholds | None = None,
    aggregation: str = "sum",
    steps: int = 10,
    rules: Iterable[str] | str | None = None,
    batch_size: "int | str" = 16,
    edges: bool = True,
    batched_edges: bool = True,
    provenance: dict | None = None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    keep_gradients_bytes: int | None = None,
    spill_gradients: bool = True,
) -> Circuit:
    """Discover the circuit of ``batch``'s behaviour with ``method`` (relp | ig | atp).

    Nodes pass ``thresholds`` (absolute / top-k / share); edges are computed only into those
    nodes, from the nodes of their direct upstream sites, and kept above ``thresholds.edge``
    (default: 1 % of the largest |edge|). Nodes with no path to the metric are pruned.
    ``batch_size``: examples per pass, or ``auto`` / ``auto:CAP`` (``featcircuits.batching``).
    With ``checkpoint_dir``, node and edge sums are checkpointed per chunk of examples and
    ``resume=True`` continues a killed run (the result equals an uninterrupted run).
    Pairs stream through in chunks of ``batch_size``: node and edge sums are accumulated, and
    the node stage's gradients are handed to the edge stage in memory up to
    ``keep_gradients_bytes`` (default ``keep_budget()``) and through a private folder on disk
    past it (beside ``checkpoint_dir``, else in the temporary folder; deleted at the end;
    ``spill_gradients=False`` recomputes those chunks instead), so memory stays flat however
    many pairs there are and no chunk's gradients are computed twice.
    """
    check_method(method, GRADIENT_METHODS)
    thresholds = thresholds or Thresholds(top_k=DEFAULT_TOP_K)  # validated when made
    t0 = time.perf_counter()
    distributed.setup(sm.model.device)
    rank, world_size = distributed.world()
    progress = progress and rank == 0  # one set of bars
    batch_size, batching = resolve_batch_size(sm, batch, batch_size, method, steps=steps, rules=rules,
                                              edges=edges)
    ckpt_nodes = ckpt_edges = None
    if checkpoint_dir is not None:
        from .checkpoint import Checkpoint

        config = {"method": method, "steps": steps, "rules": lrp.rules_key(rules), "batch_size": batch_size,
                  "aggregation": aggregation, "dictionaries": sm.dictionaries.digest(), "n": len(batch),
                  "inputs": _batch_digest(batch), "thresholds": thresholds.as_dict()}
        config["world"] = [rank, world_size]
        suffix = distributed.checkpoint_suffix()  # one checkpoint file per rank
        ckpt_nodes = Checkpoint(checkpoint_dir, f"nodes-{method}{suffix}", config, resume)
        ckpt_edges = Checkpoint(checkpoint_dir, f"edges-{method}{suffix}", config, resume)
    keep = keep_budget(sm) if keep_gradients_bytes is None else keep_gradients_bytes
    # handed to the edge stage; closed (memory freed, spill folder deleted) once the edge stage is
    # over, and by its finalizer if this call raises first
    gradients = GradientStore(keep, spill=spill_gradients, spill_dir=checkpoint_dir) if edges else None
    effects = node_effects(sm, batch, method, steps=steps, rules=rules, batch_size=batch_size, progress=progress,
                           checkpoint=ckpt_nodes, gradients=gradients)
    held = gradients.counts() if gradients is not None else None
    mean = effects.mean(aggregation)
    masks = select_nodes(mean, thresholds)
    t_nodes = time.perf_counter() - t0
    edge_list: list[tuple[str, str, float]] = []
    t_edges = 0.0
    edge_threshold = thresholds.edge
    edge_passes = {"forward": 0, "backward": 0}
    if edges and count_nodes(masks):
        t1 = time.perf_counter()
        ee = edge_effects(sm, batch, masks, method, steps=steps, rules=rules, aggregation=aggregation,
                          batch_size=batch_size, batched=batched_edges, progress=progress,
                          checkpoint=ckpt_edges, gradients=gradients)
        edge_list = ee.edge_list(masks)
        edge_passes = ee.passes
        t_edges = time.perf_counter() - t1
        if edge_threshold is None and edge_list:
            edge_threshold = 0.01 * max(abs(w) for _, _, w in edge_list)
    if gradients is not None:
        gradients.close()
    graph = build_graph(mean, masks, edge_list, last_resid=sm.adapter.last_resid, edge_threshold=edge_threshold)
    seconds = {"nodes": round(t_nodes, 3), "edges": round(t_edges, 3), "total": round(time.perf_counter() - t0, 3)}
    prov = {
        **(provenance or {}),
        "method": method, "aggregation": aggregation, "n": len(batch),
        "steps": steps if method == "ig" else None,
        "rules": sorted(effects.params["rules"]) if method == "relp" else None,
        "thresholds": {**thresholds.as_dict(), "edge_used": edge_threshold},
        "dictionaries": sm.dictionaries.name, "dictionaries_sha256": sm.dictionaries.digest(),
        "hook_z_sites": sm.dictionaries.z_sites(),  # attention sites read before o_proj
        "model_sha256": model_digest(sm.model.hf),
        "device": str(sm.model.device), "device_map": sm.model.info.get("device_map"), "dtype": dtype_name(sm.model.dtype),
        "metric_clean": effects.metric_clean, "metric_patch": effects.metric_patch,
        "seconds": seconds, "passes": {k: effects.passes[k] + edge_passes[k] for k in ("forward", "backward")},
        "passes_by_stage": {"nodes": effects.passes, "edges": edge_passes},
        "batching": batching, "processes": world_size,
        # node-stage chunks handed to the edge stage in memory, through disk, or recomputed there
        "gradients_chunks": held,
        "versions": versions(),
        "nodes_selected": count_nodes(masks), "edges_computed": len(edge_list),
        "circuit_size": size_report(thresholds.top_k, NodeSpace.of(mean).size, count_nodes(masks), sum(1 for n in graph if n != METRIC)),
        "metric_description": "logit[patch_answer] - logit[clean_answer] at the last token (clean run)",
        "prompt_tokens": _prompt_tokens(sm, batch),
    }
    for ck in (ckpt_nodes, ckpt_edges):
        if ck is not None:
            ck.clear()
    return Circuit(graph, mean, prov, activations=effects.activations)


KEEP_MAX = 2**30  # bytes of node-stage gradients kept in memory for the edge stage (1 GiB); the rest spill to disk


def keep_budget(sm: SplicedModel) -> int:
    """Bytes of node-stage gradients the edge stage may reuse: a quarter of the free memory,
    at most ``KEEP_MAX`` (a fixed ceiling, so peak memory does not grow with the pairs)."""
    from .batching import free_memory

    return int(min(KEEP_MAX, 0.25 * free_memory(sm.model.device)))


def model_digest(hf_model) -> str:
    """A short sha256 of the model's weights (provenance: which model produced a circuit)."""
    import hashlib

    h = hashlib.sha256()
    state = hf_model.state_dict()
    if any(t.device.type == "meta" for t in state.values()):  # layers accelerate offloaded (--device-map)
        from accelerate.utils.modeling import get_state_dict_offloaded_model

        loaded = get_state_dict_offloaded_model(hf_model)
        state = {name: loaded[name] for name in state}  # the same order: the same digest as loaded whole
    for name, t in state.items():
        h.update(name.encode())
        t = t.detach().cpu()
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool
                 else t.numpy().tobytes())
    return h.hexdigest()[:16]


def _prompt_tokens(sm: SplicedModel, batch: Batch) -> list[str]:
    """The first clean prompt's tokens, padded positions shown as '' (positions align at the end)."""
    tok = sm.model.tokenizer
    ids, mask = batch.clean_ids[0].tolist(), batch.clean_mask[0].tolist()
    return [tok.decode([i]) if m else "" for i, m in zip(ids, mask)]


def _batch_digest(batch: Batch) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in (batch.clean_ids, batch.patch_ids, batch.clean_answer, batch.patch_answer):
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]
