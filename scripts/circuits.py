"""Discover the circuits of the four tasks with RelP and IG on the offline default and
write them under results/circuits/<task>/<method>/, plus a table of sizes and timings.

    .venv/bin/python scripts/circuits.py [--n 32] [--tasks sva-simple,...] [--methods relp,ig]

``--methods`` names the circuits to (re)compute; the table lists every method folder present,
so ``--methods relp`` refreshes RelP's circuits beside IG's earlier ones (their summary.json
says when and with what each was made).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "circuits"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", default="sva-simple,sva-nounpp,sva-within-rc,ioi")
    ap.add_argument("--methods", default="relp,ig")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--saes", default="starter")
    ap.add_argument("--model", default="gemma-3-270m-offline")
    ap.add_argument("--table-only", action="store_true",
                    help="only rebuild the table from the circuit folders already under results/circuits")
    args = ap.parse_args()
    rows = []
    run = set() if args.table_only else set(args.methods.split(","))
    for task in args.tasks.split(","):
        # every method folder present joins the table; only --methods are (re)computed
        for method in dict.fromkeys([*args.methods.split(","), "relp", "ig"]):
            out = OUT / task / method
            if method not in run:
                if not (out / "summary.json").is_file():
                    continue
                summary = json.loads((out / "summary.json").read_text())
                rows.append({"task": task, "method": method, "n_nodes": summary["n_nodes"],
                             "n_edges": summary["n_edges"], "seconds": summary["seconds"], "wall": None,
                             "metric_clean": summary.get("metric_clean"), "metric_patch": summary.get("metric_patch"),
                             "quality": _quality(summary), "saes_sha256": summary.get("dictionaries_sha256")})
                continue
            cmd = [sys.executable, "-m", "featcircuits.cli", "discover", "--model", args.model, "--saes", args.saes,
                   "--task", task, "--method", method, "--n", str(args.n), "--top-k", str(args.top_k),
                   "--out", str(out), "--overwrite"]  # regenerates the committed folder in place
            print("$", " ".join(cmd[2:]), flush=True)
            t0 = time.time()
            subprocess.run(cmd, check=True, cwd=ROOT)
            summary = json.loads((out / "summary.json").read_text())
            rows.append({"task": task, "method": method, "n_nodes": summary["n_nodes"], "n_edges": summary["n_edges"],
                         "seconds": summary["seconds"], "wall": round(time.time() - t0, 1),
                         "metric_clean": summary.get("metric_clean"), "metric_patch": summary.get("metric_patch"),
                         "quality": _quality(summary), "saes_sha256": summary.get("dictionaries_sha256")})
    lines = ["# Circuits on the offline default",
             "",
             f"Made by `.venv/bin/python scripts/circuits.py --saes {args.saes} --n {args.n} --top-k {args.top_k}` "
             f"(model `{args.model}`, dictionaries `{args.saes}`, top {args.top_k} nodes by |effect|, "
             "edges kept above 1 % of the largest |edge|; RelP with its default two-point rules, "
             "each circuit's summary.json records its rule set).",
             "",
             "Timings were taken on a shared 2-core CPU with other jobs running; compare within a task.",
             "",
             "Quality: each circuit as `discover` evaluates it on 32 held-out pairs (mean ablation of every node "
             "outside it): faithfulness, the share of its nodes' |effect| held by error nodes, and the faithfulness of "
             "twice as many nodes (the first point of its size sweep; the node count in brackets).",
             "",
             "| task | method | nodes | edges | mean metric clean / patch | faithfulness | error share | "
             "faithfulness at 2x nodes | node effects (s) | edges (s) | total (s) | picture |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["seconds"]
        mc, mp = r.get("metric_clean"), r.get("metric_patch")
        metric = f"{mc:+.2f} / {mp:+.2f}" if mc is not None and mp is not None else "n/a"
        q = r.get("quality") or {}
        quality = " | ".join("n/a" if q.get(k) is None else fmt.format(q[k]) for k, fmt in
                             (("faithfulness", "{:.2f}"), ("error_share", "{:.0%}"), ("twice", "{:.2f}")))
        if q.get("twice_nodes"):
            quality += f" ({q['twice_nodes']})"
        lines.append(f"| {r['task']} | {r['method']} | {r['n_nodes']} | {r['n_edges']} | {metric} | {quality} | {s['nodes']:.1f} | "
                     f"{s['edges']:.1f} | {s['total']:.1f} | [png]({r['task']}/{r['method']}/circuit.png) |")
    ratios = []
    for task in args.tasks.split(","):
        by = {r["method"]: r for r in rows if r["task"] == task}
        if "relp" in by and "ig" in by:
            ratios.append(f"| {task} | {by['relp']['seconds']['total'] / by['ig']['seconds']['total']:.3f} |")
    if ratios:
        lines += ["", "RelP cost relative to IG (steps 10), nodes + edges, and how many circuit nodes the two share "
                  "(features and error nodes; the metric sink excluded):", "",
                  "| task | RelP / IG time | nodes in both | Jaccard |", "|---|---|---|---|"]
        for row, task in zip(ratios, [t for t in args.tasks.split(",")
                                      if {"relp", "ig"} <= {r["method"] for r in rows if r["task"] == t}]):
            a, b = (circuit_nodes(OUT / task / m / "graph.json") for m in ("relp", "ig"))
            lines.append(row + f" {len(a & b)} of {len(a)} / {len(b)} | {len(a & b) / max(1, len(a | b)):.2f} |")
    (OUT / "README.md").write_text("\n".join(lines) + "\n")
    (OUT / "circuits.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))
    return 0


def _quality(summary: dict) -> dict:
    """The circuit's held-out quality from its summary.json (absent from runs made before discover evaluated)."""
    q = summary.get("quality") or {}
    sweep = q.get("sweep") or [{}]  # its first point is twice the circuit's size
    return {"faithfulness": q.get("faithfulness"), "error_share": q.get("error_share"),
            "twice": sweep[0].get("faithfulness"), "twice_nodes": sweep[0].get("top_k")}


def circuit_nodes(graph_json: Path) -> set[str]:
    g = json.loads(graph_json.read_text())
    return {n["id"] for n in g["nodes"] if n.get("kind") != "metric"}


if __name__ == "__main__":
    sys.exit(main())
