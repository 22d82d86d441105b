"""Faithfulness and completeness curves of RelP, IG, AtP and random circuits for the four
tasks on the offline default, into results/faithfulness/<task>/ (curves.json, curves.png,
curves.svg), and the section "Faithfulness and completeness" of results/README.md.

    .venv/bin/python scripts/faithfulness.py [--tasks sva-simple,sva-nounpp,sva-within-rc,ioi]
        [--saes starter] [--n 16] [--n-eval 32] [--steps 10] [--thresholds 15] [--threads 1]
    .venv/bin/python scripts/faithfulness.py --readme-only     # rebuild the table from the JSONs

The model and dictionaries are loaded once. A task whose curves.json already holds the same
settings is skipped (``--force`` redoes it); node effects are cached under
``~/.cache/featcircuits/faithfulness`` so an interrupted run resumes at the evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "faithfulness"
README = ROOT / "results" / "README.md"
SECTION = "## Faithfulness and completeness"
TASKS = ("sva-simple", "sva-nounpp", "sva-within-rc", "ioi")
PLOT_TASK = "sva-nounpp"  # the plot shown in results/README.md


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--model", default="gemma-3-270m-offline")
    ap.add_argument("--saes", default="starter")
    ap.add_argument("--methods", default="relp,ig,atp,random")
    ap.add_argument("--n", type=int, default=16, help="discovery pairs")
    ap.add_argument("--n-eval", type=int, default=32, help="evaluation pairs (disjoint from discovery)")
    ap.add_argument("--steps", type=int, default=10, help="IG steps")
    ap.add_argument("--rules", default="default", help="LRP rules of relp (default: two-point; paper = ln,identity,half)")
    ap.add_argument("--thresholds", type=int, default=15, help="circuit sizes on the grid")
    ap.add_argument("--random-draws", type=int, default=3)
    ap.add_argument("--ablation", default="mean")
    ap.add_argument("--errors", default="ablate")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--stack", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core machine)")
    ap.add_argument("--effects-cache", default=None)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--force", action="store_true", help="recompute tasks whose curves.json exists")
    ap.add_argument("--readme-only", action="store_true", help="only rebuild the README section")
    ap.add_argument("--no-readme", action="store_true", help="do not touch results/README.md")
    args = ap.parse_args()
    out_root = Path(args.out)
    tasks = [t for t in args.tasks.split(",") if t]
    if not args.readme_only:
        run_tasks(args, tasks, out_root, after=None if args.no_readme else lambda: write_readme(out_root, tasks))
    if not args.no_readme:
        write_readme(out_root, tasks)
    return 0


def settings_key(args) -> dict:
    return {"model": args.model, "saes": args.saes, "methods": args.methods, "n": args.n, "n_eval": args.n_eval,
            "steps": args.steps, "thresholds": args.thresholds, "random_draws": args.random_draws,
            "ablation": args.ablation, "errors": args.errors, "seed": args.seed,
            **({"rules": args.rules} if args.rules != "default" else {})}


def run_tasks(args, tasks: list[str], out_root: Path, after=None) -> None:
    import torch

    from featcircuits.evaluation import curves_summary, run_curves
    from featcircuits.dictionaries import load_dictionary_set
    from featcircuits.models import cache_dir, load_model

    torch.set_num_threads(args.threads)
    key = settings_key(args)
    todo = []
    for task in tasks:
        f = out_root / task / "curves.json"
        if f.is_file() and not args.force:
            old = json.loads(f.read_text()).get("script_settings")
            if old == key:
                print(f"{task}: up to date ({f}), skipped", flush=True)
                continue
        todo.append(task)
    if not todo:
        return
    t0 = time.perf_counter()
    model = load_model(args.model)
    from featcircuits.dictionaries import local_set_folder, registry

    spec = args.saes
    if spec not in registry() and local_set_folder(spec) is not None:
        spec = str(local_set_folder(spec))  # trained but not (yet) registered: the same folder by path
        print(f"dictionary set {args.saes!r} is not in the registry; loading {spec}", flush=True)
    dicts = load_dictionary_set(spec, model.adapter, args.model)
    load_seconds = round(time.perf_counter() - t0, 2)
    cache = Path(args.effects_cache) if args.effects_cache else cache_dir() / "faithfulness"
    cmd = (f".venv/bin/python scripts/faithfulness.py --tasks {','.join(tasks)} --model {args.model} "
           f"--saes {args.saes} --n {args.n} --n-eval {args.n_eval} --steps {args.steps} "
           f"--thresholds {args.thresholds} --threads {args.threads}"
           + (f" --methods {args.methods}" if args.methods != "relp,ig,atp,random" else "")
           + (f" --rules {args.rules}" if args.rules != "default" else "")
           + (f" --out {Path(args.out).resolve().relative_to(ROOT)} --no-readme" if Path(args.out).resolve() != OUT else ""))
    for task in todo:
        print(f"== {task}", flush=True)
        t1 = time.perf_counter()
        result = run_curves(model, dicts, task=task, n=args.n, n_eval=args.n_eval, seed=args.seed,
                             methods=[m for m in args.methods.split(",") if m], points=args.thresholds,
                             rules=args.rules,
                             ablation=args.ablation, errors=args.errors, steps=args.steps,
                             random_draws=args.random_draws, batch_size=args.batch_size, stack=args.stack,
                             out=None, model_spec=args.model, saes_spec=args.saes, effects_cache=cache,
                             extra_timings={"load_seconds": load_seconds})
        result["timings"]["task_wall_seconds"] = round(time.perf_counter() - t1, 1)
        result["timings"]["torch_threads"] = args.threads
        result["script_settings"] = key
        result["command"] = cmd
        _write(result, out_root / task, task, args)
        print(curves_summary(result, out_root / task))
        if after is not None:
            after()  # the README table grows task by task


def _write(result: dict, folder: Path, task: str, args) -> None:
    from featcircuits.evaluation import plot_curves
    from featcircuits.io import write_json

    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "curves.json", result)
    plot_curves(result, folder / "curves", title=f"{task}: {args.model}, dictionaries {args.saes}")


# --------------------------------------------------------------------------------------
# The README section


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def section_text(out_root: Path, tasks: list[str]) -> str:
    from featcircuits.evaluation import relp_vs_ig
    from featcircuits.lrp import rules_key

    rel = out_root.relative_to(ROOT / "results") if out_root.is_relative_to(ROOT / "results") else out_root
    data = {}
    for t in tasks:
        f = out_root / t / "curves.json"
        if f.is_file():
            data[t] = json.loads(f.read_text())
    lines = [SECTION, ""]
    if not data:
        lines += ["No curves yet: run `.venv/bin/python scripts/faithfulness.py`.", ""]
        return "\n".join(lines)
    first = next(iter(data.values()))
    s, p = first["settings"], first["provenance"]
    relp_runs = _relp_by_rules(out_root, data)
    default = rules_key("default")
    methods = [m for m in ("relp", "ig", "atp", "random") if any(m in d["methods"] for d in data.values())]
    label = {"relp": "RelP", "ig": "IG", "atp": "AtP", "random": "random"}
    # RelP's columns: the default rule set first, then each other set that ran on these pairs
    relp_cols = sorted({r for runs in relp_runs.values() for r in runs}, key=lambda r: (r != default, r))
    cols = [("relp", r) for r in relp_cols] + [(m, None) for m in methods if m != "relp"]
    head = lambda m, r: (f"RelP [{_rules_name(r)}]" if m == "relp" else label[m])  # noqa: E731
    lines += [
        f"Made by {_made_by(data)} (model `{p['model']}`, dictionaries "
        f"`{p['saes']}`){_runs_note(out_root)}. Per task: node effects of each method on **{s['n_discovery']} "
        f"discovery pairs** (IG with {s['steps_ig']} steps; RelP under each rule set named in its column, "
        f"`two-point` being RelP's default; aggregation "
        f"`{s['aggregation']}`: one node per feature, plus one error node per site); circuits = the top-k nodes "
        f"by |effect| for {s['points']} log-spaced k from {s['n_min']} to the number of nodes with a non-zero "
        "effect, **the same k for every method** (so the curves compare methods at identical node counts); "
        f"random = k nodes drawn uniformly ({s['random_draws']} seeded draws, mean; band = ±1 std). "
        f"Each circuit is evaluated on **{s['n_eval']} held-out pairs** (a different seed; no pair shared with "
        f"discovery): every node outside it, at every site (embed, attn, mlp, resid of every layer), is "
        f"{s['ablation']}-ablated (mean over the counterfactual prompts of the evaluation set, per position), "
        f"error nodes {'ablated like features' if s['errors'] == 'ablate' else 'kept'}. "
        "Faithfulness = (F(C) − F(∅)) / (F(M) − F(∅)) with F the mean logit[clean] − logit[patch]; "
        "completeness = faithfulness of the complement (lower = more complete). "
        "AUC = area under faithfulness vs log10(nodes), divided by the log10 range of the grid "
        "(mean faithfulness over log-size; 1 = faithful at every size; not clipped). "
        "Nodes to 0.8 = smallest grid size with faithfulness ≥ 0.8 (grid resolution; – = never). "
        "The last column compares RelP with the default rules to IG at every grid size ≥ 50 nodes.",
        "",
        "| task | F(M) | F(∅) | " + " | ".join(f"nodes to 0.8 {head(m, r)}" for m, r in cols) + " | "
        + " | ".join(f"AUC {head(m, r)}" for m, r in cols) + " | RelP [two-point] vs IG (≥ 50 nodes) |",
        "|---|---|---|" + "---|" * (2 * len(cols)) + "---|",
    ]
    for t, d in data.items():
        cell = lambda m, r: (relp_runs[t].get(r) if m == "relp" else d["methods"].get(m))  # noqa: E731
        reach = [_fmt(c["nodes_to_0.8"]) if c else "–" for c in (cell(m, r) for m, r in cols)]
        auc = [_fmt(c["auc"]) if c else "–" for c in (cell(m, r) for m, r in cols)]
        ours = relp_runs[t].get(default)
        cmp_ = relp_vs_ig({"relp": ours, "ig": d["methods"]["ig"]}) if ours and "ig" in d["methods"] else None
        if cmp_ is None:
            verdict = "–"
        elif cmp_["within"]:
            verdict = f"within 0.05 (max \\|diff\\| {cmp_['max_abs_diff']:.3f})"
        else:
            worst = max(cmp_["outside"], key=lambda r: abs(r["diff"]))
            above = sum(r["diff"] > 0 for r in cmp_["outside"])
            side = f"{above} above IG, {len(cmp_['outside']) - above} below"
            verdict = (f"**NOT within 0.05** at {len(cmp_['outside'])}/{cmp_['points']} sizes, {side} "
                       f"(worst {worst['diff']:+.3f} at {worst['n_nodes']} nodes)")
        lines.append(f"| {t} | {d['F_M']:.3f} | {d['F_empty']:.3f} | " + " | ".join(reach) + " | "
                     + " | ".join(auc) + f" | {verdict} |")
    lines += ["", "Completeness AUC (lower = the circuit leaves less out):", "",
              "| task | " + " | ".join(head(m, r) for m, r in cols) + " |", "|---|" + "---|" * len(cols)]
    for t, d in data.items():
        cells = [relp_runs[t].get(r) if m == "relp" else d["methods"].get(m) for m, r in cols]
        lines.append(f"| {t} | " + " | ".join(_fmt(c["completeness_auc"]) if c else "–" for c in cells) + " |")
    lines += ["", "Time per task of the main run (seconds; node effects on the discovery pairs, then all "
              "ablation runs):", "",
              "| task | " + " | ".join(f"{head(m, rules_key(s['rules_relp']))} effects" for m in methods
                                       if m != "random")
              + " | ablations | forward passes |", "|---|" + "---|" * (len(methods) + 1)]
    for t, d in data.items():
        tm = d["timings"]
        lines.append(f"| {t} | " + " | ".join(_fmt(tm.get(f"effects_{m}_seconds"), 1) for m in methods if m != "random")
                     + f" | {_fmt(tm.get('ablation_seconds'), 1)} | {tm.get('ablation_forward_passes', '–')} |")
    plot_task = PLOT_TASK if PLOT_TASK in data else next(iter(data))
    lines += ["", f"![faithfulness and completeness, {plot_task}]({rel}/{plot_task}/curves.png)", "",
              "Every point is in `" + f"{rel}/<task>/curves.json" + "` (with F(C) and F(M∖C) per size, "
              "per-draw random values, the split, settings and timings); plots in "
              f"`{rel}/<task>/curves.png` and `.svg`."]
    notes = _notes(data)
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _made_by(data: dict) -> str:
    """The commands that made the tasks' curves (one, or several when the tasks were split over processes)."""
    cmds = list(dict.fromkeys(d.get("command", "scripts/faithfulness.py") for d in data.values()))
    return " and ".join(f"`{c}`" for c in cmds) + (" (the tasks split over processes)" if len(cmds) > 1 else "")


def _relp_runs(out_root: Path) -> list[Path]:
    return sorted(p for p in out_root.glob("rules-*") if p.is_dir())


def _relp_by_rules(out_root: Path, data: dict) -> dict[str, dict[str, dict]]:
    from featcircuits.lrp import rules_key

    """Per task, RelP's curve under each resolved rule set: from the main run and from the
    ``rules-<set>/`` runs made on the same pairs and size grid (others are left out)."""
    out: dict[str, dict[str, dict]] = {}
    for t, d in data.items():
        runs = {}
        if "relp" in d["methods"]:
            runs[rules_key(d["settings"]["rules_relp"])] = d["methods"]["relp"]
        for run in _relp_runs(out_root):
            f = run / t / "curves.json"
            o = json.loads(f.read_text()) if f.is_file() else None
            if o is not None and o["sizes"] == d["sizes"] and o.get("split") == d.get("split") \
                    and "relp" in o["methods"]:
                runs.setdefault(rules_key(o["settings"]["rules_relp"]), o["methods"]["relp"])
        out[t] = runs
    return out


def _rules_name(key: str) -> str:
    """A resolved rule set as its preset's name where it is one."""
    from featcircuits.lrp import rules_key

    for name in ("two-point", "paper"):
        if key == rules_key(name):
            return name
    return key


def _runs_note(out_root: Path) -> str:
    runs = _relp_runs(out_root)
    if not runs:
        return ""
    return ("; RelP under the rule sets that the main run did not use comes from runs on the same pairs and "
            "grid, each made by the command in its curves.json: "
            + ", ".join(f"`{p.relative_to(ROOT)}`" for p in runs))


def _notes(data: dict) -> list[str]:
    """Plain statements of what the numbers show, computed from them."""
    out = []
    for t, d in data.items():
        ms = d["methods"]
        if "random" not in ms:
            continue
        for m in ("relp", "ig", "atp"):
            if m not in ms:
                continue
            gap = [a - b for a, b in zip(ms[m]["faithfulness"], ms["random"]["faithfulness"])]
            if gap:
                best = max(gap)
                if best < 0.2:
                    out.append(f"- {t}: {m} beats random by at most {best:.2f} in faithfulness at any size.")
    return out


def write_readme(out_root: Path, tasks: list[str]) -> None:
    from featcircuits.io import replace_section

    replace_section(README, SECTION, section_text(out_root, tasks),
                    intro="# Results\n\nMeasured results of featcircuits, one section per study.\n")
    print(f"wrote the section {SECTION!r} of {README}")

if __name__ == "__main__":
    sys.exit(main())
