#!/usr/bin/env python
"""Benchmarks: what each estimator costs, how the cost grows, and how close it is to the floor.

Writes ``results/benchmarks/benchmarks.json``, ``results/benchmarks/README.md``, the plots
(PNG + SVG) and the ``## Benchmarks`` section of ``results/README.md``. Every number in
those files comes from this script. Run it from the repository root::

    .venv/bin/python scripts/benchmark.py --models gemma  # offline Gemma (~22 min on a loaded 2-core CPU)
    .venv/bin/python scripts/benchmark.py --models tiny   # tiny model (~14 min; keeps Gemma's rows)
    .venv/bin/python scripts/benchmark.py --quick         # both, smaller sizes, one repeat (~10 min)
    .venv/bin/python scripts/benchmark.py --report-only   # README and plots again from the JSON

How it measures (see the README it writes for the full story):

- **Time**: wall clock (``time.perf_counter``) and this process's CPU time
  (``time.process_time``) of each call. The machine is shared, so every section runs its
  items *interleaved*: round ``r`` runs every item once, in an order rotated by ``r``, so
  drift in the background load hits all of them; figures are medians over rounds, and
  ratios are computed *within* a round and then the median taken. ``os.getloadavg()`` is
  recorded next to every run.
- **Memory**: a sampling thread polls this process's RSS (psutil, every 5 ms) during each
  call, after ``gc.collect()`` and ``malloc_trim(0)``; we report the peak RSS during the
  call and its growth over the RSS at the start of the call (the model and dictionaries
  are already resident, so growth is what the estimator itself needs). The headline
  memory target is measured exactly instead: the real CLI in a subprocess under
  ``/usr/bin/time -v`` (its "Maximum resident set size").
- **Passes**: ``SplicedModel`` counts forward calls and backward calls; a subclass here
  also counts the example rows each forward processes and each backward goes through, so
  passes per example = rows / n (an IG forward over ``steps`` stacked copies of a batch of
  b examples counts steps x b rows).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from featcircuits import lrp  # noqa: E402
from featcircuits.attribution import FeatureNode, exact_feature_effects, node_effects  # noqa: E402
from featcircuits.dictionaries import identity_set, load_dictionary_set, registry  # noqa: E402
from featcircuits.discover import discover_circuit, versions  # noqa: E402
from featcircuits.edges import cut_forward, edge_effects, node_scalars, vjps  # noqa: E402
from featcircuits.graph import Thresholds, select_nodes  # noqa: E402
from featcircuits.nodes import Acts, NodeSpace, count_nodes  # noqa: E402
from featcircuits.io import write_json, write_text  # noqa: E402
from featcircuits.metric import metric  # noqa: E402
from featcircuits.models import OFFLINE_ALIAS, load_model  # noqa: E402
from featcircuits.tasks import make_pairs, tokenize_pairs  # noqa: E402
from featcircuits.tracing import SplicedModel  # noqa: E402

DEFAULT_THREADS = torch.get_num_threads()  # torch's own default, before --threads
OUT_DEFAULT = ROOT / "results" / "benchmarks"
RESULTS_README = ROOT / "results" / "README.md"
TASK = "sva-simple"

# --------------------------------------------------------------------------------------
# Measuring


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


class PeakRSS:
    """Peak resident set size of this process while the block runs (psutil polling)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.proc = psutil.Process()
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        _malloc_trim()
        self.base = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def measure(fn: Callable[[], Any]) -> tuple[dict, Any]:
    """Run ``fn`` once: wall and CPU seconds, peak RSS and its growth, load average."""
    load0 = os.getloadavg()[0]
    with PeakRSS() as mem:
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rec = {"wall_s": round(wall, 4), "cpu_s": round(cpu, 4), "peak_rss_mib": round(mem.peak / 2**20, 1),
           "rss_growth_mib": round((mem.peak - mem.base) / 2**20, 1),
           "load1": round((load0 + os.getloadavg()[0]) / 2, 2)}
    return rec, out


def counted(sm: SplicedModel, n: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap ``fn`` so that its result carries the passes it made (calls and rows per example)."""

    def run():
        c0 = sm.counters()
        out = fn()
        c1 = sm.counters()
        d = [b - a for a, b in zip(c0, c1)]
        return out, {"forward_calls": d[0], "backward_calls": d[1],
                     "forward_per_example": round(d[2] / n, 3), "backward_per_example": round(d[3] / n, 3)}

    return run


def interleaved(items: dict[str, Callable[[], Any]], rounds: int, repeats: dict[str, int] | None = None,
                log: Callable[[str], None] = print, keep: set[str] | None = None) -> dict[str, dict]:
    """Run every item once per round, the order rotated by the round; collect the records.

    ``repeats[name]`` caps how many rounds an (expensive) item takes part in. The value
    returned by the first run of each item in ``keep`` is kept under ``result``."""
    names = list(items)
    out: dict[str, dict] = {n: {"runs": []} for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if repeats and r >= repeats.get(name, rounds):
                continue
            rec, value = measure(items[name])
            passes = None
            if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict) and "forward_calls" in value[1]:
                value, passes = value
            rec["round"] = r
            out[name]["runs"].append(rec)
            if passes is not None:
                out[name]["passes"] = passes
            if keep and name in keep and "result" not in out[name]:
                out[name]["result"] = value
            del value
            log(f"    {name:<28} round {r}: {rec['wall_s']:8.3f} s wall  {rec['cpu_s']:8.3f} s cpu  "
                f"peak {rec['peak_rss_mib']:7.0f} MiB (+{rec['rss_growth_mib']:.0f})  load {rec['load1']}")
    for name, d in out.items():
        runs = d["runs"]
        if runs:
            d["median_wall_s"] = round(statistics.median(r["wall_s"] for r in runs), 4)
            d["median_cpu_s"] = round(statistics.median(r["cpu_s"] for r in runs), 4)
            d["max_peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
            d["median_rss_growth_mib"] = round(statistics.median(r["rss_growth_mib"] for r in runs), 1)
            d["n_runs"] = len(runs)
    return out


def round_ratio(res: dict[str, dict], num: str, den: str, key: str = "wall_s") -> dict | None:
    """Median over rounds of num/den, each ratio taken within one round (same background load)."""
    if num not in res or den not in res:
        return None
    a = {r["round"]: r[key] for r in res[num]["runs"]}
    b = {r["round"]: r[key] for r in res[den]["runs"]}
    per = [a[k] / b[k] for k in sorted(set(a) & set(b)) if b[k] > 0]
    if not per:  # different rounds (an item capped to fewer repeats): ratio of medians
        if not a or not b:
            return None
        return {"median": round(statistics.median(a.values()) / statistics.median(b.values()), 4),
                "per_round": [], "how": "ratio of medians (no common round)"}
    return {"median": round(statistics.median(per), 4), "per_round": [round(x, 4) for x in per],
            "how": "median of per-round ratios"}


def strip_results(res: dict[str, dict]) -> dict[str, dict]:
    return {k: {kk: vv for kk, vv in v.items() if kk != "result"} for k, v in res.items()}


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
        torch.set_num_threads(DEFAULT_THREADS)
        try:
            spliced_forward()
        finally:
            torch.set_num_threads(chosen)

    n = len(batch)
    items = {"hf_body": hf_body, "hf_forward": hf_forward, "trace_bare": trace_bare,
             "spliced_forward": counted(sm, n, spliced_forward), "spliced_fwd_bwd": counted(sm, n, spliced_fwd_bwd)}
    if DEFAULT_THREADS != torch.get_num_threads():
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
    Jacobian, under the LRP rules."""
    for c in batch.chunks(bs):
        with lrp.lrp_rules(lrp.DEFAULT_RULES):
            cut_forward(sm, c)


def vjp_part_items(sm: SplicedModel, chunk, masks: Acts, sg, chunk_nodes: int = 64) -> dict:
    """The vector-Jacobian products of ``edge_effects`` alone, on one chunk: the cut forward and
    the downstream scalars are built once (as ``edge_effects`` builds them), then the VJPs run
    batched (one backward per site and part) or one backward per downstream node. Uses the
    edge stage's public steps (``featcircuits.edges``) so the products are exactly the library's."""
    prepared = []
    with lrp.lrp_rules(lrp.DEFAULT_RULES):
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
        with lrp.lrp_rules(lrp.DEFAULT_RULES):
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


# --------------------------------------------------------------------------------------
# One model's suite


def run_suite(key: str, cfg: dict, log: Callable[[str], None]) -> dict:
    res: dict[str, Any] = {"key": key, "config": {k: v for k, v in cfg.items() if not callable(v)}}
    t_suite = time.perf_counter()
    res["machine"] = machine_info(torch.float32)
    res["busy_processes_at_start"] = other_processes()
    log(f"[{key}] load model and dictionaries")
    model, dicts, dict_note = cfg["load"]()
    sm = SplicedModel(model, dicts)
    res["model"] = model.spec
    res["dictionaries"] = {"name": dicts.name, "note": dict_note, "widths": sorted(set(dicts.widths().values())),
                           "n_sites": len(sm.sites), "total_nodes_sum_aggregation": total_nodes(sm)}
    bs = cfg["batch_size"]
    batch, dropped = tokenize_pairs(make_pairs(TASK, cfg["n"], 0), model.tokenizer)
    res["task"] = {"name": TASK, "n": len(batch), "dropped": len(dropped), "seq_len": batch.seq_len,
                   "batch_size": bs}
    # warm-up (lazy initialisation, first-call allocations), not timed
    node_effects(sm, batch.slice(0, min(bs, len(batch))), "relp", batch_size=bs, progress=False)

    # ---- node effects per method, and the floor, interleaved ------------------------------
    log(f"[{key}] node effects per method + floor (n={len(batch)}, {cfg['rounds']} rounds)")
    subset = spread_sites(sm, cfg["subset_sites"]) if cfg.get("subset_sites") else None
    check = spread_sites(sm, cfg["validate_subset"]) if cfg.get("validate_subset") else None
    items = {**floor_items(sm, batch, bs), **unembedding_items(sm, batch, bs),
             **method_items(sm, batch, bs, cfg["ig_steps"], subset, cfg["exact"], check)}
    n_sample = cfg["exact_feature_sample"]
    if n_sample:
        items["exact_features_sample"] = exact_feature_sample(sm, batch, bs, n_sample)
    repeats = {**{f"ig{s}": cfg["ig_repeats"] for s in cfg["ig_steps"]},
               "exact_components": cfg["exact_repeats"], "exact_features_sample": cfg["exact_repeats"],
               "ig10_subset_check": cfg["ig_repeats"]}
    nodes = interleaved(items, cfg["rounds"], repeats, log, keep={"relp"})
    relp_effects = nodes["relp"].pop("result")
    sec: dict[str, Any] = {"n": len(batch), "items": strip_results(nodes)}
    # Exact and IG cost a fixed part (patch and clean cache: 2 spliced forwards) plus one part per
    # site; measured on a spread subset of sites they are scaled to all of them.
    fixed = 2 * nodes["spliced_forward"]["median_wall_s"]
    to_scale = []
    if subset is not None:
        to_scale += [(f"ig{s}", subset) for s in cfg["ig_steps"]] + ([("exact_components", subset)] if cfg["exact"] else [])
    if check is not None:
        to_scale.append(("ig10_subset_check", check))
    for name, sites_ in to_scale:
        scale = len(sm.sites) / len(sites_)
        d = sec["items"][name]
        d["measured_sites"] = sites_
        d["extrapolated_wall_s"] = round(fixed + max(d["median_wall_s"] - fixed, 0.0) * scale, 3)
        d["extrapolation"] = (f"measured on {len(sites_)} of {len(sm.sites)} sites ({', '.join(sites_)}); all-site "
                              f"time = 2 spliced forwards + (measured - 2 spliced forwards) x {scale:.2f}")
        p = d.get("passes")
        if p:
            d["passes_all_sites_estimate"] = {
                "forward_per_example": round(2 + (p["forward_per_example"] - 2) * scale, 2),
                "backward_per_example": round(p["backward_per_example"] * scale, 2)}
    if check is not None and "ig10" in sec["items"]:
        sec["subset_extrapolation_check"] = {
            "measured_all_sites_s": sec["items"]["ig10"]["median_wall_s"],
            "extrapolated_from_subset_s": sec["items"]["ig10_subset_check"]["extrapolated_wall_s"],
            "ratio": round(sec["items"]["ig10_subset_check"]["extrapolated_wall_s"]
                           / sec["items"]["ig10"]["median_wall_s"], 3)}
    if n_sample:
        d = sec["items"]["exact_features_sample"]
        per_node = d["median_wall_s"] / n_sample
        d["sampled_nodes"] = n_sample
        d["seconds_per_node"] = round(per_node, 5)
        d["extrapolated_all_nodes_wall_s"] = round(per_node * total_nodes(sm), 1)
        d["total_nodes"] = total_nodes(sm)
    sec["ratios"] = {
        "relp_over_atp": round_ratio(nodes, "relp", "atp"),
        "relp_over_spliced_forward": round_ratio(nodes, "relp", "spliced_forward"),
        "relp_over_hf_forward": round_ratio(nodes, "relp", "hf_forward"),
        "relp_over_spliced_fwd_bwd": round_ratio(nodes, "relp", "spliced_fwd_bwd"),
        "spliced_fwd_bwd_over_spliced_forward": round_ratio(nodes, "spliced_fwd_bwd", "spliced_forward"),
        "spliced_forward_over_hf_forward": round_ratio(nodes, "spliced_forward", "hf_forward"),
        "trace_bare_over_hf_forward": round_ratio(nodes, "trace_bare", "hf_forward"),
        "hf_forward_over_hf_body": round_ratio(nodes, "hf_forward", "hf_body"),
        "unembed_fwd_bwd_strided_over_contiguous": round_ratio(nodes, "unembed_fwd_bwd_strided", "unembed_fwd_bwd"),
        "spliced_forward_default_threads_over_spliced_forward": round_ratio(
            nodes, "spliced_forward_default_threads", "spliced_forward"),
        "relp_over_atp_cpu": round_ratio(nodes, "relp", "atp", "cpu_s"),
        "relp_over_spliced_forward_cpu": round_ratio(nodes, "relp", "spliced_forward", "cpu_s"),
    }
    relp_med = nodes["relp"]["median_wall_s"]
    for name in [f"ig{s}" for s in cfg["ig_steps"]] + (["exact_components"] if cfg["exact"] else []):
        d = sec["items"][name]
        if d.get("extrapolated_wall_s"):
            sec["ratios"][f"{name}_over_relp"] = {"median": round(d["extrapolated_wall_s"] / relp_med, 4),
                                                  "per_round": [], "how": "extrapolated all-site time / RelP median"}
        else:
            sec["ratios"][f"{name}_over_relp"] = round_ratio(nodes, name, "relp")
    un = sec["items"].get("unembed_fwd_bwd")
    if un:
        # RelP per chunk runs one counterfactual forward (unembedding forward) and one clean forward
        # + backward (unembedding forward + backward); without a full-vocabulary unembedding:
        est = relp_med - sec["items"]["unembed_forward"]["median_wall_s"] - un["median_wall_s"]
        fwd_est = nodes["spliced_forward"]["median_wall_s"] - sec["items"]["unembed_forward"]["median_wall_s"]
        sec["without_full_unembedding_estimate"] = {
            "relp_s": round(est, 4), "spliced_forward_s": round(fwd_est, 4),
            "relp_over_spliced_forward": round(est / fwd_est, 3) if fwd_est > 0 else None,
            "relp_speedup": round(relp_med / est, 3) if est > 0 else None,
            "how": "RelP median - unembedding forward - unembedding forward+backward (both measured alone on "
                   "random hidden states); the forward minus one unembedding forward"}
    res["nodes"] = sec

    # ---- profile of one RelP chunk: what bounds it ----------------------------------------
    if cfg.get("profile"):
        log(f"[{key}] profile one RelP chunk")
        res["profile_relp_chunk"] = profile_relp(sm, batch.slice(0, min(bs, len(batch))), bs)

    # ---- edges: batched vs one backward per downstream node --------------------------------
    log(f"[{key}] edges (circuit top-k {cfg['top_k']})")
    # As discover does: the node stage keeps its per-chunk RelP gradients and the edge stage reuses them.
    del relp_effects
    grads: list = []
    mean = node_effects(sm, batch, "relp", batch_size=bs, progress=False, gradients=grads).mean("sum")
    masks = select_nodes(mean, Thresholds(top_k=cfg["top_k"]))
    order = downstream_order(sm, mean, masks)
    full = len(order)

    def edge_call(mk, batched):
        return lambda: edge_effects(sm, batch, mk, "relp", batch_size=bs, batched=batched, progress=False,
                                    gradients=grads)

    eb = {"batched": edge_call(masks, True), "one_backward_per_node": edge_call(masks, False)}
    eb = {k: counted(sm, len(batch), f) for k, f in eb.items()}
    eb["fixed_part"] = counted(sm, len(batch), lambda: edges_fixed_part(sm, batch, bs))
    edges = interleaved(eb, cfg["edge_rounds"], None, log, keep={"batched", "one_backward_per_node"})
    diff = edge_diff(edges["batched"].pop("result"), edges["one_backward_per_node"].pop("result"))
    esec = {"circuit_nodes_selected": count_nodes(masks), "downstream_nodes": full, "items": edges,
            "same_numbers": {**diff, "tolerance": 1e-5,
                             "ok_abs": diff["max_abs_diff"] <= 1e-5, "ok_rel": diff["max_rel_diff"] <= 1e-5},
            "speedup": round_ratio(edges, "one_backward_per_node", "batched")}
    # the same ratio without the part both paths share (site gradients + the cut forward)
    fx = {r["round"]: r["wall_s"] for r in edges["fixed_part"]["runs"]}
    bt = {r["round"]: r["wall_s"] for r in edges["batched"]["runs"]}
    ub = {r["round"]: r["wall_s"] for r in edges["one_backward_per_node"]["runs"]}
    per = [(ub[k] - fx[k]) / (bt[k] - fx[k]) for k in sorted(fx) if k in bt and k in ub and bt[k] > fx[k]]
    esec["speedup_vjp_part"] = {"median": round(statistics.median(per), 4) if per else None,
                                "per_round": [round(x, 4) for x in per],
                                "how": "(one backward per node - fixed part) / (batched - fixed part), per round"}
    # the vector-Jacobian products alone, on one chunk
    try:
        vj = interleaved(vjp_part_items(sm, batch.slice(0, min(bs, len(batch))), masks, grads[0]),
                         cfg["edge_rounds"], None, log)
        esec["vjp_part_one_chunk"] = {"examples": min(bs, len(batch)), "items": vj,
                                      "speedup": round_ratio(vj, "vjp_one_backward_per_node", "vjp_batched")}
    except (ImportError, AttributeError, TypeError) as exc:  # the private helpers changed
        esec["vjp_part_one_chunk"] = {"unavailable": repr(exc)}
    # time vs number of downstream nodes
    ks = sorted({k for k in cfg["sweep_ks"] if k < full} | {full})
    sweep = []
    for k in ks:
        mk = masks_of(order[:k], masks)
        items_k = {"batched": counted(sm, len(batch), edge_call(mk, True)),
                   "one_backward_per_node": counted(sm, len(batch), edge_call(mk, False))}
        log(f"  downstream nodes k={k}")
        r = interleaved(items_k, cfg["sweep_rounds"], None, log)
        sweep.append({"downstream_nodes": k, **{name: {kk: v[kk] for kk in ("median_wall_s", "median_cpu_s",
                                                                            "max_peak_rss_mib",
                                                                            "median_rss_growth_mib", "passes",
                                                                            "runs")}
                                                 for name, v in r.items()}})
    esec["vs_downstream_nodes"] = sweep
    if len(sweep) >= 2:
        a, b = sweep[0], sweep[-1]
        dk = b["downstream_nodes"] - a["downstream_nodes"]
        if dk > 0:
            esec["marginal_seconds_per_downstream_node"] = {
                name: round((b[name]["median_wall_s"] - a[name]["median_wall_s"]) / dk, 5)
                for name in ("batched", "one_backward_per_node")}
    res["edges"] = esec
    del grads

    # ---- full discover: relp vs ig --------------------------------------------------------
    dn = cfg["discover_n"]
    dbatch = batch if dn == len(batch) else tokenize_pairs(make_pairs(TASK, dn, 0), model.tokenizer)[0]
    log(f"[{key}] discover relp vs ig (steps {cfg['discover_ig_steps']}), n={len(dbatch)}")
    th = Thresholds(top_k=cfg["top_k"])

    def disc(method: str, steps: int = 10):
        def go():
            c = discover_circuit(sm, dbatch, method, thresholds=th, steps=steps, batch_size=bs, progress=False)
            return {"seconds": c.provenance["seconds"], "n_nodes": c.n_nodes, "n_edges": c.n_edges}
        return counted(sm, len(dbatch), go)

    ig_name = f"ig{cfg['discover_ig_steps']}"
    ditems = {"relp": disc("relp")}
    if cfg["discover_ig"]:
        ditems[ig_name] = disc("ig", cfg["discover_ig_steps"])
    dres = interleaved(ditems, cfg["discover_rounds"], {ig_name: cfg["discover_ig_repeats"]}, log,
                       keep=set(ditems))
    for name in ditems:
        dres[name]["circuit"] = dres[name].pop("result")
    res["discover"] = {"n": len(dbatch), "top_k": cfg["top_k"], "items": dres, "ig_steps": cfg["discover_ig_steps"],
                       "ratio_relp_over_ig": round_ratio(dres, "relp", ig_name),
                       "ratio_relp_over_ig_cpu": round_ratio(dres, "relp", ig_name, "cpu_s")}
    if ig_name in sec["items"]:
        # IG discover = IG node effects + the edge stage, so it takes longer than IG node effects
        # alone: RelP discover / IG nodes is an upper bound (a check on the measured ratio, or the
        # figure reported when IG discover is not timed).
        ig_nodes = sec["items"].get(ig_name, {})
        ig_s = ig_nodes.get("extrapolated_wall_s") or ig_nodes.get("median_wall_s")
        if ig_s and len(dbatch) == sec["n"]:
            res["discover"]["ratio_relp_over_ig_upper_bound"] = {
                "median": round(dres["relp"]["median_wall_s"] / ig_s, 4), "ig_nodes_s": ig_s,
                "how": f"RelP full discover / IG ({cfg['discover_ig_steps']} steps) node effects alone"
                       + (" (extrapolated from a subset of sites)" if ig_nodes.get("extrapolated_wall_s") else "")
                       + "; IG full discover also computes edges, so the true ratio is lower"}

    # ---- scaling with the number of examples ----------------------------------------------
    scal = []
    for n in cfg["scaling_n"]:
        b_n = tokenize_pairs(make_pairs(TASK, n, 0), model.tokenizer)[0]
        log(f"[{key}] scaling n={len(b_n)}")
        its = {"spliced_forward": counted(sm, len(b_n), lambda b_n=b_n: spliced_forwards(sm, b_n, bs)),
               "atp": counted(sm, len(b_n), lambda b_n=b_n: node_effects(sm, b_n, "atp", batch_size=bs,
                                                                         progress=False)),
               "relp": counted(sm, len(b_n), lambda b_n=b_n: node_effects(sm, b_n, "relp", batch_size=bs,
                                                                          progress=False)),
               "discover_relp": counted(sm, len(b_n), lambda b_n=b_n: discover_relp(sm, b_n, th, bs))}
        if cfg.get("scaling_ig"):
            its["ig10"] = counted(sm, len(b_n), lambda b_n=b_n: node_effects(sm, b_n, "ig", steps=10,
                                                                             batch_size=bs, progress=False))
        rounds = cfg["scaling_rounds"] if n <= cfg["scaling_full_rounds_up_to"] else 1
        r = interleaved(its, rounds, None, log)
        scal.append({"n": len(b_n), "rounds": rounds, "items": r})
    res["scaling_n"] = {"points": scal, "cut": cfg.get("scaling_cut_note")}

    # ---- scaling with dictionary width ----------------------------------------------------
    wres = []
    wn = cfg["width_n"]
    wbatch = tokenize_pairs(make_pairs(TASK, wn, 0), model.tokenizer)[0]
    for label, make in cfg["widths"](model):
        d_set = make()
        smw = SplicedModel(model, d_set)
        width = sorted(set(d_set.widths().values()))
        log(f"[{key}] width {label} ({width})")
        node_effects(smw, wbatch.slice(0, min(bs, len(wbatch))), "relp", batch_size=bs, progress=False)
        its = {"spliced_forward": counted(smw, wn, lambda: spliced_forwards(smw, wbatch, bs)),
               "atp": counted(smw, wn, lambda: node_effects(smw, wbatch, "atp", batch_size=bs, progress=False)),
               "relp": counted(smw, wn, lambda: node_effects(smw, wbatch, "relp", batch_size=bs, progress=False)),
               "discover_relp": counted(smw, wn, lambda: discover_relp(smw, wbatch, th, bs))}
        r = interleaved(its, cfg["width_rounds"], None, log)
        wres.append({"label": label, "widths": width, "total_nodes": total_nodes(smw), "items": r})
        del smw, d_set
    res["scaling_width"] = {"n": wn, "points": wres}

    # ---- peak RSS of the real CLI ----------------------------------------------------------
    if cfg.get("cli"):
        log(f"[{key}] CLI peak RSS: {' '.join(cfg['cli'])}")
        res["cli_discover"] = cli_peak_rss(cfg["cli"])
        log(f"    -> {res['cli_discover']}")

    res["loadavg_at_end"] = os.getloadavg()
    res["busy_processes_at_end"] = other_processes()
    res["suite_wall_s"] = round(time.perf_counter() - t_suite, 1)
    return res


def profile_relp(sm: SplicedModel, chunk, bs: int) -> dict:
    """torch.profiler over one RelP node-effects chunk: the ops that take the time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        node_effects(sm, chunk, "relp", batch_size=bs, progress=False)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    top = [{"op": e.key, "shapes": str(e.input_shapes)[:120], "calls": e.count,
            "self_cpu_ms": round(e.self_cpu_time_total / 1000, 1),
            "share": round(e.self_cpu_time_total / total, 4)} for e in rows]
    vocab = sm.model.hf.config.vocab_size if hasattr(sm.model.hf.config, "vocab_size") else None
    unembed = sum(e.self_cpu_time_total for e in events
                  if vocab and e.key in ("aten::mm", "aten::addmm", "aten::matmul", "aten::bmm")
                  and str(vocab) in str(e.input_shapes))
    return {"examples": len(chunk), "self_cpu_ms_total": round(total / 1000, 1), "top_ops": top,
            "unembedding_share": round(unembed / total, 4) if vocab else None, "vocab_size": vocab}


def cli_peak_rss(argv: list[str]) -> dict:
    """Run the real CLI in a subprocess; its max RSS from /usr/bin/time -v (else getrusage)."""
    out = Path(tempfile.mkdtemp(prefix="fc-bench-cli-"))
    cmd = [str(ROOT / ".venv" / "bin" / "featcircuits"), *argv, "--out", str(out / "run")]
    use_time = Path("/usr/bin/time").is_file()
    full = (["/usr/bin/time", "-v"] if use_time else []) + cmd
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(full, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    rec: dict[str, Any] = {"command": "featcircuits " + " ".join(argv) + " --out DIR", "returncode": proc.returncode,
                           "wall_s": round(wall, 1), "load1": round((load0 + os.getloadavg()[0]) / 2, 2),
                           "threads": os.environ.get("OMP_NUM_THREADS") or f"torch default ({DEFAULT_THREADS})"}
    max_kib = None
    if use_time:
        for line in proc.stderr.splitlines():
            if "Maximum resident set size" in line:
                max_kib = int(line.rsplit(":", 1)[1])
        rec["method"] = "/usr/bin/time -v: Maximum resident set size of the featcircuits process"
    if max_kib is None:
        import resource

        max_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        rec["method"] = "resource.getrusage(RUSAGE_CHILDREN).ru_maxrss"
    rec["peak_rss_gib"] = round(max_kib / 2**20, 3)
    summary = out / "run" / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        rec["summary_seconds"] = s.get("seconds")
        rec["dictionaries"] = s.get("dictionaries")
        rec["n_nodes"], rec["n_edges"] = s.get("n_nodes"), s.get("n_edges")
    if proc.returncode != 0:
        rec["stderr_tail"] = proc.stderr[-1500:]
    shutil.rmtree(out, ignore_errors=True)
    return rec


# --------------------------------------------------------------------------------------
# Configurations


def tiny_config(args) -> dict:
    from featcircuits.testing import random_saelens_set, tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="fc-bench-tiny-"))
    n_layers, d_model = 4, 64

    def load():
        model = tiny_model("gemma3", n_layers=n_layers, d_model=d_model)
        random_saelens_set(model, tmp / "w256", width=256)
        return model, load_dictionary_set(str(tmp / "w256"), model.adapter), \
            "random sae-lens set, width 256 (testing.random_saelens_set)"

    widths = [64, 256, 1024, 4096] if args.quick else [64, 256, 1024, 4096, 16384]

    def width_sets(model_):
        out = [("identity", lambda: identity_set(model_.adapter))]
        for w in widths:
            def make(w=w):
                folder = tmp / f"w{w}"
                if not folder.is_dir():
                    random_saelens_set(model_, folder, width=w)
                return load_dictionary_set(str(folder), model_.adapter)
            out.append((f"random sae-lens {w}", make))
        return out

    q = args.quick
    return {
        "description": f"tiny random Gemma 3 ({n_layers} layers, d_model {d_model}; featcircuits.testing.tiny_model)",
        "load": load, "n": 32, "batch_size": 16, "rounds": 1 if q else args.repeats or 5,
        "ig_steps": [5, 10, 20], "subset_sites": None, "validate_subset": 3,
        "ig_repeats": 1 if q else args.repeats or 5,
        "exact": True, "exact_repeats": 1 if q else args.repeats or 5, "exact_feature_sample": 32,
        "profile": not q, "top_k": 100, "edge_rounds": 1 if q else args.repeats or 5,
        "sweep_ks": [1, 2, 4, 8, 16, 32, 64, 128, 256], "sweep_rounds": 1 if q else 3,
        "discover_n": 32, "discover_ig": True, "discover_ig_steps": 10,
        "discover_rounds": 1 if q else args.repeats or 5, "discover_ig_repeats": 1 if q else args.repeats or 5,
        "scaling_n": [8, 32, 128] if q else [8, 16, 32, 64, 128, 256], "scaling_ig": True,
        "scaling_rounds": 1 if q else 3, "scaling_full_rounds_up_to": 256, "scaling_cut_note": None,
        "width_n": 32, "widths": width_sets, "width_rounds": 1 if q else 3, "cli": None,
    }


def starter_ready() -> tuple[bool, str]:
    """Whether the registry has a ``starter`` entry whose folder holds dictionaries."""
    from featcircuits.dictionaries import local_set_folder

    entry = registry().get("starter")
    if entry is None:
        return False, "no 'starter' entry in the dictionary registry"
    folder = local_set_folder(entry.get("path", "starter"))
    n = sum(1 for sub in folder.iterdir() if (sub / "cfg.json").is_file() or (sub / "ae.pt").is_file()) \
        if folder is not None else 0
    if not n:
        return False, f"'starter' is registered but its folder ({entry.get('path', 'starter')}) holds no dictionaries"
    return True, f"'starter' from the dictionary registry ({n} site dictionaries)"


def gemma_config(args) -> dict:
    saes = args.saes
    ready, why = starter_ready()
    if saes == "auto":
        saes = "starter" if ready else "identity"
        note = why if ready else f"{why}: identity dictionaries (neurons as features)"
    else:
        note = f"--saes {saes}"

    def load():
        model = load_model(OFFLINE_ALIAS)
        return model, load_dictionary_set(saes, model.adapter, OFFLINE_ALIAS), note

    def width_sets(model):
        adapter = model.adapter
        out = [("identity (640)", lambda: identity_set(adapter))]
        if ready:
            out.append(("starter", lambda: load_dictionary_set("starter", adapter, OFFLINE_ALIAS)))
        return out

    q = args.quick
    gn = 8 if q and args.gemma_n == 16 else args.gemma_n
    max_n = args.gemma_max_n or (32 if q else 128)
    scaling_n = [n for n in [8, 16, 32, 64, 128, 256] if n <= max_n]
    cut = None if scaling_n[-1] >= 256 else (
        f"cut at n={scaling_n[-1]} (of 8 -> 256) to keep the Gemma run near 20 minutes (n=256 alone took "
        f"about 6 minutes here, and the time went to the IG full discover instead); examples run in chunks "
        f"of 16, so from n=16 on the cost grows linearly (see seconds per example below); "
        f"--gemma-max-n 256 runs the full range")
    cli = None
    if not args.no_cli:
        cli = ["discover", "--model", OFFLINE_ALIAS, "--saes", saes, "--task", TASK, "--method", "relp",
               "--n", "64"]
    return {
        "description": f"offline Gemma 3 270M ({OFFLINE_ALIAS}), dictionaries: {saes}",
        "saes": saes, "load": load, "n": gn, "batch_size": 16, "rounds": 1 if q else args.repeats or 3,
        "ig_steps": [10] if q else [5, 10, 20], "subset_sites": None if args.gemma_sites == 0 else args.gemma_sites,
        "validate_subset": None, "ig_repeats": 1,
        "exact": True, "exact_repeats": 1, "exact_feature_sample": 8 if q else 16, "profile": True,
        "top_k": 100, "edge_rounds": 1 if q else 3, "sweep_ks": [1, 4, 16, 64], "sweep_rounds": 1 if q else 3,
        "discover_n": gn, "discover_ig": (not q) if args.gemma_full_ig is None else args.gemma_full_ig, "discover_ig_steps": 10,
        "discover_rounds": 1 if q else 2, "discover_ig_repeats": 1,
        "scaling_n": scaling_n, "scaling_ig": False, "scaling_rounds": 1 if q else 3,
        "scaling_full_rounds_up_to": 16, "scaling_cut_note": cut,
        "width_n": 16, "widths": width_sets, "width_rounds": 1 if q else 2, "cli": cli,
    }


# --------------------------------------------------------------------------------------
# Report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,gemma", help="comma list of tiny, gemma (default both)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes and one repeat (a smoke run)")
    ap.add_argument("--repeats", type=int, default=None, help="rounds for the cheap items (default 5 tiny, 3 Gemma)")
    ap.add_argument("--saes", default="auto",
                    help="Gemma dictionary set: auto (starter when registered, else identity), starter, identity")
    ap.add_argument("--gemma-sites", type=int, default=3,
                    help="on Gemma, time exact patching and IG node effects on this many evenly spread sites "
                         "and extrapolate to all 55 (default 3; 0 = all sites, measured: IG with 10 steps "
                         "takes ~7 s per site at n=16 here)")
    ap.add_argument("--gemma-n", type=int, default=16, help="examples for Gemma's per-method, edge and discover "
                                                           "sections (default 16: one chunk)")
    ap.add_argument("--gemma-full-ig", action=argparse.BooleanOptionalAction, default=None,
                    help="time IG (10 steps) full discover on Gemma, all 55 sites (about 6 minutes here; default "
                         "on, off with --quick); without it the RelP/IG discover ratio on Gemma is an upper bound "
                         "from IG node effects extrapolated from a subset of sites")
    ap.add_argument("--gemma-max-n", type=int, default=None,
                    help="largest n in Gemma's scaling (default 128; 32 with --quick)")
    ap.add_argument("--no-cli", action="store_true", help="skip the CLI peak-RSS measurement on Gemma")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the measurements (default 1: on a shared, oversubscribed machine "
                         "torch's default of one thread per core makes every op wait for a descheduled thread; "
                         "one floor item is also measured with torch's default, to show it). 0 = torch's default")
    ap.add_argument("--out", default=str(OUT_DEFAULT), help="output folder (default results/benchmarks)")
    ap.add_argument("--no-results-readme", action="store_true",
                    help="do not update the '## Benchmarks' section of results/README.md")
    ap.add_argument("--cli-only", action="store_true",
                    help="re-measure only the peak RSS of the real `featcircuits discover` on Gemma (e.g. once "
                         "the starter set exists) and merge it into the existing benchmarks.json")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite README and plots from the existing benchmarks.json, measure nothing")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    global DEFAULT_THREADS
    DEFAULT_THREADS = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "benchmarks.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("models", {})
    command = "python scripts/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    if args.cli_only:
        cfg = gemma_config(args)
        log(f"[gemma] CLI peak RSS only: {' '.join(cfg['cli'])}")
        gemma = data["models"].setdefault("gemma", {})
        gemma["cli_discover"] = cli_peak_rss(cfg["cli"])
        gemma["cli_discover"]["measured"] = time.strftime("%Y-%m-%d %H:%M:%S")
        gemma["cli_discover"]["command_of_this_measurement"] = command
        log(f"    -> {gemma['cli_discover']}")
        write_json(path, data)
    keys = [] if args.report_only or args.cli_only else [m.strip() for m in args.models.split(",") if m.strip()]
    for key in keys:
        if key == "tiny":
            cfg = tiny_config(args)
        elif key == "gemma":
            cfg = gemma_config(args)
        else:
            raise SystemExit(f"unknown model key {key!r}: use tiny, gemma")
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        res = run_suite(key, cfg, log)
        res["command"] = command
        res["started"], res["finished"] = started, time.strftime("%Y-%m-%d %H:%M:%S")
        res["description"] = cfg["description"]
        data["models"][key] = res
        data["generated_by"] = "scripts/benchmark.py"
        write_json(path, data)
        log(f"[{key}] done in {res['suite_wall_s']} s -> {path}")
    write_report(data, out, None if args.no_results_readme else RESULTS_README)
    return 0




# --------------------------------------------------------------------------------------
# Report: README, plots and the results/README.md section, all from benchmarks.json

TARGETS = [
    # (id, what, model keys, comparison, target)
    ("relp_atp", "RelP nodes / AtP nodes", "<=", 1.3),
    ("relp_forward", "RelP nodes / one spliced forward pass", "<=", 5.0),
    ("discover", "RelP full discover / IG (steps 10) full discover", "<=", 0.2),
    ("edges_speedup", "one-backward-per-node edges / batched edges (speed-up)", ">=", 5.0),
    ("edges_same", "batched vs one-backward-per-node edges: largest absolute difference", "<=", 1e-5),
    ("cli_rss", "peak RSS of `featcircuits discover` (offline default, starter, n=64), GiB", "<", 6.0),
]
MODEL_NAMES = {"tiny": "tiny", "gemma": "Gemma 3 270M"}


def _med(d: dict | None) -> float | None:
    return None if not d else d.get("median")


def _measured(tid: str, m: dict) -> tuple[float | None, str]:
    """The measured value of target ``tid`` on model result ``m`` and a note."""
    if tid == "relp_atp":
        return _med(m["nodes"]["ratios"].get("relp_over_atp")), ""
    if tid == "relp_forward":
        return _med(m["nodes"]["ratios"].get("relp_over_spliced_forward")), ""
    if tid == "discover":
        d = m.get("discover", {})
        if d.get("ratio_relp_over_ig"):
            return _med(d.get("ratio_relp_over_ig")), f"n={d.get('n')}, both measured"
        ub = d.get("ratio_relp_over_ig_upper_bound")
        return _med(ub), (f"n={d.get('n')}; upper bound: {ub['how']}" if ub else "")
    if tid == "edges_speedup":
        e = m.get("edges", {})
        return _med(e.get("speedup")), f"{e.get('downstream_nodes')} downstream nodes"
    if tid == "edges_same":
        e = m.get("edges", {}).get("same_numbers", {})
        return e.get("max_abs_diff"), (f"relative to the largest absolute weight ({e.get('max_abs_weight', 0):.3g}): "
                                      f"{e.get('max_rel_diff', 0):.2g}") if e else ""
    if tid == "cli_rss":
        c = m.get("cli_discover")
        if not c:
            return None, ""
        note = f"dictionaries: {c.get('dictionaries')}"
        if c.get("returncode"):
            note += f"; CLI exited {c['returncode']}"
        return c.get("peak_rss_gib"), note
    return None, ""


def target_rows(data: dict) -> list[dict]:
    rows = []
    for tid, what, cmp, target in TARGETS:
        for key, m in data.get("models", {}).items():
            if tid == "cli_rss" and key != "gemma":
                continue
            value, note = _measured(tid, m)
            if value is None:
                continue
            ok = value <= target if cmp == "<=" else value >= target if cmp == ">=" else value < target
            if tid == "cli_rss" and (m.get("cli_discover") or {}).get("dictionaries") != "starter":
                note += " (the starter set was not available: measured with identity dictionaries)"
            elif tid == "cli_rss" and m.get("dictionaries", {}).get("name") != "starter":
                note += (" (re-measured alone with `--cli-only` once the starter set existed; the other Gemma rows "
                         "were measured with identity dictionaries)")
            if ok:
                status = "met" + (" (upper bound)" if "upper bound" in note else "")
            elif cmp == ">=":
                status = f"missed: {value:.3g} is {target / value:.2f}x short of {target:g}"
            elif target and tid != "edges_same":
                status = f"missed: {value / target:.2f}x the target ({(value / target - 1) * 100:.0f} % over)"
            else:
                status = f"missed: {value:.2g} > {target:g}"
            rows.append({"id": tid, "what": what, "model": key, "measured": value, "cmp": cmp, "target": target,
                         "ok": ok, "status": status, "note": note})
    return rows


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _fmt_v(x: float | None, tid: str = "") -> str:
    if x is None:
        return "-"
    if tid == "edges_same":
        return f"{x:.2g}"
    return f"{x:.3g}"


def _mi(m: dict, section: str, name: str) -> dict:
    return m.get(section, {}).get("items", {}).get(name, {})


def bounds_text(key: str, m: dict, row: dict) -> str:
    """Why a missed target is missed, from the numbers measured (floor parts, profile, sweep)."""
    items = m["nodes"]["items"]
    w = lambda n: items.get(n, {}).get("median_wall_s")  # noqa: E731
    prof = m.get("profile_relp_chunk") or {}
    tid = row["id"]
    lines = []
    if tid in ("relp_forward", "relp_atp"):
        fwd, hf, body, bare, fb = (w("spliced_forward"), w("hf_forward"), w("hf_body"), w("trace_bare"),
                                   w("spliced_fwd_bwd"))
        relp, atp = w("relp"), w("atp")
        if tid == "relp_forward" and None not in (fwd, hf, body, bare, fb, relp):
            lines.append(
                f"RelP node effects are, per chunk of examples, one spliced forward of the counterfactual prompts "
                f"(no gradients) plus one spliced forward of the clean prompts with every site's features and "
                f"error as gradient leaves and the LRP rules on, then one backward. Measured here: spliced "
                f"forward {fwd:.3g} s, spliced forward+backward {fb:.3g} s ({fb / fwd:.2f}x a forward), so the "
                f"floor for RelP is about {1 + fb / fwd:.2f}x a forward before the LRP surrogates and the effect "
                f"products ({relp:.3g} s measured, {relp / fwd:.2f}x).")
            lines.append(
                f"Inside one spliced forward ({fwd:.3g} s): the model body {body:.3g} s, the last-position "
                f"unembedding {max(hf - body, 0):.3g} s ({max(hf - body, 0) / fwd * 100:.0f} %), nnsight's trace "
                f"{bare - hf:+.3g} s, splicing (encode/decode at {m['dictionaries']['n_sites']} sites and the "
                f"per-site hooks) {fwd - bare:+.3g} s ({(fwd - bare) / fwd * 100:.0f} %).")
        un = m["nodes"].get("without_full_unembedding_estimate")
        if tid == "relp_forward" and un and items.get("unembed_forward") and (un.get("relp_speedup") or 0) > 1.1:
            uf, ub = items["unembed_forward"]["median_wall_s"], items["unembed_fwd_bwd"]["median_wall_s"]
            lines.append(
                f"The unembedding is measured alone too: forward {uf:.3g} s, forward + backward {ub:.3g} s for "
                f"these chunks. The metric reads two logits per example, yet every forward computes all "
                f"{prof.get('vocab_size') or 'vocabulary'} and the backward multiplies the dense logit gradient "
                f"back through the whole unembedding. Without that (logits of the two answer tokens only), RelP "
                f"would take about {un['relp_s']:.3g} s ({un['relp_speedup']:.2g}x faster) against a forward "
                f"of {un['spliced_forward_s']:.3g} s: {un['relp_over_spliced_forward']:.2f}x (an estimate: "
                f"measured times minus the measured unembedding parts).")
        if tid == "relp_atp" and None not in (relp, atp):
            lines.append(
                f"RelP and AtP make the same passes; RelP's extra {relp - atp:.3g} s is the LRP surrogates "
                f"(each norm recomputed with its scale detached, the identity-rule ratio f(x)/x at every "
                f"activation, the half-rule product in the gated MLP) in the clean forward and their backward.")
        if prof.get("top_ops"):
            top = ", ".join(f"{o['op']} {o['share'] * 100:.0f} %" for o in prof["top_ops"][:5])
            un = prof.get("unembedding_share")
            lines.append(f"torch.profiler over one RelP chunk ({prof['examples']} examples): {top}"
                         + (f"; matmuls with the {prof['vocab_size']:,}-token unembedding: {un * 100:.0f} % of "
                            f"self CPU time." if un else "."))
    if tid == "edges_speedup":
        e = m["edges"]
        it = e["items"]
        fixed = it.get("fixed_part", {}).get("median_wall_s")
        bt, ub = it["batched"]["median_wall_s"], it["one_backward_per_node"]["median_wall_s"]
        vjp = e.get("speedup_vjp_part", {}).get("median")
        if fixed is not None:
            lines.append(
                f"Both paths are given the node stage's RelP gradients (as in discover) and first do the same "
                f"work per chunk of examples: one cut forward that records every direct Jacobian (every "
                f"site's output replaced by fresh leaves, under the LRP rules), then per downstream site the "
                f"encoder and the scalars to differentiate. Measured alone, the cut forward takes {fixed:.3g} s of "
                f"the batched path's {bt:.3g} s ({fixed / bt * 100:.0f} %), so even free vector-Jacobian products "
                f"could not make the whole call more than {ub / fixed:.2g}x faster than the one-backward path "
                f"({ub:.3g} s). On the vector-Jacobian part alone (total minus the shared part) batching is "
                + (f"{vjp:.3g}x faster." if vjp else "not measurably faster."))
        vp = e.get("vjp_part_one_chunk", {})
        if vp.get("speedup"):
            vb = vp["items"]["vjp_batched"]["median_wall_s"]
            vu = vp["items"]["vjp_one_backward_per_node"]["median_wall_s"]
            lines.append(f"Timed alone on one chunk of {vp['examples']} examples, the vector-Jacobian products take "
                         f"{vb:.3g} s batched and {vu:.3g} s with one backward per node: batching itself is "
                         f"**{vp['speedup']['median']:.3g}x** faster, but that part is "
                         f"{vb / fixed * 100 if fixed else 0:.0f} % (batched) of the shared part above.")
        marg = e.get("marginal_seconds_per_downstream_node", {})
        if marg and marg.get("batched", 0) > 0:
            lines.append(f"From the sweep over downstream nodes: each extra node costs "
                         f"{marg['one_backward_per_node']:.3g} s with one backward per node and {marg['batched']:.3g}"
                         f" s batched (marginal ratio {marg['one_backward_per_node'] / marg['batched']:.2g}x).")
        lines.append("One backward per node is itself cheap here: it runs only through one block (from the "
                     "upstream sites' leaves to the downstream site), not through the model, so batching can "
                     "only save the per-call autograd overhead and the repeated small kernels.")
    if tid == "discover":
        d = m["discover"]["items"]
        sec_ = {k: v.get("circuit", {}).get("seconds", {}) for k, v in d.items()}
        ig = next((k for k in d if k.startswith("ig")), None)
        if ig and "relp" in sec_:
            r, g = sec_["relp"], sec_[ig]
            pig = m["nodes"]["items"].get(ig, {}).get("passes", {})
            prl = m["nodes"]["items"].get("relp", {}).get("passes", {})
            try:
                ratio_p = ((pig["forward_per_example"] + pig["backward_per_example"])
                           / (prl["forward_per_example"] + prl["backward_per_example"]))
            except (KeyError, ZeroDivisionError):
                ratio_p = float("nan")
            lines.append(
                f"First runs: RelP nodes {r['nodes']:.3g} s + edges {r['edges']:.3g} s; IG nodes {g['nodes']:.3g} s "
                f"+ edges {g['edges']:.3g} s. IG stacks its {ig[2:]} interpolation steps along the batch, so it "
                f"makes one forward + backward call *per site*; its passes per example "
                f"({pig.get('forward_per_example', '?')} forward + {pig.get('backward_per_example', '?')} backward, "
                f"against RelP's {prl.get('forward_per_example', '?')} + {prl.get('backward_per_example', '?')}) "
                f"would make it ~{ratio_p:.0f}x RelP if cost followed rows, but on a model this small a call over "
                f"{ig[2:]}x the rows costs little more than one (per-call overhead dominates), so IG nodes cost "
                f"{g['nodes'] / r['nodes']:.2g}x RelP nodes. "
                f"The edge stage costs both methods about the same and is {r['edges'] / (r['nodes'] + r['edges']) * 100:.0f} % "
                f"of RelP's discover, which bounds the ratio from below at about "
                f"{r['edges'] / (g['nodes'] + g['edges']):.2g} even if RelP nodes were free.")
    if tid == "cli_rss":
        lines.append("The CLI holds the fp32 model (Gemma 3 270M: 268M parameters, 1.0 GiB, of which the "
                     "262,144 x 640 embedding is 0.63 GiB), the dictionaries, one chunk's activations and "
                     "gradients, and the dense node effects.")
    return " ".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(name: str) -> str:
    from featcircuits.plotting import METHOD_COLORS

    if name.startswith("ig"):
        return METHOD_COLORS["ig"]
    if name.startswith("exact"):
        return METHOD_COLORS["exact"]
    return METHOD_COLORS.get(name, "#999999")


def plot_nodes(key: str, m: dict, out: Path) -> str:
    from featcircuits.plotting import save_figure

    plt = _plt()
    items = m["nodes"]["items"]
    order = ["hf_body", "hf_forward", "unembed_forward", "unembed_fwd_bwd", "unembed_fwd_bwd_strided",
             "trace_bare", "spliced_forward", "spliced_forward_default_threads", "spliced_fwd_bwd", "atp", "relp",
             "ig5", "ig10", "ig20", "exact_components"]
    names, vals, cols, hatch = [], [], [], []
    for n in order:
        if n not in items:
            continue
        v = items[n].get("extrapolated_wall_s") or items[n]["median_wall_s"]
        names.append(n + (" (extrapolated)" if items[n].get("extrapolated_wall_s") else ""))
        vals.append(v)
        cols.append(_color(n) if n in ("atp", "relp") or n.startswith(("ig", "exact")) else "#bbbbbb")
    ex = items.get("exact_features_sample")
    if ex and ex.get("extrapolated_all_nodes_wall_s"):
        names.append("exact, every feature (extrapolated)")
        vals.append(ex["extrapolated_all_nodes_wall_s"])
        cols.append("#222222")
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(names) + 1.2))
    y = range(len(names))
    ax.barh(list(y), vals, color=cols)
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    fwd = items["spliced_forward"]["median_wall_s"]
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.3g} s ({v / fwd:.3g}x fwd)", va="center", fontsize=8)
    ax.set_xlabel(f"wall seconds for n={m['nodes']['n']} examples (median of rounds, log scale)")
    ax.set_title(f"Node effects and the floor: {MODEL_NAMES.get(key, key)}")
    ax.set_xlim(right=max(vals) * 30)
    stem = out / f"nodes_{key}"
    save_figure(fig, stem)
    plt.close(fig)
    return stem.name


def plot_edges(key: str, m: dict, out: Path) -> str:
    from featcircuits.plotting import save_figure

    plt = _plt()
    sw = m["edges"]["vs_downstream_nodes"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = [p["downstream_nodes"] for p in sw]
    ax.plot(ks, [p["batched"]["median_wall_s"] for p in sw], "o-", color="#0072B2", label="batched VJPs")
    ax.plot(ks, [p["one_backward_per_node"]["median_wall_s"] for p in sw], "s--", color="#D55E00",
            label="one backward per downstream node")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("downstream nodes (by |RelP effect|, 1 to the full circuit)")
    ax.set_ylabel("wall seconds (RelP edges)")
    ax.set_title(f"Edges: {MODEL_NAMES.get(key, key)}, n={m['nodes']['n']}")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    stem = out / f"edges_{key}"
    save_figure(fig, stem)
    plt.close(fig)
    return stem.name


def plot_scaling(key: str, m: dict, out: Path, which: str) -> str:
    from featcircuits.plotting import save_figure

    plt = _plt()
    pts = m[which]["points"]
    special = []  # identity dictionaries: drawn as separate markers, not on the width line
    if which == "scaling_n":
        xlabel = "examples n"
        line = pts
        xs = [p["n"] for p in line]
    else:
        xlabel = "dictionary width (features per site)"
        line = [p for p in pts if not p["label"].startswith("identity")]
        special = [p for p in pts if p["label"].startswith("identity")]
        xs = [max(p["widths"]) for p in line]
    names = [n for n in ("spliced_forward", "atp", "relp", "discover_relp", "ig10") if n in pts[0]["items"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for n in names:
        col = "#999999" if n == "spliced_forward" else _color(n.replace("discover_", ""))
        style = "--" if n.startswith("discover") else "-"
        for ax_, field in ((a1, "median_wall_s"), (a2, "median_rss_growth_mib")):
            ax_.plot(xs, [p["items"][n][field] for p in line], style, marker="o", color=col, label=n)
            for p in special:
                ax_.plot([max(p["widths"])], [p["items"][n][field]], marker="x", markersize=9, color=col,
                         linestyle="none", label=f"{n}, {p['label']}" if ax_ is a1 and n == "relp" else None)
    for a in (a1, a2):
        a.set_xscale("log")
        a.set_xlabel(xlabel)
        a.grid(alpha=0.3, which="both")
    if which == "scaling_width" and line:
        a1.set_title(f"{line[0]['label'].rsplit(' ', 1)[0]} sets (o); x = identity", fontsize=9)
    a1.set_yscale("log")
    a1.set_ylabel("wall seconds (median)")
    a2.set_ylabel("RSS growth during the call (MiB)")
    a1.legend(fontsize=8)
    title = "examples" if which == "scaling_n" else "dictionary width"
    fig.suptitle(f"Scaling with {title}: {MODEL_NAMES.get(key, key)}")
    stem = out / f"{which}_{key}"
    save_figure(fig, stem)
    plt.close(fig)
    return stem.name


def plot_discover(key: str, m: dict, out: Path) -> str:
    from featcircuits.plotting import save_figure

    plt = _plt()
    d = m["discover"]["items"]
    names = list(d)
    nodes = [d[n]["circuit"]["seconds"]["nodes"] for n in names]
    edges = [d[n]["circuit"]["seconds"]["edges"] for n in names]
    ub = m["discover"].get("ratio_relp_over_ig_upper_bound")
    if ub and not any(n.startswith("ig") for n in d):
        names.append(f"ig{m['discover'].get('ig_steps', 10)} (nodes only, no edges: a lower bound)")
        nodes.append(ub["ig_nodes_s"])
        edges.append(0.0)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(names, nodes, color=[_color(n) for n in names], label="nodes")
    ax.barh(names, edges, left=nodes, color=[_color(n) for n in names], alpha=0.5, label="edges")
    if max(nodes) / max(min(a + b for a, b in zip(nodes, edges)), 1e-9) > 30:
        ax.set_xscale("log")
        ax.set_xlim(left=min(nodes) * 0.3)
    for i, n in enumerate(names):
        ax.text(nodes[i] + edges[i], i, f" {nodes[i] + edges[i]:.3g} s", va="center", fontsize=8)
    ax.set_xlabel(f"wall seconds (first run), n={m['discover']['n']}; dark = nodes, light = edges")
    ax.set_title(f"Full discover: {MODEL_NAMES.get(key, key)}")
    ax.set_xlim(right=max(a + b for a, b in zip(nodes, edges)) * (3 if ax.get_xscale() == "log" else 1.25))
    stem = out / f"discover_{key}"
    save_figure(fig, stem)
    plt.close(fig)
    return stem.name


def _table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _load_range(runs: list[dict]) -> str:
    loads = [r["load1"] for r in runs]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"


def model_section(key: str, m: dict, figs: dict[str, str]) -> str:
    mc = m["machine"]
    items = m["nodes"]["items"]
    relp = items["relp"]["median_wall_s"]
    fwd = items["spliced_forward"]["median_wall_s"]
    L = [f"## {MODEL_NAMES.get(key, key)}: {m['description']}", ""]
    L.append(f"Dictionaries: **{m['dictionaries']['name']}** ({m['dictionaries']['note']}), widths "
             f"{m['dictionaries']['widths']}, {m['dictionaries']['n_sites']} sites, "
             f"{m['dictionaries']['total_nodes_sum_aggregation']:,} nodes. Task `{m['task']['name']}`, "
             f"prompt length {m['task']['seq_len']} tokens, chunks of {m['task']['batch_size']}. "
             f"Run {m['started']} to {m['finished']} ({m['suite_wall_s']:.0f} s), torch threads "
             f"{mc['torch_threads']}, {mc['dtype']}, load average {mc['loadavg_at_start'][0]:.1f} at the start "
             f"and {m['loadavg_at_end'][0]:.1f} at the end.")
    L += ["", f"### Node effects per method (n={m['nodes']['n']})", "",
          f"![node effects](nodes_{key}.png)", ""]
    rows = []
    order = ["hf_body", "hf_forward", "unembed_forward", "unembed_fwd_bwd", "unembed_fwd_bwd_strided",
             "trace_bare", "spliced_forward", "spliced_forward_default_threads", "spliced_fwd_bwd", "atp", "relp",
             "ig5", "ig10", "ig20", "ig10_subset_check", "exact_components", "exact_features_sample"]
    labels = {"hf_body": "HF model body, no unembedding (no nnsight)",
              "hf_forward": "HF forward, last-position logits (no nnsight)",
              "trace_bare": "nnsight trace, no hooks", "spliced_forward": "**floor: one spliced forward**",
              "spliced_fwd_bwd": "one spliced forward + backward", "atp": "AtP", "relp": "**RelP**",
              "ig5": "IG, 5 steps", "ig10": "IG, 10 steps", "ig20": "IG, 20 steps",
              "exact_components": "exact patching, components (site x position)",
              "exact_features_sample": "exact patching, sampled features",
              "spliced_forward_default_threads": "one spliced forward, torch's default thread count",
              "unembed_forward": "unembedding alone, last position (forward)",
              "unembed_fwd_bwd": "unembedding alone, forward + metric backward",
              "unembed_fwd_bwd_strided": "the same on HF's strided last-position view (before commit 43424a1)",
              "ig10_subset_check": "IG, 10 steps, on a subset of sites (extrapolation check)"}
    for n in order:
        if n not in items:
            continue
        d = items[n]
        p = d.get("passes") or {}
        wall = d["median_wall_s"]
        extra = ""
        if d.get("extrapolated_wall_s"):
            extra = (f"measured on {len(d['measured_sites'])} of {m['dictionaries']['n_sites']} sites "
                     f"({', '.join(d['measured_sites'])}): "
                     f"{wall:.3g} s; all sites extrapolated: **{d['extrapolated_wall_s']:.3g} s** "
                     f"({d['extrapolated_wall_s'] / relp:.3g}x RelP)")
            pe = d.get("passes_all_sites_estimate")
            if pe:
                p = {**p, **pe}
        if n == "exact_features_sample":
            extra = (f"{d['sampled_nodes']} features: {d['seconds_per_node']:.3g} s per node; all "
                     f"{d['total_nodes']:,} nodes extrapolated: **{d['extrapolated_all_nodes_wall_s']:,.0f} s** "
                     f"({d['extrapolated_all_nodes_wall_s'] / relp:,.0f}x RelP)")
        rows.append([labels[n], _fmt_s(wall), _fmt_s(d["median_cpu_s"]), f"{wall / fwd:.3g}",
                     f"{wall / relp:.3g}", f"{d['max_peak_rss_mib']:.0f}", f"{d['median_rss_growth_mib']:.0f}",
                     f"{p.get('forward_per_example', '-')} / {p.get('backward_per_example', '-')}",
                     f"{p.get('forward_calls', '-')} / {p.get('backward_calls', '-')}", d["n_runs"],
                     _load_range(d["runs"]), extra])
    L.append(_table(["what", "wall s", "CPU s", "x forward", "x RelP", "peak RSS MiB", "RSS growth MiB",
                     "passes per example (fwd / bwd)", "calls (fwd / bwd)", "runs", "load", "note"], rows))
    chk = m["nodes"].get("subset_extrapolation_check")
    if chk:
        L += ["", f"Check of the extrapolation from a subset of sites: IG (10 steps) measured on all sites "
              f"{chk['measured_all_sites_s']:.3g} s, extrapolated from a subset {chk['extrapolated_from_subset_s']:.3g}"
              f" s (ratio {chk['ratio']:.2f})."]
    un = m["nodes"].get("without_full_unembedding_estimate")
    if un:
        L += ["", f"Estimate without the full-vocabulary unembedding (answer logits only): RelP "
              f"{un['relp_s']:.3g} s, spliced forward {un['spliced_forward_s']:.3g} s, ratio "
              f"{un['relp_over_spliced_forward']:.2f} ({un['how']})."]
    r = m["nodes"]["ratios"]
    L += ["", "Ratios, each taken within one round and then the median over rounds (wall time; CPU time in "
          "brackets where measured):", ""]
    rr = []
    for name, val in r.items():
        if val is None or name.endswith("_cpu"):
            continue
        cpu = r.get(name + "_cpu")
        rr.append([name, f"{val['median']:.3g}" + (f" ({cpu['median']:.3g})" if cpu else ""),
                   ", ".join(f"{x:.3g}" for x in val["per_round"]) or val["how"]])
    L.append(_table(["ratio", "median", "per round"], rr))
    prof = m.get("profile_relp_chunk")
    if prof:
        L += ["", f"Profile of one RelP chunk ({prof['examples']} examples, torch.profiler, self CPU time "
              f"{prof['self_cpu_ms_total']:.0f} ms):", ""]
        L.append(_table(["op", "input shapes", "calls", "self CPU ms", "share"],
                        [[o["op"], f"`{o['shapes']}`", o["calls"], o["self_cpu_ms"], f"{o['share'] * 100:.1f} %"]
                         for o in prof["top_ops"][:10]]))
    e = m["edges"]
    sn = e["same_numbers"]
    sp = e["speedup"]
    L += ["", f"### Edges (RelP, circuit: top {m['config']['top_k']} nodes, {e['downstream_nodes']} of them "
          f"downstream of another site)", "", f"![edges](edges_{key}.png)", "",
          f"Batched: {e['items']['batched']['median_wall_s']:.3g} s; one backward per downstream node: "
          f"{e['items']['one_backward_per_node']['median_wall_s']:.3g} s; speed-up **{sp['median']:.3g}x** "
          f"(per round: {', '.join(f'{x:.3g}' for x in sp['per_round'])}). "
          + (f"The part both paths share (the cut forward) takes "
             f"{e['items']['fixed_part']['median_wall_s']:.3g} s on its own; without it the vector-Jacobian "
             f"part is **{e['speedup_vjp_part']['median']:.3g}x** faster batched. "
             if e.get("speedup_vjp_part", {}).get("median") else "")
          + f"Same numbers: max |difference| "
          f"{sn['max_abs_diff']:.3g} over {sn['n_weights']:,} weights (largest |weight| "
          f"{sn['max_abs_weight']:.3g}, relative {sn['max_rel_diff']:.3g}); tolerance 1e-5: "
          f"{'met' if sn['ok_abs'] else 'missed'}.", ""]
    rows = [[p["downstream_nodes"], _fmt_s(p["batched"]["median_wall_s"]),
             _fmt_s(p["one_backward_per_node"]["median_wall_s"]),
             f"{p['one_backward_per_node']['median_wall_s'] / p['batched']['median_wall_s']:.3g}",
             f"{p['batched']['passes']['backward_calls']} / {p['one_backward_per_node']['passes']['backward_calls']}",
             f"{p['batched']['median_rss_growth_mib']:.0f} / {p['one_backward_per_node']['median_rss_growth_mib']:.0f}",
             _load_range(p["batched"]["runs"] + p["one_backward_per_node"]["runs"])]
            for p in e["vs_downstream_nodes"]]
    L.append(_table(["downstream nodes", "batched s", "one backward per node s", "speed-up",
                     "backward calls (batched / per node)", "RSS growth MiB (batched / per node)", "load"], rows))
    vp = e.get("vjp_part_one_chunk", {})
    if vp.get("speedup"):
        L += ["", f"The vector-Jacobian products alone (one chunk of {vp['examples']} examples, the cut forward "
              f"and the downstream scalars built once): batched {vp['items']['vjp_batched']['median_wall_s']:.3g} s, "
              f"one backward per node {vp['items']['vjp_one_backward_per_node']['median_wall_s']:.3g} s, speed-up "
              f"**{vp['speedup']['median']:.3g}x** (per round: "
              f"{', '.join(f'{x:.3g}' for x in vp['speedup']['per_round'])})."]
    mg = e.get("marginal_seconds_per_downstream_node")
    if mg:
        L += ["", f"Marginal cost per extra downstream node: batched {mg['batched']:.3g} s, one backward per node "
              f"{mg['one_backward_per_node']:.3g} s."]
    d = m["discover"]
    L += ["", f"### Full discover (nodes + edges, top {d['top_k']} nodes, n={d['n']})", "",
          f"![discover](discover_{key}.png)", ""]
    rows = []
    for n, v in d["items"].items():
        c = v["circuit"]
        rows.append([n, _fmt_s(v["median_wall_s"]), _fmt_s(c["seconds"]["nodes"]), _fmt_s(c["seconds"]["edges"]),
                     f"{v['max_peak_rss_mib']:.0f}", f"{v['median_rss_growth_mib']:.0f}",
                     f"{v['passes']['forward_per_example']} / {v['passes']['backward_per_example']}",
                     f"{c['n_nodes']} / {c['n_edges']}", v["n_runs"], _load_range(v["runs"])])
    L.append(_table(["method", "wall s (median)", "nodes s (first run)", "edges s (first run)", "peak RSS MiB",
                     "RSS growth MiB", "passes per example (fwd / bwd)", "circuit nodes / edges", "runs", "load"],
                    rows))
    if d.get("ratio_relp_over_ig"):
        L += ["", f"RelP / IG: **{d['ratio_relp_over_ig']['median']:.3g}** (CPU time "
              f"{d['ratio_relp_over_ig_cpu']['median']:.3g})."]
    ubd = d.get("ratio_relp_over_ig_upper_bound")
    if ubd and d.get("ratio_relp_over_ig"):
        ex = "extrapolated from a subset of sites" if "extrapolated" in ubd["how"] else "measured"
        L += ["", f"Cross-check: RelP full discover / IG node effects alone ({ubd['ig_nodes_s']:.3g} s, {ex}) = "
              f"{ubd['median']:.3g}, an upper bound of the ratio measured above."]
    elif ubd:
        L += ["", f"IG full discover was not timed in this run (`--gemma-full-ig` times it). "
              f"Upper bound of RelP / IG: **{ubd['median']:.3g}** = RelP full discover "
              f"{d['items']['relp']['median_wall_s']:.3g} s / IG node effects alone {ubd['ig_nodes_s']:.3g} s "
              f"({ubd['how']})."]
    s = m["scaling_n"]
    L += ["", "### Scaling with the number of examples", "", f"![scaling n](scaling_n_{key}.png)", ""]
    if s.get("cut"):
        L += [f"Range {s['cut']}.", ""]
    names = [n for n in ("spliced_forward", "atp", "relp", "discover_relp", "ig10") if n in s["points"][0]["items"]]
    rows = []
    for p in s["points"]:
        rows.append([p["n"], p["rounds"]] + [f"{p['items'][n]['median_wall_s']:.3g} s / "
                                              f"{p['items'][n]['median_rss_growth_mib']:.0f} MiB" for n in names]
                    + [_load_range([r for n in names for r in p["items"][n]["runs"]])])
    L.append(_table(["n", "runs"] + [f"{n} (wall / RSS growth)" for n in names] + ["load"], rows))
    pts = s["points"]
    if len(pts) >= 2:
        a, b = pts[0], pts[-1]
        L += ["", "Seconds per example from the smallest to the largest n: " + ", ".join(
            f"{n} {a['items'][n]['median_wall_s'] / a['n']:.3g} -> {b['items'][n]['median_wall_s'] / b['n']:.3g}"
            for n in names) + "."]
        if "discover_relp" in names and b["n"] > a["n"]:
            dm = b["items"]["discover_relp"]["median_rss_growth_mib"] - a["items"]["discover_relp"]["median_rss_growth_mib"]
            rm = b["items"]["relp"]["median_rss_growth_mib"] - a["items"]["relp"]["median_rss_growth_mib"]
            L += ["", f"Memory: RelP node effects grow by {rm:.0f} MiB from n={a['n']} to n={b['n']} (they keep one "
                  f"chunk's tensors at a time), full discover by {dm:.0f} MiB "
                  f"({dm / (b['n'] - a['n']) * 1024:.0f} KiB per example): discover keeps every chunk's "
                  f"gradients and site values from the node stage for the edge stage, so its memory is linear in n."]
    s = m["scaling_width"]
    L += ["", f"### Scaling with dictionary width (n={s['n']})", "", f"![scaling width](scaling_width_{key}.png)", ""]
    names = [n for n in ("spliced_forward", "atp", "relp", "discover_relp") if n in s["points"][0]["items"]]
    rows = [[p["label"], p["widths"], f"{p['total_nodes']:,}"] + [
        f"{p['items'][n]['median_wall_s']:.3g} s / {p['items'][n]['median_rss_growth_mib']:.0f} MiB" for n in names]
        + [_load_range([r for n in names for r in p["items"][n]["runs"]])] for p in s["points"]]
    L.append(_table(["dictionaries", "widths", "nodes"] + [f"{n} (wall / RSS growth)" for n in names] + ["load"], rows))
    c = m.get("cli_discover")
    if c:
        L += ["", "### Peak memory of the real CLI", "", f"`{c['command']}` in a subprocess: peak RSS "
              f"**{c['peak_rss_gib']:.2f} GiB** ({c['method']}), wall {c['wall_s']:.0f} s (load {c['load1']}, "
              f"threads: {c.get('threads', 'torch default')}, as a user would run it; its stage times are "
              f"not comparable with the single-threaded figures above), exit code {c['returncode']}; summary "
              f"seconds {c.get('summary_seconds')}."]
        if c.get("stderr_tail"):
            L += ["", "```", c["stderr_tail"], "```"]
    return "\n".join(L)


METHOD_TEXT = """## How it is measured

- **Interleaving.** Each section runs its items in rounds; round r runs every item once, in an
  order rotated by r, so a change in background load hits every item. Figures are medians over
  rounds; a ratio is computed within each round (same load) and the median taken. Expensive
  items (IG, exact patching, on Gemma) take part in fewer rounds; where an item has no round in
  common with its reference the ratio of medians is used and the table says so.
- **Time.** Wall clock (`time.perf_counter`) of the whole call, and the process's CPU time
  (`time.process_time`, all threads). On a shared machine CPU time is the steadier of the two;
  the targets are judged on wall time.
- **Threads.** One torch thread (`--threads 1`, the default of the script). On this shared,
  oversubscribed 2-core machine torch's default (one thread per core) makes every parallel op
  wait for a descheduled worker thread: the floor row "torch's default thread count" measures
  that penalty in the same run. The CLI memory run uses the CLI as a user runs it.
- **Memory.** Before each call: `gc.collect()` and glibc `malloc_trim(0)`; during it a thread
  polls the process RSS with psutil every 5 ms. "Peak RSS" is the largest RSS seen (model and
  dictionaries included); "RSS growth" is the peak minus the RSS at the start of the call, i.e.
  what the estimator itself needed (a spike shorter than 5 ms can be missed, and memory the
  allocator kept from an earlier call can be reused without showing as growth). The memory
  target is measured exactly instead: the real `featcircuits discover` in a subprocess under
  `/usr/bin/time -v` (maximum resident set size of that process, from the kernel).
- **Passes.** `SplicedModel` counts forward and backward calls; the script's subclass also counts
  the example rows of each forward and backward, so "passes per example" = rows / n (an IG forward
  over `steps` stacked copies of b examples is steps x b rows; a batched edge backward over K
  stacked vector-Jacobian products counts once).
- **The floor.** `spliced forward` = `SplicedModel.cache` (one nnsight trace, every site encoded
  and decoded, no gradients), over the same chunks as the node effects. Its parts are measured
  beside it: the HF body alone, the HF forward with last-position logits, and a bare nnsight trace.
- **Extrapolations** are marked as such: exact patching of every feature is timed on a sample of
  features and scaled to all nodes; on Gemma, IG may be timed on a spread subset of sites
  (`--gemma-ig-sites`) and scaled as 2 spliced forwards + per-site part x (sites / measured sites).
"""


def write_report(data: dict, out: Path, results_readme: Path | None) -> None:
    models = data.get("models", {})
    figs: dict[str, dict[str, str]] = {}
    for key, m in models.items():
        figs[key] = {"nodes": plot_nodes(key, m, out), "edges": plot_edges(key, m, out),
                     "discover": plot_discover(key, m, out),
                     "scaling_n": plot_scaling(key, m, out, "scaling_n"),
                     "scaling_width": plot_scaling(key, m, out, "scaling_width")}
    rows = target_rows(data)
    data["targets"] = rows
    write_json(out / "benchmarks.json", data)
    L = ["# Benchmarks", "",
         "What each estimator costs on this machine, how the cost grows, and how close it is to the floor "
         "of one forward pass. Every number here is written by `scripts/benchmark.py` from "
         "`benchmarks.json` (beside this file); nothing is typed by hand.", "", "Commands that produced it:", ""]
    for key, m in models.items():
        L.append(f"- {MODEL_NAMES.get(key, key)}: `{m['command']}` ({m['started']})")
    L += ["", "Regenerate the README and plots from the JSON alone: `python scripts/benchmark.py --report-only`.",
          "", "## Targets (ratios measured in one run)", ""]
    L.append(_table(["target", "model", "measured", "target", "status", "note"],
                    [[r["what"], MODEL_NAMES.get(r["model"], r["model"]), _fmt_v(r["measured"], r["id"]),
                      f"{r['cmp']} {r['target']:g}", r["status"], r["note"]] for r in rows]))
    missed = [r for r in rows if not r["ok"]]
    if missed:
        L += ["", "### Where a target is missed, and what bounds it", ""]
        for r in missed:
            L.append(f"- **{r['what']}, {MODEL_NAMES.get(r['model'], r['model'])}**: {r['status']}. "
                     + bounds_text(r["model"], models[r["model"]], r))
    L += ["", "## Machine", ""]
    for key, m in models.items():
        mc = m["machine"]
        v = mc["versions"]
        busy = ", ".join(f"{p['name']} {p['cpu_percent']} %" for p in m.get("busy_processes_at_start", [])) or "none"
        L.append(f"- {MODEL_NAMES.get(key, key)} run: {mc.get('cpu_model', mc['processor'])}, "
                 f"{mc['logical_cores']} logical cores ({mc['affinity_cores']} usable), {mc['memory_total_gib']} GiB; "
                 f"torch {v['torch']} with {mc['torch_threads']} threads, {mc['dtype']}; transformers "
                 f"{v['transformers']}, nnsight {v['nnsight']}, sae-lens {v['sae_lens']}, Python {v['python']}. "
                 f"Load average at start {', '.join(f'{x:.1f}' for x in mc['loadavg_at_start'])}; other busy "
                 f"processes at the start: {busy}.")
    L += ["", METHOD_TEXT]
    for key, m in models.items():
        L += [model_section(key, m, figs[key]), ""]
    write_text(out / "README.md", "\n".join(L) + "\n")
    if results_readme is not None:
        update_results_readme(results_readme, rows, models)


def update_results_readme(path: Path, rows: list[dict], models: dict) -> None:
    """Rewrite only the ``## Benchmarks`` section of results/README.md (others own the rest)."""
    lines = ["## Benchmarks", "",
             "Cost of each estimator, the floor, edges, full discover and scaling, from "
             "`scripts/benchmark.py`: details, plots and the commands in "
             "[benchmarks/README.md](benchmarks/README.md), raw numbers in `benchmarks/benchmarks.json`.", ""]
    lines.append(_table(["target", "model", "measured", "target", "status"],
                        [[r["what"], MODEL_NAMES.get(r["model"], r["model"]), _fmt_v(r["measured"], r["id"]),
                          f"{r['cmp']} {r['target']:g}", r["status"]] for r in rows]))
    loads = ", ".join(f"{MODEL_NAMES.get(k, k)} {m['machine']['loadavg_at_start'][0]:.1f}" for k, m in models.items())
    lines += ["", f"Measured on a shared {next(iter(models.values()))['machine']['logical_cores']}-core CPU "
              f"machine (load average at the start: {loads}); ratios are within-run, interleaved.", ""]
    section = "\n".join(lines)
    text = path.read_text() if path.is_file() else (
        "# Results\n\nMeasured results of featcircuits; each section says which script wrote it.\n")
    start = text.find("\n## Benchmarks")
    if start < 0 and text.startswith("## Benchmarks"):
        start = 0
    if start < 0:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        head = text[:start].rstrip("\n") + "\n\n" if start > 0 else ""
        rest = text[start + 1:] if start > 0 else text
        nxt = rest.find("\n## ", 1)
        tail = "\n" + rest[nxt + 1:] if nxt >= 0 else ""
        new = head + section + tail
    write_text(path, new.rstrip("\n") + "\n")


if __name__ == "__main__":
    sys.exit(main())
