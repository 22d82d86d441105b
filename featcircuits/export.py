"""Writing a circuit to disk in formats other tools read, and reading it back.

One run folder holds (each written atomically, see :mod:`featcircuits.io`):

- ``graph.graphml``: nodes and edges with every attribute, typed (``int`` for layer,
  feature, position; ``double`` for effect and weight; ``string`` otherwise); the
  provenance as graph attributes ``provenance.<key>`` (nested keys joined with dots,
  lists and ``null`` as JSON text). GraphML has no null: an attribute whose value is
  ``None`` is left out of that node, and reading treats "absent" as "None".
- ``graph.dot``: Graphviz DOT, drawn bottom to top (embed first, metric last), with the
  same attributes on every node and edge (names Graphviz reserves, ``label``, ``layer``,
  ``weight``, carry a ``circuit_`` prefix); rendered to ``graph.svg`` / ``graph.png`` when
  the Graphviz ``dot`` binary is installed (the summary says so when it is not).
- ``graph.json``: networkx node-link JSON (``nodes``, ``links``) with a ``metadata``
  block holding the provenance. This is what :func:`load_circuit` reads.
- ``graph.circuit-tracer.json``: the same circuit in the attribution-graph schema of
  circuit-tracer's front end (``metadata``, ``qParams``, ``nodes``, ``links``), with a
  ``graph-metadata.json`` index beside it so the folder can be served as its data dir.
- ``node_effects.safetensors``: the dense aggregated node effects, ``features/<site>`` and
  ``errors/<site>``, provenance as string metadata.
- ``summary.json``: the provenance plus counts (``n_nodes``, ``n_edges``, per kind and per
  site), ``method``, ``seconds`` (``nodes``, ``edges``, ``total``), the files written and
  any notes, merged with the caller's ``extra``.
- ``circuit.png`` / ``circuit.svg``: a matplotlib picture (:mod:`featcircuits.draw`), when
  asked for (formats ``png``/``svg``; not in :data:`DEFAULT_FORMATS`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

import networkx as nx
import torch

from .adapters import site_band, site_row, site_sort_key
from .errors import UserError
from .graph import METRIC, Circuit
from .nodes import Act, Acts
from .io import atomic_write, write_json, write_tensors, write_text

log = logging.getLogger(__name__)

GRAPHML = "graph.graphml"
DOT = "graph.dot"
JSON = "graph.json"
CIRCUIT_TRACER = "graph.circuit-tracer.json"
CIRCUIT_TRACER_INDEX = "graph-metadata.json"
EFFECTS = "node_effects.safetensors"
SUMMARY = "summary.json"
PICTURE = "circuit"  # stem: circuit.png, circuit.svg

#: Every format :func:`save_circuit` knows, in the order it writes them.
FORMATS = ("graphml", "dot", "json", "circuit-tracer", "effects", "summary", "png", "svg")
#: What it writes by default: everything but the matplotlib picture (``png``/``svg``, which
#: callers draw with :func:`featcircuits.draw.draw_circuit` or ask for here).
DEFAULT_FORMATS = FORMATS[:-2]
JSON_FORMAT_VERSION = "featcircuits.circuit/1"

# Node attributes and their types (GraphML/DOT need one type per attribute).
_INT_ATTRS = ("layer", "feature", "position")
_FLOAT_ATTRS = ("effect",)
_STR_ATTRS = ("site", "kind", "label")


# --------------------------------------------------------------------------- helpers

def _plain(value: Any) -> Any:
    """Python scalars for numpy/torch scalars and 0-d tensors; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and not isinstance(value, (str, bytes)) and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def _jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types (tuples become lists, tensors lists, paths strings)."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    return str(obj)


def _typed_node_attrs(data: dict) -> dict:
    """Node attributes coerced to their declared types; None values dropped."""
    out = {}
    for k, v in data.items():
        v = _plain(v)
        if v is None:
            continue
        if k in _INT_ATTRS:
            v = int(v)
        elif k in _FLOAT_ATTRS:
            v = float(v)
        elif k in _STR_ATTRS:
            v = str(v)
        out[k] = v
    return out


def _scalar_for_graphml(v: Any) -> Any:
    """A value GraphML can type: bool/int/float/str kept, anything else as JSON text."""
    v = _plain(v)
    if isinstance(v, (bool, int, float, str)):
        return v
    return json.dumps(_jsonable(v))


def _flatten(d: dict, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        elif v is None or isinstance(v, (dict, list, tuple)):
            out[key] = json.dumps(_jsonable(v))  # null, [], {} and lists as JSON text
        else:
            out[key] = _scalar_for_graphml(v)
    return out


def _task_name(prov: dict) -> str:
    task = prov.get("task")
    if isinstance(task, dict):
        return str(task.get("name") or task.get("path") or "task")
    return str(task) if task is not None else "task"


def _seconds(prov: dict) -> dict:
    secs = dict(prov.get("seconds") or {})
    for k in ("nodes", "edges", "total"):
        secs.setdefault(k, None)
    return secs


# --------------------------------------------------------------------------- GraphML

def to_graphml_graph(circuit: Circuit) -> nx.DiGraph:
    """A copy of the circuit graph that ``networkx.write_graphml`` can write losslessly:
    typed node/edge attributes, None values left out, provenance as graph attributes."""
    g = nx.DiGraph()
    g.graph.update(_flatten(_jsonable(circuit.provenance), "provenance"))
    g.graph["format"] = JSON_FORMAT_VERSION
    for n, data in circuit.graph.nodes(data=True):
        g.add_node(str(n), **{k: _scalar_for_graphml(v) for k, v in _typed_node_attrs(data).items()})
    for u, v, data in circuit.graph.edges(data=True):
        attrs = {k: _scalar_for_graphml(x) for k, x in data.items() if _plain(x) is not None}
        if "weight" in attrs:
            attrs["weight"] = float(attrs["weight"])
        g.add_edge(str(u), str(v), **attrs)
    return g


def write_graphml(circuit: Circuit, path: str | Path) -> Path:
    g = to_graphml_graph(circuit)
    return atomic_write(path, lambda p: nx.write_graphml(g, str(p), infer_numeric_types=False))


def read_graphml(path: str | Path) -> nx.DiGraph:
    """Read a ``graph.graphml`` back (node ids are strings, attributes typed)."""
    g = nx.read_graphml(str(path))
    return nx.DiGraph(g)


# --------------------------------------------------------------------------- DOT

def _dot_quote(s: Any) -> str:
    s = str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


#: Attribute names Graphviz gives a meaning of its own; ours carry a ``circuit_`` prefix in DOT.
DOT_RESERVED = ("label", "layer", "weight", "color", "shape", "style", "pos", "width", "height",
                "fillcolor", "penwidth", "group", "rank", "id", "class", "comment", "tooltip")


def _dot_name(key: str) -> str:
    return f"circuit_{key}" if key in DOT_RESERVED else key


def _fmt(x: float) -> str:
    return repr(float(x))


def _node_sort_key(n: str, d: dict) -> tuple:
    kind = d.get("kind")
    if kind == "metric":
        return (10**9, 0, 0, 0)
    site = str(d.get("site", ""))
    band = site_band(site)
    return (int(d.get("layer", -1)), band, int(d.get("position", -1)), int(d.get("feature", -1)))


def _node_display(n: str, d: dict) -> str:
    if d.get("kind") == "metric":
        return "metric"
    label = d.get("label")
    name = str(n)
    text = f"{name}\n{float(d.get('effect', 0.0)):+.3g}"
    return f"{label}\n{text}" if label else text


def to_dot(circuit: Circuit) -> str:
    """The circuit as Graphviz DOT: ``rankdir=BT`` (embed at the bottom, metric at the
    top), one rank per site, features as ellipses, error nodes as boxes, the metric as a
    double octagon; fill and edge colour blue for positive, red for negative values, pen
    width by |weight|. Every node and edge carries its attributes (``site``, ``kind``,
    ``feature``, ``position``, ``effect``; those Graphviz reserves with a ``circuit_``
    prefix: ``circuit_layer``, ``circuit_label``, ``circuit_weight``)."""
    g = circuit.graph
    prov = circuit.provenance
    effects = [abs(float(d.get("effect", 0.0))) for _, d in g.nodes(data=True) if d.get("kind") != "metric"]
    weights = [abs(float(w)) for _, _, w in g.edges(data="weight", default=0.0)]
    emax = max(effects, default=0.0) or 1.0
    wmax = max(weights, default=0.0) or 1.0
    title = f"{_task_name(prov)} / {prov.get('method', '?')}: {circuit.n_nodes} nodes, {circuit.n_edges} edges"
    lines = [
        "digraph circuit {",
        f"  graph [rankdir=BT, ranksep=0.6, nodesep=0.15, fontname=Helvetica, labelloc=t, label={_dot_quote(title)}];",
        '  node [fontname=Helvetica, fontsize=9, style=filled, penwidth=0.8];',
        '  edge [arrowsize=0.5];',
    ]
    by_site: dict[str, list[str]] = {}
    for n, d in sorted(g.nodes(data=True), key=lambda t: _node_sort_key(*t)):
        d = _typed_node_attrs(d)
        kind = d.get("kind", "feature")
        eff = float(d.get("effect", 0.0))
        if kind == "metric":
            shape, fill = "doubleoctagon", "#dddddd"
        else:
            shape = "box" if kind == "error" else "ellipse"
            strength = min(1.0, abs(eff) / emax)
            # blend white -> blue (positive) or red (negative)
            base = (0x1F, 0x5A, 0xC8) if eff >= 0 else (0xD6, 0x2B, 0x2B)
            rgb = [round(255 + (c - 255) * (0.15 + 0.85 * strength)) for c in base]
            fill = "#%02x%02x%02x" % tuple(rgb)
        attrs = {k: d[k] for k in ("site", "layer", "kind", "feature", "position") if k in d}
        parts = [f"{_dot_name(k)}={_dot_quote(v)}" for k, v in attrs.items()]
        parts.append(f"effect={_dot_quote(_fmt(eff))}")
        if "label" in d:
            parts.append(f"circuit_label={_dot_quote(d['label'])}")
        for k, v in d.items():  # any extra attribute the graph carries
            if k not in attrs and k not in ("effect", "label"):
                parts.append(f"{_dot_name(k)}={_dot_quote(_scalar_for_graphml(v))}")
        parts += [f"label={_dot_quote(_node_display(n, d))}",
                  f"shape={shape}", f"fillcolor={_dot_quote(fill)}"]
        lines.append(f"  {_dot_quote(n)} [{', '.join(parts)}];")
        by_site.setdefault(str(d.get("site", "")), []).append(str(n))
    for site, members in by_site.items():
        if len(members) > 1:
            lines.append("  { rank=same; " + " ".join(_dot_quote(m) for m in members) + " }")
    for u, v, data in g.edges(data=True):
        w = float(data.get("weight", 0.0))
        strength = min(1.0, abs(w) / wmax)
        colour = "#1f5ac8" if w >= 0 else "#d62b2b"
        alpha = max(0x20, round(0xFF * strength))
        parts = [f"circuit_weight={_dot_quote(_fmt(w))}", f"color={_dot_quote(colour + '%02x' % alpha)}",
                 f"penwidth={0.5 + 3.0 * strength:.2f}"]
        for k, x in data.items():
            if k != "weight" and _plain(x) is not None:
                parts.append(f"{_dot_name(k)}={_dot_quote(_scalar_for_graphml(x))}")
        lines.append(f"  {_dot_quote(u)} -> {_dot_quote(v)} [{', '.join(parts)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_dot(circuit: Circuit, path: str | Path) -> Path:
    return write_text(path, to_dot(circuit))


def graphviz_available() -> bool:
    return shutil.which("dot") is not None


GRAPHVIZ_MISSING = ("graphviz 'dot' binary not found: graph.dot was written but not rendered to "
                    "graph.svg/graph.png (install graphviz, e.g. apt-get install graphviz, then "
                    "`featcircuits export DIR --format svg --graphviz`); circuit.png/svg is the "
                    "matplotlib picture")


def render_dot(dot_path: str | Path, out_path: str | Path, fmt: str | None = None, timeout: float = 120) -> Path:
    """Render a DOT file with the Graphviz ``dot`` binary (atomically). Raises UserError
    when the binary is not installed."""
    out_path = Path(out_path)
    return render_dot_many(dot_path, {fmt or out_path.suffix.lstrip("."): out_path}, timeout=timeout)[0]


def render_dot_many(dot_path: str | Path, outputs: dict[str, str | Path], timeout: float = 120) -> list[Path]:
    """Lay the graph out once and write every ``{format: path}`` (each atomically)."""
    exe = shutil.which("dot")
    if exe is None:
        raise UserError(GRAPHVIZ_MISSING)
    finals = {fmt: Path(p) for fmt, p in outputs.items()}
    tmps = {}
    for fmt, final in finals.items():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmps[fmt] = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    cmd = [exe, str(dot_path)]
    for fmt, tmp in tmps.items():
        cmd += [f"-T{fmt}", "-o", str(tmp)]
    try:
        subprocess.run(cmd, check=True, timeout=timeout, capture_output=True)
        for fmt, tmp in tmps.items():
            os.replace(tmp, finals[fmt])
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    return list(finals.values())


# --------------------------------------------------------------------------- node-link JSON

def to_node_link(circuit: Circuit) -> dict:
    """networkx node-link data (``nodes``, ``links``) plus a ``metadata`` block."""
    data = nx.node_link_data(circuit.graph, edges="links")
    data["metadata"] = {
        "format": JSON_FORMAT_VERSION,
        "provenance": _jsonable(circuit.provenance),
        "n_nodes": circuit.n_nodes,
        "n_edges": circuit.n_edges,
        "sites": list(circuit.effects),
    }
    return _jsonable(data)


def from_node_link(data: dict) -> nx.DiGraph:
    g = nx.node_link_graph({k: v for k, v in data.items() if k != "metadata"}, directed=True,
                           multigraph=False, edges="links")
    return nx.DiGraph(g)


def write_json_graph(circuit: Circuit, path: str | Path) -> Path:
    return write_json(path, to_node_link(circuit))


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


# --------------------------------------------------------------------------- node effects

def write_effects(circuit: Circuit, path: str | Path) -> Path:
    tensors = {}
    for site, v in circuit.effects.items():
        tensors[f"features/{site}"] = v.f
    for site, v in circuit.effects.items():
        tensors[f"errors/{site}"] = v.err
    meta = {"format": "featcircuits.node_effects/1",
            "sites": json.dumps(list(circuit.effects)),
            "provenance": json.dumps(_jsonable(circuit.provenance))}
    return write_tensors(path, tensors, metadata=meta)


def read_effects(path: str | Path) -> tuple[Acts, dict]:
    """``(effects, metadata)`` from a ``node_effects.safetensors``, in site order."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    sites = json.loads(meta["sites"]) if "sites" in meta else \
        sorted({k.split("/", 1)[1] for k in keys}, key=site_sort_key)
    effects = {s: Act(tensors[f"features/{s}"], tensors[f"errors/{s}"]) for s in sites
               if f"features/{s}" in tensors and f"errors/{s}" in tensors}
    return effects, meta




# --------------------------------------------------------------------------- summary

def summary_dict(circuit: Circuit, extra: dict | None = None, files: Iterable[str] = (),
                 notes: Iterable[str] = ()) -> dict:
    """Provenance + counts + timings (+ ``extra``, merged last)."""
    prov = _jsonable(circuit.provenance)
    g = circuit.graph
    by_kind: dict[str, int] = {}
    by_site: dict[str, int] = {}
    for _, d in g.nodes(data=True):
        if d.get("kind") == "metric":
            continue
        by_kind[d.get("kind", "?")] = by_kind.get(d.get("kind", "?"), 0) + 1
        by_site[str(d.get("site"))] = by_site.get(str(d.get("site")), 0) + 1
    out = dict(prov)
    out.update({
        "method": prov.get("method"),
        "n_nodes": circuit.n_nodes,
        "n_edges": circuit.n_edges,
        "n_nodes_by_kind": by_kind,
        "n_nodes_by_site": dict(sorted(by_site.items(), key=lambda t: site_sort_key(t[0]))),
        "seconds": _seconds(prov),
        "top_nodes": [{"id": n, "effect": float(e)} for n, e in circuit.top_nodes(10)],
    })
    if files:
        out["files"] = sorted(set(files))
    notes = list(notes)
    if notes:
        out["notes"] = notes
    if extra:
        out.update(_jsonable(extra))
    return out


# --------------------------------------------------------------------------- save / load

def save_circuit(circuit: Circuit, out_dir: str | Path, formats: Iterable[str] = DEFAULT_FORMATS,
                 extra: dict | None = None, max_draw_nodes: int = 200,
                 graphviz_max_edges: int = 5000) -> dict:
    """Write ``circuit`` to ``out_dir`` in ``formats`` (default :data:`DEFAULT_FORMATS`;
    add ``"png"``/``"svg"`` for the picture ``circuit.png``/``circuit.svg``).

    Returns the summary dict (also written as ``summary.json`` when ``"summary"`` is in
    ``formats``), whose ``files`` lists what was written and ``notes`` what was not (e.g.
    the DOT not rendered because Graphviz is missing). ``extra`` is merged into the
    summary last; ``max_draw_nodes`` caps the picture; the DOT is rendered with Graphviz
    only up to ``graphviz_max_edges`` edges."""
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UserError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    files: list[str] = []
    notes: list[str] = []
    if "graphml" in formats:
        files.append(write_graphml(circuit, out / GRAPHML).name)
    if "dot" in formats:
        files.append(write_dot(circuit, out / DOT).name)
        if not graphviz_available():
            notes.append(GRAPHVIZ_MISSING)
            log.warning(GRAPHVIZ_MISSING)
        elif circuit.n_edges > graphviz_max_edges:
            notes.append(f"graph.dot not rendered with graphviz: {circuit.n_edges} edges > {graphviz_max_edges} "
                         "(dot gets slow); `featcircuits export DIR --format svg --graphviz` renders it anyway")
            log.warning(notes[-1])
        else:
            try:
                files += [p.name for p in render_dot_many(out / DOT, {"svg": out / "graph.svg",
                                                                     "png": out / "graph.png"})]
            except (subprocess.SubprocessError, OSError) as exc:
                notes.append(f"graphviz failed to render graph.dot: {exc}")
                log.warning(notes[-1])
    if "json" in formats:
        files.append(write_json_graph(circuit, out / JSON).name)
    if "circuit-tracer" in formats:
        files.append(write_circuit_tracer(circuit, out / CIRCUIT_TRACER).name)
        files.append(CIRCUIT_TRACER_INDEX)
    if "effects" in formats:
        files.append(write_effects(circuit, out / EFFECTS).name)
    pics = tuple(f for f in ("png", "svg") if f in formats)
    if pics:
        from .draw import draw_circuit

        files += [p.name for p in draw_circuit(circuit, out / PICTURE, max_nodes=max_draw_nodes, formats=pics)]
    if "summary" in formats:
        files.append(SUMMARY)
    summary = summary_dict(circuit, extra=None, files=files, notes=notes)
    summary["export_seconds"] = round(time.perf_counter() - t0, 4)
    if extra:
        summary.update(_jsonable(extra))
    if "summary" in formats:
        write_json(out / SUMMARY, summary)
    return summary


def load_circuit(path: str | Path) -> Circuit:
    """Read a run folder written by :func:`save_circuit` (``graph.json``, plus
    ``node_effects.safetensors`` and ``summary.json`` when present)."""
    d = Path(path)
    if not d.exists():
        raise UserError(f"circuit folder {d} does not exist")
    if not d.is_dir():
        raise UserError(f"{d} is not a folder: give the run folder that holds {JSON}")
    gj = d / JSON
    if not gj.exists():
        raise UserError(f"{d} holds no {JSON}: not a featcircuits circuit folder (run `featcircuits discover` first)")
    try:
        data = json.loads(gj.read_text(encoding="utf-8"))
        graph = from_node_link(data)
    except (json.JSONDecodeError, KeyError, TypeError, nx.NetworkXError) as exc:
        raise UserError(f"{gj} is not a readable node-link graph: {exc}") from exc
    meta = data.get("metadata") or {}
    prov = meta.get("provenance")
    if prov is None and (d / SUMMARY).exists():
        summary = json.loads((d / SUMMARY).read_text(encoding="utf-8"))
        computed = {"n_nodes", "n_edges", "n_nodes_by_kind", "n_nodes_by_site", "files", "notes",
                    "top_nodes", "export_seconds"}
        prov = {k: v for k, v in summary.items() if k not in computed}
    effects: Acts = {}
    if (d / EFFECTS).exists():
        effects, emeta = read_effects(d / EFFECTS)
        if prov is None and "provenance" in emeta:
            prov = json.loads(emeta["provenance"])
    return Circuit(graph=graph, effects=effects, provenance=prov or {})


def circuits_equal(a: Circuit, b: Circuit, atol: float = 0.0) -> bool:
    """Same nodes, edges, attributes, dense effects and (JSON-normalised) provenance."""
    return not circuit_diff(a, b, atol=atol)


def circuit_diff(a: Circuit, b: Circuit, atol: float = 0.0) -> list[str]:
    """What differs between two circuits (empty when equal); for tests and debugging."""
    diffs = []
    ga, gb = a.graph, b.graph
    if set(ga.nodes) != set(gb.nodes):
        diffs.append(f"nodes differ: {sorted(set(ga.nodes) ^ set(gb.nodes))[:10]}")
    if set(ga.edges) != set(gb.edges):
        diffs.append(f"edges differ: {sorted(set(ga.edges) ^ set(gb.edges))[:10]}")
    for n in set(ga.nodes) & set(gb.nodes):
        if not _attrs_close(ga.nodes[n], gb.nodes[n], atol):
            diffs.append(f"node {n}: {ga.nodes[n]} != {gb.nodes[n]}")
    for e in set(ga.edges) & set(gb.edges):
        if not _attrs_close(ga.edges[e], gb.edges[e], atol):
            diffs.append(f"edge {e}: {ga.edges[e]} != {gb.edges[e]}")
    for name, part in (("features", "f"), ("errors", "err")):
        da = {s: getattr(v, part) for s, v in a.effects.items()}
        db = {s: getattr(v, part) for s, v in b.effects.items()}
        if list(da) != list(db):
            diffs.append(f"{name} sites differ: {list(da)} != {list(db)}")
        for s in set(da) & set(db):
            if da[s].shape != db[s].shape or da[s].dtype != db[s].dtype or \
                    not torch.allclose(da[s], db[s], atol=atol, rtol=0):
                diffs.append(f"{name}[{s}] differs")
    if _jsonable(a.provenance) != _jsonable(b.provenance):
        diffs.append("provenance differs")
    return diffs


def _attrs_close(x: dict, y: dict, atol: float) -> bool:
    x = {k: _plain(v) for k, v in x.items() if _plain(v) is not None}
    y = {k: _plain(v) for k, v in y.items() if _plain(v) is not None}
    if set(x) != set(y):
        return False
    for k in x:
        vx, vy = x[k], y[k]
        if isinstance(vx, float) or isinstance(vy, float):
            if not (isinstance(vx, (int, float)) and isinstance(vy, (int, float))):
                return False
            if not (math.isclose(vx, vy, abs_tol=atol, rel_tol=0) or (math.isnan(vx) and math.isnan(vy))):
                return False
        elif vx != vy or type(vx) is not type(vy):
            return False
    return True
