"""The circuit in the attribution-graph schema of circuit-tracer's front end, and a folder
its local server (``circuit-tracer start-server``) serves with our feature examples.

Checked against circuit-tracer's own pydantic models (``circuit_tracer.frontend.graph_models.Model``
and ``feature_models.Model``) in tests/test_circuit_tracer.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..adapters import site_kind, site_row
from ..graph import METRIC, Circuit
from ..io import write_json
from .common import CIRCUIT_TRACER_INDEX, _jsonable, _task_name
from .dot import _node_sort_key

SCHEMA_VERSION = 1
#: the serving folder beside graph.circuit-tracer.json: <slug>.json, graph-metadata.json, <slug>-features/
SERVE_DIR = "circuit-tracer"


def cantor(x: int, y: int) -> int:
    """Cantor pairing of two non-negative integers (circuit-tracer's combined feature id)."""
    return (x + y) * (x + y + 1) // 2 + y


def run_slug(circuit: Circuit) -> str:
    """A slug unique to the run: task, method and a digest of what decided the circuit."""
    prov = _jsonable(circuit.provenance)
    keys = ("model_sha256", "dictionaries_sha256", "method", "aggregation", "rules", "steps", "thresholds", "n",
            "seed", "task", "metric_clean")
    digest = hashlib.sha256(json.dumps({k: prov.get(k) for k in keys}, sort_keys=True, default=str).encode())
    task = "".join(c if c.isalnum() or c in "-_" else "-" for c in _task_name(prov))[:40]
    return f"{task}-{prov.get('method', 'circuit')}-{digest.hexdigest()[:10]}"


def _feature_id(site: str, feature: int) -> int:
    """Our (site, feature) as one integer: the Cantor pairing of the site's row and the index
    (unique across sites, so attn/mlp/resid of one layer never collide)."""
    return cantor(site_row(site), int(feature))


def _ct_layer(site: str) -> str:
    """The front end's ``layer``: the model layer (``E`` for the embedding); the site kind is
    carried in ``site_kind``."""
    return "E" if site == "embed" else str(int(site.split("_")[1]))


def _tokens(circuit: Circuit) -> list[str]:
    given = circuit.provenance.get("prompt_tokens")
    positions = [int(d.get("position", -1)) for _, d in circuit.graph.nodes(data=True)]
    n = max(positions, default=-1) + 1
    if isinstance(given, (list, tuple)) and len(given) >= max(n, 2):
        return [str(t) for t in given]
    return [f"t{i}" for i in range(max(n, 2))]


def to_circuit_tracer(circuit: Circuit, slug: str | None = None, scan: str | None = None) -> dict:
    """The circuit as circuit-tracer's graph JSON (its ``graph_models.Model``).

    Feature nodes: ``feature`` = Cantor pairing of (site row, index), ``layer`` = model layer,
    ``feature_type`` "cross layer transcoder" (the only type whose examples the front end
    shows); error nodes: "<kind> reconstruction error" with ``feature`` = -1 - site row (one
    per site, never a feature id); one "embedding" node per prompt position (the token axis);
    the metric: the target "logit" node with the mean probability of the clean answer.
    Summed circuits place every node at the last token (their effects are summed over
    positions). ``activation`` = mean activation on the clean prompts; ``influence`` =
    cumulative share of |effect| (small = important). Extra fields (``site``,
    ``site_kind``, ``model_layer``, ``position``, ``effect``, ``our_id``) are passed through."""
    g = circuit.graph
    prov = _jsonable(circuit.provenance)
    slug = slug or run_slug(circuit)
    tokens = _tokens(circuit)
    last = len(tokens) - 1
    nodes = [(n, d) for n, d in g.nodes(data=True) if d.get("kind") != "metric"]
    total = sum(abs(float(d.get("effect", 0.0))) for _, d in nodes) or 1.0
    influence, acc = {}, 0.0
    for n, d in sorted(nodes, key=lambda t: -abs(float(t[1].get("effect", 0.0)))):
        acc += abs(float(d.get("effect", 0.0)))
        influence[n] = min(1.0, acc / total)
    ids: dict[str, str] = {}
    out_nodes = []
    for p, tok in enumerate(tokens):
        if tok == "":  # left padding of the first prompt
            continue
        out_nodes.append({"node_id": f"E_{p}_{p}", "feature": p, "layer": "E", "ctx_idx": p,
                          "feature_type": "embedding", "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
                          "reverse_ctx_idx": 0, "jsNodeId": f"E_{p}-{p}", "clerp": f"Emb: {tok!r}",
                          "influence": None, "activation": None})
    for n, d in sorted(nodes, key=lambda t: _node_sort_key(*t)):
        site = str(d["site"])
        layer = _ct_layer(site)
        pos = int(d.get("position", -1))
        ctx = pos if pos >= 0 else last
        is_err = d.get("kind") == "error"
        feat = -1 - site_row(site) if is_err else _feature_id(site, int(d["feature"]))
        node_id = f"{layer}_{feat}_{ctx}"
        ids[n] = node_id
        label = d.get("label")
        act = d.get("activation_clean")
        out_nodes.append({
            "node_id": node_id, "feature": feat, "layer": layer, "ctx_idx": ctx,
            "feature_type": f"{site_kind(site)} reconstruction error" if is_err else "cross layer transcoder",
            "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
            "jsNodeId": f"{layer}_{feat}-{ctx}", "clerp": str(label) if label else str(n),
            "influence": influence[n], "activation": None if act is None else float(act),
            "site": site, "site_kind": site_kind(site), "model_layer": int(d.get("layer", -1)), "position": pos,
            "effect": float(d.get("effect", 0.0)), "our_id": str(n),
        })
    rows = [int(x["layer"]) for x in out_nodes if x["layer"] != "E"]
    if METRIC in g:
        logit_layer = str(max(rows, default=0) + 1)
        p = prov.get("answer_probability") or {}
        prob = float(p.get("clean_answer_on_clean", 0.0)) if isinstance(p, dict) else 0.0
        ids[METRIC] = f"{logit_layer}_0_{last}"
        out_nodes.append({
            "node_id": ids[METRIC], "feature": 0, "layer": logit_layer, "ctx_idx": last, "feature_type": "logit",
            "token_prob": prob, "is_target_logit": True, "run_idx": 0, "reverse_ctx_idx": 0,
            "jsNodeId": f"L_0-{last}",
            # the front end parses "(p=...)": the mean probability of the clean answer on the clean prompts
            "clerp": f'Output "logit[patch] - logit[clean]" (p={prob:.3f})',
            "influence": None, "activation": None, "site": METRIC, "site_kind": METRIC,
            "model_layer": int(g.nodes[METRIC].get("layer", -1)), "position": -1,
            "effect": float(g.nodes[METRIC].get("effect", 0.0)), "our_id": METRIC,
        })
    links = [{"source": ids[u], "target": ids[v], "weight": float(w)}
             for u, v, w in g.edges(data="weight", default=0.0) if u in ids and v in ids]
    prompt = prov.get("prompt") or f"{_task_name(prov)} ({prov.get('method', '?')}, {prov.get('aggregation', 'sum')})"
    thr = prov.get("thresholds")
    node_thr = thr.get("node") if isinstance(thr, dict) else None
    return {
        "metadata": {
            "slug": slug, "scan": scan or f"./graph_data/{slug}-features", "transcoder_list": [],
            "prompt_tokens": tokens, "prompt": str(prompt),
            "node_threshold": None if node_thr is None else float(node_thr), "schema_version": SCHEMA_VERSION,
            "info": {"generator": "featcircuits", "model": prov.get("model"), "method": prov.get("method"),
                     "task": prov.get("task"), "aggregation": prov.get("aggregation")},
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": out_nodes,
        "links": links,
    }


def feature_file(card: dict, site: str, feature: int, transcoder_id: str) -> dict:
    """One card in circuit-tracer's feature format (``feature_models.Model``)."""

    def examples(rows: list[dict]) -> list[dict]:
        return [{"tokens_acts_list": [float(a) for a in e["acts"]], "train_token_ind": int(e["peak"]),
                 "is_repeated_datapoint": False, "tokens": [str(t) for t in e["tokens"]]} for e in rows]

    quantiles = [{"quantile_name": "Top activations", "examples": examples(card.get("top", []))}]
    if card.get("quantiles"):
        quantiles.append({"quantile_name": "Sampled active examples", "examples": examples(card["quantiles"])})
    return {"transcoder_id": transcoder_id, "index": _feature_id(site, feature), "examples_quantiles": quantiles,
            "top_logits": [t["token"] for t in card.get("promoted", [])],
            "bottom_logits": [t["token"] for t in card.get("suppressed", [])],
            "act_min": 0.0, "act_max": float(card.get("max") or 0.0),
            "quantile_values": [float(e["value"]) for e in card.get("quantiles", [])], "histogram": [],
            "activation_frequency": float(card.get("density") or 0.0)}


def write_circuit_tracer(circuit: Circuit, path: str | Path, index: bool = True,
                         cards: dict[str, dict] | None = None) -> Path:
    """Write the circuit-tracer JSON to ``path``; with ``index`` also the folder
    ``circuit-tracer/`` beside it that its server reads (``circuit-tracer start-server
    --graph_file_dir DIR/circuit-tracer``): ``<slug>.json``, ``graph-metadata.json`` and,
    from ``cards``, one feature file per feature node in ``<slug>-features/``."""
    path = Path(path)
    data = to_circuit_tracer(circuit)
    write_json(path, data)
    if index:
        serve = path.parent / SERVE_DIR
        slug = data["metadata"]["slug"]
        write_json(serve / f"{slug}.json", data)
        idx_path = serve / CIRCUIT_TRACER_INDEX
        try:
            idx = json.loads(idx_path.read_text()) if idx_path.exists() else {"graphs": []}
        except (OSError, json.JSONDecodeError):
            idx = {"graphs": []}
        meta = {k: v for k, v in data["metadata"].items() if k != "info"}
        idx["graphs"] = [x for x in idx.get("graphs", []) if x.get("slug") != slug] + [meta]
        write_json(idx_path, idx)
        done: set[tuple[str, int]] = set()
        for card in (cards or {}).values():
            site, feature = card["site"], int(card["feature"])
            if (site, feature) in done:  # positional nodes of one feature share its card
                continue
            done.add((site, feature))
            write_json(serve / f"{slug}-features" / f"{_feature_id(site, feature)}.json",
                       feature_file(card, site, feature, str(circuit.provenance.get("dictionaries", "saes"))))
    return path
