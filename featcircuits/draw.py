"""A picture of a circuit with matplotlib (no Graphviz needed).

Rows bottom to top: the embed site, then for every layer its ``attn``, ``mlp`` and
``resid`` sites (three bands per layer), the metric on top. Columns: token positions when
the circuit keeps them (aggregation ``none``), one column otherwise. Nodes: circles for
features, squares for error nodes, a star for the metric; colour and size by effect (blue
positive, red negative), features and error nodes on separate scales (error nodes are often
far larger and would wash the feature signs out). The strongest features are named by their
label (truncated), set beside the marker, never on it. Edges: blue positive, red negative,
opacity and width by |weight|. Large circuits are cut to the ``max_nodes`` nodes of largest
|effect| and the title says so. The title is the task's short name; SVG text stays text.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

from . import distributed
from .adapters import site_row
from .graph import Circuit
from .plotting import METHOD_LABELS, save_figure

POSITIVE = "#1f5ac8"
NEGATIVE = "#d62b2b"


MAX_LABEL = 28  # characters of a label in the picture


@functools.lru_cache(maxsize=1)
def _font_chars() -> frozenset[int]:
    """Code points the picture's font draws (matplotlib draws the others as empty boxes)."""
    from matplotlib import font_manager, ft2font

    path = font_manager.findfont(font_manager.FontProperties())
    return frozenset(ft2font.FT2Font(path).get_charmap())


def _drawable(text: str) -> str:
    """``text`` without the ``|``-separated tokens the font cannot draw: a label such as
    ``her|emma → she|그녀|her`` reads ``her|emma → she|her`` in the picture instead of showing
    boxes (the viewer and the graph files keep the full label)."""
    chars = _font_chars()
    sides = []
    for side in text.split(" → "):
        tokens = side.split("|")
        kept = [t for t in tokens if all(ord(c) in chars or c.isspace() for c in t)]
        sides.append("|".join(kept) if kept else "?")
    return " → ".join(sides)


def _short(nid: str, d: dict) -> str:
    """A node's label (tokens the font cannot draw left out, truncated to ``MAX_LABEL``), or its id
    without the position (the column shows it)."""
    text = _drawable(str(d["label"])) if d.get("label") else str(nid).partition("@")[0]
    return text if len(text) <= MAX_LABEL else text[:MAX_LABEL - 1] + "…"


def select_drawn(circuit: Circuit, max_nodes: int | None) -> list[str]:
    """The nodes to draw: all, or the metric and the ``max_nodes`` of largest |effect|."""
    g = circuit.graph
    nodes = [n for n, d in g.nodes(data=True) if d.get("kind") != "metric"]
    if max_nodes is not None and len(nodes) > max_nodes:
        nodes = sorted(nodes, key=lambda n: -abs(float(g.nodes[n].get("effect", 0.0))))[:max_nodes]
    return nodes + [n for n, d in g.nodes(data=True) if d.get("kind") == "metric"]


def circuit_layout(circuit: Circuit, nodes: list[str] | None = None) -> tuple[dict[str, tuple[float, float]], dict]:
    """(x, y) for every node and facts about the grid (``rows``, ``positions``, ``cell``)."""
    g = circuit.graph
    nodes = list(g.nodes) if nodes is None else nodes
    body = [n for n in nodes if g.nodes[n].get("kind") != "metric"]
    positions = sorted({int(g.nodes[n].get("position", -1)) for n in body} - {-1})
    positional = bool(positions)
    col_of = {p: i for i, p in enumerate(positions)} if positional else {}
    n_cols = max(1, len(positions))
    cells: dict[tuple[int, int], list[str]] = {}
    for n in body:
        d = g.nodes[n]
        row = site_row(str(d["site"]))
        pos = int(d.get("position", -1))
        col = col_of.get(pos, 0) if positional else 0
        cells.setdefault((row, col), []).append(n)
    top = max((r for r, _ in cells), default=0)
    per_cell = max((len(v) for v in cells.values()), default=1)
    xy: dict[str, tuple[float, float]] = {}
    for (row, col), members in cells.items():
        members.sort(key=lambda n: (g.nodes[n].get("kind") == "error", int(g.nodes[n].get("feature", -1))))
        k = len(members)
        step = 0.9 / max(per_cell, 1)
        for i, n in enumerate(members):
            xy[n] = (col + 0.5 + (i - (k - 1) / 2) * step, float(row))
    metric_row = top + 1
    for n in nodes:
        if g.nodes[n].get("kind") == "metric":
            xy[n] = ((n_cols - 0.5) if positional else 0.5, float(metric_row))
    return xy, {"rows": sorted({r for r, _ in cells}), "metric_row": metric_row, "positions": positions,
                "n_cols": n_cols, "per_cell": per_cell}


def _title(circuit: Circuit, shown: int) -> str:
    prov = circuit.provenance
    task = prov.get("task")
    if isinstance(task, dict):
        task = task.get("name") or task.get("path")
    method = prov.get("method")
    method = METHOD_LABELS.get(str(method), str(method)) if method else "?"
    name = Path(str(task)).stem if task else "circuit"  # a task file by its short name
    line1 = name
    bits = [f"{method} · {circuit.n_nodes} nodes, {circuit.n_edges} edges"]
    bits += [str(prov[k]) for k in ("model", "dictionaries") if prov.get(k)]
    if prov.get("aggregation"):
        bits.append(f"aggregation {prov['aggregation']}")
    line2 = " · ".join(bits)
    if shown < circuit.n_nodes:
        line2 = (line2 + " · " if line2 else "") + f"showing the {shown} nodes of largest |effect|"
    return line1 + ("\n" + line2 if line2 else "")


def draw_circuit(circuit: Circuit, path_stem: str | Path, max_nodes: int | None = 200,
                 formats: tuple[str, ...] = ("png", "svg"), n_labels: int = 20,
                 title: str | None = None) -> list[Path]:
    """Draw ``circuit`` and save ``<path_stem>.png`` and ``.svg``; returns the paths.
    (``path_stem`` may end in ``.png``/``.svg``: that suffix is replaced per format.)

    ``max_nodes``: draw at most this many nodes (largest |effect|; the title says so);
    ``n_labels``: name the nodes of largest |effect| (their ``label`` or id)."""
    if not distributed.is_writer():  # under torchrun rank 0 alone writes
        return []
    from matplotlib.collections import LineCollection
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    g = circuit.graph
    nodes = select_drawn(circuit, max_nodes)
    shown = sum(1 for n in nodes if g.nodes[n].get("kind") != "metric")
    xy, grid = circuit_layout(circuit, nodes)
    drawn = set(nodes)

    body = [n for n in nodes if g.nodes[n].get("kind") != "metric"]
    edges = [(u, v, float(w)) for u, v, w in g.edges(data="weight", default=0.0) if u in drawn and v in drawn]
    wmax = max((abs(w) for _, _, w in edges), default=0.0) or 1.0

    n_rows = grid["metric_row"] + 1
    width = min(26.0, max(7.0, 2.5 + 0.2 * grid["per_cell"] * grid["n_cols"]))
    height = min(22.0, max(4.5, 1.6 + 0.26 * n_rows))
    fig = Figure(figsize=(width, height))
    ax = fig.add_subplot(1, 1, 1)

    # layer bands: shade every other model layer
    for layer_start in range(1, grid["metric_row"] - 1, 6):
        ax.axhspan(layer_start - 0.5, layer_start + 2.5, color="#f2f2f2", zorder=0, lw=0)

    if edges:
        edges.sort(key=lambda t: abs(t[2]))
        segs, colours, widths = [], [], []
        for u, v, w in edges:
            s = abs(w) / wmax
            segs.append([xy[u], xy[v]])
            rgb = POSITIVE if w >= 0 else NEGATIVE
            colours.append(_rgba(rgb, 0.08 + 0.8 * s))
            widths.append(0.3 + 2.4 * s)
        ax.add_collection(LineCollection(segs, colors=colours, linewidths=widths, zorder=1))

    # marker area (pt^2): at most what the spacing of the fullest cell leaves
    pt_per_unit = 0.7 * width * 72 / grid["n_cols"]
    d_max = min(16.7, 0.85 * pt_per_unit * 0.9 / max(grid["per_cell"], 1))
    s_max = d_max ** 2
    s_min = min(18.0, 0.3 * s_max)
    # features and error nodes on their own scales: one sign colour map each
    scales = {}
    for group, kinds, cmap in (("feature", ("feature", "embed"), "RdBu"), ("error", ("error",), "PuOr")):
        members = [n for n in body if g.nodes[n].get("kind") in kinds]
        top = max((abs(float(g.nodes[n].get("effect", 0.0))) for n in members), default=0.0) or 1.0
        scales[group] = (members, TwoSlopeNorm(vmin=-top, vcenter=0.0, vmax=top), cmap, top)
    radius: dict[str, float] = {}
    mappables = {}
    for group, (members, norm, cmap, top) in scales.items():
        if not members:
            continue
        eff = [float(g.nodes[n].get("effect", 0.0)) for n in members]
        sizes = [s_min + (s_max - s_min) * math.sqrt(abs(e) / top) for e in eff]
        radius.update({n: math.sqrt(a) / 2 for n, a in zip(members, sizes)})
        for marker, kinds in (("o", ("feature", "embed")), ("s", ("error",))):
            idx = [i for i, n in enumerate(members) if g.nodes[n].get("kind") in kinds]
            if idx:
                mappables[group] = ax.scatter(
                    [xy[members[i]][0] for i in idx], [xy[members[i]][1] for i in idx], s=[sizes[i] for i in idx],
                    c=[eff[i] for i in idx], cmap=cmap, norm=norm, marker=marker, edgecolors="#333333",
                    linewidths=0.9 if marker == "s" else 0.4, zorder=3)
    metric = [n for n in nodes if g.nodes[n].get("kind") == "metric"]
    if metric:
        ax.scatter([xy[n][0] for n in metric], [xy[n][1] for n in metric], s=320, marker="*", c="#222222",
                   zorder=4)
        for n in metric:
            ax.annotate("metric", xy[n], xytext=(8, 0), textcoords="offset points", fontsize=8, va="center")

    # name the strongest features (by label) first, then error nodes if room is left; the text
    # starts past the marker's radius, neighbours in a row alternate above / below
    by_effect = sorted(body, key=lambda n: -abs(float(g.nodes[n].get("effect", 0.0))))
    named = [n for n in by_effect if g.nodes[n].get("kind") != "error"][:n_labels]
    named += [n for n in by_effect if g.nodes[n].get("kind") == "error"][:max(0, n_labels - len(named))]
    by_row: dict[float, list[str]] = {}
    for n in named:
        by_row.setdefault(xy[n][1], []).append(n)
    for row in by_row.values():
        for i, n in enumerate(sorted(row, key=lambda n: xy[n][0])):
            up = i % 2 == 0
            off = radius.get(n, 3.0) + 2.0
            ax.annotate(_short(n, g.nodes[n]), xy[n], xytext=(0, off if up else -off), textcoords="offset points",
                        fontsize=5.5, ha="center", va="bottom" if up else "top", zorder=5, color="#111111",
                        bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7})

    # axes: rows named by site, columns by position
    row_names = {}
    for n in body:
        row_names[site_row(str(g.nodes[n]["site"]))] = str(g.nodes[n]["site"])
    ticks = sorted(row_names) + [grid["metric_row"]]
    ax.set_yticks(ticks)
    ax.set_yticklabels([row_names.get(r, "metric") for r in ticks], fontsize=7)
    ax.set_ylim(-0.8, grid["metric_row"] + 0.8)
    if grid["positions"]:
        tokens = circuit.provenance.get("prompt_tokens")
        labels = [repr(str(tokens[p])) if isinstance(tokens, (list, tuple)) and p < len(tokens) else f"t{p}"
                  for p in grid["positions"]]
        ax.set_xticks([i + 0.5 for i in range(len(labels))])
        ax.set_xticklabels(labels, fontsize=7, rotation=45 if len(labels) > 8 else 0)
        for i in range(1, grid["n_cols"]):
            ax.axvline(i, color="#dddddd", lw=0.6, zorder=0)
        ax.set_xlabel("token position")
    else:
        ax.set_xticks([])
        ax.set_xlabel("features (summed over positions)")
    ax.set_xlim(0, grid["n_cols"])
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)

    handles = [
        Line2D([], [], marker="o", ls="", color="#888888", markeredgecolor="#333333", label="feature"),
        Line2D([], [], marker="s", ls="", color="#888888", markeredgecolor="#333333", label="error node"),
        Line2D([], [], marker="*", ls="", color="#222222", markersize=11, label="metric"),
        Line2D([], [], color=POSITIVE, lw=2, label="positive edge"),
        Line2D([], [], color=NEGATIVE, lw=2, label="negative edge"),
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False,
              title="size, colour: effect (features and\nerror nodes on separate scales)\nopacity, width: |weight|",
              title_fontsize=7)
    for i, (group, label) in enumerate((("feature", "feature effect"), ("error", "error-node effect"))):
        if group in mappables:
            cb = fig.colorbar(mappables[group], ax=ax, fraction=0.025, pad=0.12 + 0.08 * i, shrink=0.45,
                              anchor=(0.0, 0.0))
            cb.set_label(label, fontsize=7)
            cb.ax.tick_params(labelsize=6)
    ax.set_title(title or _title(circuit, shown), fontsize=9)
    stem = Path(path_stem)
    if stem.suffix and stem.suffix.lstrip(".").lower() not in ("png", "svg", "pdf"):
        stem = stem.with_name(stem.name + ".x")  # keep "a.b" whole: save_figure swaps the last suffix
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG text as <text>, searchable and editable
        return save_figure(fig, stem, formats=tuple(formats))


def _rgba(hex_colour: str, alpha: float) -> tuple[float, float, float, float]:
    h = hex_colour.lstrip("#")
    return (int(h[0:2], 16) / 255, int(h[2:4], 16) / 255, int(h[4:6], 16) / 255, max(0.0, min(1.0, alpha)))
