"""Feature cards: what each feature of a dictionary set responds to and what it promotes.

One streamed pass over a corpus through the spliced model keeps, for every feature of
every site (or only the features a circuit needs): the ``top_k`` windows where it peaks
(one example per window, a token context around the peak with per-token activations), a
uniform sample of the windows where it is active (priority sampling with seeded random
keys: the lower-quantile examples), how often it is active and its mean; then its direct
effect on the output tokens (:mod:`featcircuits.direct_effect`). The BOS position is left
out (its activations are attention-sink outliers, not about the text).

The store is two files, ``store.safetensors`` (the tensors, named ``<site>.<field>``, and
the corpus ``windows``) and ``store.json`` (settings, provenance, the strings of every
token id it uses), cached under ``cache_dir()/features/<key>`` where the key hashes the
model, the dictionary set's digest, the corpus tokens, the settings and the feature subset.
A killed build resumes from its checkpoint.

sae-dashboard / sae-vis were considered and not used: both pin transformer-lens < 3 (this
project resolves 3.x through sae-lens 6.54) and sae-dashboard pins transformers < 4.57 and
safetensors < 0.5; both run TransformerLens ``HookedTransformer`` hooks, not our nnsight
model with the adapter's sites (e.g. Gemma's post-norm sites), and their HTML loads d3 and
plotly from a CDN, which is blank offline. What is kept here is the data, rendered by
:mod:`featcircuits.viewer`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from .checkpoint import Checkpoint
from .errors import UserError
from .io import write_json, write_tensors
from .text_corpus import corpus_windows
from .tracing import SplicedModel

STORE_TENSORS = "store.safetensors"
STORE_META = "store.json"
FORMAT = "featcircuits.features/1"


@dataclass(frozen=True)
class StoreSettings:
    """How a feature store is built (all of it goes into the cache key)."""

    tokens: int = 200_000  # corpus tokens streamed (whole windows, rounded up)
    top_k: int = 20  # top activating windows kept per feature
    samples: int = 8  # uniformly sampled active windows per feature (lower quantiles)
    before: int = 12  # context tokens kept before the peak
    after: int = 4  # and after it
    batch: int = 8  # windows per forward pass
    seed: int = 0
    logit_k: int = 10  # promoted / suppressed tokens per feature
    checkpoint_every: int = 25  # batches between checkpoints

    def key_dict(self) -> dict:
        d = asdict(self)
        d.pop("checkpoint_every")  # how often we save does not change the result
        return d


# --------------------------------------------------------------------------- the pass

def _init_state(sites: dict[str, torch.Tensor], s: StoreSettings) -> dict[str, torch.Tensor]:
    width = s.before + 1 + s.after
    st: dict[str, torch.Tensor] = {}
    for site, feats in sites.items():
        n = len(feats)
        st[f"{site}.features"] = feats.to(torch.int64)
        st[f"{site}.count"] = torch.zeros(n, dtype=torch.int64)
        st[f"{site}.sum"] = torch.zeros(n, dtype=torch.float64)
        for p, k in (("top", s.top_k), ("smp", s.samples)):
            st[f"{site}.{p}_score"] = torch.full((k, n), -math.inf)
            st[f"{site}.{p}_val"] = torch.zeros(k, n)
            st[f"{site}.{p}_win"] = torch.zeros(k, n, dtype=torch.int32)
            st[f"{site}.{p}_pos"] = torch.zeros(k, n, dtype=torch.int32)
            st[f"{site}.{p}_ctx"] = torch.zeros(k, n, width, dtype=torch.bfloat16)
    return st


def _merge(st: dict, pre: str, score: torch.Tensor, val: torch.Tensor, pos: torch.Tensor,
           win: torch.Tensor, ctx: torch.Tensor) -> None:
    """Keep the best rows of (kept ∪ this batch) by ``score``, along dim 0, per feature."""
    k, n = st[pre + "_score"].shape
    best, idx = torch.cat([st[pre + "_score"], score]).topk(k, dim=0)
    st[pre + "_score"] = best
    for name, new in (("_val", val), ("_pos", pos.int()), ("_win", win.int())):
        st[pre + name] = torch.cat([st[pre + name], new]).gather(0, idx)
    both = torch.cat([st[pre + "_ctx"], ctx.to(torch.bfloat16)])
    # whole context rows picked by flat row number: ~10x faster on CPU than a gather with
    # the index expanded over the window (the largest part of a batch's bookkeeping)
    rows = (idx * n + torch.arange(n)).flatten()
    st[pre + "_ctx"] = both.view(-1, both.shape[2]).index_select(0, rows).view(k, n, -1)


def _update(st: dict, site: str, f: torch.Tensor, first_window: int, keys: torch.Tensor,
            s: StoreSettings) -> None:
    """Fold one batch of one site's features f [b, T, n] into the running state; ``keys``
    [b, n] are the uniform random priorities of the sample.

    Activation means positive (``f > 0``): for sparse dictionaries the same as non-zero.
    Reductions run over the middle (position) dimension without indices: ``amax`` is
    ~20x faster there than ``max``/``argmax`` on CPU, so the peak's position is the
    largest position holding the peak value.
    """
    b, T, n = f.shape
    body = f[:, 1:].float().contiguous()  # BOS left out
    flat = body.view(-1, n)
    # sign -> {-1, 0, 1} -> {0, 1} summed in float32 (exact below 2^24): faster than a bool sum
    st[f"{site}.count"] += torch.sign(flat).clamp_(min=0).sum(0).long()
    st[f"{site}.sum"] += flat.sum(0).double()
    peak = body.amax(1)  # [b, n]
    steps = torch.arange(T - 1, dtype=body.dtype)[None, :, None]
    pos = torch.where(body == peak[:, None], steps, -1.0).amax(1).long() + 1
    where = pos[:, :, None] + torch.arange(-s.before, s.after + 1)  # [b, n, W] positions
    outside = (where < 1) | (where >= T)  # BOS shown with activation 0
    flat_idx = (torch.arange(b)[:, None, None] * T + where.clamp(0, T - 1)) * n + torch.arange(n)[None, :, None]
    ctx = f.float().contiguous().view(-1).take(flat_idx).masked_fill(outside, 0.0)
    win = torch.arange(first_window, first_window + b)[:, None].expand(b, n)
    active = peak > 0
    for p, score in (("top", torch.where(active, peak, -math.inf)),
                     ("smp", torch.where(active, keys, -math.inf))):
        _merge(st, f"{site}.{p}", score, peak, pos, win, ctx)


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "big")


def stream(sm: SplicedModel, windows: torch.Tensor, s: StoreSettings,
           features: dict[str, torch.Tensor] | None = None, checkpoint_dir: Path | None = None,
           progress: bool = True) -> dict[str, torch.Tensor]:
    """The pass: the running state after every window went through the spliced model.

    ``features`` (site -> feature indices) limits the pass to those sites and features.
    With ``checkpoint_dir`` the state is saved every ``s.checkpoint_every`` batches and a
    rerun with the same inputs continues from there.
    """
    from tqdm import tqdm

    if features is None:
        features = {site.name: torch.arange(sm.dictionary(site).d_sae) for site in sm.sites}
    unknown = [k for k in features if k not in {x.name for x in sm.sites}]
    if unknown:
        raise UserError(f"no site {unknown[0]!r} in this model's sites")
    visit = [site for site in sm.sites if site.name in features]
    features = {site.name: features[site.name] for site in visit}  # forward order
    n_batches = math.ceil(windows.shape[0] / s.batch)
    ck = None
    state, start = _init_state(features, s), 0
    if checkpoint_dir is not None:
        ck = Checkpoint(checkpoint_dir, "features", {"settings": s.key_dict(), "n": n_batches,
                                                     "sites": {k: v.tolist() for k, v in features.items()}})
        loaded = ck.load()
        if loaded is not None:
            start, state = loaded
    index = {k: torch.as_tensor(v, dtype=torch.long) for k, v in features.items()}
    for bi in tqdm(range(start, n_batches), desc="feature store", unit="batch", initial=start,
                   total=n_batches, disable=not progress):
        batch = windows[bi * s.batch:(bi + 1) * s.batch]

        def hook(site: Any, x: torch.Tensor) -> None:
            f = sm.dictionary(site).encode(x.detach())
            # Keys drawn per (seed, batch, site) over the full width: a resumed run and the
            # subset mode draw the same keys for the same feature.
            gen = torch.Generator().manual_seed(_seed(s.seed, bi, site.name))
            keys = torch.rand(f.shape[0], f.shape[-1], generator=gen)
            idx = index[site.name]
            full = len(idx) == f.shape[-1]
            _update(state, site.name, f if full else f[..., idx], bi * s.batch, keys if full else keys[:, idx], s)

        with torch.no_grad():
            sm.run({"input_ids": batch, "attention_mask": torch.ones_like(batch)}, hook, visit, stop=True)
        if ck is not None and (bi + 1) % s.checkpoint_every == 0 and bi + 1 < n_batches:
            ck.save(bi + 1, state)
    if ck is not None:
        ck.clear()
    return state


# --------------------------------------------------------------------------- the store

def _token_strings(tokenizer: Any, ids: Iterable[int]) -> dict[str, str]:
    return {str(i): tokenizer.decode([i]) for i in sorted(set(int(x) for x in ids))}


def finish(sm: SplicedModel, state: dict[str, torch.Tensor], windows: torch.Tensor, s: StoreSettings,
           meta: dict, progress: bool = True) -> "FeatureStore":
    """Add each feature's direct effect on the output tokens and the token strings."""
    from tqdm import tqdm

    from .direct_effect import CHUNK, direct_effects

    tensors = dict(state)
    sites = [k[:-len(".features")] for k in state if k.endswith(".features")]
    chunks = sum(math.ceil(len(state[f"{x}.features"]) / CHUNK) for x in sites)
    bar = tqdm(total=chunks, desc="direct effects", unit="chunk", disable=not progress)
    used = [windows.flatten()]
    for site in sites:
        eff = direct_effects(sm.model, sm.dictionary(site), state[f"{site}.features"], k=s.logit_k, progress=bar,
                             site=sm.site(site))
        for name, t in eff.items():
            tensors[f"{site}.{name}"] = t
        used += [eff["up_ids"].flatten(), eff["down_ids"].flatten()]
    bar.close()
    tensors["windows"] = windows.to(torch.int32)
    meta = {**meta, "format": FORMAT, "settings": s.key_dict(), "sites": sites,
            "vocab": _token_strings(sm.model.tokenizer, torch.cat(used).tolist())}
    return FeatureStore(tensors, meta)


def store_key(sm: SplicedModel, corpus: dict, s: StoreSettings, features: dict | None) -> tuple[str, dict]:
    """The cache key of a store, and the provenance that went into it."""
    prov = {"model": sm.model.spec, "family": sm.adapter.family, "n_layers": sm.adapter.n_layers,
            "d_model": sm.adapter.d_model, "dictionaries": sm.dictionaries.name,
            "digest": sm.dictionaries.digest(), "corpus": corpus}
    sub = None if features is None else {k: sorted(int(i) for i in v) for k, v in sorted(features.items())}
    blob = json.dumps({"prov": prov, "settings": s.key_dict(), "features": sub}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16], prov


def _locate(sm: SplicedModel, corpus: str, s: StoreSettings, features: dict | None, cache: Path | None) -> tuple:
    from .models import cache_dir

    windows, desc = corpus_windows(corpus, sm.model.tokenizer, s.tokens, sm.dictionaries.meta.get("set"))
    feats = None if features is None else {k: torch.as_tensor(sorted(set(int(i) for i in v)), dtype=torch.long)
                                           for k, v in features.items() if len(list(v))}
    key, prov = store_key(sm, desc, s, feats)
    # $FEATCIRCUITS_FEATURES moves only the stores (tests point it at a temporary folder)
    root = cache or Path(os.environ.get("FEATCIRCUITS_FEATURES") or cache_dir() / "features")
    return root / key, windows, feats, key, prov


def cached_store(sm: SplicedModel, corpus: str = "auto", settings: StoreSettings | None = None,
                 features: dict[str, Iterable[int]] | None = None, cache: Path | None = None) -> "FeatureStore | None":
    """The store :func:`feature_store` would return, if it is already cached; else None (builds nothing)."""
    folder = _locate(sm, corpus, settings or StoreSettings(), features, cache)[0]
    return FeatureStore.load(folder) if (folder / STORE_META).is_file() else None


def feature_store(sm: SplicedModel, corpus: str = "auto", settings: StoreSettings | None = None,
                  features: dict[str, Iterable[int]] | None = None, cache: Path | None = None,
                  progress: bool = True) -> "FeatureStore":
    """The feature store for ``sm``'s dictionary set: from the cache, or built once and cached.

    ``features`` (site -> feature indices) builds cards for those features only (a
    circuit's), which is far cheaper than the whole set when the sites are few.
    """
    s = settings or StoreSettings()
    folder, windows, feats, key, prov = _locate(sm, corpus, s, features, cache)
    if (folder / STORE_META).is_file():
        return FeatureStore.load(folder)
    partial = folder.with_name(folder.name + ".partial")
    state = stream(sm, windows, s, feats, checkpoint_dir=partial, progress=progress)
    store = finish(sm, state, windows, s, {**prov, "key": key, "subset": feats is not None}, progress)
    store.save(partial)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(partial, folder)  # atomic: a crash leaves no half-written store under the key
    store.folder = folder
    return store


class FeatureStore:
    """The kept tensors and metadata; ``card(site, feature)`` reads one feature's card."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict, folder: Path | None = None):
        self.tensors = tensors
        self.meta = meta
        self.folder = folder
        self._row: dict[str, dict[int, int]] = {
            site: {int(f): i for i, f in enumerate(tensors[f"{site}.features"].tolist())} for site in meta["sites"]}

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        write_tensors(folder / STORE_TENSORS, {k: v.contiguous() for k, v in self.tensors.items()},
                      {"format": FORMAT})
        write_json(folder / STORE_META, self.meta)
        self.folder = folder

    @classmethod
    def load(cls, folder: str | Path) -> "FeatureStore":
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            meta = json.loads((folder / STORE_META).read_text())
            tensors = load_file(str(folder / STORE_TENSORS))
        except (OSError, ValueError) as exc:
            raise UserError(f"{folder}: not a readable feature store ({exc}); delete it to rebuild") from None
        if meta.get("format") != FORMAT:
            raise UserError(f"{folder}: feature store format {meta.get('format')!r}, expected {FORMAT!r}")
        return cls(tensors, meta, folder)

    @property
    def n_tokens(self) -> int:
        return int(self.meta["corpus"]["tokens"])

    def has(self, site: str, feature: int) -> bool:
        return int(feature) in self._row.get(site, {})

    def _tok(self, i: int) -> str:
        return self.meta["vocab"].get(str(int(i)), f"<{int(i)}>")

    def _examples(self, site: str, pre: str, row: int) -> list[dict]:
        s = self.meta["settings"]
        t = self.tensors
        windows = t["windows"]
        T = windows.shape[1]
        out = []
        for j in range(t[f"{site}.{pre}_score"].shape[0]):
            if not math.isfinite(float(t[f"{site}.{pre}_score"][j, row])):
                continue
            win, pos = int(t[f"{site}.{pre}_win"][j, row]), int(t[f"{site}.{pre}_pos"][j, row])
            acts = t[f"{site}.{pre}_ctx"][j, row].float().tolist()
            lo = pos - s["before"]
            keep = [(p, a) for p, a in zip(range(lo, lo + len(acts)), acts) if 0 <= p < T]
            out.append({"tokens": [self._tok(windows[win, p]) for p, _ in keep],
                        "acts": [round(a, 4) for _, a in keep], "peak": pos - max(lo, 0),
                        "value": round(float(t[f"{site}.{pre}_val"][j, row]), 4), "window": win, "position": pos})
        return out

    def card(self, site: str, feature: int, n_quantiles: int = 4) -> dict | None:
        """One feature's card as plain JSON types, or None when the store lacks it."""
        row = self._row.get(site, {}).get(int(feature))
        if row is None:
            return None
        t = self.tensors
        count = int(t[f"{site}.count"][row])
        total = float(t[f"{site}.sum"][row])
        n = self.n_tokens - t["windows"].shape[0]  # BOS positions left out
        top = sorted(self._examples(site, "top", row), key=lambda e: -e["value"])
        sample = sorted(self._examples(site, "smp", row), key=lambda e: e["value"])
        if len(sample) > n_quantiles:  # evenly spaced ranks of the uniform sample
            picks = [round(i * (len(sample) - 1) / (n_quantiles - 1)) for i in range(n_quantiles)]
            sample = [sample[i] for i in sorted(set(picks))]
        for i, e in enumerate(sample):
            e["quantile"] = round(i / max(1, len(sample) - 1), 2)

        def toks(name: str) -> list[dict]:
            return [{"token": self._tok(i), "value": round(float(v), 4)}
                    for i, v in zip(t[f"{site}.{name}_ids"][row].tolist(), t[f"{site}.{name}_val"][row].tolist())]

        return {"site": site, "feature": int(feature), "density": count / max(1, n),
                "mean": total / max(1, n), "mean_active": total / count if count else 0.0,
                "max": top[0]["value"] if top else 0.0, "n_tokens": n,
                "top": top, "quantiles": sample, "promoted": toks("up"), "suppressed": toks("down")}

    def cards_for_nodes(self, node_ids: Iterable[str]) -> dict[str, dict]:
        """Cards of the feature nodes among ``node_ids`` (``site/feature[@pos]``) the store holds."""
        from .nodes import parse_node_id

        out = {}
        for nid in node_ids:
            if "/" not in str(nid):
                continue
            site, feature, _ = parse_node_id(str(nid))
            if feature >= 0:
                c = self.card(site, feature)
                if c is not None:
                    out[str(nid)] = c
        return out


def circuit_features(node_ids: Iterable[str]) -> dict[str, list[int]]:
    """site -> feature indices of the feature nodes among ``node_ids`` (for the subset mode)."""
    from .nodes import parse_node_id

    out: dict[str, set[int]] = {}
    for nid in node_ids:
        if "/" in str(nid):
            site, feature, _ = parse_node_id(str(nid))
            if feature >= 0:
                out.setdefault(site, set()).add(feature)
    return {k: sorted(v) for k, v in out.items()}
