#!/usr/bin/env python
"""Do a set's SAEs keep IOI with names it was not built around? results/starter_targets/held_out_names.md

For each set and site: the share of IOI kept when that one site's SAE replaces the activation
without its error term (the ``saes.md`` measure, ``sae_report.site_metrics``), on the task's own
names (``ioi``) and on ``tasks.HELD_OUT_NAMES`` (16 given names that are neither the task's nor
among the names the model's samples open with or ``--name-swaps`` draws from). A recipe that
gains on the first but not the second learned the names, not the mechanism.

Usage: .venv/bin/python scripts/held_out_names.py --saes starter starter-v4 [--sites resid]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from featcircuits.dictionaries import load_dictionary_set  # noqa: E402
from featcircuits.io import atomic_write  # noqa: E402
from featcircuits.metric import metric  # noqa: E402
from featcircuits.models import load_model  # noqa: E402
from featcircuits.tasks import HELD_OUT_NAMES, ioi_pairs, make_pairs, tokenize_pairs  # noqa: E402
from featcircuits.tracing import SplicedModel  # noqa: E402
from sae_report import recovered, site_metrics  # noqa: E402


def measure(model, set_names: list[str], site_filter: str, pairs: int, seed: int) -> dict:
    spliced = SplicedModel(model)
    bos = model.tokenizer.bos_token_id
    batches = {"ioi": tokenize_pairs(make_pairs("ioi", pairs, seed), model.tokenizer)[0],
               "ioi-held-out-names": tokenize_pairs(ioi_pairs(HELD_OUT_NAMES, pairs, seed), model.tokenizer)[0]}
    with torch.no_grad():
        clean = {t: float(metric(spliced.run(b.inputs("clean")), b.clean_answer, b.patch_answer).mean())
                 for t, b in batches.items()}
    out = {"pairs": {t: len(b) for t, b in batches.items()}, "clean": clean, "sets": {}}
    for name in set_names:
        dset = load_dictionary_set(name, model.adapter)
        # a partial set (a run trained at a few sites) is measured where it has dictionaries
        sites = [s for s in model.adapter.sites() if s.name.startswith(site_filter) and s.name in dset
                 and s.name not in dset.meta.get("identity_sites", [])]
        if not sites:
            raise SystemExit(f"{name} has no dictionary at a site starting with {site_filter!r}")
        print(f"{name}: {len(sites)} sites ({sites[0].name} .. {sites[-1].name})", flush=True)
        rows = {}
        for s in sites:
            row = {}
            for t, b in batches.items():
                m = site_metrics(spliced, b, s, dset[s.name], bos)
                row[t] = {"sae": m["sae"], "zero": m["zero"], "recovered": recovered(m["sae"], clean[t], m["zero"])}
            rows[s.name] = row
            print(f"{name} {s.name}: " + ", ".join(f"{t} {_f(r['recovered'])}" for t, r in row.items()), flush=True)
        out["sets"][name] = {"sha256": dset.meta.get("set", {}).get("sha256", ""), "sites": rows}
    return out


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def render(res: dict, command: str) -> str:
    sets = list(res["sets"])
    sites = list(dict.fromkeys(site for r in res["sets"].values() for site in r["sites"]))  # union, first set's order first
    lines = [
        "# IOI with held-out names: does a set keep names it was not built around?",
        "",
        f"Written by `{command}`. Share of the clean-vs-zero-ablation gap kept when one site's SAE "
        "replaces the activation without its error term (as in `saes.md`), on `ioi` (the task's 16 "
        f"names) and on IOI with 16 held-out names ({', '.join(HELD_OUT_NAMES)}: neither the task's nor "
        "among the 120 names the model's samples open with or `--name-swaps` draws from); "
        f"{res['pairs']['ioi']} / {res['pairs']['ioi-held-out-names']} pairs, clean metric "
        f"{res['clean']['ioi']:+.2f} / {res['clean']['ioi-held-out-names']:+.2f}; n/a where zero-ablation "
        "moves the metric by < 1 logit.",
        "",
        "| site | " + " | ".join(f"{s}: ioi | {s}: held-out names" for s in sets) + " |",
        "|---|" + "---|---|" * len(sets),
    ]
    for site in sites:
        cells = []
        for s in sets:
            r = res["sets"][s]["sites"].get(site, {})
            cells += [_f(r.get("ioi", {}).get("recovered")), _f(r.get("ioi-held-out-names", {}).get("recovered"))]
        lines.append(f"| {site} | " + " | ".join(cells) + " |")
    lines += ["", "Sites below 0.5 (of those where zero-ablation moves the metric by ≥ 1 logit):", ""]
    for s in sets:
        for t in ("ioi", "ioi-held-out-names"):
            below = [f"{site} {v:.2f}" for site, r in res["sets"][s]["sites"].items()
                     if (v := r[t]["recovered"]) is not None and v < 0.5]
            lines.append(f"- {s}, {t}: {len(below)}" + (f" ({', '.join(below)})" if below else ""))
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--saes", nargs="+", default=["starter"], help="registered set names or folders")
    ap.add_argument("--sites", default="resid", help="sites whose name starts with this (resid, attn, mlp, ...)")
    ap.add_argument("--model", default="gemma-3-270m-offline")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1, help="task seed (discovery uses 0; this is held out)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "results" / "starter_targets"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    res = measure(load_model(args.model), args.saes, args.sites, args.pairs, args.seed)
    command = ".venv/bin/python scripts/held_out_names.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    for path, text in ((out / "held_out_names.json", json.dumps(res, indent=1)),
                       (out / "held_out_names.md", render(res, command))):
        atomic_write(path, lambda tmp, text=text: tmp.write_text(text))
    print(f"wrote {out / 'held_out_names.md'} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
