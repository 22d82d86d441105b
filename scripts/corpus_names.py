#!/usr/bin/env python
"""How often the IOI task's names occur in a set's training corpus, against the trainer's
idle limit for a latent (``dead_tokens``).

A TopK latent that fires only on one name fires about once per (corpus tokens / that name's
count) tokens. When that gap is longer than ``dead_tokens``, the trainer declares such a
latent dead between two occurrences and resamples it (while resampling is on), so a latent
of its own for that name cannot survive; ``scripts/ioi_positions.py`` found that the early
residual SAEs of starter give the IOI names nearly one code.

    .venv/bin/python scripts/corpus_names.py --saes starter --out results/starter_targets/corpus_names

Counts the names as the task writes them mid-sentence (one token each, with the leading
space) and at the start of a text (no space), over the corpus's training windows. Writes
OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from featcircuits.dictionaries import load_dictionary_set  # noqa: E402
from featcircuits.models import load_model  # noqa: E402
from featcircuits.tasks import NAMES  # noqa: E402
from featcircuits.training.corpus import corpus_of_set  # noqa: E402


def name_counts(train: torch.Tensor, tokenizer, names: list[str]) -> dict[str, dict[str, int]]:
    """Per name: occurrences of its single-token forms (`` Name``, ``Name``) in ``train``."""
    flat = train.flatten()
    counts = torch.bincount(flat, minlength=int(flat.max()) + 1)
    out = {}
    for name in names:
        row = {}
        for form in (" " + name, name):
            ids = tokenizer.encode(form, add_special_tokens=False)
            row[repr(form)] = int(counts[ids[0]]) if len(ids) == 1 else -1  # -1: not one token
        out[name] = row
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--saes", default="starter")
    ap.add_argument("--model", default="gemma-3-270m-offline")
    ap.add_argument("--out", default=str(ROOT / "results" / "starter_targets" / "corpus_names"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    meta = load_dictionary_set(args.saes, model.adapter, args.model).meta.get("set") or {}
    corpus = corpus_of_set(meta, model.tokenizer, model.hf)
    cfg = meta.get("config") or {}
    trained = int(meta.get("tokens_trained") or corpus.recipe["train_tokens"])
    counts = name_counts(corpus.train, model.tokenizer, NAMES)
    n_tokens = int(corpus.train.numel())
    report = {"saes": args.saes, "corpus_sha256": corpus.recipe["train_sha256"],
              "recorded_corpus_sha256": meta.get("corpus_sha256"), "corpus_tokens": n_tokens,
              "tokens_trained": trained, "dead_tokens": cfg.get("dead_tokens"),
              "resample_until": cfg.get("resample_until"), "counts": counts}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(report, " ".join(sys.argv[1:])))
    print(out.with_suffix(".md").read_text())
    return 0


def _rebuilt(r: dict) -> str:
    recorded = r.get("recorded_corpus_sha256")
    if not recorded or recorded == r["corpus_sha256"]:
        return ""
    return (f" (rebuilt on this machine from the set's recipe; the set recorded `{recorded[:12]}`: the model's "
            "samples, regenerated here, came out different)")


def render(r: dict, argv: str) -> str:
    dead = r["dead_tokens"]
    lines = [f"# The IOI names in the training corpus of `{r['saes']}`", "",
             f"Written by `.venv/bin/python scripts/corpus_names.py {argv}`. Corpus "
             f"`{r['corpus_sha256'][:12]}`{_rebuilt(r)}: {r['corpus_tokens']:,} tokens in its training windows "
             f"({r['tokens_trained']:,} of them trained on). *gap* = corpus tokens per occurrence of the "
             f"mid-sentence form, i.e. how long a latent of that name alone would sit idle; the trainer "
             f"resamples a latent idle for {dead:,} tokens (`dead_tokens`, resampling until "
             f"{r['resample_until']:.0%} of training).", "",
             "| name | ' Name' | 'Name' | gap (tokens) | idle longer than dead_tokens |", "|---|---|---|---|---|"]
    over = 0
    for name, c in r["counts"].items():
        mid, start = c[repr(" " + name)], c[repr(name)]
        gap = r["corpus_tokens"] / mid if mid > 0 else float("inf")
        over += gap > dead
        lines.append(f"| {name} | {mid if mid >= 0 else 'n/a'} | {start if start >= 0 else 'n/a'} | "
                     f"{'never' if gap == float('inf') else f'{gap:,.0f}'} | {'yes' if gap > dead else 'no'} |")
    lines += ["", f"{over} of {len(r['counts'])} names occur less often than once per {dead:,} corpus tokens."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
