"""The benchmark plots (PNG + SVG)."""

from __future__ import annotations

from pathlib import Path

from .targets import MODEL_NAMES


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, stem: Path) -> str:
    """Write the figure as PNG + SVG, close it, and return the file stem's name."""
    from featcircuits.plotting import save_figure

    save_figure(fig, stem)
    _plt().close(fig)
    return stem.name


def _color(name: str) -> str:
    from featcircuits.plotting import METHOD_COLORS

    if name.startswith("ig"):
        return METHOD_COLORS["ig"]
    if name.startswith("exact"):
        return METHOD_COLORS["exact"]
    return METHOD_COLORS.get(name, "#999999")


def plot_nodes(key: str, m: dict, out: Path) -> str:
    plt = _plt()
    items = m["nodes"]["items"]
    order = ["hf_body", "hf_forward", "unembed_forward", "unembed_fwd_bwd", "unembed_fwd_bwd_strided",
             "trace_bare", "spliced_forward", "spliced_forward_default_threads", "spliced_fwd_bwd", "atp", "relp",
             "ig5", "ig10", "ig20", "exact_components"]
    names, vals, cols, hatch = [], [], [], []
    for n in order:
        if n not in items:
            continue
        v = items[n].get("extrapolated_wall_s") or items[n]["median_wall_s"]
        names.append(n + (" (extrapolated)" if items[n].get("extrapolated_wall_s") else ""))
        vals.append(v)
        cols.append(_color(n) if n in ("atp", "relp") or n.startswith(("ig", "exact")) else "#bbbbbb")
    ex = items.get("exact_features_sample")
    if ex and ex.get("extrapolated_all_nodes_wall_s"):
        names.append("exact, every feature (extrapolated)")
        vals.append(ex["extrapolated_all_nodes_wall_s"])
        cols.append("#222222")
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(names) + 1.2))
    y = range(len(names))
    ax.barh(list(y), vals, color=cols)
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    fwd = items["spliced_forward"]["median_wall_s"]
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.3g} s ({v / fwd:.3g}x fwd)", va="center", fontsize=8)
    ax.set_xlabel(f"wall seconds for n={m['nodes']['n']} examples (median of rounds, log scale)")
    ax.set_title(f"Node effects and the floor: {MODEL_NAMES.get(key, key)}")
    ax.set_xlim(right=max(vals) * 30)
    return _save(fig, out / f"nodes_{key}")


def plot_edges(key: str, m: dict, out: Path) -> str:
    plt = _plt()
    sw = m["edges"]["vs_downstream_nodes"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = [p["downstream_nodes"] for p in sw]
    ax.plot(ks, [p["batched"]["median_wall_s"] for p in sw], "o-", color="#0072B2", label="batched VJPs")
    ax.plot(ks, [p["one_backward_per_node"]["median_wall_s"] for p in sw], "s--", color="#D55E00",
            label="one backward per downstream node")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("downstream nodes (by |RelP effect|, 1 to the full circuit)")
    ax.set_ylabel("wall seconds (RelP edges)")
    ax.set_title(f"Edges: {MODEL_NAMES.get(key, key)}, n={m['nodes']['n']}")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out / f"edges_{key}")


def plot_scaling(key: str, m: dict, out: Path, which: str) -> str:
    plt = _plt()
    pts = m[which]["points"]
    special = []  # identity dictionaries: drawn as separate markers, not on the width line
    if which == "scaling_n":
        xlabel = "examples n"
        line = pts
        xs = [p["n"] for p in line]
    else:
        xlabel = "dictionary width (features per site)"
        line = [p for p in pts if not p["label"].startswith("identity")]
        special = [p for p in pts if p["label"].startswith("identity")]
        xs = [max(p["widths"]) for p in line]
    names = [n for n in ("spliced_forward", "atp", "relp", "discover_relp", "ig10") if n in pts[0]["items"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for n in names:
        col = "#999999" if n == "spliced_forward" else _color(n.replace("discover_", ""))
        style = "--" if n.startswith("discover") else "-"
        for ax_, field in ((a1, "median_wall_s"), (a2, "median_rss_growth_mib")):
            ax_.plot(xs, [p["items"][n][field] for p in line], style, marker="o", color=col, label=n)
            for p in special:
                ax_.plot([max(p["widths"])], [p["items"][n][field]], marker="x", markersize=9, color=col,
                         linestyle="none", label=f"{n}, {p['label']}" if ax_ is a1 and n == "relp" else None)
    for a in (a1, a2):
        a.set_xscale("log")
        a.set_xlabel(xlabel)
        a.grid(alpha=0.3, which="both")
    if which == "scaling_width" and line:
        a1.set_title(f"{line[0]['label'].rsplit(' ', 1)[0]} sets (o); x = identity", fontsize=9)
    a1.set_yscale("log")
    a1.set_ylabel("wall seconds (median)")
    a2.set_ylabel("RSS growth during the call (MiB)")
    a1.legend(fontsize=8)
    title = "examples" if which == "scaling_n" else "dictionary width"
    fig.suptitle(f"Scaling with {title}: {MODEL_NAMES.get(key, key)}")
    return _save(fig, out / f"{which}_{key}")


def plot_discover(key: str, m: dict, out: Path) -> str:
    plt = _plt()
    d = m["discover"]["items"]
    names = list(d)
    nodes = [d[n]["circuit"]["seconds"]["nodes"] for n in names]
    edges = [d[n]["circuit"]["seconds"]["edges"] for n in names]
    ub = m["discover"].get("ratio_relp_over_ig_upper_bound")
    if ub and not any(n.startswith("ig") for n in d):
        names.append(f"ig{m['discover'].get('ig_steps', 10)} (nodes only, no edges: a lower bound)")
        nodes.append(ub["ig_nodes_s"])
        edges.append(0.0)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(names, nodes, color=[_color(n) for n in names], label="nodes")
    ax.barh(names, edges, left=nodes, color=[_color(n) for n in names], alpha=0.5, label="edges")
    if max(nodes) / max(min(a + b for a, b in zip(nodes, edges)), 1e-9) > 30:
        ax.set_xscale("log")
        ax.set_xlim(left=min(nodes) * 0.3)
    for i, n in enumerate(names):
        ax.text(nodes[i] + edges[i], i, f" {nodes[i] + edges[i]:.3g} s", va="center", fontsize=8)
    ax.set_xlabel(f"wall seconds (first run), n={m['discover']['n']}; dark = nodes, light = edges")
    ax.set_title(f"Full discover: {MODEL_NAMES.get(key, key)}")
    ax.set_xlim(right=max(a + b for a, b in zip(nodes, edges)) * (3 if ax.get_xscale() == "log" else 1.25))
    return _save(fig, out / f"discover_{key}")
