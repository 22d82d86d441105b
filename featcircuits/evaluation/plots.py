"""The picture of faithfulness and completeness curves."""

from __future__ import annotations

def plot_curves(result: dict, path_stem, title: str = "") -> list:
    """Faithfulness and completeness vs number of nodes (log x), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting import METHOD_LABELS, method_color, save_figure

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    order = [m for m in ("relp", "relp+ah", "ig", "atp", "exact", "random") if m in result["methods"]]
    order += [m for m in result["methods"] if m not in order]
    for ax, key, label in ((axes[0], "faithfulness", "faithfulness  (F(C) − F(∅)) / (F(M) − F(∅))"),
                           (axes[1], "completeness", "completeness  (faithfulness of M ∖ C)")):
        for m in order:
            c = result["methods"][m]
            kw = dict(color=method_color(m), label=METHOD_LABELS.get(m, m), marker="o", markersize=3, lw=1.6)
            if m == "random":
                kw.update(ls="--")
                lo = [a - s for a, s in zip(c[key], c[f"{key}_std"])]
                hi = [a + s for a, s in zip(c[key], c[f"{key}_std"])]
                ax.fill_between(c["n_nodes"], lo, hi, color=method_color(m), alpha=0.2, lw=0)
            ax.plot(c["n_nodes"], c[key], **kw)
        ax.axhline(1.0, color="#bbbbbb", lw=0.8, ls=":")
        ax.axhline(0.0, color="#bbbbbb", lw=0.8, ls=":")
        if key == "faithfulness":
            ax.axhline(0.8, color="#dddddd", lw=0.8, ls="-.")
        ax.set_xscale("log")
        ax.set_xlabel("nodes in circuit (features + error nodes, log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.25, which="both")
        ax.legend(fontsize=8)
    s = result["settings"]
    sub = (f"{s['ablation']} ablation, errors {s['errors']}, aggregation {s['aggregation']}, "
           f"n_disc {s['n_discovery']}, n_eval {s['n_eval']}")
    fig.suptitle(f"{title}\n{sub}" if title else sub, fontsize=10)
    fig.tight_layout()
    paths = save_figure(fig, path_stem)
    plt.close(fig)
    return paths
