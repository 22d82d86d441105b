"""``featcircuits finetune-saes``: end-to-end KL fine-tuning of a trained set's SAEs at chosen sites."""

from __future__ import annotations

import argparse
import sys

from ..training.finetune import KL_FOCUS, FinetuneConfig
from . import add_training_device_arg, add_training_run_args

_D = FinetuneConfig(sites=[])


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "finetune-saes", help="fine-tune a set's SAEs so the model spliced with them predicts as the clean one",
        description="End-to-end fine-tuning (Braun et al. 2024) of a trained set: each chosen site's SAE, spliced "
                    "without its error term, is trained on KL(clean || spliced) of the next-token distribution plus "
                    "a normalised reconstruction term. The other sites are copied; OUT is a complete set. Trains on "
                    "the corpus the set was trained on (its set.json recipe) unless --text is given.")
    p.add_argument("--model", required=True, help="model spec, e.g. gemma-3-270m-offline")
    p.add_argument("--saes", required=True, help="the trained set: a registered name or a folder with set.json")
    p.add_argument("--sites", required=True, help="comma list of sites to fine-tune, e.g. resid_1,resid_2")
    p.add_argument("--out", required=True, help="output folder (the whole set + set.json)")
    p.add_argument("--tokens", type=int, default=_D.tokens, help="tokens through each site's SAE (BOS excluded)")
    p.add_argument("--lr", type=float, default=_D.lr, help="relative rate: each tensor's Adam rate is LR x its RMS")
    p.add_argument("--mse-coef", type=float, default=_D.mse_coef, help="weight of the normalised reconstruction term")
    p.add_argument("--kl-positions", type=int, default=_D.kl_positions,
                   help="non-BOS positions per window whose next-token KL is trained")
    p.add_argument("--kl-focus", choices=KL_FOCUS, default=_D.kl_focus,
                   help="random positions, or first those whose next token repeats an uncommon token from earlier "
                        "in the window (copying a name or term seen before), then random ones")
    p.add_argument("--batch-size", type=int, default=_D.batch_size, help="windows per step")
    p.add_argument("--seed", type=int, default=_D.seed)
    add_training_device_arg(p)
    add_training_run_args(p, _D.checkpoint_every, "steps", _D.eval_tokens)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..dictionaries import load_dictionary_set
    from ..models import load_model
    from ..training.corpus import build_corpus, corpus_of_set
    from ..training.finetune import finetune_set
    from .train_saes import read_text_docs

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device)
    if args.text:
        corpus = build_corpus(model.tokenizer, seed=args.seed, docs=read_text_docs(args.text), window=args.window,
                              cache=False)
    else:
        meta = load_dictionary_set(args.saes, model.adapter, args.model).meta.get("set") or {}
        if not meta.get("corpus"):
            from ..errors import UserError

            raise UserError(f"{args.saes!r} records no corpus recipe in its set.json; give --text FILE")
        corpus = corpus_of_set(meta, model.tokenizer, model.hf, progress=not args.no_progress)
        if meta.get("corpus_sha256") and meta["corpus_sha256"] != corpus.recipe["train_sha256"]:
            print("featcircuits: this machine rebuilds the set's corpus with other text (package versions differ)",
                  file=sys.stderr)
    cfg = FinetuneConfig(sites=[s.strip() for s in args.sites.split(",")], tokens=args.tokens, lr=args.lr,
                         mse_coef=args.mse_coef, kl_positions=args.kl_positions, kl_focus=args.kl_focus, batch_size=args.batch_size,
                         seed=args.seed, checkpoint_every=args.checkpoint_every, eval_tokens=args.eval_tokens)
    meta = finetune_set(model, args.saes, corpus, args.out, cfg, resume=args.resume, max_steps=args.max_steps,
                        progress=not args.no_progress, log=lambda line: print(line, flush=True))
    if not meta.get("complete"):
        print("featcircuits: fine-tuning stopped early; rerun with --resume to continue", file=sys.stderr)
    return 0
