"""Making a discovered circuit readable: node facts, feature cards and labels on its nodes.

After ``discover_circuit`` (graph -> readable graph, before export):

- :func:`node_facts`: each feature node's mean activation on the clean and the patch
  prompts (``activation_clean``, ``activation_patch``; summed circuits: the mean over the
  examples and their real positions, positional ones: at the node's position), and with
  positions the prompt token (``token``).
- :func:`circuit_cards`: the cards of the circuit's feature nodes, from the cached full
  feature store of the set when one exists, else built for the circuit's features only
  (the subset mode of :func:`featcircuits.cards.feature_store`).
- :func:`annotate`: ``label`` on every node (annotation > card > error site) and, for hub
  sets Neuronpedia hosts, ``neuronpedia`` on feature nodes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .activation_sums import SIDES, ActivationSums, answer_probs
from .cards import FeatureStore, StoreSettings, cached_store, circuit_features, feature_store
from .errors import UserError
from .graph import Circuit
from .labels import label_nodes, source_neuronpedia_url
from .tasks import Batch
from .tracing import SplicedModel

CARD_MODES = ("auto", "subset", "off")
#: corpus tokens of the subset mode: a few thousand give most features >= 5 examples
DEFAULT_CARD_TOKENS = 4096


def is_feature(d: dict) -> bool:
    """A dictionary-feature node (kind ``feature``, or ``embed`` at the embedding site), not an error or the metric."""
    return d.get("kind") in ("feature", "embed") and int(d.get("feature", -1)) >= 0


def _feature_nodes(circuit: Circuit) -> dict[str, list[tuple[str, int, int]]]:
    """site -> [(node id, feature, position)] of the circuit's feature nodes."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    for n, d in circuit.graph.nodes(data=True):
        if is_feature(d):
            out.setdefault(str(d["site"]), []).append((str(n), int(d["feature"]), int(d.get("position", -1))))
    return out


def node_facts(sm: SplicedModel, batch: Batch, circuit: Circuit, prompt_tokens: list[str] | None = None,
               batch_size: int = 16) -> None:
    """Set ``activation_clean``/``activation_patch`` on feature nodes and ``token`` on positional
    nodes, and ``provenance["answer_probability"]`` (mean softmax probability of the clean and
    the patch answer at the last token of the clean prompts).

    From ``circuit.activations`` (summed by the attribution's own forwards over ``batch``)
    when it covers the circuit's sites; else one no-grad forward per chunk and side, hooking
    only the circuit's sites. Positions are the left-padded batch's (as node ids use them).
    """
    nodes = _feature_nodes(circuit)
    acts = circuit.activations
    if acts is None or acts.n != len(batch) or any(s not in acts.sums[side] for side in SIDES for s in nodes):
        acts = _activation_sums(sm, batch, nodes, batch_size)
    if nodes:
        for side in SIDES:
            real = batch.inputs(side)["attention_mask"].to(torch.float64).sum(0)  # [T] examples per position
            for s, v in nodes.items():
                sums = acts.sums[side][s].double().cpu()
                for nid, feature, pos in v:
                    if pos >= 0:
                        val = sums[pos, feature] / max(1.0, float(real[pos]))
                    else:
                        val = sums[:, feature].sum() / max(1.0, float(real.sum()))
                    circuit.graph.nodes[nid][f"activation_{side}"] = round(float(val), 6)
    n = max(1, len(batch))
    circuit.provenance["answer_probability"] = {"clean_answer_on_clean": round(acts.p_clean_answer / n, 6),
                                                "patch_answer_on_clean": round(acts.p_patch_answer / n, 6)}
    if prompt_tokens:
        for n, d in circuit.graph.nodes(data=True):
            pos = d.get("position", -1)
            if pos is not None and 0 <= int(pos) < len(prompt_tokens) and d.get("kind") != "metric":
                d["token"] = str(prompt_tokens[int(pos)])


def _activation_sums(sm: SplicedModel, batch: Batch, nodes: dict, batch_size: int) -> ActivationSums:
    """The sums :func:`node_facts` needs, from its own forwards (a circuit that does not carry them)."""
    acts = ActivationSums()
    sites = [s for s in sm.sites if s.name in nodes]
    for side in SIDES:
        if side == "patch" and not nodes:
            break
        for chunk in batch.chunks(batch_size):
            mask = chunk.inputs(side)["attention_mask"]

            def hook(site, x, mask=mask):
                acts.add(side, site.name, sm.dictionary(site).encode(x.detach()), mask)

            with torch.no_grad():
                logits = sm.run(chunk.inputs(side), hook, sites, stop=side == "patch" and bool(sites))
            if side == "clean":
                acts.add_answers(answer_probs(logits, chunk.clean_answer, chunk.patch_answer))
    return acts


def circuit_cards(sm: SplicedModel, circuit: Circuit, mode: str = "auto", corpus: str = "auto",
                  tokens: int = DEFAULT_CARD_TOKENS, progress: bool = True,
                  on_subset: Callable[[int, int], None] | None = None) -> tuple[dict[str, dict], dict | None]:
    """The cards of the circuit's feature nodes and a summary of where they came from.

    ``auto``: the cached full store of the set (default settings) if one exists, else
    the subset mode; ``subset``: cards for the circuit's features only, over ``tokens``
    corpus tokens; ``off``: none. Returns ``(cards by node id, info)``, info None for off.
    ``on_subset(n_features, tokens)`` is called before a subset build (the CLI says so).
    """
    if mode not in CARD_MODES:
        raise UserError(f"--cards must be one of {', '.join(CARD_MODES)}, got {mode!r}")
    if mode == "off":
        return {}, None
    ids = [str(n) for n in circuit.graph]
    feats = circuit_features(ids)
    store: FeatureStore | None = None
    if mode == "auto":
        try:
            store = cached_store(sm, corpus, StoreSettings())
        except UserError:  # e.g. a corpus shorter than a full store's tokens: none can exist
            store = None
    if store is None:
        if not feats:
            return {}, {"store": None, "subset": True, "tokens": 0, "n_cards": 0, "n_feature_nodes": 0}
        if on_subset is not None:
            on_subset(sum(len(v) for v in feats.values()), tokens)
        store = feature_store(sm, corpus, StoreSettings(tokens=tokens), features=feats, progress=progress)
    cards = store.cards_for_nodes(ids)
    info = {"store": str(store.folder), "subset": bool(store.meta.get("subset")), "tokens": store.n_tokens,
            "corpus": store.meta.get("corpus"), "n_cards": len(cards),
            "n_feature_nodes": sum(1 for _, d in circuit.graph.nodes(data=True) if is_feature(d))}
    return cards, info


def annotate(sm: SplicedModel | None, circuit: Circuit, cards: dict[str, dict],
             annotations: dict[str, str] | None = None) -> dict[str, str]:
    """Set ``label`` on every node that gets one (see :func:`featcircuits.labels.label_nodes`)
    and ``neuronpedia`` on feature nodes of sets Neuronpedia hosts; returns the labels."""
    g = circuit.graph
    nodes = [{"id": n, **d} for n, d in g.nodes(data=True) if d.get("kind") != "metric"]
    labels = label_nodes(nodes, cards, annotations, prompt_tokens=circuit.provenance.get("prompt_tokens"))
    for n, label in labels.items():
        g.nodes[n]["label"] = label
    if sm is not None:
        for n, d in g.nodes(data=True):
            if is_feature(d):
                url = source_neuronpedia_url(sm.dictionary(str(d["site"])).source, int(d["feature"]))
                if url:
                    d["neuronpedia"] = url
    return labels


def unlabelled(circuit: Circuit) -> list[str]:
    """Feature nodes whose label is missing or just their id (what the quick start must not leave)."""
    return [str(n) for n, d in circuit.graph.nodes(data=True)
            if is_feature(d) and (not d.get("label") or d.get("label") == str(n))]



def build_features(sm: SplicedModel, corpus: str = "auto", *, tokens: int | None = None, top_k: int | None = None,
                   seed: int = 0, batch: int | None = None, nodes: str | Path | None = None,
                   out: str | Path | None = None, progress: bool = True) -> tuple[FeatureStore, Path | None]:
    """What ``featcircuits features`` runs: the (cached, resumable) feature store of ``sm``'s
    set with the given settings (None: the defaults), only for a circuit's feature nodes
    when ``nodes`` names its folder or graph.json; copied into ``out`` when given."""
    import json
    import shutil

    from .cards import STORE_META, STORE_TENSORS

    given = {"tokens": tokens, "top_k": top_k, "batch": batch}
    bad = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None and v < 1]
    if bad:
        raise UserError(f"{', '.join(bad)} must be positive")
    settings = StoreSettings(seed=seed, **{k: v for k, v in given.items() if v is not None})
    features = None
    if nodes is not None:
        path = Path(nodes)
        path = path / "graph.json" if path.is_dir() else path
        try:
            ids = [str(n["id"]) for n in json.loads(path.read_text(encoding="utf-8"))["nodes"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"--nodes {nodes}: not a readable graph.json ({exc})") from None
        features = circuit_features(ids)
        if not features:
            raise UserError(f"--nodes {nodes}: the circuit has no feature nodes")
    store = feature_store(sm, corpus, settings, features=features, progress=progress)
    copied = None
    if out is not None:
        copied = Path(out)
        copied.mkdir(parents=True, exist_ok=True)
        for name in (STORE_TENSORS, STORE_META):
            shutil.copy2(Path(store.folder) / name, copied / name)
    return store, copied
