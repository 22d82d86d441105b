"""``featcircuits train-saes``: train one SAE per site offline (sae-lens folders + set.json)."""

from __future__ import annotations

import argparse
import sys

from ..training.corpus import MAX_CHARS_PER_SOURCE
from ..training.trainer import TrainConfig
from . import add_training_device_arg, add_training_run_args

_D = TrainConfig(sites=[])


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train-saes", help="train SAEs at many sites offline (sae-lens format)",
        description="Train one SAE per site on the offline corpus (docstrings of the installed packages, "
                    "optionally plus the model's own English samples); one forward collects all sites, "
                    "all SAEs train together. Progress (tokens/s, FVE and dead share per site) is printed at "
                    "every checkpoint; a killed run continues with --resume.")
    p.add_argument("--model", required=True, help="model spec, e.g. gemma-3-270m-offline")
    p.add_argument("--sites", default="all", help="'all' or a comma list such as resid_3,mlp_3")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per site + set.json)")
    p.add_argument("--architecture", choices=("topk", "batchtopk"), default=_D.architecture,
                   help="topk (L0 = k) or batchtopk (k on average per minibatch; saved as JumpReLU)")
    p.add_argument("--width", type=int, default=_D.width, help="latents per SAE for embed/mlp/resid sites")
    p.add_argument("--attn-width", type=int, default=None, help="latents for attn sites (default 3/4 of --width)")
    p.add_argument("--k", type=int, default=_D.k, help="active latents per token (mean, for batchtopk)")
    p.add_argument("--tokens", type=int, default=_D.tokens, help="training tokens (BOS excluded)")
    p.add_argument("--seed", type=int, default=_D.seed, help="seed of the corpus order, initialisation and sampling")
    p.add_argument("--batch-size", type=int, default=_D.batch_size, help="128-token windows per model forward")
    p.add_argument("--sae-batch", type=int, default=_D.sae_batch, help="tokens per optimizer step")
    p.add_argument("--lr", type=float, default=_D.lr)
    p.add_argument("--dim-clip", type=float, default=_D.dim_clip,
                   help="shrink dimensions whose std exceeds this many times the median dimension's "
                        "(folded back into the saved weights; 0 = off)")
    p.add_argument("--identity-coef", type=float, default=_D.identity_coef,
                   help="extra weight on the error along each token's own embedding direction (keeps which "
                        "token is here, e.g. a name, at early residual sites; 0 = off)")
    p.add_argument("--aux-coef", type=float, default=_D.aux_coef, help="AuxK coefficient against dead latents")
    p.add_argument("--dead-tokens", type=int, default=_D.dead_tokens,
                   help="a latent is dead after this many training tokens without firing")
    p.add_argument("--resample-until", type=float, default=_D.resample_until,
                   help="resample dead latents up to this share of training (0 = never, 1 = to the end)")
    p.add_argument("--resample-every", type=int, default=_D.resample_every,
                   help="forwards between resamplings (default: every checkpoint)")
    p.add_argument("--samples", type=int, default=0,
                   help="add this many samples of the model (English-filtered, cached) to the corpus")
    p.add_argument("--sample-names", action="store_true",
                   help="open every other sample with a common English given name (person names in running "
                        "prose; featcircuits.training.samples.NAME_OPENERS)")
    p.add_argument("--sample-batch", type=int, default=32, metavar="B",
                   help="samples generated together (default 32): larger is faster where memory allows, e.g. "
                        "512 on a GPU; part of the sampling recipe, so the same samples need the same B")
    p.add_argument("--pair-samples", type=int, default=0, metavar="N",
                   help="add N samples of the model opened by two given names ('Alice and Henry', "
                        "featcircuits.training.samples.pair_openers; same --sample-batch and seed): text about two "
                        "people, where the model keeps track of which name is which (IOI's layer-9/10 sites; "
                        "results/pilot_pairs)")
    p.add_argument("--pair-sample-batch", type=int, default=None, metavar="B",
                   help="batch of the pair samples (default: --sample-batch); part of their recipe, e.g. 32 for "
                        "the CPU-sampled ones shipped in saes/samples/ beside GPU samples drawn 1024 at a time")
    p.add_argument("--name-swaps", type=int, default=0, metavar="N",
                   help="add N copies of every model sample that holds a given name, its names swapped for "
                        "others of the list (more occurrences of each name without sampling; needs --samples)")
    p.add_argument("--max-chars-per-source", type=int, default=None,
                   help="characters kept of each docstring source (a seeded sample of its documents; default "
                        f"{MAX_CHARS_PER_SOURCE:,}); lower it to give the model samples a larger share of the "
                        "training tokens, which are the first --tokens of the shuffled corpus")
    p.add_argument("--init", choices=("data", "random"), default=_D.init, help="decoder initialisation")
    add_training_device_arg(p)
    add_training_run_args(p, _D.checkpoint_every, "forwards", _D.eval_tokens)
    p.add_argument("--snapshot", metavar="DIR", default=None,
                   help="do not train: write the SAEs of the unfinished run in --out (its last checkpoint) as a "
                        "set in DIR, to inspect it midway; the run is left as it is")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace, site_names: list[str]) -> TrainConfig:
    """The TrainConfig the flags ask for."""
    return TrainConfig(
        sites=site_names, width=args.width,
        attn_width=args.attn_width or max(args.k, (3 * args.width) // 4), k=args.k, tokens=args.tokens,
        batch_size=args.batch_size, sae_batch=args.sae_batch, lr=args.lr, seed=args.seed,
        checkpoint_every=args.checkpoint_every, eval_tokens=args.eval_tokens, init=args.init,
        architecture=args.architecture, dim_clip=args.dim_clip, aux_coef=args.aux_coef,
        identity_coef=args.identity_coef,
        dead_tokens=args.dead_tokens, resample_until=args.resample_until, resample_every=args.resample_every,
    )


def read_text_docs(path_str: str) -> dict[str, list[str]]:
    """``--text FILE``: its documents (separated by blank lines) as one corpus source."""
    from pathlib import Path

    from ..errors import UserError

    path = Path(path_str)
    if not path.is_file():
        raise UserError(f"no such text file: {path_str}")
    return {f"text:{path.name}": [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]}


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import UserError
    from ..models import load_model
    from ..training.corpus import build_corpus
    from ..training.samples import model_samples, opener_cycle, pair_openers
    from ..training.trainer import resolve_sites, snapshot_run, train_saes

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.snapshot:
        meta = snapshot_run(load_model(args.model), args.out, args.snapshot)  # folds weights: the CPU suffices
        print(f"featcircuits: wrote {len(meta['config']['sites'])} SAEs of {args.out} at forward {meta['forward']} "
              f"({meta['tokens_trained']} tokens) -> {args.snapshot}")
        return 0
    if args.samples < 0 or args.pair_samples < 0 or args.window < 2:
        raise UserError("--samples and --pair-samples must be >= 0 and --window >= 2")
    if args.max_chars_per_source is not None and args.max_chars_per_source < 1:
        raise UserError("--max-chars-per-source must be >= 1")
    if args.sample_batch < 1 or (args.pair_sample_batch is not None and args.pair_sample_batch < 1):
        raise UserError("--sample-batch and --pair-sample-batch must be >= 1")
    if args.sample_names and not args.samples:
        raise UserError("--sample-names needs --samples N (it chooses how the model's samples open)")
    if args.name_swaps < 0 or (args.name_swaps and not args.samples):
        raise UserError("--name-swaps needs --samples N and a count >= 0 (it copies the model's samples)")
    docs = read_text_docs(args.text) if args.text else None
    model = load_model(args.model, device=args.device)
    sites = resolve_sites(model.adapter, args.sites)
    cfg = config_from_args(args, [s.name for s in sites])

    def say(line: str) -> None:
        print(line, flush=True)

    samples = None
    if args.samples:
        samples = model_samples(model.hf, model.tokenizer, args.model, args.samples, seed=args.seed,
                                batch=args.sample_batch, progress=not args.no_progress, log=say,
                                openers=opener_cycle(args.sample_names))
    pairs = None
    if args.pair_samples:
        pairs = model_samples(model.hf, model.tokenizer, args.model, args.pair_samples, seed=args.seed,
                              batch=args.pair_sample_batch or args.sample_batch, progress=not args.no_progress, log=say,
                              openers=pair_openers(args.seed))
    corpus = build_corpus(model.tokenizer, seed=args.seed, log=say, samples=samples, docs=docs,
                          window=args.window, cache=docs is None,
                          max_chars_per_source=args.max_chars_per_source or MAX_CHARS_PER_SOURCE,
                          name_swaps=args.name_swaps, pair_samples=pairs)
    say(f"corpus: {corpus.recipe['train_tokens']} train / {corpus.recipe['eval_tokens']} held-out tokens, "
        f"sha256 {corpus.recipe['train_sha256'][:16]}")
    meta = train_saes(model, corpus, args.out, cfg, resume=args.resume, max_steps=args.max_steps,
                      progress=not args.no_progress, log=say)
    if not meta.get("complete"):
        print("featcircuits: training stopped early; rerun with --resume to continue", file=sys.stderr)
    return 0
