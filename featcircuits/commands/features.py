"""``featcircuits features``: build (or reuse) the feature store of a dictionary set."""

from __future__ import annotations

import argparse

from ..text_corpus import CORPUS_HELP, corpus_name
from . import add_model_args, add_threads_arg, default_saes, load_model_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "features", help="build the feature cards of a dictionary set (cached; discover reuses them)",
        description="Stream a corpus once through the spliced model and keep, for every feature of every site, "
                    "its top activating contexts, sampled lower-quantile examples, density, mean and direct "
                    "effect on the output tokens. Cached by (model, set, corpus, settings); a killed build "
                    "resumes. With --nodes, only the features of a circuit (graph.json) are built.")
    add_model_args(p)
    p.add_argument("--corpus", default="auto", help=CORPUS_HELP)
    p.add_argument("--tokens", type=int, default=None, help="corpus tokens to stream (default 200000)")
    p.add_argument("--top-k", type=int, default=None, help="top activating contexts kept per feature (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled examples")
    p.add_argument("--batch-size", type=int, default=None, help="corpus windows per forward pass (default 8)")
    p.add_argument("--nodes", default=None, metavar="DIR_OR_GRAPH_JSON",
                   help="build cards only for the feature nodes of this circuit (a run folder or its graph.json)")
    p.add_argument("--out", default=None, metavar="DIR", help="also copy store.safetensors + store.json here")
    add_threads_arg(p)  # on a machine shared with other jobs, --threads 1 avoids threads waiting on each other
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from ..readable import build_features
    from ..dictionaries import load_dictionary_set
    from ..tracing import SplicedModel

    from ..errors import UserError
    from ..text_corpus import check_corpus

    bad = [f for f, v in (("--tokens", args.tokens), ("--top-k", args.top_k), ("--batch-size", args.batch_size))
           if v is not None and v < 1]
    if bad:  # checked before the model loads
        raise UserError(f"{', '.join(bad)} must be positive")
    check_corpus(args.corpus)
    t0 = time.perf_counter()
    model = load_model_from_args(args)
    saes = default_saes(args.model, args.saes)
    sm = SplicedModel(model, load_dictionary_set(saes, model.adapter, args.model))
    t1 = time.perf_counter()
    store, copied = build_features(sm, args.corpus, tokens=args.tokens, top_k=args.top_k, seed=args.seed,
                                   batch=args.batch_size, nodes=args.nodes, out=args.out)
    n_feat = sum(len(store.tensors[f"{s}.features"]) for s in store.meta["sites"])
    print(f"feature store: {n_feat} features at {len(store.meta['sites'])} sites over {store.n_tokens} tokens "
          f"of {corpus_name(store.meta.get('corpus'))} "
          f"({'circuit-only' if store.meta.get('subset') else 'full'}; {time.perf_counter() - t1:.1f}s, "
          f"model load {t1 - t0:.1f}s) -> {store.folder}" + (f" (copied to {copied})" if copied else ""))
    return 0
