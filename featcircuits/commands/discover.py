"""``featcircuits discover``: the main job, from a task to a circuit folder."""

from __future__ import annotations

import argparse
import sys
import time

from ..graph import DEFAULT_TOP_K, describe_size
from ..text_corpus import CORPUS_HELP, corpus_name
from . import (load_model_from_args, add_model_args, add_out_args, add_rules_arg, add_task_args, add_threads_arg,
               check_dictionaries_early, default_saes, report_pairs)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "discover", help="discover a sparse feature circuit and write graph, exports and plots",
        description="Compute node effects, threshold them, compute edges into the kept nodes, and write "
                    "graph.graphml/.dot/.json, node effects, summary.json, pictures and the viewer circuit.html "
                    "(labelled from feature cards) into --out; a quick evaluation reports faithfulness, "
                    "completeness and the error nodes' share of |effect|.")
    add_model_args(p)
    add_task_args(p)
    p.add_argument("--method", default="relp", choices=["relp", "ig", "atp"],
                   help="estimator for nodes and edges (default relp)")
    p.add_argument("--steps", type=int, default=10, help="IG interpolation steps (default 10)")
    add_rules_arg(p)
    p.add_argument("--node-threshold", type=float, default=None, help="keep nodes with |effect| above this")
    p.add_argument("--edge-threshold", type=float, default=None,
                   help="keep edges with |weight| above this (default: 1%% of the largest |edge|)")
    p.add_argument("--top-k", type=int, default=None,
                   help=f"keep the k nodes of largest |effect| (default {DEFAULT_TOP_K} when no other node rule is given)")
    p.add_argument("--share", type=float, default=None,
                   help="keep the fewest nodes whose |effect| adds up to this share of the total")
    p.add_argument("--aggregation", default="sum", choices=["sum", "none"],
                   help="sum: one node per feature (summed over positions); none: one per feature and position")
    p.add_argument("--no-edges", action="store_true", help="nodes only")
    p.add_argument("--unbatched-edges", action="store_true",
                   help="one backward per downstream node (the slow reference path)")
    p.add_argument("--compare", default=None, choices=["ig", "relp", "atp"],
                   help="also time this method's nodes+edges on the same data (recorded in summary.json)")
    p.add_argument("--cards", default="auto", choices=["auto", "subset", "off"],
                   help="feature cards for the circuit's nodes (labels, example contexts in circuit.html): "
                        "auto = the set's cached feature store (`featcircuits features`) if built, else cards "
                        "for the circuit's features only; subset = always the latter; off = none")
    p.add_argument("--no-cards", dest="cards", action="store_const", const="off", help="same as --cards off")
    p.add_argument("--corpus", default="auto", help=CORPUS_HELP)
    p.add_argument("--card-tokens", type=int, default=None,
                   help="corpus tokens of the circuit-only cards (default 4096)")
    p.add_argument("--annotations", default=None, metavar="FILE.json",
                   help="JSON object node id -> label; overrides the automatic labels")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the quick evaluation (faithfulness/completeness on held-out pairs)")
    p.add_argument("--n-eval", type=int, default=None, help="held-out pairs of the quick evaluation (default 32)")
    add_out_args(p)
    add_threads_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..dictionaries import load_dictionary_set
    from ..compare import compare_circuits
    from ..discover import discover_circuit
    from ..export import save_circuit
    from ..graph import Thresholds
    from ..tasks import make_pairs, tokenize_pairs
    from ..tracing import SplicedModel
    from ..validation import prepare_run_folder

    torch.manual_seed(args.seed)
    run_folder = prepare_run_folder(args.out, resume=args.resume, overwrite=args.overwrite)
    if args.n < 1 or args.steps < 1:  # --batch-size is checked by its parser
        from ..errors import UserError

        raise UserError("--n and --steps must be positive")
    from ..evaluation.quick import DEFAULT_N_EVAL, circuit_quality, quality_lines
    from ..labels import load_annotations
    from ..readable import DEFAULT_CARD_TOKENS, annotate, circuit_cards, node_facts

    annotations = load_annotations(args.annotations)  # a bad file fails before the model loads
    if args.cards != "off":
        from ..text_corpus import check_corpus

        check_corpus(args.corpus)
    card_tokens = DEFAULT_CARD_TOKENS if args.card_tokens is None else args.card_tokens
    n_eval = DEFAULT_N_EVAL if args.n_eval is None else args.n_eval
    if card_tokens < 1 or n_eval < 1:
        from ..errors import UserError

        raise UserError("--card-tokens and --n-eval must be positive")
    thresholds = Thresholds.with_default(node=args.node_threshold, edge=args.edge_threshold, top_k=args.top_k,
                                         share=args.share)
    pairs = make_pairs(args.task, args.n, args.seed)
    t_load = time.perf_counter()
    saes = default_saes(args.model, args.saes)
    check_dictionaries_early(args.model, saes)
    model = load_model_from_args(args)
    dicts = load_dictionary_set(saes, model.adapter, args.model)
    t_load = time.perf_counter() - t_load
    batch, dropped = tokenize_pairs(pairs, model.tokenizer)
    counts = report_pairs(args.task, args.n, pairs, dropped)
    sm = SplicedModel(model, dicts)
    out = run_folder.open()  # every input checked: now the work starts
    provenance = {"model": args.model, "saes": saes, "task": args.task, "seed": args.seed,
                  **counts}
    circuit = discover_circuit(sm, batch, args.method, thresholds=thresholds, aggregation=args.aggregation,
                               steps=args.steps, rules=args.rules, batch_size=args.batch_size,
                               edges=not args.no_edges, batched_edges=not args.unbatched_edges,
                               provenance=provenance, checkpoint_dir=out, resume=args.resume)
    secs = circuit.provenance["seconds"]
    secs["load"] = round(t_load, 3)
    batch_size = circuit.provenance["batching"]["batch_size"]  # --batch-size auto resolved once, by discover
    t = time.perf_counter()
    node_facts(sm, batch, circuit, circuit.provenance.get("prompt_tokens"), batch_size=batch_size)
    secs["facts"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()

    def say_subset(n_features: int, tokens: int) -> None:
        print(f"featcircuits: no feature store for this set yet: building cards for the circuit's {n_features} "
              f"features only ({tokens} corpus tokens; `featcircuits features` builds the full store once)",
              file=sys.stderr)

    cards, card_info = circuit_cards(sm, circuit, args.cards, args.corpus, card_tokens, on_subset=say_subset)
    annotate(sm, circuit, cards, annotations)
    secs["cards"] = round(time.perf_counter() - t, 3)
    if card_info is not None:
        circuit.provenance["cards"] = card_info
    if not args.no_eval:
        t = time.perf_counter()
        circuit.provenance["quality"] = circuit_quality(sm, circuit, args.task, pairs, n_eval=n_eval, seed=args.seed,
                                                        batch_size=batch_size)
        secs["quality"] = round(time.perf_counter() - t, 3)
    extra = {}
    if args.compare and args.compare != args.method:
        other = discover_circuit(sm, batch, args.compare, thresholds=thresholds, aggregation=args.aggregation,
                                 steps=args.steps, rules=args.rules, batch_size=batch_size,
                                 edges=not args.no_edges, batched_edges=not args.unbatched_edges)
        mine, theirs = circuit.provenance["seconds"], other.provenance["seconds"]
        extra["compare"] = {"method": args.compare, "seconds": theirs, "n_nodes": other.n_nodes,
                            "n_edges": other.n_edges,
                            "ratio_total": round(mine["total"] / theirs["total"], 4) if theirs["total"] else None,
                            **compare_circuits(circuit, other)}
    save_circuit(circuit, out, extra=extra, cards=cards)
    out = run_folder.commit()
    s = circuit.provenance["seconds"]
    print(f"circuit: {circuit.n_nodes} nodes, {circuit.n_edges} edges  (nodes {s['nodes']:.1f}s, "
          f"edges {s['edges']:.1f}s, total {s['total']:.1f}s)  -> {out}")
    if "compare" in extra:
        c = extra["compare"]
        print(f"same run with {c['method']}: total {c['seconds']['total']:.1f}s "
              f"({args.method}/{c['method']} = {c['ratio_total']}); {c['nodes_shared']} nodes shared "
              f"(Jaccard {c['jaccard']}), Pearson r of node effects over all nodes {c['pearson_effects']}")
    note = describe_size(circuit.provenance["circuit_size"])
    if note:
        print(f"  {note}")
    for nid, eff in circuit.top_nodes(8):
        label = circuit.graph.nodes[nid].get("label") or ""
        print(f"  {nid:<22} effect {eff:+.4f}  {label}")
    if card_info is not None:
        print(f"cards: {card_info['n_cards']} of {card_info['n_feature_nodes']} feature nodes "
              f"({'circuit-only' if card_info['subset'] else 'full'} store, {card_info['tokens']} tokens of "
              f"{corpus_name(card_info.get('corpus'))})")
    if "quality" in circuit.provenance:
        for line in quality_lines(circuit.provenance["quality"]):
            print(line, file=sys.stderr if line.startswith("featcircuits: warning") else sys.stdout)
    return 0
