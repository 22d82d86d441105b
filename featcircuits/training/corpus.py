"""An offline, reproducible training corpus built from text every install already has.

Sources (the recipe): docstrings of the Python standard library (non-test modules), the
``pydoc_data.topics`` help texts, and docstrings of numpy, torch and transformers. No
network, no download: the same package versions and seed give the same token stream,
and its sha256 goes into the metadata of every dictionary set trained on it.

Collecting docstrings means importing modules, which can print, spawn threads, grab
memory or even crash; so the collection runs in a child process (``python -m
featcircuits.training.corpus collect OUT``) with its stdout/stderr thrown away, every
import guarded, known side-effect modules skipped, and a per-package time budget. The
text is cached once per package-version set; the tokenized windows are cached once per
tokenizer and recipe, both under ``featcircuits.models.cache_dir()``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..errors import UserError

WINDOW = 128  # tokens per training window, BOS included
RECIPE_VERSION = 1  # bump when the collection code changes what text it yields
PACKAGES = ("numpy", "torch", "transformers")
# Seconds spent importing one package's modules. A safety net: the walk is sorted and the
# budget is large enough that on this machine it is never the reason a walk stops (the
# recipe records how many modules each source yielded, so a cut walk would show there).
PACKAGE_BUDGET_S = 240.0
# Cap on the characters taken from one source (about 1.6M tokens). transformers alone yields
# ~27M characters of highly repetitive auto-generated model docs; without the cap it would
# be three quarters of the corpus. Documents beyond the cap are dropped by a seeded sample.
MAX_CHARS_PER_SOURCE = 6_400_000
# corpus sources that are the model's own samples (exactly as many as asked for: never capped)
SAMPLE_SOURCES = ("model_samples", "model_pair_samples")

# Modules whose import has side effects (prints, opens a browser, starts a GUI, installs
# signal handlers, runs demos) or that are not text about the library.
_SKIP_STDLIB = {
    "this", "antigravity", "__hello__", "__phello__", "__main__", "idlelib", "tkinter",
    "turtle", "turtledemo", "ensurepip", "venv", "lib2to3", "pydoc_data", "test", "unittest.test",
    "xxlimited", "xxlimited_35", "xxsubtype", "_xxtestfuzz", "msilib", "winreg", "winsound",
    "_winapi", "msvcrt", "nturl2path", "ntpath", "_msi", "_overlapped", "asyncio.windows_events",
    "asyncio.windows_utils", "multiprocessing.popen_spawn_win32", "encodings", "distutils",
    "sre_compile", "sre_parse", "sre_constants", "crypt", "nis", "ossaudiodev", "spwd",
}
_SKIP_PARTS = {"test", "tests", "testing", "_testing", "conftest", "benchmarks", "benchmark",
               "__main__", "setup", "examples", "demo", "demos"}


def _skip(name: str) -> bool:
    parts = name.split(".")
    if any(p in _SKIP_PARTS or p.startswith("test_") or p.endswith("_test") for p in parts):
        return True
    if name in _SKIP_STDLIB or parts[0] in _SKIP_STDLIB:
        return True
    return any(".".join(parts[:i]) in _SKIP_STDLIB for i in range(1, len(parts) + 1))


def _docs_of_module(mod: Any, root: str, seen: set[str]) -> list[str]:
    """Module docstring plus docstrings of the classes, functions and methods it defines."""
    import inspect

    out: list[str] = []

    def add(obj: Any) -> None:
        try:
            doc = obj.__doc__ if isinstance(obj, type(sys)) else inspect.getdoc(obj)
        except Exception:
            return
        if not isinstance(doc, str):
            return
        doc = inspect.cleandoc(doc).strip()
        # Very short docstrings ("Return self.") are boilerplate; they add no language.
        if len(doc) < 40 or doc in seen:
            return
        seen.add(doc)
        out.append(doc)

    add(mod)
    try:
        members = sorted(vars(mod).items())
    except Exception:
        return out
    for name, obj in members:
        if name.startswith("__"):
            continue
        owner = getattr(obj, "__module__", None)
        if not isinstance(owner, str) or not (owner == root or owner.startswith(root + ".")):
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        add(obj)
        if inspect.isclass(obj):
            try:
                attrs = sorted(vars(obj).items())
            except Exception:
                continue
            for aname, attr in attrs:
                if aname.startswith("__") and aname != "__init__":
                    continue
                if isinstance(attr, (staticmethod, classmethod)):
                    attr = attr.__func__
                if inspect.isroutine(attr) or isinstance(attr, property):
                    add(attr)
    return out


def _walk(root: str, budget_s: float, public_only: bool) -> tuple[list[str], list[str]]:
    """Import ``root`` and its submodules in sorted order; return (module names, docs)."""
    import importlib
    import pkgutil

    t0 = time.time()
    seen: set[str] = set()
    docs: list[str] = []
    names: list[str] = []
    queue = [root]
    while queue and time.time() - t0 < budget_s:
        name = queue.pop(0)
        if _skip(name) or (public_only and any(p.startswith("_") for p in name.split(".")[1:])):
            continue
        try:
            mod = importlib.import_module(name)
        except BaseException:  # ImportError, SystemExit, missing optional deps, anything
            continue
        names.append(name)
        docs.extend(_docs_of_module(mod, root, seen))
        path = getattr(mod, "__path__", None)
        if path:
            try:
                subs = sorted(m.name for m in pkgutil.iter_modules(path))
            except Exception:
                subs = []
            queue.extend(f"{name}.{s}" for s in subs)
    return names, docs


def collect_texts() -> dict[str, Any]:
    """Every source's documents (run this in a child process: it imports a lot)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.simplefilter("ignore")
    sources: dict[str, list[str]] = {}
    modules: dict[str, int] = {}
    # Standard library: every top-level module name the interpreter knows, sorted.
    seen: set[str] = set()
    std_docs: list[str] = []
    n_std = 0
    for top in sorted(sys.stdlib_module_names):
        if _skip(top) or top.startswith("_"):
            continue
        names, docs = _walk(top, 30.0, public_only=True)
        n_std += len(names)
        for d in docs:
            if d not in seen:
                seen.add(d)
                std_docs.append(d)
    sources["stdlib"] = std_docs
    modules["stdlib"] = n_std
    try:
        from pydoc_data.topics import topics

        sources["pydoc_topics"] = [topics[k].strip() for k in sorted(topics) if topics[k].strip()]
    except Exception:
        sources["pydoc_topics"] = []
    modules["pydoc_topics"] = 1
    for pkg in PACKAGES:
        names, docs = _walk(pkg, PACKAGE_BUDGET_S, public_only=pkg != "transformers")
        sources[pkg] = docs
        modules[pkg] = len(names)
    return {"sources": sources, "modules": modules, "versions": package_versions()}


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a crash leaves no half-written file under the final name


def texts(cache: Path | None = None, log: Any = None) -> dict[str, Any]:
    """The collected documents, from the cache or by running the collector in a child process."""
    from ..models import cache_dir

    versions = package_versions()
    key = _sha({"recipe": RECIPE_VERSION, "versions": versions})[:16]
    path = (cache or cache_dir() / "corpus") / f"texts-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    if log:
        log(f"collecting docstrings (one-off, a few minutes) into {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "featcircuits.training.corpus", "collect", str(tmp)],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env=env, timeout=3600)
    if proc.returncode != 0 or not tmp.is_file():
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise UserError(f"building the docstring corpus failed (exit {proc.returncode}): {' | '.join(tail)}")
    os.replace(tmp, path)
    return json.loads(path.read_text())


@dataclass
class Corpus:
    """Tokenized windows [n, WINDOW] (BOS first) for training and held-out evaluation."""

    train: torch.Tensor
    eval: torch.Tensor
    recipe: dict = field(default_factory=dict)

    @property
    def train_tokens(self) -> int:
        return int(self.train.numel())


def token_hash(windows: torch.Tensor) -> str:
    """sha256 of a window tensor's int32 bytes in row order."""
    return hashlib.sha256(windows.to(torch.int32).contiguous().numpy().tobytes()).hexdigest()


def windows_from_texts(docs: Iterable[str], tokenizer: Any, window: int = WINDOW) -> torch.Tensor:
    """Tokenize documents, join them into one stream (documents separated by a blank line's
    tokens would add noise; they are simply concatenated, each starting a new sentence), and
    cut it into ``window - 1``-token pieces, each prefixed with BOS. The tail is dropped."""
    bos = tokenizer.bos_token_id
    if bos is None:
        raise UserError("the tokenizer has no BOS token; SAE training windows start with BOS")
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer.encode(doc + "\n\n", add_special_tokens=False))
    body = window - 1
    n = len(stream) // body
    if n == 0:
        raise UserError(f"the text holds {len(stream)} tokens, fewer than one {window}-token window")
    t = torch.tensor(stream[: n * body], dtype=torch.int64).view(n, body)
    return torch.cat([torch.full((n, 1), bos, dtype=torch.int64), t], dim=1)


def drop_task_prompts(docs: list[str], n: int = 200, min_words: int = 4) -> tuple[int, list[str], int]:
    """Drop documents holding a prompt of a built-in task (circuits are judged on tasks the
    dictionaries never saw). Prompts of fewer than ``min_words`` words ("The author") are
    ordinary English, not a template, and are not looked for. Returns (prompts checked,
    kept documents, documents dropped)."""
    from ..tasks import BUILTIN_TASKS, make_pairs

    prompts = sorted({p.clean_prefix.strip() for t in BUILTIN_TASKS for p in make_pairs(t, n, 0)
                      if len(p.clean_prefix.split()) >= min_words})
    big = "\n".join(docs)  # one search per prompt over the joined text; per document only on a hit
    hits = [p for p in prompts if p in big]
    if not hits:
        return len(prompts), docs, 0
    kept = [d for d in docs if not any(p in d for p in hits)]
    return len(prompts), kept, len(docs) - len(kept)


def _holdout(doc: str, fraction: float) -> bool:
    # By document content, not position: adding a source never moves a document across the split.
    h = int.from_bytes(hashlib.sha256(doc.encode()).digest()[:8], "big")
    return (h % 10_000) < fraction * 10_000


def build_corpus(tokenizer: Any, seed: int = 0, eval_fraction: float = 0.02,
                 docs: dict[str, list[str]] | None = None, window: int = WINDOW,
                 cache: bool = True, log: Any = None,
                 max_chars_per_source: int = MAX_CHARS_PER_SOURCE,
                 samples: tuple[list[str], dict] | None = None, name_swaps: int = 0,
                 pair_samples: tuple[list[str], dict] | None = None) -> Corpus:
    """The shuffled, tokenized corpus. ``docs`` (source -> documents) overrides the
    docstring collection (tests pass a handful of strings); otherwise the collected texts
    are used and the result is cached per tokenizer, recipe and seed. ``samples`` (documents
    and recipe from ``samples.model_samples``) adds the model's own samples as the source
    ``model_samples``; their sampling recipe goes into the corpus recipe. ``name_swaps`` adds,
    for every model sample holding a given name, that many copies with its names swapped
    (``samples.swap_names``); a copy lands on the same side of the held-out split as its sample.
    ``pair_samples`` (the same, sampled with ``samples.pair_openers``) adds samples about two
    people as the source ``model_pair_samples``, their recipe as the recipe's ``model_pair_samples``."""
    from ..models import cache_dir

    collected = None
    if docs is None:
        collected = texts(log=log)
        docs = collected["sources"]
    if samples is not None:
        docs = {**docs, "model_samples": list(samples[0])}
    if pair_samples is not None:
        docs = {**docs, "model_pair_samples": list(pair_samples[0])}
    recipe = {
        "recipe_version": RECIPE_VERSION,
        "sources": {k: len(v) for k, v in sorted(docs.items())},
        "modules": (collected or {}).get("modules", {}),
        "versions": (collected or {}).get("versions", package_versions()),
        "window": window, "bos": True, "seed": seed, "eval_fraction": eval_fraction,
        "max_chars_per_source": max_chars_per_source,
        "tokenizer": getattr(tokenizer, "name_or_path", "") and Path(str(tokenizer.name_or_path)).name,
        "vocab_size": len(tokenizer),
        "text_sha256": _sha(docs),
    }
    if samples is not None:
        recipe["model_samples"] = samples[1]
    if pair_samples is not None:  # only when used: recipes without them keep their key (and cache)
        recipe["model_pair_samples"] = pair_samples[1]
    if name_swaps < 0 or (name_swaps and samples is None):
        raise UserError("name swaps need the model's samples (--samples N) and a count >= 0")
    if name_swaps:  # only when used: a recipe without swaps keeps the key (and cache) it always had
        recipe["name_swaps"] = int(name_swaps)
    key = _sha(recipe)[:16]
    path = cache_dir() / "corpus" / f"windows-{key}.pt"
    if cache and collected is not None and path.is_file():
        blob = torch.load(path, weights_only=True)
        return Corpus(blob["train"], blob["eval"], json.loads(blob["recipe"]))
    from .samples import swap_names

    rng = random.Random(seed)
    train_docs, eval_docs = [], []
    swapped = 0
    for src in sorted(docs):
        chosen = list(docs[src])
        # The cap thins the collected docstring sources; the model's samples are exactly as many as asked for.
        if src not in SAMPLE_SOURCES and sum(map(len, chosen)) > max_chars_per_source:
            random.Random(f"{seed}:{src}").shuffle(chosen)
            kept, total = [], 0
            for d in chosen:
                if total >= max_chars_per_source:
                    break
                kept.append(d)
                total += len(d)
            chosen = kept
        for d in chosen:
            side = eval_docs if _holdout(d, eval_fraction) else train_docs
            side.append(d)
            if src == "model_samples" and name_swaps:
                copies = swap_names(d, name_swaps, seed)
                side.extend(copies)
                swapped += bool(copies)
    if collected is not None:  # the built-in corpus: no built-in task prompt in the training text
        checked, train_docs, dropped = drop_task_prompts(train_docs)
        recipe.update(task_prompts_checked=checked, docs_dropped_for_task_prompts=dropped)
    rng.shuffle(train_docs)
    rng.shuffle(eval_docs)
    train = windows_from_texts(train_docs, tokenizer, window)
    ev = windows_from_texts(eval_docs, tokenizer, window) if eval_docs else train[:0]
    perm = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
    train = train[perm]
    if name_swaps:
        recipe["name_swapped_samples"] = swapped
    recipe.update(train_windows=int(train.shape[0]), eval_windows=int(ev.shape[0]),
                  train_tokens=int(train.numel()), eval_tokens=int(ev.numel()),
                  train_sha256=token_hash(train), eval_sha256=token_hash(ev))
    corpus = Corpus(train, ev, recipe)
    if cache and collected is not None:
        import io

        buf = io.BytesIO()
        torch.save({"train": train, "eval": ev, "recipe": json.dumps(recipe)}, buf)
        _atomic_write_bytes(path, buf.getvalue())
    return corpus


def corpus_of_set(set_meta: dict, tokenizer: Any, hf: Any = None, progress: bool = False) -> Corpus:
    """The corpus a set was trained on, rebuilt from the recipe in its ``set.json``: the same
    docstring cap, window and seed, and the model's samples with the same settings and openers
    (read from the sampling cache or a shipped archive; missing chunks are sampled again, which
    needs ``hf``). The caller compares ``recipe["train_sha256"]`` with the set's
    ``corpus_sha256``: other package versions give other docstrings."""
    from .samples import samples_of_recipe

    recipe = set_meta.get("corpus") or {}
    samples = {src: samples_of_recipe(hf, tokenizer, recipe[src], progress=progress)
               for src in SAMPLE_SOURCES if recipe.get(src)}
    return build_corpus(tokenizer, seed=int((set_meta.get("config") or {}).get("seed", recipe.get("seed", 0))),
                        samples=samples.get("model_samples"), pair_samples=samples.get("model_pair_samples"),
                        window=int(recipe.get("window", WINDOW)),
                        eval_fraction=float(recipe.get("eval_fraction", 0.02)),
                        max_chars_per_source=int(recipe.get("max_chars_per_source", MAX_CHARS_PER_SOURCE)),
                        name_swaps=int(recipe.get("name_swaps", 0)))


def corpus_from_windows(windows: Sequence[Sequence[int]] | torch.Tensor, eval_fraction: float = 0.1) -> Corpus:
    """A corpus from ready token windows (tests, custom data): the last ``eval_fraction`` held out."""
    t = torch.as_tensor(windows, dtype=torch.int64)
    if t.ndim != 2 or t.shape[0] < 2:
        raise UserError("token windows must be a [n, T] array with n >= 2")
    n_eval = max(1, int(round(t.shape[0] * eval_fraction)))
    train, ev = t[:-n_eval], t[-n_eval:]
    recipe = {"source": "windows", "window": int(t.shape[1]), "train_tokens": int(train.numel()),
              "eval_tokens": int(ev.numel()), "train_sha256": token_hash(train), "eval_sha256": token_hash(ev)}
    return Corpus(train, ev, recipe)


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "collect":
        data = collect_texts()
        _atomic_write_bytes(Path(argv[1]), json.dumps(data).encode())
        return 0
    print("usage: python -m featcircuits.training.corpus collect OUT.json", file=sys.stderr)
    return 2


if __name__ == "__main__":
    # The import side effects of some modules may leave non-daemon threads; exit hard.
    code = _main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)
