"""Graphviz DOT, drawn bottom to top, and rendering it when the ``dot`` binary is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ..adapters import site_band
from ..errors import UserError
from ..graph import Circuit
from ..io import write_text
from .common import _plain, _scalar_for_graphml, _task_name, _typed_node_attrs


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
        alpha = round(0x60 + 0x9F * strength)  # the faintest edge still visible (was 0x20: invisible)
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
