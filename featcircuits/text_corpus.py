"""Corpora for feature cards: token windows from the text a dictionary set was trained on, the
offline docstring corpus, a .txt or a .jsonl file.

A feature's top contexts depend on the text streamed: cards of a set trained mostly on prose,
read off docstrings, show the feature where code happens to look like its prose. So cards
default (``auto``) to the set's own training text when it can be rebuilt here from its
``set.json`` recipe without sampling the model (its samples cached or shipped beside the sets),
and to the offline corpus otherwise; the store records which (``source``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .errors import UserError


NAMED = ("auto", "set", "offline")
CORPUS_HELP = ("text for the feature cards: 'auto' (default: 'set' where it can be rebuilt here, else "
               "'offline'), 'set' (the text the dictionary set was trained on, rebuilt from its set.json), "
               "'offline' (the docstring corpus), a .txt or a .jsonl file")


def corpus_name(corpus: dict | None) -> str:
    """How a store's corpus descriptor (``corpus_windows``' second value) reads in output."""
    source = (corpus or {}).get("source")
    return {"set": "the set's training text", "offline": "the offline docstring corpus",
            None: "an unrecorded corpus"}.get(source) or Path(str(source)).name


def check_corpus(spec: str) -> None:
    """Raise UserError unless ``spec`` is one of ``NAMED`` or an existing .txt / .jsonl file
    (cheap: commands call it before loading the model)."""
    if spec not in NAMED and (not Path(spec).is_file() or Path(spec).suffix not in (".txt", ".jsonl")):
        raise UserError(f"--corpus must be 'auto', 'set', 'offline', a .txt file or a .jsonl file; got {spec!r}"
                        + ("" if Path(spec).exists() else " (no such file)"))


def set_corpus_problem(set_meta: dict | None) -> str | None:
    """Why the training text of the set whose ``set.json`` is ``set_meta`` cannot be rebuilt here
    without sampling the model, or None when it can."""
    from .training.corpus import SAMPLE_SOURCES
    from .training.samples import key_of_recipe, missing_chunks

    recipe = (set_meta or {}).get("corpus")
    if not recipe:
        return "the dictionary set records no training corpus (no set.json with a corpus recipe)"
    if not recipe.get("modules"):
        return "the set was trained on text it was given (--text), which it does not ship"
    for src in SAMPLE_SOURCES:
        ms = recipe.get(src)
        missing = missing_chunks(key_of_recipe(ms)) if ms else []
        if missing:
            return (f"{len(missing)} of the {ms['chunks']} chunks of its {src.replace('_', ' ')} are neither cached "
                    "nor shipped (saes/samples/); rebuilding them means sampling the model (slow on a CPU: "
                    "`featcircuits train-saes` with the set's flags, or scripts/device_samples.py on a GPU)")
    return None


def resolve_corpus(spec: str, set_meta: dict | None) -> str:
    """``auto`` -> ``set`` where the set's text can be rebuilt here, else ``offline``; ``set``
    where it cannot raises UserError saying why; anything else is returned as given."""
    if spec not in ("auto", "set"):
        return spec
    problem = set_corpus_problem(set_meta)
    if problem is None:
        return "set"
    if spec == "set":
        raise UserError(f"--corpus set: {problem}; use --corpus offline or a text file")
    return "offline"


def corpus_windows(spec: str, tokenizer: Any, tokens: int, set_meta: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Token windows [n, T] (BOS first) covering at least ``tokens`` tokens, and a descriptor.

    ``spec``: ``set`` (the train split of the corpus the set was trained on, rebuilt from
    ``set_meta``, its ``set.json``), ``auto`` (see :func:`resolve_corpus`), ``offline`` (the
    docstring corpus of :mod:`featcircuits.training.corpus`, train split, already shuffled with
    its seed), a ``.txt`` file (paragraphs split at blank lines) or a ``.jsonl`` file (one
    string or ``{"text": ...}`` per line). The descriptor's ``source`` names what was used.
    """
    from .training.corpus import WINDOW, build_corpus, corpus_of_set, token_hash, windows_from_texts

    spec = resolve_corpus(spec, set_meta)
    extra: dict = {}
    if spec == "set":
        corpus = corpus_of_set(set_meta or {}, tokenizer)
        windows = corpus.train
        # other package versions give other docstrings: the same recipe, not the same text
        extra = {"set_corpus_sha256": corpus.recipe["train_sha256"],
                 "same_text_as_trained": corpus.recipe["train_sha256"] == (set_meta or {}).get("corpus_sha256")}
    elif spec == "offline":
        windows = build_corpus(tokenizer).train
    else:
        check_corpus(spec)
        path = Path(spec)
        raw = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".txt":
            docs = [p.strip() for p in raw.split("\n\n") if p.strip()]
        else:
            docs = [_jsonl_text(line, path, i) for i, line in enumerate(raw.splitlines(), 1) if line.strip()]
        windows = windows_from_texts(docs, tokenizer, WINDOW)
    n = max(1, math.ceil(tokens / windows.shape[1]))
    if n > windows.shape[0]:
        raise UserError(f"the corpus {spec!r} holds {windows.numel()} tokens, fewer than the {tokens} asked for")
    windows = windows[:n]
    return windows, {"source": spec if spec in NAMED else str(Path(spec).resolve()),
                     "tokens": int(windows.numel()), "sha256": token_hash(windows), **extra}


def _jsonl_text(line: str, path: Path, i: int) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{i}: not JSON ({exc.msg})") from None
    text = obj if isinstance(obj, str) else obj.get("text") if isinstance(obj, dict) else None
    if not isinstance(text, str):
        raise UserError(f"{path}:{i}: expected a string or an object with a 'text' string")
    return text
