"""``featcircuits curves``: faithfulness and completeness against circuit size, per method.

Node effects per method on the discovery examples; circuits = the top-k nodes by |effect|
for k on one log-spaced grid shared by every method (so the methods and the random
baseline are compared at identical node counts); each circuit and its complement are
evaluated on held-out examples. Writes ``curves.json`` (every point, F(M), F(∅), settings,
timings, definitions) and ``curves.png`` / ``curves.svg``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from . import add_model_args, add_rules_arg, add_task_args, default_saes


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
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
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
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run from the checkpoints in --out (same arguments required)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..dictionaries import load_dictionary_set
    from ..errors import UserError
    from ..models import load_model
    from ..validation import check_output_folder

    if args.threads:
        torch.set_num_threads(args.threads)
    check_output_folder(args.out, create=False)
    for name in ("n", "batch_size", "steps", "thresholds", "random_draws", "stack"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    t0 = time.perf_counter()
    model = load_model(args.model)
    saes = default_saes(args.model, args.saes)
    dicts = load_dictionary_set(saes, model.adapter, args.model)
    load_seconds = time.perf_counter() - t0
    result = curves_main(model, dicts, task=args.task, n=args.n, n_eval=args.n_eval or args.n, seed=args.seed,
                         methods=methods, points=args.thresholds, n_min=args.min_nodes, n_max=args.max_nodes,
                         ablation=args.ablation, errors=args.errors, aggregation=args.aggregation,
                         start_layer=args.start_layer, steps=args.steps, rules=args.rules,
                         random_draws=args.random_draws, batch_size=args.batch_size, stack=args.stack,
                         out=args.out, model_spec=args.model, saes_spec=saes,
                         effects_cache=args.effects_cache, progress=not args.no_progress,
                         extra_timings={"load_seconds": round(load_seconds, 3)}, resume=args.resume)
    print_summary(result, args.out)
    return 0


def print_summary(result: dict, out) -> None:
    print(f"F(M) {result['F_M']:+.4f}   F(empty) {result['F_empty']:+.4f}   sizes {result['sizes']}")
    for m, c in result["methods"].items():
        auc = c["auc"]
        reach = c["nodes_to_0.8"]
        print(f"  {m:<7} AUC {auc if auc is None else f'{auc:.3f}'}   nodes to faithfulness 0.8: "
              f"{reach if reach is not None else 'not reached'}")
    cmp_ = result.get("relp_vs_ig")
    if cmp_:
        print(f"  RelP vs IG at >= {cmp_['min_nodes']} nodes: max |diff| {cmp_['max_abs_diff']}, "
              f"{'within' if cmp_['within'] else 'NOT within'} {cmp_['tolerance']}")
    print(f"-> {out}")


def curves_main(model, dicts, *, task: str, n: int, n_eval: int, seed: int = 0, methods=("relp", "ig", "atp", "random"),
                points: int = 15, n_min: int = 1, n_max: int | None = None, ablation: str = "mean",
                errors: str = "ablate", aggregation: str = "sum", start_layer: int = -1, steps: int = 10,
                rules="default", random_draws: int = 3, batch_size: int = 16, stack: int = 4, out=None,
                model_spec: str | None = None, saes_spec: str | None = None, effects_cache=None,
                progress: bool = True, extra_timings: dict | None = None, title: str | None = None,
                resume: bool = False) -> dict:
    """Everything ``featcircuits curves`` does after loading the model and dictionaries:
    discovery and evaluation pairs, node effects (cached when ``effects_cache`` is given),
    the curves, ``curves.json`` and the plots in ``out``. Returns the result dict.

    With ``out``, every stage checkpoints per chunk of examples into ``out/.checkpoint``;
    ``resume=True`` continues a killed run from there."""
    import torch

    from ..evaluation import eval_pairs, faithfulness_curves, plot_curves
    from ..io import write_json
    from ..tasks import make_pairs, tokenize_pairs
    from ..tracing import SplicedModel

    torch.manual_seed(seed)
    disc_pairs = make_pairs(task, n, seed)
    ev_pairs, split = eval_pairs(task, n_eval, disc_pairs, seed)
    disc, dropped_d = tokenize_pairs(disc_pairs, model.tokenizer)
    evb, dropped_e = tokenize_pairs(ev_pairs, model.tokenizer)
    for what, dropped, pairs in (("discovery", dropped_d, disc_pairs), ("evaluation", dropped_e, ev_pairs)):
        if dropped:
            print(f"featcircuits: dropped {len(dropped)} of {len(pairs)} {what} pairs ({dropped[0][1]}, ...)",
                  file=sys.stderr)
    split.update({"discovery_seed": seed, "n_discovery_requested": n, "n_discovery": len(disc),
                  "discovery_dropped": len(dropped_d), "n_eval_requested": n_eval, "n_eval": len(evb),
                  "eval_dropped": len(dropped_e)})
    sm = SplicedModel(model, dicts)
    effects = {}
    cache_info = {}
    paths = {}
    for m in methods:
        if m == "random" or effects_cache is None:
            continue
        key = _effects_key(model_spec or model.spec, dicts, disc, m, steps, rules, batch_size)
        paths[m] = Path(effects_cache) / f"{m}-{key}.pt"
        if paths[m].is_file():
            effects[m] = torch.load(paths[m], weights_only=False)
            cache_info[m] = {"path": str(paths[m]), "reused": True}
    result = faithfulness_curves(sm, disc, evb, methods, points=points, n_min=n_min, n_max=n_max,
                                 ablation=ablation, errors=errors, aggregation=aggregation,
                                 start_layer=start_layer, steps=steps, rules=rules, random_draws=random_draws,
                                 seed=seed, batch_size=batch_size, stack=stack, effects=effects,
                                 progress=progress, checkpoint_dir=out, resume=resume)
    for m, path in paths.items():
        if m not in cache_info:  # computed in this run: keep for the next
            from ..io import atomic_write

            atomic_write(path, lambda p, e=effects[m]: torch.save(e, p))
            cache_info[m] = {"path": str(path), "reused": False}
    from ..discover import versions

    result["provenance"] = {
        "model": model_spec or model.spec, "saes": saes_spec or dicts.name,
        "dictionaries_sha256": dicts.digest(), "identity_sites": dicts.meta.get("identity_sites", []),
        "task": task, "seed": seed, "versions": versions(), "effects_cache": cache_info or None,
    }
    result["split"] = split
    result["timings"].update(extra_timings or {})
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "curves.json", result)
        plot_curves(result, out / "curves", title=title or f"{task} — {model_spec or model.spec}, "
                                                           f"dictionaries {saes_spec or dicts.name}")
    return result


def _effects_key(model_spec: str, dicts, batch, method: str, steps: int, rules, batch_size: int) -> str:
    from ..lrp import rules_key

    h = hashlib.sha256()
    for t in (batch.clean_ids, batch.patch_ids, batch.clean_answer, batch.patch_answer):
        h.update(t.numpy().tobytes())
    h.update(json.dumps([model_spec, dicts.digest(), method, steps if method == "ig" else None,
                         rules_key(rules) if method == "relp" else None, batch_size]).encode())
    return h.hexdigest()[:16]
