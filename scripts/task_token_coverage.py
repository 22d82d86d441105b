#!/usr/bin/env python
"""How often the tasks' words occur in the positions a starter set was trained on.

A dictionary can only spell out what it has seen: a feature for " Mary" needs " Mary" in the
training text. This rebuilds a set's training corpus from its ``set.json`` (the same
docstrings and cached model samples; the sha256 of the windows is checked against the one the
trainer recorded), takes the windows the trainer consumed (``tokens`` of them, in order), and
counts the single-token words of each built-in task: IOI's names, SVA's subject nouns and
verbs. Writes ``<out>/task_token_coverage.json`` and ``.md`` (``task_token_coverage-<label>.*``
with ``--label``).

    .venv/bin/python scripts/task_token_coverage.py --saes starter
    .venv/bin/python scripts/task_token_coverage.py --saes starter-v2 --label v2   # (a deleted set: as it was run)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from featcircuits import tasks  # noqa: E402
from featcircuits.dictionaries import local_set_folder, registry  # noqa: E402
from featcircuits.errors import UserError  # noqa: E402
from featcircuits.io import write_text  # noqa: E402
from featcircuits.training.corpus import corpus_of_set  # noqa: E402


def word_groups() -> dict[str, list[str]]:
    """The tasks' words, by group, as the prompts use them (a leading space, mid-sentence)."""
    return {"ioi names": tasks.NAMES,
            "sva nouns (singular)": [s for s, _ in tasks.NOUNS],
            "sva nouns (plural)": [p for _, p in tasks.NOUNS],
            "sva verbs": sorted({v.strip() for pair in tasks.VERBS for v in pair})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--saes", default="starter", help="a registered local set or a set folder with set.json")
    ap.add_argument("--out", default=str(ROOT / "results" / "starter_targets"))
    ap.add_argument("--label", default=None, help="suffix of the output files (one file per set)")
    args = ap.parse_args(argv)
    entry = registry().get(args.saes)
    folder = local_set_folder(entry["path"]) if entry and entry.get("kind") == "local" else Path(args.saes)
    if folder is None or not (folder / "set.json").is_file():
        raise UserError(f"{args.saes}: no set.json (a set trained by featcircuits train-saes)")
    meta = json.loads((folder / "set.json").read_text())
    cfg = meta["config"]
    from transformers import AutoTokenizer

    from featcircuits.models import offline_gemma_folder

    tok = AutoTokenizer.from_pretrained(offline_gemma_folder())
    # every sample chunk is in the sampling cache after training, so no model is needed (hf=None)
    corpus = corpus_of_set(meta, tok)
    if corpus.recipe["train_sha256"] != meta["corpus_sha256"]:
        raise UserError("the rebuilt corpus differs from the one the set was trained on (sha256 mismatch): "
                        "other package versions give other docstrings")
    skip = int(cfg.get("skip_bos", True))  # the trainer skips each window's BOS position
    n_windows = int(meta["tokens_trained"]) // (corpus.train.shape[1] - skip)
    trained = corpus.train[:n_windows, skip:].reshape(-1).tolist()
    counts = Counter(trained)
    rows = {}
    for group, words in word_groups().items():
        per = {}
        for w in words:
            ids = tok.encode(" " + w, add_special_tokens=False)
            per[w] = counts[ids[0]] if len(ids) == 1 else None  # multi-token words are not counted
        known = [c for c in per.values() if c is not None]
        rows[group] = {"counts": per, "median": statistics.median(known) if known else None,
                       "never": sum(c == 0 for c in known)}
    result = {"set": args.saes, "corpus_sha256": meta["corpus_sha256"], "trained_positions": len(trained),
              "groups": rows, "command": "python scripts/task_token_coverage.py " + " ".join(argv or sys.argv[1:])}
    out = Path(args.out)
    stem = "task_token_coverage" + (f"-{args.label}" if args.label else "")
    write_text(out / f"{stem}.json", json.dumps(result, indent=1))
    lines = [f"# Task words in the training positions of `{args.saes}`", "",
             f"Written by `{result['command']}`. {len(trained):,} trained positions (corpus sha256 "
             f"`{meta['corpus_sha256'][:12]}`, checked). Counts of each word as one token with a leading space.", "",
             "| group | median count | words never seen | counts |", "|---|---:|---:|---|"]
    for group, r in rows.items():
        shown = ", ".join(f"{w} {c}" for w, c in r["counts"].items() if c is not None)
        lines.append(f"| {group} | {r['median']} | {r['never']} | {shown} |")
    write_text(out / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"task_token_coverage: {e}", file=sys.stderr)
        sys.exit(2)
