"""The model's own samples as training text: English prose it handles by construction.

Batched top-k sampling with the model's KV cache (``_sample``), seeded per chunk so the
result does not depend on how often generation was interrupted: chunk ``i`` always holds
the same ``batch`` samples, each chunk is written to the cache as soon as it is done
(one file, atomically), and a rerun generates only the chunks that are missing.

Each sample starts at BOS plus one English opening word (``OPENERS``, chosen round-robin):
unconditioned from BOS alone, Gemma 3 270M wrote Indonesian, Chinese and HTML as often as
English in a first look, and every such sample is compute thrown away by the English filter
(``english_prose``). The openers are single common words, not task templates: the circuits
are judged on tasks (featcircuits/tasks.py) the dictionaries never saw.

``NAME_OPENERS`` (``--sample-names``): every other sample opens with a common English given
name instead, so the text holds person names in running prose (stories, letters, biographies
the model writes about them). Opened by words alone, the shipped set's 377 samples gave about
one name per 1,000 tokens and a dictionary with no feature for " Mary". The list is the 120
given names below, not task prompts; it includes the 16 names of the IOI task, as any list of
common English names would.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch

SAMPLES_VERSION = 1  # bump when the generation or filter code changes what it yields
OPENERS = ("The", "In", "It", "This", "A", "When", "After", "Many", "There", "We", "Our", "One",
           "For", "If", "Today", "Some", "Most", "As", "Although", "During", "I", "You", "Every", "His")
# Common English function words; a sample whose words are less than this share of them is
# taken for another language, a list, code or markup.
_STOPWORDS = frozenset("""a an the and or but if of to in on at by for with from as is are was were be been
it its this that these those he she they we you i his her their our your my not no so than then there
which who what when where how all any some one can will would could should has have had do does did""".split())
# 60 female and 60 male given names common in English text (written out here: no package on
# this machine ships a name list). Alphabetical within each half.
NAME_OPENERS = (
    "Alice", "Amanda", "Amy", "Angela", "Anna", "Barbara", "Betty", "Carol", "Catherine", "Charlotte",
    "Christine", "Claire", "Deborah", "Diana", "Donna", "Dorothy", "Elizabeth", "Ellen", "Emily", "Emma",
    "Grace", "Hannah", "Helen", "Jane", "Janet", "Jennifer", "Jessica", "Joan", "Julia", "Karen",
    "Kate", "Laura", "Linda", "Lisa", "Louise", "Lucy", "Margaret", "Maria", "Martha", "Mary",
    "Megan", "Melissa", "Michelle", "Nancy", "Olivia", "Patricia", "Rachel", "Rebecca", "Rose", "Ruth",
    "Sandra", "Sarah", "Sharon", "Sophie", "Susan", "Teresa", "Victoria", "Virginia", "Wendy", "Alan",
    "Andrew", "Anthony", "Arthur", "Benjamin", "Brian", "Charles", "Christopher", "Daniel", "David", "Dennis",
    "Edward", "Eric", "Frank", "George", "Gregory", "Harry", "Henry", "Jack", "James", "Jason",
    "Jeffrey", "John", "Jonathan", "Joseph", "Joshua", "Kenneth", "Kevin", "Larry", "Mark", "Matthew",
    "Michael", "Nicholas", "Oliver", "Patrick", "Paul", "Peter", "Philip", "Raymond", "Richard", "Robert",
    "Roger", "Ronald", "Samuel", "Scott", "Simon", "Stephen", "Steven", "Thomas", "Timothy", "Tom",
    "Walter", "William", "Adam", "Albert", "Carl", "Douglas", "Frederick", "Howard", "Martin", "Ralph",
)
# NAME_OPENERS is 59 female names, then 61 male ones: a swap keeps a name's half so that the
# pronouns around it still agree.
_NAME_HALVES = (NAME_OPENERS[:59], NAME_OPENERS[59:])
_NAME_WORD = re.compile(r"\b(" + "|".join(NAME_OPENERS) + r")\b")
MIN_STOPWORD_SHARE = 0.25
MIN_ASCII_SHARE = 0.97
_TAG = re.compile(r"</?[A-Za-z][^<>]{0,60}>")


def english_prose(text: str) -> str | None:
    """``text`` with HTML-like tags removed if it reads as English prose, else None."""
    text = _TAG.sub("", text).strip()
    if len(text) < 80:
        return None
    ascii_share = sum(c.isascii() for c in text) / len(text)
    words = re.findall(r"[A-Za-z']+", text.lower())
    if ascii_share < MIN_ASCII_SHARE or len(words) < 15:
        return None
    if sum(w in _STOPWORDS for w in words) / len(words) < MIN_STOPWORD_SHARE:
        return None
    return text


def opener_cycle(names: bool) -> tuple[str, ...]:
    """The openers that samples take round-robin: ``OPENERS``, or with ``names`` those words and
    ``NAME_OPENERS`` alternating (word, name, word, name, ...; each list cycled to the longer one)."""
    if not names:
        return OPENERS
    n = max(len(OPENERS), len(NAME_OPENERS))
    return tuple(w for i in range(n) for w in (OPENERS[i % len(OPENERS)], NAME_OPENERS[i % len(NAME_OPENERS)]))


def pair_openers(seed: int = 0) -> tuple[str, ...]:
    """120 openers "<Name> and <Name>", two different names of ``NAME_OPENERS`` (each name first
    once, its partner drawn with ``seed``): samples about two people, in which the model must
    keep track of which name is which (the early and layer-9/10 residual SAEs of the shipped
    set lose exactly that: results/README.md, "Where IOI's error nodes hold the behaviour").
    Two names and a conjunction, not a task template: no built-in prompt starts this way."""
    rng = random.Random(f"pairs:{seed}")
    out = []
    for name in NAME_OPENERS:
        other = rng.choice([n for n in NAME_OPENERS if n != name])
        out.append(f"{name} and {other}")
    return tuple(out)


def swap_names(doc: str, copies: int, seed: int) -> list[str]:
    """``copies`` versions of ``doc`` in which every given name of ``NAME_OPENERS`` it holds is
    replaced, consistently through the document, by another name of the same half of the list
    (two names never map to one). Empty when ``doc`` holds none.

    Why: a name-opened sample mentions its name a few times, so in half a million corpus
    tokens each of the 120 names occurs about once per 10,000-100,000 tokens: too rare for a
    1,024-latent SAE to keep a latent for it, and the early residual SAEs code all names
    alike (results/starter_targets/ioi_positions.md). Swapping names in the model's own prose
    multiplies every name's occurrences without sampling (the costly part on a CPU), in
    contexts the model wrote. Seeded by ``seed`` and the document's text: the same inputs
    give the same copies."""
    found = sorted(set(_NAME_WORD.findall(doc)))
    if not found or copies <= 0:
        return []
    rng = random.Random(f"{seed}:{hashlib.sha256(doc.encode()).hexdigest()}")
    out = []
    for _ in range(copies):
        mapping = {}
        for half in _NAME_HALVES:
            own = [n for n in found if n in half]
            if own:
                mapping.update(zip(own, rng.sample([n for n in half if n not in own] or list(half), len(own))))
        out.append(_NAME_WORD.sub(lambda m: mapping.get(m.group(1), m.group(1)), doc))
    return out


def samples_key(model_spec: str, n_chunks: int, batch: int, new_tokens: int, seed: int,
                temperature: float, top_k: int, openers: tuple[str, ...] = OPENERS) -> dict[str, Any]:
    """The sampling recipe (recorded in the corpus recipe and naming the cache folder)."""
    return {"samples_version": SAMPLES_VERSION, "model": model_spec, "chunks": n_chunks, "batch": batch,
            "new_tokens": new_tokens, "seed": seed, "temperature": temperature, "top_k": top_k,
            "openers": list(openers)}


def key_of_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """The ``samples_key`` of a recorded sampling recipe (a corpus recipe's ``model_samples``)."""
    return samples_key(recipe["model"], recipe["chunks"], recipe["batch"], recipe["new_tokens"], recipe["seed"],
                       recipe["temperature"], recipe["top_k"], tuple(recipe.get("openers", OPENERS)))


def samples_of_recipe(hf: Any, tokenizer: Any, recipe: dict[str, Any], progress: bool = False) -> tuple[list[str], dict]:
    """The samples a recorded recipe names, from the cache or a shipped archive (missing chunks
    are sampled again, which needs ``hf``)."""
    k = key_of_recipe(recipe)
    return model_samples(hf, tokenizer, k["model"], k["chunks"] * k["batch"], seed=k["seed"], new_tokens=k["new_tokens"],
                         batch=k["batch"], temperature=k["temperature"], top_k=k["top_k"], progress=progress,
                         openers=tuple(k["openers"]))


def samples_folder(key: dict[str, Any], cache: Path | None = None) -> Path:
    """The cache folder of a sampling recipe (``samples_key``): one per recipe, whatever the
    number of chunks (chunk ``i`` is the same text in every run of the recipe)."""
    from ..models import cache_dir

    return (cache or cache_dir() / "corpus") / ("samples-" + hashlib.sha256(
        json.dumps({k: v for k, v in key.items() if k != "chunks"}, sort_keys=True).encode()).hexdigest()[:16])


def shipped_archive(name: str) -> Path | None:
    """``samples/<name>.tar.xz`` in a local set folder (``$FEATCIRCUITS_SAES``, the source tree's
    ``saes/``): samples made elsewhere (``scripts/device_samples.py`` on a GPU) shipped with the sets."""
    from ..dictionaries import local_set_dirs

    for root in local_set_dirs():
        path = root / "samples" / f"{name}.tar.xz"
        if path.is_file():
            return path
    return None


def missing_chunks(key: dict[str, Any], cache: Path | None = None) -> list[int]:
    """The chunks of ``key`` that would have to be sampled: not in the cache after unpacking any
    shipped archive of the recipe into it (chunk files already there are kept)."""
    import tarfile

    folder = samples_folder(key, cache)
    names = [f"chunk-{i:05d}.json" for i in range(int(key["chunks"]))]
    wanted = {f"{folder.name}/{n}" for n in names if not (folder / n).is_file()}
    archive = shipped_archive(folder.name) if wanted else None
    if archive is not None:
        with tarfile.open(archive, "r:xz") as tar:
            # only the recipe's own chunk files, as plain files: nothing else in an archive is written
            members = [m for m in tar.getmembers() if m.name in wanted and m.isfile()]
            tar.extractall(folder.parent, members=members, filter="data")
    return [i for i, n in enumerate(names) if not (folder / n).is_file()]


@torch.no_grad()
def _sample(hf: Any, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, temperature: float, top_k: int,
            gen: torch.Generator) -> torch.Tensor:
    """Top-k sampling with the model's KV cache; returns ``ids`` with ``new_tokens`` appended.

    Not ``generate``: its sampling softmaxes and draws over the whole 262k vocabulary every
    step (and top-p sorts it), which measured 2-6x the cost of the model's own decode step
    on this CPU; here the draw is over the top-k logits only. Same distribution as
    ``generate(do_sample=True, top_k=k, temperature=t)``.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=hf.config)
    # Newer transformers 5.x name the argument ``cache``; earlier 5.x releases ``past_key_values``.
    import inspect

    key = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    device = next(hf.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    step_ids, seq, att = ids, ids, mask
    for _ in range(new_tokens):
        out = hf(input_ids=step_ids, attention_mask=att, position_ids=pos, use_cache=True,
                 **{key: cache})
        logits = out.logits[:, -1].float() / temperature
        top = logits.topk(top_k, dim=-1)
        # drawn on the CPU (``gen`` is a CPU generator) wherever the model runs
        pick = torch.multinomial(top.values.softmax(-1).cpu(), 1, generator=gen).to(device)
        step_ids = top.indices.gather(-1, pick)
        seq = torch.cat([seq, step_ids], dim=1)
        att = torch.cat([att, torch.ones_like(step_ids)], dim=1)
        pos = pos[:, -1:] + 1
    return seq.cpu()


def model_samples(hf: Any, tokenizer: Any, model_spec: str, n_samples: int, seed: int = 0,
                  new_tokens: int = 126, batch: int = 32, temperature: float = 1.0, top_k: int = 50,
                  cache: Path | None = None, progress: bool = True,
                  log: Callable[[str], None] | None = None,
                  openers: tuple[str, ...] = OPENERS) -> tuple[list[str], dict[str, Any]]:
    """``n_samples`` (rounded up to whole chunks) samples of the model, English-filtered, each
    opened by the next word of ``openers`` (round-robin; ``opener_cycle(names=True)`` mixes in
    given names).

    Returns (kept documents, recipe). The recipe holds the sampling settings, the counts
    generated and kept, the measured tokens/s of this call and the sha256 of the raw samples.
    """
    from ..io import atomic_write

    n_chunks = max(1, -(-n_samples // batch))
    key = samples_key(model_spec, n_chunks, batch, new_tokens, seed, temperature, top_k, openers)
    folder = samples_folder(key, cache)
    todo = missing_chunks(key, cache)
    folder.mkdir(parents=True, exist_ok=True)
    bos = tokenizer.bos_token_id
    opener_ids = [tokenizer.encode(w, add_special_tokens=False) for w in openers]
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo) * batch * new_tokens, unit="tok", unit_scale=True, desc="model samples",
                   mininterval=5.0, dynamic_ncols=True)
    t0, generated = time.time(), 0
    if todo:
        hf.eval()
    for i in todo:
        rows = [[bos, *opener_ids[(i * batch + j) % len(openers)]] for j in range(batch)]
        width = max(map(len, rows))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # left padding
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        out = _sample(hf, ids, mask, new_tokens, temperature, top_k,
                      torch.Generator().manual_seed(seed * 1_000_003 + i))
        texts = [tokenizer.decode(r[width - len(rows[j]) + 1:], skip_special_tokens=True)
                 for j, r in enumerate(out)]
        atomic_write(folder / f"chunk-{i:05d}.json",
                     lambda tmp, texts=texts: Path(tmp).write_text(json.dumps(texts)))
        generated += batch * new_tokens
        if bar is not None:
            bar.update(batch * new_tokens)
    if bar is not None:
        bar.close()
    raw: list[str] = []
    for i in range(n_chunks):
        raw.extend(json.loads((folder / f"chunk-{i:05d}.json").read_text()))
    kept = [t for t in (english_prose(s) for s in raw) if t is not None]
    dt = time.time() - t0
    recipe = {**key, "generated": len(raw), "kept": len(kept),
              "raw_sha256": hashlib.sha256(json.dumps(raw).encode()).hexdigest(),
              "tokens_per_s_this_call": round(generated / dt, 1) if generated and dt > 0 else None,
              "threads": torch.get_num_threads()}
    if log:
        log(f"model samples: {len(kept)} of {len(raw)} kept as English prose ({folder})")
    return kept, recipe


if __name__ == "__main__":  # python -m featcircuits.training.samples N [seed] [--pairs]: fill the cache
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import offline_gemma_folder

    args = [a for a in sys.argv[1:] if a != "--pairs"]
    pairs = "--pairs" in sys.argv[1:]  # the openers of train-saes --pair-samples (batch 32, as its default)
    torch.set_num_threads(int(os.environ.get("FEATCIRCUITS_THREADS", "1")))
    f = offline_gemma_folder()
    tok = AutoTokenizer.from_pretrained(f)
    hf = AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32)
    seed = int(args[1]) if len(args) > 1 else 0
    kept, rec = model_samples(hf, tok, "gemma-3-270m-offline", int(args[0]), seed=seed, log=print,
                              **({"openers": pair_openers(seed)} if pairs else {}))
    print(json.dumps(rec))
