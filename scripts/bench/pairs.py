"""The pairs-scaling row: the real ``featcircuits discover`` on the offline Gemma for growing n,
each in its own process (so its peak RSS is its own), time per pair and peak RSS.

Time per pair is discover's own ``seconds.total`` (nodes + edges, model loading excluded)
divided by the pairs used; peak RSS is ``/usr/bin/time -v``'s maximum resident set size of the
whole process (model and dictionaries included). The issue's targets: from the smallest to the
largest n, peak RSS within 1.5x and time per pair within 1.3x.
"""

from __future__ import annotations

import time
from typing import Callable

from featcircuits.models import OFFLINE_ALIAS

from .common import TASK
from .suite import cli_peak_rss

FULL_ROW = [64, 128, 256, 512, 1024, 2048]
RSS_TARGET, TIME_TARGET = 1.5, 1.3


def run_pairs_scaling(ns: list[int], saes: str, log: Callable[[str], None], batch_size: int = 16) -> dict:
    """One CLI discover per n (RelP, top-k 100, chunks of ``batch_size``); the row and its ratios."""
    rows = []
    for n in ns:
        argv = ["discover", "--model", OFFLINE_ALIAS, "--saes", saes, "--task", TASK, "--method", "relp",
                "--n", str(n), "--batch-size", str(batch_size)]
        rec = cli_peak_rss(argv)
        total = (rec.get("summary_seconds") or {}).get("total")
        rec["n"] = n
        rec["seconds_per_pair"] = round(total / n, 4) if total else None
        rows.append(rec)
        log(f"    pairs n={n}: peak RSS {rec['peak_rss_gib']} GiB, {rec['seconds_per_pair']} s/pair "
            f"(rc {rec['returncode']})")
    ok = [r for r in rows if r["returncode"] == 0 and r["seconds_per_pair"]]
    out = {"rows": rows, "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "batch_size": batch_size,
           "full_row": FULL_ROW, "targets": {"peak_rss_ratio": RSS_TARGET, "time_per_pair_ratio": TIME_TARGET}}
    if len(ok) >= 2:
        out["peak_rss_ratio"] = round(ok[-1]["peak_rss_gib"] / ok[0]["peak_rss_gib"], 3)
        out["time_per_pair_ratio"] = round(ok[-1]["seconds_per_pair"] / ok[0]["seconds_per_pair"], 3)
    return out


def pairs_section(m: dict) -> str:
    """Markdown for the row (empty when it was not run)."""
    p = m.get("pairs_scaling")
    if not p:
        return ""
    ns = [r["n"] for r in p["rows"]]
    L = ["### Thousands of pairs: discover from n = %d to %d" % (ns[0], ns[-1]), "",
         f"The real CLI, one process per n (RelP, top-k 100, chunks of {p['batch_size']}), {p['measured']}. "
         f"The full row is n = {', '.join(map(str, p['full_row']))}; "
         + ("all of it was run." if ns == p["full_row"] else
            f"only n = {', '.join(map(str, ns))} was run here (a loaded shared machine); "
            "`--pairs-scaling " + ",".join(map(str, p["full_row"])) + "` runs the rest."), "",
         "| n | peak RSS (GiB) | s / pair | discover total (s) | load avg |", "|---|---|---|---|---|"]
    for r in p["rows"]:
        total = (r.get("summary_seconds") or {}).get("total")
        L.append(f"| {r['n']} | {r['peak_rss_gib']} | {r['seconds_per_pair']} | {total} | {r['load1']} |")
    if "peak_rss_ratio" in p:
        t = p["targets"]
        L += ["", f"Largest / smallest n: peak RSS {p['peak_rss_ratio']}x (target within {t['peak_rss_ratio']}x), "
                  f"time per pair {p['time_per_pair_ratio']}x (target within {t['time_per_pair_ratio']}x), "
                  f"over n = {ns[0]}..{ns[-1]} only."]
    if p.get("note"):
        L += ["", p["note"]]
    return "\n".join(L)
