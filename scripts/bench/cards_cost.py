"""What readable circuits cost: the real ``featcircuits discover`` on the offline Gemma with
feature cards (the set's full feature store already built and cached) against the same
command with ``--no-cards``, both ``--no-eval``; and the quick evaluation's cost on its own.

Each run is its own process (``cli_peak_rss``). Its cost is the process's wall clock less
the model load it reports (``seconds.load``): what discover itself took, from the pairs to
the written folder, so the cards' share (store load, labels, cards.json, circuit.html) is
not diluted by loading the model. Rounds alternate the order of the two runs so drift in
the shared machine's load hits both; the ratio is taken within a round, then the median.
The issue's target: discover with cards costs at most 10 % more than without. Node facts
(activations on the clean and patch prompts) run in both: they now read the sums the
attribution made in its own forwards (``featcircuits.activation_sums``), so they cost no pass.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

from featcircuits.models import OFFLINE_ALIAS

from .common import TASK
from .suite import cli_peak_rss

TARGET = 1.10
STORE_COMMAND = "featcircuits features --model gemma-3-270m-offline --saes {saes}"


def _cost(rec: dict) -> float | None:
    secs = rec.get("summary_seconds") or {}
    if rec.get("returncode") != 0 or "load" not in secs:
        return None
    return round(rec["wall_s"] - secs["load"], 2)


def run_cards_cost(saes: str, log: Callable[[str], None], n: int = 64, rounds: int = 2,
                   batch_size: int = 16) -> dict:
    """``rounds`` x (with cards, without) plus one run with the quick evaluation; the ratios."""
    base = ["discover", "--model", OFFLINE_ALIAS, "--saes", saes, "--task", TASK, "--method", "relp",
            "--n", str(n), "--batch-size", str(batch_size)]
    variants = {"cards": base + ["--no-eval"], "no_cards": base + ["--no-eval", "--no-cards"]}
    runs: list[dict] = []
    ratios: list[float] = []
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        got = {}
        for name in order:
            rec = cli_peak_rss(variants[name])
            rec.update(variant=name, round=r, cost_s=_cost(rec))
            runs.append(rec)
            got[name] = rec
            log(f"    cards cost round {r} {name}: {rec['cost_s']} s (wall {rec['wall_s']} s, load avg "
                f"{rec['load1']}, cards {rec.get('summary_cards')})")
        if got["cards"]["cost_s"] and got["no_cards"]["cost_s"]:
            ratios.append(round(got["cards"]["cost_s"] / got["no_cards"]["cost_s"], 4))
    ev = cli_peak_rss(base)
    ev.update(variant="cards_and_eval", round=rounds, cost_s=_cost(ev))
    runs.append(ev)
    log(f"    with the quick evaluation: {ev['cost_s']} s, of it quality {(ev.get('summary_seconds') or {}).get('quality')} s")
    with_cards = [r for r in runs if r["variant"] == "cards" and r.get("summary_cards")]
    full_store = bool(with_cards) and all(not r["summary_cards"].get("subset") for r in with_cards)
    out = {"measured": time.strftime("%Y-%m-%d %H:%M:%S"), "n": n, "batch_size": batch_size, "saes": saes,
           "runs": runs, "ratios": ratios, "target": TARGET, "full_store_reused": full_store,
           "store_command": STORE_COMMAND.format(saes=saes)}
    if ratios:
        out["ratio_median"] = round(statistics.median(ratios), 4)
        out["met"] = full_store and out["ratio_median"] <= TARGET
    no_cards = [r["cost_s"] for r in runs if r["variant"] == "no_cards" and r["cost_s"]]
    q = (ev.get("summary_seconds") or {}).get("quality")
    if q is not None and no_cards:
        out["quality_s"] = q
        out["quality_over_discover_without_cards"] = round(q / statistics.median(no_cards), 4)
    return out


def cards_cost_section(m: dict) -> str:
    """Markdown for the item (empty when it was not run)."""
    c = m.get("cards_cost")
    if not c:
        return ""
    L = ["### Readable circuits: discover with feature cards against --no-cards", "",
         f"The real CLI (`discover --task {TASK} --method relp --n {c['n']} --no-eval`, dictionaries "
         f"{c['saes']}), each run its own process, {c['measured']}; cost = wall clock less the model load. "
         + ("The set's full feature store was built beforehand and reused by every run with cards."
            if c["full_store_reused"] else
            f"**No full feature store was cached**: the runs with cards built circuit-only cards, so this is "
            f"not the target's setting (`{c['store_command']}` builds the store once)."), "",
         "| round | variant | cost (s) | wall (s) | cards (s) | node facts (s) | load avg |", "|---|---|---|---|---|---|---|"]
    for r in c["runs"]:
        s = r.get("summary_seconds") or {}
        L.append(f"| {r['round']} | {r['variant']} | {r['cost_s']} | {r['wall_s']} | {s.get('cards')} | "
                 f"{s.get('facts')} | {r['load1']} |")
    if "ratio_median" in c:
        verdict = "met" if c.get("met") else "**not met**"
        L += ["", f"With cards / without: {', '.join(map(str, c['ratios']))} per round, median "
                  f"{c['ratio_median']:.4g} (target at most {c['target']}: {verdict})."]
    if "quality_s" in c:
        L += ["", f"The quick evaluation (faithfulness, completeness, the size sweep) costs {c['quality_s']} s on "
                  f"its own, {c['quality_over_discover_without_cards']}x discover without cards; `--no-eval` "
                  "skips it."]
    return "\n".join(L)
