"""One run folder: ``summary.json``, ``save_circuit`` (every format, atomically) and ``load_circuit``."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Iterable

import networkx as nx

from .. import distributed
from ..adapters import site_sort_key
from ..errors import UserError
from ..graph import Circuit
from ..io import write_json
from ..nodes import Acts
from .common import (CARDS, CIRCUIT_TRACER, DEFAULT_FORMATS, DOT, EFFECTS, FORMATS, GRAPHML,
                     HTML, JSON, PICTURE, SUMMARY, _jsonable, _seconds)
from .graphml import write_graphml
from . import dot
from .dot import GRAPHVIZ_MISSING, render_dot_many, write_dot
from .nodelink import from_node_link, write_json_graph
from .circuit_tracer import SERVE_DIR, write_circuit_tracer
from .effects import read_effects, write_effects
from .html import write_cards, write_circuit_html

log = logging.getLogger("featcircuits.export")


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
                 graphviz_max_edges: int = 5000, *, model: str | None = None, task: str | None = None,
                 saes: str | None = None, seed: int | None = None, cards: dict[str, dict] | None = None) -> dict:
    """Write ``circuit`` to ``out_dir`` in ``formats`` (default :data:`DEFAULT_FORMATS`: every
    format, the picture ``circuit.png``/``circuit.svg`` and the viewer ``circuit.html`` included).

    ``model``, ``task``, ``saes`` (and ``seed``), when given, are merged into the saved
    provenance: they are what ``featcircuits evaluate`` rebuilds the run from (a circuit from
    ``discover`` records them already; one made in Python may not).

    Returns the summary dict (also written as ``summary.json`` when ``"summary"`` is in
    ``formats``), whose ``files`` lists what was written and ``notes`` what was not (e.g.
    the DOT not rendered because Graphviz is missing). ``extra`` is merged into the
    summary last; ``max_draw_nodes`` caps the picture; the DOT is rendered with Graphviz
    only up to ``graphviz_max_edges`` edges. ``cards`` (node id -> feature card) go into
    ``cards.json`` and the viewer ``circuit.html`` (format ``html``; without cards the page
    still shows the graph, labels and node facts)."""
    formats = tuple(formats)
    if not distributed.is_writer():  # under torchrun rank 0 alone writes; the others hold the same circuit
        return {}
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UserError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    given = {k: v for k, v in (("model", model), ("task", task), ("saes", saes), ("seed", seed)) if v is not None}
    if given:  # a copy: the caller's circuit keeps its provenance
        circuit = dataclasses.replace(circuit, provenance={**(circuit.provenance or {}), **given})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    files: list[str] = []
    notes: list[str] = []
    if "graphml" in formats:
        files.append(write_graphml(circuit, out / GRAPHML).name)
    if "dot" in formats:
        files.append(write_dot(circuit, out / DOT).name)
        if not dot.graphviz_available():  # looked up on the module so tests can patch it
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
        files.append(write_circuit_tracer(circuit, out / CIRCUIT_TRACER, cards=cards).name)
        files.append(f"{SERVE_DIR}/")
    if "effects" in formats:
        files.append(write_effects(circuit, out / EFFECTS).name)
    if cards:
        files.append(write_cards(cards, out / CARDS).name)
    if "html" in formats:
        files.append(write_circuit_html(circuit, out / HTML, cards).name)
    pics = tuple(f for f in ("png", "svg") if f in formats)
    if pics:
        from ..draw import draw_circuit

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
