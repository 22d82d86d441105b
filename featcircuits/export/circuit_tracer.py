"""The circuit in the attribution-graph schema of circuit-tracer's front end."""

from __future__ import annotations

import json
from pathlib import Path

from ..adapters import site_band, site_row
from ..graph import METRIC, Circuit
from ..io import write_json
from .common import CIRCUIT_TRACER_INDEX, _jsonable, _task_name
from .dot import _node_sort_key


# --------------------------------------------------------------------------- circuit-tracer

def _ct_row(site: str) -> str:
    """The front end's ``layer`` (a row of its plot): ``E`` for the embed site, then one row
    per site, attn_l = 3l, mlp_l = 3l+1, resid_l = 3l+2 (so attn/mlp/resid of one model
    layer get three rows instead of overlapping in one)."""
    return "E" if site == "embed" else str(site_row(site) - 1)


def _ct_prompt_tokens(circuit: Circuit) -> tuple[list[str], bool]:
    """The prompt tokens for the front end's x axis, and whether nodes carry positions."""
    g = circuit.graph
    positions = [int(d.get("position", -1)) for _, d in g.nodes(data=True) if d.get("kind") != "metric"]
    positional = any(p >= 0 for p in positions)
    prov = circuit.provenance
    given = prov.get("prompt_tokens")
    if positional:
        n = max(positions) + 1
        tokens = [str(t) for t in given] if isinstance(given, (list, tuple)) and len(given) >= n else \
            [f"t{i}" for i in range(n)]
    else:
        # summed over positions: one column for every node, one for the metric (last token)
        tokens = ["(summed over positions)", "(last token)"]
    if len(tokens) < 2:  # the front end hides a node whose id appears in > 2/3 of the tokens
        tokens.append("(end)")
    return tokens, positional


def to_circuit_tracer(circuit: Circuit, slug: str = "graph.circuit-tracer") -> dict:
    """The circuit in circuit-tracer's attribution-graph JSON (what its
    ``create_graph_files`` writes and its front end reads).

    Mapping: SAE features -> ``feature_type`` "cross layer transcoder" (the front end's
    only feature type), error nodes -> "mlp reconstruction error" (its only error type;
    the ``clerp`` names the real site), the metric -> the single "logit" node
    (``is_target_logit``). ``layer`` is a row per site (see ``_ct_row``), ``ctx_idx`` the
    token position (a single column when summed over positions), ``influence`` the
    cumulative share of total |effect| up to and including the node (circuit-tracer's
    pruning score: small = important), ``activation`` the node effect is *not* (left null:
    activations are not stored). Extra fields ``site``, ``model_layer``, ``position``,
    ``effect``, ``our_id``, ``probe_location_idx`` are ignored by the front end's model
    but kept for readers."""
    g = circuit.graph
    prov = _jsonable(circuit.provenance)
    tokens, positional = _ct_prompt_tokens(circuit)
    last = len(tokens) - 1

    nodes = [(n, d) for n, d in g.nodes(data=True) if d.get("kind") != "metric"]
    order = sorted(nodes, key=lambda t: -abs(float(t[1].get("effect", 0.0))))
    total = sum(abs(float(d.get("effect", 0.0))) for _, d in nodes) or 1.0
    influence, acc = {}, 0.0
    for n, d in order:
        acc += abs(float(d.get("effect", 0.0)))
        influence[n] = min(1.0, acc / total)

    ids: dict[str, str] = {}
    used: set[str] = set()
    out_nodes = []
    for n, d in sorted(nodes, key=lambda t: _node_sort_key(*t)):
        site = str(d["site"])
        row = _ct_row(site)
        pos = int(d.get("position", -1))
        ctx = pos if positional and pos >= 0 else 0
        feat = int(d.get("feature", -1))
        is_err = d.get("kind") == "error"
        node_id = f"{row}_{'err' if is_err else feat}_{ctx}"
        if node_id in used:  # only when summed and positional nodes are mixed
            node_id = f"{node_id}_{len(used)}"
        used.add(node_id)
        ids[n] = node_id
        label = d.get("label")
        tok = tokens[ctx] if positional else None
        where = f" @ {tok!r}" if tok is not None else ""
        if is_err:
            clerp = f"Err: {site}{where}" + (f" ({label})" if label else "")
            ftype = "mlp reconstruction error"
        else:
            clerp = str(label) if label else f"{site}/{feat}{where}"
            ftype = "cross layer transcoder"
        out_nodes.append({
            "node_id": node_id, "feature": feat, "layer": row, "ctx_idx": ctx, "feature_type": ftype,
            "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
            "jsNodeId": f"{row}_{'err' if is_err else feat}-{ctx}", "clerp": clerp,
            "influence": influence[n], "activation": None,
            # extras (not in circuit-tracer's Node model; its front end passes them through)
            "probe_location_idx": site_band(site, 0),
            "site": site, "model_layer": int(d.get("layer", -1)), "position": pos,
            "effect": float(d.get("effect", 0.0)), "our_id": str(n),
        })
    rows = [int(x["layer"]) for x in out_nodes if x["layer"] != "E"]
    logit_row = str(max(rows, default=0) + 1)
    if METRIC in g:
        metric_desc = str(g.nodes[METRIC].get("label") or prov.get("metric") or "metric")
        if metric_desc == "metric":
            metric_desc = "metric: logit[patch] - logit[clean]"
        ids[METRIC] = f"{logit_row}_metric_{last}"
        out_nodes.append({
            "node_id": ids[METRIC], "feature": 0, "layer": logit_row, "ctx_idx": last, "feature_type": "logit",
            "token_prob": 0.0, "is_target_logit": True, "run_idx": 0, "reverse_ctx_idx": 0,
            "jsNodeId": f"L_metric-{last}",
            # the front end parses "(p=...)" from a logit's clerp; there is no probability here
            "clerp": f'Output "{metric_desc}" (p=n/a)',
            "influence": None, "activation": None,
            "probe_location_idx": -1, "site": METRIC, "model_layer": int(g.nodes[METRIC].get("layer", -1)),
            "position": -1, "effect": float(g.nodes[METRIC].get("effect", 0.0)), "our_id": METRIC,
        })
    links = [{"source": ids[u], "target": ids[v], "weight": float(w)}
             for u, v, w in g.edges(data="weight", default=0.0) if u in ids and v in ids]
    dicts = prov.get("dictionaries")
    scan = f"featcircuits-{dicts if isinstance(dicts, str) else 'saes'}"
    prompt = prov.get("prompt") or f"{_task_name(prov)} ({prov.get('method', '?')}, {prov.get('aggregation', 'sum')})"
    thr = prov.get("thresholds")
    node_thr = thr.get("node") if isinstance(thr, dict) else None
    return {
        "metadata": {
            "slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": tokens, "prompt": str(prompt),
            "node_threshold": node_thr,
            "info": {"generator": "featcircuits", "model": prov.get("model"), "method": prov.get("method"),
                     "task": prov.get("task"), "aggregation": prov.get("aggregation")},
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": out_nodes,
        "links": links,
    }


def write_circuit_tracer(circuit: Circuit, path: str | Path, index: bool = True) -> Path:
    """Write the circuit-tracer JSON; with ``index`` also add/replace its entry in
    ``graph-metadata.json`` beside it (the list circuit-tracer's local server offers)."""
    path = Path(path)
    slug = path.name[:-5] if path.name.endswith(".json") else path.stem
    data = to_circuit_tracer(circuit, slug=slug)
    write_json(path, data)
    if index:
        idx_path = path.parent / CIRCUIT_TRACER_INDEX
        try:
            idx = json.loads(idx_path.read_text()) if idx_path.exists() else {"graphs": []}
        except (OSError, json.JSONDecodeError):
            idx = {"graphs": []}
        meta = {k: v for k, v in data["metadata"].items() if k != "info"}
        idx["graphs"] = [x for x in idx.get("graphs", []) if x.get("slug") != slug] + [meta]
        write_json(idx_path, idx)
    return path
