"""``featcircuits agreement``: how well AtP, RelP and IG agree with exact activation patching."""

from __future__ import annotations

import argparse

from . import (load_model_from_args, add_model_args, add_out_args, add_rules_arg, add_task_args, add_threads_arg,
               check_dictionaries_early, report_pairs)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "agreement", help="compare node-effect estimators with exact activation patching",
        description="Compute exact activation patching and each estimator (AtP, RelP with the given rules and "
                    "beside it the RelP authors' rules, IG) on the same pairs; write agreement.json (Pearson r per method "
                    "and site kind, seconds per method), agreement.md and scatter plots into --out.")
    add_model_args(p)
    add_task_args(p, n_default=32)
    p.set_defaults(batch_size=8)
    p.add_argument("--methods", default="atp,relp,ig",
                   help="comma list of atp, relp, relp+ah, relp:<rules joined by +> (e.g. relp:ln+identity+half-qk), "
                        "ig (default atp,relp,ig; next to relp the RelP authors' rules relp:ln+identity+half are added, "
                        "or relp+ah when --rules paper, unless --no-variant)")
    p.add_argument("--granularity", default="components", choices=["components", "features"],
                   help="components: one node per site and position (identity dictionaries); features: one "
                        "per SAE feature and error node, exact patching on a sample")
    add_rules_arg(p)
    p.add_argument("--no-variant", "--no-ah-variant", dest="no_ah_variant", action="store_true",
                   help="do not add the comparison column next to relp (the authors' rules, or relp+ah)")
    p.add_argument("--steps", type=int, default=10, help="IG interpolation steps (default 10)")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved timing runs of AtP and RelP; the median is reported (default 3)")
    p.add_argument("--aggregation", default="sum", choices=["sum", "none"],
                   help="features: sum (one node per feature) or none (per feature and position)")
    p.add_argument("--top-k", type=int, default=16,
                   help="features: exact-patch the top k nodes by each method, per site kind (default 16)")
    p.add_argument("--random", type=int, default=48,
                   help="features: plus this many random nodes with a nonzero estimate, per site kind (default 48)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-by-case", action="store_true",
                   help="skip the per-case results (by default each case of a task with several, e.g. IOI's "
                        "io-first and s-first, is rerun on its pairs alone)")
    add_out_args(p, resume=False)
    add_threads_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..agreement import by_case_rows, resolve_methods, run_agreement, write_agreement
    from ..dictionaries import identity_set, load_dictionary_set
    from ..errors import UserError
    from ..tasks import make_pairs, tokenize_pairs
    from ..tracing import SplicedModel
    from ..validation import prepare_run_folder

    torch.manual_seed(args.seed)
    run_folder = prepare_run_folder(args.out, overwrite=args.overwrite)
    if min(args.n, args.steps, args.repeats) < 1:  # --batch-size: checked by its parser
        raise UserError("--n, --steps and --repeats must be positive")
    if args.top_k < 0 or args.random < 0:
        raise UserError("--top-k and --random must not be negative")
    resolve_methods(args.methods, args.rules)  # a bad --methods or --rules fails before the model loads
    if args.granularity == "components" and args.saes not in (None, "identity"):
        raise UserError("--granularity components patches whole site vectors and uses no dictionaries; "
                        "drop --saes or use --granularity features")
    pairs = make_pairs(args.task, args.n, args.seed)
    if args.granularity == "features":
        check_dictionaries_early(args.model, args.saes)
    model = load_model_from_args(args)
    if args.granularity == "components":
        dicts, saes = identity_set(model.adapter), "identity"
    else:
        saes = args.saes or "identity"
        dicts = load_dictionary_set(saes, model.adapter, args.model)
    batch, dropped = tokenize_pairs(pairs, model.tokenizer)
    counts = report_pairs(args.task, args.n, pairs, dropped)
    sm = SplicedModel(model, dicts)
    result = run_agreement(sm, batch, args.methods, args.granularity, rules=args.rules, steps=args.steps,
                           batch_size=args.batch_size, repeats=args.repeats, aggregation=args.aggregation,
                           top_k=args.top_k, n_random=args.random, seed=args.seed, progress=not args.quiet,
                           add_ah=not args.no_ah_variant, by_case=not args.no_by_case)
    # the digest names the weights, so a result made with ``starter`` says which set that was
    result = {"model": args.model, "task": args.task, "saes": saes, "seed": args.seed,
              "dictionaries_sha256": dicts.digest(), **counts,
              "torch_threads": torch.get_num_threads(), **result}
    title = f"{args.model}, {args.task}, {args.granularity}" + (f", {saes}" if args.granularity == "features" else "")
    write_agreement(result, run_folder.open(), title)
    out = run_folder.commit()
    from .. import distributed

    if not distributed.is_writer():  # under torchrun rank 0 alone reports
        return 0
    kinds = result["site_kinds"]
    print(f"Pearson r vs exact patching ({args.granularity}, n={result['n']}):")
    print(f"  {'method':<8} " + " ".join(f"{k:>7}" for k in kinds) + f" {'seconds':>9}")
    for m in result["methods"]:
        print(f"  {m:<8} " + " ".join(f"{result['pearson'][m][k]:>+7.3f}" for k in kinds)
              + f" {result['seconds'][m]:>9.2f}")
    print(f"  {'exact':<8} " + " ".join(f"{'':>7}" for _ in kinds) + f" {result['seconds']['exact']:>9.2f}")
    if result.get("by_case"):
        print("  by case: " + " ".join(f"{k:>7}" for k in kinds) + f" {'all':>7}")
        for row in by_case_rows(result):
            print(f"  {row[0]:<10} n={row[1]:<3} {row[2]:<8} " + " ".join(f"{v:>7}" for v in row[3:]))
    for c in result["targets"]:
        print(f"  target {c['check']}: {'met' if c['passed'] else 'MISSED'} ({c['value']})")
    print(f"-> {out}")
    return 0
