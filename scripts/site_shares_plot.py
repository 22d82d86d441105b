#!/usr/bin/env python
"""Recovered share per residual site, one line per SAE set: where each set loses a task's behaviour.

Reads the ``sae_report.py`` JSON of each set (``results/starter_targets/LABEL-saes.json``) and
plots, per task, the share of the clean-vs-zero-ablation gap kept when one residual site's SAE
replaces the activation without its error term (sae_report's ``recovered``) against the layer.
Sites where zero-ablation moves the metric by less than one logit have no share (sae_report leaves
it out) and are left as gaps: #16's "no resid site below 0.5" is judged only where there is a line.

    .venv/bin/python scripts/site_shares_plot.py v3 v5 v6
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from starter_targets import MIN_GAP, T_RESID_MIN  # noqa: E402  (the #16 target and sae_report's gap, defined once)

ROOT = Path(__file__).resolve().parent.parent


def resid_shares(report: dict, task: str) -> tuple[list[int], list[float | None]]:
    """(layers, recovered share or None) of the resid sites of one task, in layer order."""
    sites = {int(name.split("_")[1]): row["recovered"] for name, row in report["tasks"][task]["sites"].items()
             if name.startswith("resid_")}
    layers = sorted(sites)
    return layers, [sites[i] for i in layers]


def plot(reports: dict[str, dict], tasks: list[str], path: Path) -> None:
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.6), sharey=True, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for label, report in reports.items():
            layers, shares = resid_shares(report, task)
            ys = [float("nan") if s is None else s for s in shares]
            ax.plot(layers, ys, marker="o", ms=3.5, lw=1.4, label=label)
        ax.axhline(T_RESID_MIN, color="grey", ls="--", lw=0.9)
        ax.set_title(f"{task}: resid sites")
        ax.set_xlabel("layer")
        ax.set_xticks(range(0, max(layers) + 1, 2))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("recovered share (SAE, no error term)")
    axes[0][0].set_ylim(min(-0.2, axes[0][0].get_ylim()[0]), 1.15)
    axes[0][-1].legend(title="set", fontsize=8)
    fig.text(0.01, 0.01, f"dashed: the {T_RESID_MIN:g} target; gaps: zero-ablation moves the metric < {MIN_GAP:g} logit "
             "(not judged). scripts/site_shares_plot.py", fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("labels", nargs="+", help="sets by label: results/starter_targets/LABEL-saes.json")
    ap.add_argument("--dir", default=str(ROOT / "results" / "starter_targets"))
    ap.add_argument("--tasks", nargs="+", default=["sva-simple", "ioi"])
    ap.add_argument("--out", default=None, help="PNG (default DIR/site_shares.png)")
    args = ap.parse_args()
    folder = Path(args.dir)
    missing = [lb for lb in args.labels if not (folder / f"{lb}-saes.json").is_file()]
    if missing:
        raise SystemExit(f"no {', '.join(f'{lb}-saes.json' for lb in missing)} in {folder}; "
                         "write one with scripts/sae_report.py --out and copy its saes.json there")
    reports = {lb: json.loads((folder / f"{lb}-saes.json").read_text()) for lb in args.labels}
    absent = [(lb, t) for lb, r in reports.items() for t in args.tasks if t not in r["tasks"]]
    if absent:
        raise SystemExit("no task " + ", ".join(f"{t} in {lb}-saes.json" for lb, t in absent))
    out = Path(args.out) if args.out else folder / "site_shares.png"
    plot(reports, args.tasks, out)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
