"""``featcircuits curves``: faithfulness and completeness against circuit size, per method.

Node effects per method on the discovery examples; circuits = the top-k nodes by |effect|
for k on one log-spaced grid shared by every method (so the methods and the random
baseline are compared at identical node counts); each circuit and its complement are
evaluated on held-out examples. Writes ``curves.json`` (every point, F(M), F(∅), settings,
timings, definitions) and ``curves.png`` / ``curves.svg``.
"""

from __future__ import annotations

import argparse
import time

from . import (load_model_from_args, add_model_args, add_out_args, add_rules_arg, add_task_args, add_threads_arg,
               check_dictionaries_early, default_saes)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``evaluate`` and ``curves``."""
    p.add_argument("--ablation", default="mean", choices=["mean", "zero", "resample"],
                   help="what an ablated node becomes: its mean over the counterfactual prompts of the "
                        "evaluation set (per position), zero, or a resampled counterfactual value (default mean)")
    p.add_argument("--errors", default="ablate", choices=["ablate", "keep"],
                   help="error nodes outside the circuit are ablated (default) or always kept")
    p.add_argument("--start-layer", type=int, default=-1,
                   help="ablate only sites from this layer on (embed = -1, the default: every site)")
    p.add_argument("--stack", type=int, default=4, help="circuits evaluated together in one forward pass")
    add_threads_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "curves", help="faithfulness and completeness curves comparing RelP, IG, AtP and random circuits",
        description="Sweep circuit sizes (top-k nodes by |effect|, log-spaced k shared by all methods), ablate "
                    "everything outside each circuit on held-out examples, and plot faithfulness and "
                    "completeness against the number of nodes.")
    add_model_args(p)
    add_task_args(p, n_default=32)
    p.add_argument("--n-eval", type=int, default=None,
                   help="evaluation pairs, disjoint from the discovery pairs (default: --n)")
    p.add_argument("--methods", default="relp,ig,atp,random",
                   help="comma list of relp, ig, atp, random (default: all four)")
    p.add_argument("--thresholds", type=int, default=15, help="number of circuit sizes on the grid (default 15)")
    p.add_argument("--min-nodes", type=int, default=1, help="smallest circuit size (default 1)")
    p.add_argument("--max-nodes", type=int, default=None,
                   help="largest circuit size (default: the most nodes with a non-zero effect under any method)")
    p.add_argument("--aggregation", default="sum", choices=["sum", "none"],
                   help="sum: one node per feature; none: one per feature and position")
    p.add_argument("--steps", type=int, default=10, help="IG interpolation steps (default 10)")
    add_rules_arg(p)
    p.add_argument("--random-draws", type=int, default=3, help="random circuits per size, averaged (default 3)")
    p.add_argument("--effects-cache", default=None,
                   help="folder to keep node effects in, reused by a rerun with the same inputs")
    add_eval_args(p)
    add_out_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..dictionaries import load_dictionary_set
    from ..errors import UserError
    from ..evaluation import curves_summary, run_curves
    from ..validation import prepare_run_folder

    run_folder = prepare_run_folder(args.out, resume=args.resume, overwrite=args.overwrite)
    for name in ("n", "steps", "thresholds", "random_draws", "stack"):  # --batch-size: checked by its parser
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    t0 = time.perf_counter()
    saes = default_saes(args.model, args.saes)
    check_dictionaries_early(args.model, saes)
    model = load_model_from_args(args)
    dicts = load_dictionary_set(saes, model.adapter, args.model)
    load_seconds = time.perf_counter() - t0
    work = run_folder.open()
    result = run_curves(model, dicts, task=args.task, n=args.n, n_eval=args.n_eval or args.n, seed=args.seed,
                         methods=methods, points=args.thresholds, n_min=args.min_nodes, n_max=args.max_nodes,
                         ablation=args.ablation, errors=args.errors, aggregation=args.aggregation,
                         start_layer=args.start_layer, steps=args.steps, rules=args.rules,
                         random_draws=args.random_draws, batch_size=args.batch_size, stack=args.stack,
                         out=work, model_spec=args.model, saes_spec=saes,
                         effects_cache=args.effects_cache, progress=not args.no_progress,
                         extra_timings={"load_seconds": round(load_seconds, 3)}, resume=args.resume)
    out = run_folder.commit()
    from .. import distributed

    if distributed.is_writer():  # under torchrun rank 0 alone reports
        print(curves_summary(result, out))
    return 0
