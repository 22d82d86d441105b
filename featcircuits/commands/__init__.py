"""Subcommands of the ``featcircuits`` CLI, one module each, and the flags they share."""

from __future__ import annotations

import argparse

from ..models import OFFLINE_ALIAS


def add_model_args(p: argparse.ArgumentParser, saes: bool = True) -> None:
    p.add_argument("--model", default=OFFLINE_ALIAS,
                   help=f"hub id, local HF folder, .gguf file, or {OFFLINE_ALIAS!r} (default)")
    if saes:
        p.add_argument("--saes", default=None,
                       help="dictionary set: a registered name (e.g. 'starter'), a folder of per-site "
                            "dictionaries, or 'identity' (neurons). Default: 'starter' for the offline "
                            "model when present, else identity")
    add_device_args(p)


def add_device_args(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype`` (every command that runs a model; resolved by ``featcircuits.devices``)."""
    from ..devices import DEVICE_MAPS, DEVICES, DTYPES

    p.add_argument("--device", default="auto",
                   help=f"where the model runs: {'|'.join(DEVICES)} (default auto: cuda, else mps, else cpu)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="model and dictionary precision (default float32; effects and sums are always float32)")
    p.add_argument("--device-map", default=None, choices=list(DEVICE_MAPS),
                   help="auto: accelerate spreads the model's layers over every device it sees (models "
                        "bigger than one device; instead of --device, not with torchrun)")


def load_model_from_args(args: argparse.Namespace, spec: str | None = None):
    """``load_model`` with the flags of ``add_device_args`` (the one place commands load a model)."""
    from ..models import load_model

    return load_model(spec or args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)


def add_training_device_arg(p: argparse.ArgumentParser) -> None:
    """``--device`` of ``train-saes`` and ``finetune-saes``: the model and the SAEs it trains go
    there (training is float32; no ``--dtype`` or ``--device-map``)."""
    from ..devices import DEVICES

    p.add_argument("--device", default="auto",
                   help=f"where the model runs and the SAEs train: {'|'.join(DEVICES)} (default auto: cuda, "
                        "else mps, else cpu); a checkpoint resumes on any device")


def add_training_run_args(p: argparse.ArgumentParser, checkpoint_every: int, checkpoint_unit: str,
                          eval_tokens: int) -> None:
    """The flags ``train-saes`` and ``finetune-saes`` share: the text to train on, checkpoints and
    resuming, threads, progress."""
    p.add_argument("--text", default=None,
                   help="train on this UTF-8 text file instead (documents separated by blank lines)")
    p.add_argument("--window", type=int, default=128, help="tokens per training window, BOS included")
    p.add_argument("--checkpoint-every", type=int, default=checkpoint_every,
                   help=f"{checkpoint_unit} between checkpoints")
    p.add_argument("--eval-tokens", type=int, default=eval_tokens, help="held-out tokens for the final metrics")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine one thread ran 2.4x faster "
                        "than two, whose OpenMP barriers spin against other processes)")
    p.add_argument("--max-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt after a kill")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the per-checkpoint lines stay)")


def add_rules_arg(p: argparse.ArgumentParser) -> None:
    from ..lrp import DEFAULT_RULES, PAPER_RULES, PRESETS, RULES

    p.add_argument("--rules", default="default",
                   help=f"rules for relp: comma list of {','.join(RULES)} or a preset ({', '.join(PRESETS)}); "
                        f"default two-point ({','.join(DEFAULT_RULES)}: every operation linearised between "
                        f"the clean and the counterfactual run); 'paper' = the RelP authors' "
                        f"{','.join(PAPER_RULES)}")


def add_task_args(p: argparse.ArgumentParser, n_default: int = 64) -> None:
    p.add_argument("--task", default="sva-simple",
                   help="built-in task (sva-simple, sva-nounpp, sva-rc, sva-within-rc, ioi) or a "
                        "JSON-lines file in the Sparse Feature Circuits format")
    # --pairs: under torchrun, whose parser reads "--n" as an ambiguous abbreviation of its own flags
    p.add_argument("--n", "--pairs", dest="n", type=int, default=n_default,
                   help="number of prompt pairs (--pairs: the same, for use after torchrun)")
    p.add_argument("--seed", type=int, default=0, help="seed for task generation and sampling")
    add_batch_size_arg(p)


def add_batch_size_arg(p: argparse.ArgumentParser) -> None:
    """``--batch-size N|auto|auto:CAP`` (resolved by ``featcircuits.batching.resolve_batch_size``)."""
    p.add_argument("--batch-size", type=_batch_size, default=16,
                   help="examples per forward pass, or 'auto' / 'auto:CAP': the largest that fits in "
                        "free memory (measured per example; featcircuits.batching), at most CAP")


def _batch_size(text: str) -> "int | str":
    from ..batching import parse_batch_size
    from ..errors import UserError

    try:
        return parse_batch_size(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def default_saes(model_spec: str, saes: str | None) -> str:
    """``starter`` for the offline model when that set is registered and its folder found, else identity."""
    if saes is not None:
        return saes
    from ..dictionaries import local_set_folder, registry

    if model_spec == OFFLINE_ALIAS and "starter" in registry() and local_set_folder(registry()["starter"]["path"]):
        return "starter"
    return "identity"


def report_pairs(task: str, n: int, pairs: list, dropped: list) -> dict:
    """Print the pair warnings (fewer than --n, dropped) and return the counts for the summary."""
    import sys

    from ..tasks import pair_counts, pair_warnings

    for line in pair_warnings(task, n, pairs, dropped):
        print(f"featcircuits: {line}", file=sys.stderr)
    return pair_counts(n, pairs, dropped)


def check_dictionaries_early(model_spec: str, saes: str | None) -> None:
    """Dictionaries against the model's config, before its weights load (where the config and
    the dictionaries' widths can be read without loading either)."""
    from ..dictionaries import precheck_dictionary_set
    from ..models import config_adapter

    adapter = config_adapter(model_spec)
    if adapter is not None:
        precheck_dictionary_set(saes, adapter)


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """``--threads`` for every command that computes (applied once, in ``cli.main``)."""
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_out_args(p: argparse.ArgumentParser, resume: bool = True) -> None:
    """``--out`` and what to do when it holds an earlier run (``--resume``, ``--overwrite``)."""
    p.add_argument("--out", required=True, help="output folder")
    if resume:
        p.add_argument("--resume", action="store_true",
                       help="continue a killed run from the checkpoints in --out (same arguments required)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the earlier run in --out (the new run is written beside it and swapped in "
                        "when complete; a kill leaves the old folder)")
