"""Tasks: counterfactual prompt pairs, from the Sparse Feature Circuits JSON-lines format or
from seeded built-in generators, tokenized into aligned batches.

A pair is a clean prompt with its answer and a counterfactual ("patch") prompt with its
answer. Prompts are left-padded so that every prompt's last token sits at the last
position, where the metric reads the logits.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .errors import UserError

FIELDS = ("clean_prefix", "patch_prefix", "clean_answer", "patch_answer")
BUILTIN_TASKS = ("sva-simple", "sva-nounpp", "sva-rc", "sva-within-rc", "ioi", "ioi-io-first", "ioi-s-first")
# IOI word orders: "When A and B ..., B gave ... to" -> A names the indirect object first
# (io-first); "When B and A ..., B gave ... to" -> A names the subject first (s-first).
# ``ioi`` mixes both at random; each pair's ``case`` says which order it has.
IOI_ORDERS = {"ioi": None, "ioi-io-first": "io-first", "ioi-s-first": "s-first"}


@dataclass(frozen=True)
class Pair:
    clean_prefix: str
    patch_prefix: str
    clean_answer: str
    patch_answer: str
    case: str = ""
    # where the pair came from ("file.jsonl:12"), for messages; not part of its identity
    source: str = field(default="", compare=False)

    def where(self, index: int) -> str:
        """``file.jsonl:12`` for a pair read from a file, else ``pair 3`` (0-based index)."""
        return self.source or f"pair {index}"


# --------------------------------------------------------------------------------------
# Reading the Sparse Feature Circuits format


def read_pairs(path: str | Path) -> list[Pair]:
    """Read one JSON object per line with clean_prefix, patch_prefix, clean_answer,
    patch_answer (and optional case). A malformed line is an error naming its number."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"task file {path} does not exist")
    pairs = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in FIELDS if k not in row]
            if missing:
                raise UserError(f"{path}:{number}: missing field(s) {', '.join(missing)}")
            bad = [k for k in FIELDS if not isinstance(row[k], str) or not row[k]]
            if bad:
                raise UserError(f"{path}:{number}: field(s) {', '.join(bad)} must be non-empty strings")
            pairs.append(Pair(*(row[k] for k in FIELDS), case=str(row.get("case", "")), source=f"{path}:{number}"))
    if not pairs:
        raise UserError(f"task file {path} holds no pairs")
    return pairs


def write_pairs(pairs: Iterable[Pair], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as fh:
        for p in pairs:
            fh.write(json.dumps(p.__dict__) + "\n")


# --------------------------------------------------------------------------------------
# Built-in generators (seeded templates)

NOUNS = [  # (singular, plural)
    ("author", "authors"), ("pilot", "pilots"), ("surgeon", "surgeons"), ("farmer", "farmers"),
    ("manager", "managers"), ("customer", "customers"), ("officer", "officers"),
    ("teacher", "teachers"), ("senator", "senators"), ("doctor", "doctors"), ("dancer", "dancers"),
    ("guard", "guards"), ("student", "students"), ("writer", "writers"), ("painter", "painters"),
    ("lawyer", "lawyers"), ("singer", "singers"), ("player", "players"), ("driver", "drivers"),
    ("friend", "friends"), ("parent", "parents"), ("child", "children"), ("girl", "girls"),
    ("boy", "boys"), ("king", "kings"), ("nurse", "nurses"), ("soldier", "soldiers"),
]
OBJECTS = [("table", "tables"), ("desk", "desks"), ("car", "cars"), ("house", "houses"),
           ("tree", "trees"), ("door", "doors"), ("window", "windows"), ("book", "books")]
PREPOSITIONS = ["near", "behind", "beside", "above", "below"]
VERBS = [(" is", " are"), (" has", " have"), (" was", " were"), (" does", " do")]
PAST_VERBS = ["liked", "saw", "met", "knew", "helped", "called"]
NAMES = ["Mary", "John", "Tom", "James", "Sarah", "Anna", "Paul", "Mark", "Lisa", "Kate",
         "David", "Michael", "Emma", "Peter", "Alice", "Robert"]
# 16 given names that are neither NAMES nor among the 120 names the model's samples open with
# (training.samples.NAME_OPENERS, also the names --name-swaps draws from): IOI with these
# (``ioi_pairs(HELD_OUT_NAMES, n)``) asks whether a dictionary keeps names it was not built around.
HELD_OUT_NAMES = ("Leo", "Nora", "Ivan", "Hugo", "Iris", "Nina", "Omar", "Ella", "Owen", "Ruby", "Jake", "Zoe",
                  "Luke", "Amber", "Dean", "Eva")
PLACES = ["store", "park", "school", "office", "hospital", "station", "market", "garden"]
THINGS = ["drink", "book", "ring", "gift", "letter", "ball", "key", "bag"]


def _sva(rng: random.Random, n: int, kind: str) -> list[Pair]:
    pairs = []
    for _ in range(n):
        subj = rng.choice(NOUNS)
        verb = rng.choice(VERBS)
        clean_plural = rng.random() < 0.5
        if kind == "simple":
            prefix = "The {}"
            fill = lambda p: prefix.format(subj[p])  # noqa: E731
            agree_with = "subject"
        elif kind == "nounpp":
            obj = rng.choice(OBJECTS)[rng.random() < 0.5]
            prep = rng.choice(PREPOSITIONS)
            fill = lambda p: f"The {subj[p]} {prep} the {obj}"  # noqa: E731
            agree_with = "subject"
        elif kind == "rc":
            other = rng.choice(NOUNS)[rng.random() < 0.5]
            past = rng.choice(PAST_VERBS)
            fill = lambda p: f"The {subj[p]} that the {other} {past}"  # noqa: E731
            agree_with = "subject"
        elif kind == "within-rc":
            head = rng.choice(NOUNS)[rng.random() < 0.5]
            fill = lambda p: f"The {head} that the {subj[p]}"  # noqa: E731
            agree_with = "embedded subject"
        else:  # pragma: no cover - guarded by make_task
            raise ValueError(kind)
        c, p = int(clean_plural), int(not clean_plural)
        pairs.append(Pair(fill(c), fill(p), verb[c], verb[p],
                          case=f"{'plural' if clean_plural else 'singular'} {agree_with}"))
    return pairs


def _ioi(rng: random.Random, n: int, order: str | None = None, names: Sequence[str] = NAMES) -> list[Pair]:
    """IOI pairs; ``order`` forces one word order (``io-first`` | ``s-first``), None mixes them."""
    pairs = []
    for _ in range(n):
        a, b = rng.sample(list(names), 2)
        place, thing = rng.choice(PLACES), rng.choice(THINGS)
        io_first = rng.random() < 0.5 if order is None else order == "io-first"
        first, second = (a, b) if io_first else (b, a)
        start = f"When {first} and {second} went to the {place}, "
        # Clean: B gives to A (answer A). Counterfactual: A gives, so the answer is B.
        pairs.append(Pair(f"{start}{b} gave a {thing} to", f"{start}{a} gave a {thing} to",
                          f" {a}", f" {b}", case="io-first" if io_first else "s-first"))
    return pairs


def ioi_pairs(names: Sequence[str], n: int, seed: int = 0) -> list[Pair]:
    """``n`` pairs of the ``ioi`` task with other given names (each must be one token after a
    space for the answers to be single tokens; ``tokenize_pairs`` drops pairs where not). Asks
    whether what holds for the built-in names (``NAMES``) holds for names a dictionary's
    training text was not chosen around."""
    if len(set(names)) < 2:
        raise UserError("ioi needs at least two different names")
    return _ioi(random.Random(f"ioi:{seed}:{','.join(names)}"), n, None, names)


def make_pairs(task: str, n: int, seed: int = 0) -> list[Pair]:
    """``n`` pairs of a built-in task (``sva-simple`` ...), or the first ``n`` of a task file."""
    if n <= 0:
        raise UserError(f"--n must be positive, got {n}")
    if task in BUILTIN_TASKS:
        rng = random.Random(f"{task}:{seed}")
        if task in IOI_ORDERS:
            return _ioi(rng, n, IOI_ORDERS[task])
        return _sva(rng, n, task[len("sva-"):])
    path = Path(task)
    if path.suffix in (".json", ".jsonl") or path.exists():
        pairs = read_pairs(path)
        rng = random.Random(seed)
        rng.shuffle(pairs)
        return pairs[:n]
    raise UserError(f"unknown task {task!r}: give one of {', '.join(BUILTIN_TASKS)} or a JSON-lines file")


def task_vocabulary() -> list[str]:
    """Every word the built-in generators use (tests build tiny word-level tokenizers from it)."""
    words = {"The", "the", "that", "When", "and", "went", "to", "gave", "a", ","}
    for s, p in NOUNS + OBJECTS:
        words |= {s, p}
    words |= set(PREPOSITIONS) | set(PAST_VERBS) | set(NAMES) | set(PLACES) | set(THINGS)
    words |= {v.strip() for pair in VERBS for v in pair}
    return sorted(words)


# --------------------------------------------------------------------------------------
# Tokenizing into aligned batches


@dataclass
class Batch:
    """Clean and counterfactual prompts, left-padded to one length so positions align at the end."""

    clean_ids: torch.Tensor  # [b, T]
    clean_mask: torch.Tensor
    patch_ids: torch.Tensor
    patch_mask: torch.Tensor
    clean_answer: torch.Tensor  # [b] token ids
    patch_answer: torch.Tensor
    pairs: list[Pair]

    def __len__(self) -> int:
        return self.clean_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.clean_ids.shape[1]

    def inputs(self, which: str = "clean") -> dict[str, torch.Tensor]:
        if which == "clean":
            return {"input_ids": self.clean_ids, "attention_mask": self.clean_mask}
        return {"input_ids": self.patch_ids, "attention_mask": self.patch_mask}

    def slice(self, start: int, stop: int) -> "Batch":
        return Batch(self.clean_ids[start:stop], self.clean_mask[start:stop], self.patch_ids[start:stop],
                     self.patch_mask[start:stop], self.clean_answer[start:stop],
                     self.patch_answer[start:stop], self.pairs[start:stop])

    def select(self, indices: list[int]) -> "Batch":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Batch(self.clean_ids[idx], self.clean_mask[idx], self.patch_ids[idx], self.patch_mask[idx],
                     self.clean_answer[idx], self.patch_answer[idx], [self.pairs[i] for i in indices])

    def chunks(self, size: int) -> list["Batch"]:
        return [self.slice(i, i + size) for i in range(0, len(self), size)]


def pair_counts(n_requested: int, pairs: list[Pair], dropped: list[tuple[int, str]]) -> dict[str, int]:
    """What a summary records about the pairs: asked for (``--n``), found in the task, dropped, used."""
    return {"pairs_requested": n_requested, "pairs_available": len(pairs), "pairs_dropped": len(dropped),
            "pairs_used": len(pairs) - len(dropped)}


def pair_warnings(task: str, n_requested: int, pairs: list[Pair], dropped: list[tuple[int, str]]) -> list[str]:
    """One line each: the task holds fewer pairs than ``--n`` asked for; pairs were dropped."""
    lines = []
    if len(pairs) < n_requested:
        lines.append(f"warning: --n {n_requested} but {task} holds only {len(pairs)} pairs: using {len(pairs)}")
    if dropped:
        lines.append(describe_dropped(dropped, len(pairs)))
    return lines


def _prompt_lengths(pairs: list[Pair], tokenizer: Any) -> list[tuple[int, int]]:
    """Token counts of each pair's clean and patch prompt (one batched call, no padding)."""
    enc = tokenizer([p.clean_prefix for p in pairs] + [p.patch_prefix for p in pairs])["input_ids"]
    return [(len(enc[i]), len(enc[len(pairs) + i])) for i in range(len(pairs))]


def describe_dropped(dropped: list[tuple[int, str]], total: int, what: str = "pairs", first: int = 3) -> str:
    """``dropped 2 of 10 pairs: <reason>; <reason>`` (the first few reasons) for one-line reports."""
    reasons = "; ".join(r for _, r in dropped[:first]) + ("; ..." if len(dropped) > first else "")
    return f"dropped {len(dropped)} of {total} {what}: {reasons}"


def single_token(tokenizer: Any, answer: str) -> int | None:
    ids = tokenizer.encode(answer, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def tokenize_pairs(pairs: list[Pair], tokenizer: Any) -> tuple[Batch, list[tuple[int, str]]]:
    """Tokenize pairs into one aligned batch.

    Dropped, and returned as ``(index, reason)`` so the caller reports the count (the reason
    names the pair's file line when it has one): pairs whose answers are not single tokens or
    are the same token, and pairs whose clean and patch prompts tokenize to different lengths
    (patching is position by position, so it would swap unrelated tokens). An empty result
    is an error.
    """
    kept, dropped, answers = [], [], []
    lengths = _prompt_lengths(pairs, tokenizer)
    for i, p in enumerate(pairs):
        ca, pa = single_token(tokenizer, p.clean_answer), single_token(tokenizer, p.patch_answer)
        if ca is None or pa is None:
            bad = p.clean_answer if ca is None else p.patch_answer
            dropped.append((i, f"{p.where(i)}: answer {bad!r} is not a single token"))
            continue
        if ca == pa:
            dropped.append((i, f"{p.where(i)}: clean and patch answers are the same token {p.clean_answer!r}"))
            continue
        lc, lp = lengths[i]
        if lc != lp:
            dropped.append((i, f"{p.where(i)}: clean prompt is {lc} tokens, patch prompt {lp} "
                               "(position-wise patching needs equal lengths)"))
            continue
        kept.append(p)
        answers.append((ca, pa))
    if not kept:
        raise UserError(f"no usable pairs: all {len(pairs)} were dropped ({describe_dropped(dropped, len(pairs))})")
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer([p.clean_prefix for p in kept] + [p.patch_prefix for p in kept],
                        return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    b = len(kept)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    batch = Batch(ids[:b], mask[:b], ids[b:], mask[b:],
                  torch.tensor([a for a, _ in answers]), torch.tensor([p for _, p in answers]), kept)
    return batch, dropped
