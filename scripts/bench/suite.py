"""One model's suite: nodes, edges, discover, scaling with n and width, and the CLI's peak RSS."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from featcircuits.attribution import node_effects
from featcircuits.discover import discover_circuit
from featcircuits.edges import edge_effects
from featcircuits.gradient_store import GradientStore
from featcircuits.graph import Thresholds, select_nodes
from featcircuits.nodes import count_nodes
from featcircuits.tasks import make_pairs, tokenize_pairs
from featcircuits.tracing import SplicedModel

from . import common
from .common import ROOT, TASK, counted, interleaved, round_ratio, strip_results
from .items import (discover_relp, downstream_order, edge_diff, edges_fixed_part, exact_feature_sample,
                    floor_items, machine_info, masks_of, method_items, other_processes, spliced_forwards,
                    spread_sites, total_nodes, unembedding_items, vjp_part_items)


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
    grads = GradientStore()  # everything in memory (no budget): the benchmark times the edge stage alone
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

    # ---- readable circuits: discover with cards against --no-cards (the real CLI) -------------
    if cfg.get("cards_cost"):
        from .cards_cost import run_cards_cost

        log(f"[{key}] discover with cards against --no-cards")
        res["cards_cost"] = run_cards_cost(cfg["saes"], log)

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


def cli_peak_rss(argv: list[str], measure: "Callable[[Path], dict] | None" = None) -> dict:
    """Run the real CLI in a subprocess; its max RSS from /usr/bin/time -v (else getrusage).
    ``measure(run_folder)`` reads what else the record needs from the outputs before they go."""
    out = Path(tempfile.mkdtemp(prefix="fc-bench-cli-"))
    venv_cli = ROOT / ".venv" / "bin" / "featcircuits"
    # the source tree's own venv as the README sets it up, else this interpreter on this tree
    launcher = [str(venv_cli)] if venv_cli.is_file() else [sys.executable, "-m", "featcircuits.cli"]
    cmd = [*launcher, *argv, "--out", str(out / "run")]
    use_time = Path("/usr/bin/time").is_file()
    full = (["/usr/bin/time", "-v"] if use_time else []) + cmd
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(full, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    rec: dict[str, Any] = {"command": "featcircuits " + " ".join(argv) + " --out DIR", "returncode": proc.returncode,
                           "wall_s": round(wall, 1), "load1": round((load0 + os.getloadavg()[0]) / 2, 2),
                           "threads": os.environ.get("OMP_NUM_THREADS") or f"torch default ({common.DEFAULT_THREADS})"}
    max_kib = None
    if use_time:
        cpu = {}
        for line in proc.stderr.splitlines():
            if "Maximum resident set size" in line:
                max_kib = int(line.rsplit(":", 1)[1])
            elif line.strip().startswith(("User time (seconds)", "System time (seconds)")):
                cpu[line.strip().split()[0]] = float(line.rsplit(":", 1)[1])
        if len(cpu) == 2:  # the process's CPU seconds (load included): wall seconds alone grow with other jobs
            rec["cpu_s"] = round(cpu["User"] + cpu["System"], 1)
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
        rec["export_seconds"] = s.get("export_seconds")
        rec["summary_cards"] = s.get("cards")  # where the feature cards came from (None: --no-cards)
        rec["dictionaries"] = s.get("dictionaries")
        rec["n_nodes"], rec["n_edges"] = s.get("n_nodes"), s.get("n_edges")
    if measure is not None and proc.returncode == 0:
        rec.update(measure(out / "run"))
    if proc.returncode != 0:
        rec["stderr_tail"] = proc.stderr[-1500:]
    shutil.rmtree(out, ignore_errors=True)
    return rec
