"""Corpora for feature cards: token windows from the offline corpus, a .txt or a .jsonl file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .errors import UserError


def check_corpus(spec: str) -> None:
    """Raise UserError unless ``spec`` is ``offline`` or an existing .txt / .jsonl file (cheap:
    commands call it before loading the model)."""
    if spec != "offline" and (not Path(spec).is_file() or Path(spec).suffix not in (".txt", ".jsonl")):
        raise UserError(f"--corpus must be 'offline', a .txt file or a .jsonl file; got {spec!r}"
                        + ("" if Path(spec).exists() else " (no such file)"))


def corpus_windows(spec: str, tokenizer: Any, tokens: int) -> tuple[torch.Tensor, dict]:
    """Token windows [n, T] (BOS first) covering at least ``tokens`` tokens, and a descriptor.

    ``spec``: ``offline`` (the docstring corpus of :mod:`featcircuits.training.corpus`, train
    split, already shuffled with its seed), a ``.txt`` file (paragraphs split at blank lines)
    or a ``.jsonl`` file (one string or ``{"text": ...}`` per line).
    """
    from .training.corpus import WINDOW, build_corpus, token_hash, windows_from_texts

    if spec == "offline":
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
    return windows, {"source": spec if spec == "offline" else str(Path(spec).resolve()),
                     "tokens": int(windows.numel()), "sha256": token_hash(windows)}


def _jsonl_text(line: str, path: Path, i: int) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{i}: not JSON ({exc.msg})") from None
    text = obj if isinstance(obj, str) else obj.get("text") if isinstance(obj, dict) else None
    if not isinstance(text, str):
        raise UserError(f"{path}:{i}: expected a string or an object with a 'text' string")
    return text
