"""The README the benchmarks write, and their section of results/README.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from featcircuits.io import write_json, write_text

from .targets import MODEL_NAMES, _fmt_s, _fmt_v, bounds_text, target_rows
from .cards_cost import cards_cost_section
from .pairs import pairs_section
from .plots import plot_discover, plot_edges, plot_nodes, plot_scaling


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
    every = data.get("models", {})
    models = {k: m for k, m in every.items() if "nodes" in m}  # a full suite (not only a pairs-scaling row)
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
    for key, m in every.items():
        if key in models:
            L += [model_section(key, m, figs[key]), ""]
        section = pairs_section(m)
        if section:
            L += [section, ""]
        if m.get("cards_cost"):
            L += [cards_cost_section(m), ""]
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
    # a run with only a pairs row (e.g. --pairs-model on a tiny model) records no machine section
    machines = {k: m["machine"] for k, m in models.items() if "machine" in m}
    if machines:
        loads = ", ".join(f"{MODEL_NAMES.get(k, k)} {m['loadavg_at_start'][0]:.1f}" for k, m in machines.items())
        lines += ["", f"Measured on a shared {next(iter(machines.values()))['logical_cores']}-core CPU "
                  f"machine (load average at the start: {loads}); ratios are within-run, interleaved.", ""]
    else:
        lines.append("")
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
