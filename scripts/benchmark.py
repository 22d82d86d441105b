#!/usr/bin/env python
"""Benchmarks: what each estimator costs, how the cost grows, and how close it is to the floor.

Writes ``results/benchmarks/benchmarks.json``, ``results/benchmarks/README.md``, the plots
(PNG + SVG) and the ``## Benchmarks`` section of ``results/README.md``. Every number in
those files comes from this script. Run it from the repository root::

    .venv/bin/python scripts/benchmark.py --models gemma  # offline Gemma (~22 min on a loaded 2-core CPU)
    .venv/bin/python scripts/benchmark.py --models tiny   # tiny model (~14 min; keeps Gemma's rows)
    .venv/bin/python scripts/benchmark.py --quick         # both, smaller sizes, one repeat (~10 min)
    .venv/bin/python scripts/benchmark.py --cards-cost    # only discover with cards vs --no-cards (~6 min)
    .venv/bin/python scripts/benchmark.py --report-only   # README and plots again from the JSON

The suites live in ``scripts/bench/`` (measuring, items, one model's suite, sizes, targets,
plots, report); this file parses the flags and runs them.

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
- **Passes**: ``SplicedModel`` counts forward calls and backward calls, and the example
  rows each forward processes and each backward goes through (``counters()``), so
  passes per example = rows / n (an IG forward over ``steps`` stacked copies of a batch of
  b examples counts steps x b rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # featcircuits and the bench package

from featcircuits.io import write_json  # noqa: E402
from bench import common  # noqa: E402
from bench.common import OUT_DEFAULT, RESULTS_README  # noqa: E402
from bench.suite import cli_peak_rss, run_suite  # noqa: E402
from bench.config import gemma_config, tiny_config  # noqa: E402
from bench.report import write_report  # noqa: E402


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
    ap.add_argument("--pairs-scaling", default=None, metavar="full|N,N,...",
                    help="run only the pairs-scaling row on Gemma: the real CLI in a fresh process per n (time "
                         "per pair, peak RSS, ratios to the smallest n against the targets); 'full' = "
                         "64,128,256,512,1024,2048; merged into benchmarks.json")
    ap.add_argument("--pairs-commands", default="discover", metavar="CMD,...",
                    help="commands of the pairs-scaling row: discover, curves, agreement (default discover)")
    ap.add_argument("--pairs-batch-size", type=int, default=16, help="--batch-size of the pairs-scaling row")
    ap.add_argument("--pairs-model", default=None,
                    help="model of the pairs-scaling row (default the offline Gemma; e.g. a tiny model folder "
                         "for a smoke run into another --out)")
    ap.add_argument("--cards-cost", action="store_true",
                    help="run only the readable-circuits item on Gemma (the real CLI discover with feature cards "
                         "against --no-cards, the set's full store built beforehand; ~2 x 2 runs + 1 with the quick "
                         "evaluation) and merge it into benchmarks.json")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite README and plots from the existing benchmarks.json, measure nothing")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    common.DEFAULT_THREADS = torch.get_num_threads()  # torch's own default, before --threads
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
    if args.pairs_scaling:
        from bench.pairs import COMMANDS, parse_sizes, run_pairs_scaling

        ns = parse_sizes(args.pairs_scaling)
        commands = [c.strip() for c in args.pairs_commands.split(",") if c.strip()]
        if not commands or set(commands) - set(COMMANDS):
            raise SystemExit(f"--pairs-commands: choose from {', '.join(COMMANDS)}")
        saes = "identity" if args.pairs_model else gemma_config(args)["saes"]
        gemma = data["models"].setdefault("gemma", {})
        for cmd in commands:
            log(f"[gemma] pairs scaling {cmd} n={ns}, dictionaries {saes}")
            key = "pairs_scaling" if cmd == "discover" else f"pairs_scaling_{cmd}"
            kw = {"model": args.pairs_model} if args.pairs_model else {}
            gemma[key] = run_pairs_scaling(ns, saes, log, batch_size=args.pairs_batch_size, command=cmd, **kw)
            gemma[key]["command_of_this_measurement"] = command
            write_json(path, data)
    if args.cards_cost:
        from bench.cards_cost import run_cards_cost

        saes = gemma_config(args)["saes"]
        log(f"[gemma] discover with cards against --no-cards, dictionaries {saes}")
        gemma = data["models"].setdefault("gemma", {})
        gemma["cards_cost"] = run_cards_cost(saes, log)
        gemma["cards_cost"]["command_of_this_measurement"] = command
        write_json(path, data)
    keys = [] if args.report_only or args.cli_only or args.pairs_scaling or args.cards_cost else [m.strip() for m in args.models.split(",") if m.strip()]
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
        # the items measured by their own flags (--pairs-scaling, --cards-cost) take tens of minutes
        # and each records its own command: a suite rerun keeps them rather than dropping them
        previous = data["models"].get(key, {})
        res.update({k: v for k, v in previous.items()
                    if (k.startswith("pairs_scaling") or k == "cards_cost") and k not in res})
        data["models"][key] = res
        data["generated_by"] = "scripts/benchmark.py"
        write_json(path, data)
        log(f"[{key}] done in {res['suite_wall_s']} s -> {path}")
    write_report(data, out, None if args.no_results_readme else RESULTS_README)
    return 0


if __name__ == "__main__":
    sys.exit(main())
