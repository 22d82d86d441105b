#!/usr/bin/env python
"""How far does a 64-pair circuit measure move with its pairs? Faithfulness and error share over pair seeds.

``starter_targets.py`` judges a set on one split of each task (seed 0: ``--n`` discovery pairs,
``--n-eval`` held-out pairs). This script repeats that measure for several seeds: for seed s the
discovery pairs are ``make_pairs(task, n, s)`` and the held-out pairs ``eval_pairs(task, n_eval,
discovery, s)`` (seed 0 is starter_targets' split, so its figures come out the same); for each set
the top-k RelP circuits from the discovery pairs and, on the held-out pairs, each pair's clean
preference with the circuit kept, with nothing ablated (M) and with everything ablated (∅)
(``Evaluator.pair_scores``; mean ablation, error nodes outside the circuit ablated). Faithfulness
is (mean F(C) - mean F(∅)) / (mean F(M) - mean F(∅)), as ``evaluate`` reports it.

Reported per set and circuit size: the faithfulness and top-k error share at every seed, their mean
and standard deviation across seeds (the spread of the whole measure: which pairs discover the
circuit and which judge it); for each seed a bootstrap 90 % interval over the held-out pairs (the
circuit and the mean-ablation values fixed, only the judging sample resampled); with two or more
sets, the paired difference per seed (every set sees the same pairs).

    .venv/bin/python scripts/faithfulness_spread.py --sets v3=starter v5=/work/sae-runs/starter-v5-set \\
        --task sva-simple --sizes 100 200 --seeds 0 1 2 3 4 5 6 7 --label faith_spread-sva-simple
    .venv/bin/python scripts/faithfulness_spread.py --table faith_spread-sva-simple faith_spread-ioi ...

A set given as ``LABEL=SET@RULES`` finds its circuits with RelP under that rule set (``paper``,
``two-point`` or a comma list, as ``--rules`` elsewhere) instead of RelP's default, so two rule sets
are compared on the same dictionaries and pairs (``v6=starter v6-paper=starter@paper``).

``--reuse NAME ...`` copies a set's rows from an earlier output when that set (same sha256) was
measured there the same way (task, pair counts, draws, every seed and size asked), so a new set is
judged beside the shipped one without measuring the shipped one again:

    .venv/bin/python scripts/faithfulness_spread.py --sets v5=saes/starter-v5 v6=saes/starter-v6 \\
        --task ioi --sizes 100 200 500 --reuse faith_spread-ioi --label faith_spread-v6-ioi

``--table`` writes ``faith_spread.md`` beside them: one row per task and set, the mean ± sd over
the seeds of faithfulness and error share at each size, the widest bootstrap interval, and how
often each set's error share is below the first set's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from featcircuits.dictionaries import load_dictionary_set  # noqa: E402
from featcircuits.evaluation.evaluator import Evaluator  # noqa: E402
from featcircuits.evaluation.masks import empty_masks, full_masks  # noqa: E402
from featcircuits.evaluation.pairs import eval_pairs  # noqa: E402
from featcircuits.models import load_model  # noqa: E402
from featcircuits.tasks import make_pairs, tokenize_pairs  # noqa: E402
from featcircuits.tracing import SplicedModel  # noqa: E402
from starter_targets import error_share, top_k_circuits  # noqa: E402


def faithfulness(per: torch.Tensor) -> float:
    """per: [3, n] rows (circuit, M, ∅) of per-pair preferences -> ratio of the means."""
    c, m, e = per.mean(1).tolist()
    return (c - e) / (m - e) if abs(m - e) > 1e-12 else float("nan")


def bootstrap(per: torch.Tensor, draws: int, seed: int, level: float = 0.9) -> tuple[float, float]:
    """Percentile interval of ``faithfulness`` with the pairs (columns) resampled with replacement."""
    gen = torch.Generator().manual_seed(seed)
    n = per.shape[1]
    idx = torch.randint(0, n, (draws, n), generator=gen)
    s = per[:, idx].mean(2)  # [3, draws]
    vals = ((s[0] - s[2]) / (s[1] - s[2])).sort().values
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    return float(vals[int(lo * (draws - 1))]), float(vals[int(hi * (draws - 1))])


def _same_rules(a: str | None, b: str | None) -> bool:
    """Whether two recorded rule sets are one (None: RelP's default, as every run before ``@RULES``)."""
    from featcircuits.lrp import rules_key

    return rules_key(a or "default") == rules_key(b or "default")


def reusable_rows(earlier: dict, sha: str, out: dict, rules: str | None = None) -> dict | None:
    """The per-seed rows of the set with this sha256 in an earlier run of the same measure (same task,
    pair counts and bootstrap draws, every seed and size asked for measured there), else None. The
    measure is deterministic (RelP, mean ablation, seeded pairs and bootstrap), so a set measured
    once need not be measured again beside a new one."""
    same = all(earlier.get(k) == out[k] for k in ("task", "n", "n_eval", "bootstrap_draws"))
    if not same or not set(map(str, out["sizes"])) <= set(map(str, earlier["sizes"])):
        return None
    for s in earlier["sets"].values():
        if (s.get("dictionaries_sha256") == sha and _same_rules(s.get("rules"), rules)
                and all(str(sd) in s["seeds"] for sd in out["seeds"])):
            return {str(sd): {**s["seeds"][str(sd)],
                              "sizes": {str(k): s["seeds"][str(sd)]["sizes"][str(k)] for k in out["sizes"]}}
                    for sd in out["seeds"]}
    return None


def measure(model, sets: dict[str, tuple[str, str | None]], task: str, sizes, seeds, n: int, n_eval: int, draws: int,
            batch_size: int, earlier: list[dict] = ()) -> dict:
    tok = model.tokenizer
    spliced = {label: SplicedModel(model, load_dictionary_set(path, model.adapter, model.spec))
               for label, (path, _) in sets.items()}
    out: dict = {"sets": {}, "task": task, "sizes": list(sizes), "seeds": list(seeds), "n": n, "n_eval": n_eval,
                 "bootstrap_draws": draws}
    for label, sm in list(spliced.items()):
        sha = sm.dictionaries.digest()
        path, rules = sets[label]
        out["sets"][label] = {"path": path, "dictionaries_sha256": sha, "seeds": {}, "rules": rules}
        for run in earlier:
            rows = reusable_rows(run, sha, out, rules)
            if rows is not None:
                out["sets"][label].update(seeds=rows, reused_from=run["_file"])
                print(f"{label}: every seed reused from {run['_file']} (same sha256 and measure)", flush=True)
                del spliced[label]
                break
    for seed in seeds:
        disc_pairs = make_pairs(task, n, seed)
        disc, _ = tokenize_pairs(disc_pairs, tok)
        ev_pairs, _ = eval_pairs(task, n_eval, disc_pairs, seed)
        evb, _ = tokenize_pairs(ev_pairs, tok)
        for label, sm in spliced.items():
            t0 = time.perf_counter()
            _, effects, masks = top_k_circuits(sm, disc, sizes, batch_size, rules=sets[label][1])
            ev = Evaluator(sm, evb, batch_size=batch_size)
            per = ev.pair_scores(masks + [full_masks(sm, ev.sites), empty_masks(sm, ev.sites)])
            row = {"n_discovery": len(disc), "n_eval": len(evb), "sizes": {}}
            for i, k in enumerate(sizes):
                rows = per[[i, len(sizes), len(sizes) + 1]]
                lo, hi = bootstrap(rows, draws, seed)
                row["sizes"][str(k)] = {"faithfulness": faithfulness(rows), "bootstrap_90": [lo, hi],
                                        "error_share": error_share(effects, masks[i])}
            row["seconds"] = round(time.perf_counter() - t0, 1)
            out["sets"][label]["seeds"][str(seed)] = row
            print(f"seed {seed} {label}: " + "  ".join(
                f"{k}: F {v['faithfulness']:.3f} [{v['bootstrap_90'][0]:.3f}, {v['bootstrap_90'][1]:.3f}] "
                f"err {v['error_share']:.0%}" for k, v in row["sizes"].items()) + f" ({row['seconds']} s)", flush=True)
    summarise(out)
    return out


def summarise(out: dict) -> None:
    """Mean and sd across seeds per set and size; paired differences against the first set."""
    labels = list(out["sets"])
    for label in labels:
        s = out["sets"][label]
        s["summary"] = {}
        for k in map(str, out["sizes"]):
            f = [r["sizes"][k]["faithfulness"] for r in s["seeds"].values()]
            e = [r["sizes"][k]["error_share"] for r in s["seeds"].values()]
            s["summary"][k] = {"faithfulness_mean": statistics.mean(f), "faithfulness_sd": _sd(f),
                               "faithfulness_min": min(f), "faithfulness_max": max(f),
                               "error_share_mean": statistics.mean(e), "error_share_sd": _sd(e),
                               "error_share_min": min(e), "error_share_max": max(e)}
    if len(labels) > 1:
        base = out["sets"][labels[0]]["seeds"]
        out["paired"] = {}
        for label in labels[1:]:
            other = out["sets"][label]["seeds"]
            out["paired"][f"{label} - {labels[0]}"] = {
                k: {"faithfulness": [other[sd]["sizes"][k]["faithfulness"] - base[sd]["sizes"][k]["faithfulness"]
                                     for sd in base],
                    "error_share": [other[sd]["sizes"][k]["error_share"] - base[sd]["sizes"][k]["error_share"]
                                    for sd in base]}
                for k in map(str, out["sizes"])}


def _sd(v: list[float]) -> float:
    return statistics.stdev(v) if len(v) > 1 else float("nan")


def render(out: dict, command: str) -> str:
    sizes = [str(k) for k in out["sizes"]]
    lines = [f"# Spread of the {out['n']}/{out['n_eval']}-pair measure on {out['task']}", "",
             f"Written by `{command}`. Seed s: discovery pairs `make_pairs(task, {out['n']}, s)`, held-out pairs "
             f"`eval_pairs(task, {out['n_eval']}, discovery, s)` (seed 0 = starter_targets.py's split); RelP top-k, "
             f"mean ablation; bootstrap {out['bootstrap_draws']} draws over the held-out pairs.", "",
             "| set | size | faithfulness per seed | mean ± sd | error share per seed | mean ± sd |",
             "|---|---|---|---|---|---|"]
    for label, s in out["sets"].items():
        for k in sizes:
            f = " ".join(f"{r['sizes'][k]['faithfulness']:.3f}" for r in s["seeds"].values())
            e = " ".join(f"{r['sizes'][k]['error_share']:.0%}" for r in s["seeds"].values())
            m = s["summary"][k]
            lines.append(f"| {label} | {k} | {f} | {m['faithfulness_mean']:.3f} ± {m['faithfulness_sd']:.3f} | {e} | "
                         f"{m['error_share_mean']:.1%} ± {m['error_share_sd']:.1%} |")
    lines += ["", "Bootstrap 90 % intervals over the held-out pairs (circuit fixed), per seed:", "",
              "| set | size | " + " | ".join(f"seed {sd}" for sd in out["seeds"]) + " |",
              "|---|---|" + "---|" * len(out["seeds"])]
    for label, s in out["sets"].items():
        for k in sizes:
            cells = [f"{r['sizes'][k]['bootstrap_90'][0]:.2f}-{r['sizes'][k]['bootstrap_90'][1]:.2f}"
                     for r in s["seeds"].values()]
            lines.append(f"| {label} | {k} | " + " | ".join(cells) + " |")
    if out.get("paired"):
        lines += ["", "Paired differences (same pairs for both sets), per seed:", "",
                  "| difference | size | faithfulness | mean ± sd | error share (points) | mean ± sd |", "|---|---|---|---|---|---|"]
        for name, per_k in out["paired"].items():
            for k in sizes:
                f, e = per_k[k]["faithfulness"], per_k[k]["error_share"]
                lines.append(f"| {name} | {k} | " + " ".join(f"{x:+.3f}" for x in f)
                             + f" | {statistics.mean(f):+.3f} ± {_sd(f):.3f} | "
                             + " ".join(f"{100 * x:+.0f}" for x in e)
                             + f" | {100 * statistics.mean(e):+.1f} ± {100 * _sd(e):.1f} |")
    return "\n".join(lines) + "\n"


def render_summary(results: list[dict], names: list[str]) -> str:
    """Across tasks: mean ± sd over seeds per set and size, and the paired comparison of error shares."""
    sizes = sorted({str(k) for r in results for k in r["sizes"]}, key=int)
    lines = ["# Circuit rows over pair splits, all tasks", "",
             "Written by `scripts/faithfulness_spread.py --table " + " ".join(names) + "` from the per-task files beside "
             "this one. Faithfulness and top-k error share: mean ± sd over the seeds (each seed a split of "
             "discovery and held-out pairs); *bootstrap* is the widest 90 % interval over held-out pairs among the "
             "seeds; *lower error* counts the seeds at which a set's error share is below the first set's.", "",
             "| task | set | seeds | " + " | ".join(f"faithfulness {k}" for k in sizes) + " | "
             + " | ".join(f"error share {k}" for k in sizes) + " | bootstrap width (widest) | lower error share |",
             "|---|---|---|" + "---|" * (2 * len(sizes)) + "---|---|"]
    for r in results:
        labels = list(r["sets"])
        for label in labels:
            s = r["sets"][label]
            fs, es = [], []
            for k in sizes:
                m = s["summary"].get(k)
                fs.append(f"{m['faithfulness_mean']:.3f} ± {m['faithfulness_sd']:.3f}" if m else "")
                es.append(f"{m['error_share_mean']:.1%} ± {m['error_share_sd']:.1%}" if m else "")
            width = max(v["bootstrap_90"][1] - v["bootstrap_90"][0] for row in s["seeds"].values() for v in row["sizes"].values())
            lower = ""
            if label != labels[0]:
                base = r["sets"][labels[0]]["seeds"]
                pairs = [(row["sizes"][k]["error_share"], base[sd]["sizes"][k]["error_share"])
                         for sd, row in s["seeds"].items() for k in row["sizes"]]
                lower = f"{sum(a < b for a, b in pairs)} of {len(pairs)} (seed x size)"
            lines.append(f"| {r['task']} | {label} | {len(s['seeds'])} | " + " | ".join(fs) + " | " + " | ".join(es)
                         + f" | {width:.2f} | {lower} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", metavar="LABEL=SET", help="SAE sets (registry name or folder)")
    ap.add_argument("--model", default="gemma-3-270m-offline")
    ap.add_argument("--task", default="sva-simple")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 200])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--label", default=None, help="output name (default faith_spread-TASK)")
    ap.add_argument("--out", default=str(ROOT / "results" / "starter_targets"))
    ap.add_argument("--table", nargs="+", metavar="NAME", help="only write faith_spread.md from these files in --out")
    ap.add_argument("--reuse", nargs="+", default=[], metavar="NAME",
                    help="earlier outputs in --out: a set measured there (same sha256, task, pairs) is copied, not remeasured")
    args = ap.parse_args()
    out = Path(args.out)
    if args.table:
        missing = [n for n in args.table if not (out / f"{n}.json").is_file()]
        if missing:
            raise SystemExit(f"no {', '.join(missing)} in {out}; make each with --sets ... --task T --label NAME")
        results = [json.loads((out / f"{n}.json").read_text()) for n in args.table]
        (out / "faith_spread.md").write_text(render_summary(results, args.table))
        print(f"-> {out / 'faith_spread.md'}")
        return 0
    if not args.sets:
        raise SystemExit("give --sets LABEL=SET ... (or --table NAME ...)")
    sets = {}
    for item in args.sets:
        label, sep, spec = item.partition("=")
        path, _, rules = spec.partition("@")
        if not sep or not label or not path:
            raise SystemExit(f"--sets takes LABEL=SET or LABEL=SET@RULES, got {item!r}")
        if rules:
            from featcircuits.errors import UserError
            from featcircuits.lrp import rules_key

            try:
                rules_key(rules)
            except (UserError, ValueError) as exc:
                raise SystemExit(f"--sets {item!r}: {exc}") from exc
        sets[label] = (path, rules or None)
    earlier = []
    for name in args.reuse:
        if not (out / f"{name}.json").is_file():
            raise SystemExit(f"--reuse: no {name}.json in {out}")
        earlier.append({**json.loads((out / f"{name}.json").read_text()), "_file": f"{name}.json"})
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    res = measure(model, sets, args.task, args.sizes, args.seeds, args.n, args.n_eval, args.bootstrap, args.batch_size,
                  earlier)
    label = args.label or f"faith_spread-{args.task}"
    out.mkdir(parents=True, exist_ok=True)
    command = "scripts/faithfulness_spread.py " + " ".join(sys.argv[1:])
    (out / f"{label}.json").write_text(json.dumps(res, indent=1))
    (out / f"{label}.md").write_text(render(res, command))
    print(f"-> {out / (label + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
