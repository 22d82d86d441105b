"""The pairs-scaling row: the real ``featcircuits discover`` (and, when asked, ``curves`` and
``agreement``) on the offline Gemma for growing n, each n in its own fresh process (so its peak
RSS is its own), time per pair and peak RSS.

Time per pair is the command's own compute time (model loading excluded) divided by n:
discover's ``seconds.total`` (nodes + edges), curves' ``timings.total_seconds`` (node effects,
evaluation setup, ablations), agreement's seconds summed over its estimators and exact
patching (one run each). Peak RSS is ``/usr/bin/time -v``'s maximum resident set size of the
whole process (model and dictionaries included). The issue's targets: from the smallest n to
every larger one, peak RSS within 1.5x and time per pair within 1.3x; each row's ratios to the
smallest n are reported, and the verdict is on the worst of them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from featcircuits.models import OFFLINE_ALIAS

from .common import TASK
from .suite import cli_peak_rss

FULL_ROW = [64, 128, 256, 512, 1024, 2048]
COMMANDS = ("discover", "curves", "agreement")
RSS_TARGET, TIME_TARGET = 1.5, 1.3
# curves needs n evaluation pairs disjoint from n discovery pairs: sva-simple has 216 distinct
# pairs, sva-nounpp ~1,900 of 2,048 (and 2,048 more outside them)
CURVES_TASK = "sva-nounpp"


def parse_sizes(text: str) -> list[int]:
    """``full`` -> the whole row; ``64,128,256`` -> those n (ascending, distinct, positive)."""
    if text.strip().lower() == "full":
        return list(FULL_ROW)
    sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    if not sizes or sizes[0] < 1:
        raise SystemExit(f"--pairs-scaling: give 'full' or a comma list of positive n, got {text!r}")
    return sizes


def command_argv(command: str, n: int, saes: str, batch_size: int, model: str = OFFLINE_ALIAS) -> list[str]:
    """The CLI call measured for one ``command`` at ``n`` pairs (``--out`` added by the runner)."""
    if command == "discover":
        return ["discover", "--model", model, "--saes", saes, "--task", TASK, "--method", "relp",
                "--n", str(n), "--batch-size", str(batch_size)]
    if command == "curves":
        return ["curves", "--model", model, "--saes", saes, "--task", CURVES_TASK, "--n", str(n), "--n-eval", str(n),
                "--methods", "relp,random", "--thresholds", "8", "--random-draws", "1", "--batch-size", str(batch_size),
                "--no-progress"]
    if command == "agreement":
        return ["agreement", "--model", model, "--saes", saes, "--task", TASK, "--n", str(n), "--granularity",
                "features", "--methods", "atp,relp", "--no-variant", "--repeats", "1", "--top-k", "4", "--random", "8",
                "--no-by-case", "--batch-size", str(batch_size), "--quiet"]
    raise SystemExit(f"unknown command {command!r}: choose from {', '.join(COMMANDS)}")


def work_seconds(command: str) -> Callable[[Path], dict]:
    """Reads the command's own compute seconds from its output folder."""
    def read(folder: Path) -> dict:
        if command == "discover":
            s = json.loads((folder / "summary.json").read_text())
            return {"work_seconds": (s.get("seconds") or {}).get("total"), "n_used": s.get("n"),
                    "summary_seconds": s.get("seconds"), "dictionaries": s.get("dictionaries"),
                    "gradients_chunks": s.get("gradients_chunks")}
        if command == "curves":
            c = json.loads((folder / "curves.json").read_text())
            return {"work_seconds": c["timings"].get("total_seconds"), "n_used": c["split"]["n_discovery"],
                    "timings": c["timings"]}
        a = json.loads((folder / "agreement.json").read_text())
        return {"work_seconds": round(sum(a["seconds"].values()), 3), "n_used": a["n"], "seconds": a["seconds"]}
    return read


def run_pairs_scaling(ns: list[int], saes: str, log: Callable[[str], None], batch_size: int = 16,
                      command: str = "discover", model: str = OFFLINE_ALIAS) -> dict:
    """One fresh CLI process per n; the row, each row's ratios to the smallest n, the verdicts."""
    rows = []
    for n in ns:
        rec = cli_peak_rss(command_argv(command, n, saes, batch_size, model), measure=work_seconds(command))
        rec["n"] = n
        total, used = rec.get("work_seconds"), rec.get("n_used") or n
        rec["seconds_per_pair"] = round(total / used, 4) if total else None
        rows.append(rec)
        log(f"    {command} n={n}: peak RSS {rec['peak_rss_gib']} GiB, {rec['seconds_per_pair']} s/pair "
            f"(rc {rec['returncode']})")
    out = {"command": command, "model": model, "rows": rows, "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
           "batch_size": batch_size, "full_row": FULL_ROW,
           "targets": {"peak_rss_ratio": RSS_TARGET, "time_per_pair_ratio": TIME_TARGET}}
    out.update(ratios(rows))
    return out


def ratios(rows: list[dict]) -> dict:
    """Each successful row's peak RSS and time per pair over the smallest n's; worst of each
    and whether it is within the target (and by how much it misses)."""
    ok = [r for r in rows if r["returncode"] == 0 and r["seconds_per_pair"]]
    if len(ok) < 2:
        return {}
    base = ok[0]
    for r in ok:
        r["peak_rss_vs_smallest"] = round(r["peak_rss_gib"] / base["peak_rss_gib"], 3)
        r["time_per_pair_vs_smallest"] = round(r["seconds_per_pair"] / base["seconds_per_pair"], 3)
    rss = max(r["peak_rss_vs_smallest"] for r in ok)
    tpp = max(r["time_per_pair_vs_smallest"] for r in ok)
    return {"peak_rss_ratio": rss, "time_per_pair_ratio": tpp, "ratio_over": [base["n"], ok[-1]["n"]],
            "peak_rss_within_target": rss <= RSS_TARGET, "time_per_pair_within_target": tpp <= TIME_TARGET}


def _verdict(value: float, target: float) -> str:
    return f"{value}x, within {target}x" if value <= target else f"{value}x: MISSED {target}x by {value - target:.2f}x"


def pairs_section(m: dict) -> str:
    """Markdown for every command's row that was run (empty when none was)."""
    parts = [_one_section(m[k]) for k in ("pairs_scaling", *(f"pairs_scaling_{c}" for c in COMMANDS[1:])) if m.get(k)]
    return "\n\n".join(parts)


def _one_section(p: dict) -> str:
    if "peak_rss_vs_smallest" not in p["rows"][0]:  # a row measured before the per-n ratios were recorded
        p.update(ratios(p["rows"]))
    ns = [r["n"] for r in p["rows"]]
    command = p.get("command", "discover")
    L = [f"### Thousands of pairs: {command} from n = {ns[0]} to {ns[-1]}", "",
         f"The real CLI, one fresh process per n (`{' '.join(p['rows'][0]['command'].split()[:2])} ...`, model "
         f"{p.get('model', OFFLINE_ALIAS)}, chunks of {p['batch_size']}), {p['measured']}. The full row is n = {', '.join(map(str, p['full_row']))}; "
         + ("all of it was run." if ns == p["full_row"] else
            f"only n = {', '.join(map(str, ns))} was run here; "
            "`--pairs-scaling full` runs the rest."), "",
         "| n | peak RSS (GiB) | x smallest | s / pair | x smallest | compute (s) | process CPU (s) | load avg |",
         "|---|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        total = r.get("work_seconds") or (r.get("summary_seconds") or {}).get("total")
        L.append(f"| {r['n']} | {r['peak_rss_gib']} | {r.get('peak_rss_vs_smallest', '-')} | {r['seconds_per_pair']} | "
                 f"{r.get('time_per_pair_vs_smallest', '-')} | {total} | {r.get('cpu_s', '-')} | {r['load1']} |")
    L += ["", "s / pair and compute are wall seconds of the compute stages (summary.json), so they grow when "
              "other jobs share the cores (load avg); process CPU is user + system seconds of the whole process "
              "(model load included, /usr/bin/time -v), which other jobs inflate far less."]
    if "peak_rss_ratio" in p:
        t = p["targets"]
        L += ["", f"Worst ratio to the smallest n over n = {ns[0]}..{ns[-1]}: peak RSS "
                  f"{_verdict(p['peak_rss_ratio'], t['peak_rss_ratio'])}; time per pair "
                  f"{_verdict(p['time_per_pair_ratio'], t['time_per_pair_ratio'])}."]
    stages = _stage_line(p["rows"])
    if stages:
        L += ["", stages]
    if p.get("note"):
        L += ["", p["note"]]
    return "\n".join(L)


def _stage_line(rows: list[dict]) -> str:
    """Seconds per pair of discover's node and edge stages at the smallest and largest n: where
    the time per pair grows."""
    ok = [r for r in rows if (r.get("summary_seconds") or {}).get("edges") is not None and r.get("n_used")]
    if len(ok) < 2:
        return ""
    a, b = ok[0], ok[-1]
    per = _per_pair
    return (f"Per stage, s / pair at n = {a['n']} -> {b['n']}: node effects {per(a, 'nodes'):.3f} -> "
            f"{per(b, 'nodes'):.3f} ({per(b, 'nodes') / per(a, 'nodes'):.2f}x), edges {per(a, 'edges'):.3f} -> "
            f"{per(b, 'edges'):.3f} ({per(b, 'edges') / per(a, 'edges'):.2f}x). The edge stage reads the node "
            "stage's gradients from memory up to a fixed budget (`discover.KEEP_MAX`, 1 GiB, so memory stays flat in "
            "n) and from a spill folder on disk past it (`gradients_chunks` in each run's summary.json)."
            + _chunks_line(b) + _spill_cost_line(ok))


def _per_pair(row: dict, stage: str) -> float:
    return row["summary_seconds"][stage] / row["n_used"]


def _spill_cost_line(ok: list[dict]) -> str:
    """What spilling costs: the largest n against the largest n whose chunks all stayed in memory."""
    kept = [r for r in ok if (r.get("gradients_chunks") or {}).get("disk") == 0]
    b = ok[-1]
    if not kept or not (b.get("gradients_chunks") or {}).get("disk"):
        return ""
    c = kept[-1]
    dn, de = _per_pair(b, "nodes") - _per_pair(c, "nodes"), _per_pair(b, "edges") - _per_pair(c, "edges")
    return (f" Against n = {c['n']}, the largest n with every chunk in memory, n = {b['n']} spends {dn:+.4f} s / pair "
            f"more in the node stage (which writes the spilled chunks) and {de:+.4f} in the edge stage (which reads "
            f"them back): {(dn + de) / _per_pair(b, 'total'):.0%} of its time per pair.")


def _chunks_line(row: dict) -> str:
    """Where the largest n's node-stage gradients went (memory, disk, recomputed), when recorded."""
    chunks = row.get("gradients_chunks")
    if not chunks:
        return ""
    return (f" At n = {row['n']}: {chunks['memory']} chunks in memory, {chunks['disk']} read from disk, "
            f"{chunks['recompute']} recomputed.")
