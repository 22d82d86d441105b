#!/usr/bin/env python
"""Where a set's error nodes hold a task's effect: results/starter_targets/error_sites-LABEL.md

#16 asks that error nodes hold at most a quarter of the top-100 circuit's |effect|. This says
where they do not, per site and per kind of position, two ways:

- RelP (two-point rules, which conserve the clean-minus-counterfactual metric difference at each
  layer cut): per site, the error node's share of the site's signed effect, split into the
  positions where the clean and counterfactual tokens differ (IOI: the subject's second mention;
  SVA: the subject noun), the last position, and the rest. Computed pair by pair, so the top-100
  error share is also given per pair (each pair's own top 100), next to the pooled top-100 that
  ``starter_targets.py`` scores: if the pooled share were high only because features of different
  names split the mean effect while one error node per site adds it up, the per-pair share
  would be low.
- exactly: the share of the metric difference that survives when one site's SAE replaces the
  activation *without its error term* on both the clean and the counterfactual prompts (every
  real token but BOS, as in ``saes.md``). ``saes.md``'s recovered share asks only whether the
  clean prompt's metric survives; this asks whether the *difference* does, which is what the
  error node's effect measures (to first order, error share ≈ 1 - difference kept).

Usage: .venv/bin/python scripts/error_sites.py --saes starter --label v3 [--tasks ioi sva-rc]
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

from featcircuits.attribution import node_effects  # noqa: E402
from featcircuits.dictionaries import load_dictionary_set  # noqa: E402
from featcircuits.evaluation.masks import candidate_effects, evaluated_sites  # noqa: E402
from featcircuits.io import atomic_write  # noqa: E402
from featcircuits.metric import metric  # noqa: E402
from featcircuits.models import load_model  # noqa: E402
from featcircuits.nodes import NodeSpace  # noqa: E402
from featcircuits.tasks import Batch, make_pairs, tokenize_pairs  # noqa: E402
from featcircuits.tracing import SplicedModel  # noqa: E402
from starter_targets import error_share  # noqa: E402

ROLES = ("changed", "last", "other")
TOP = 100
# Sites whose |RelP effect| is below this share of the metric difference are left out of the
# table (their error share divides by almost nothing); the totals still count them.
MIN_SITE_SHARE = 0.05


def roles(batch: Batch) -> dict[str, torch.Tensor]:
    """Per example and position: where the clean and counterfactual tokens differ, the last
    position, and the other real tokens ([b, T] bool each)."""
    real = batch.clean_mask.bool()
    changed = (batch.clean_ids != batch.patch_ids) & real
    last = torch.zeros_like(real)
    last[:, -1] = True  # prompts are left-padded: the last column is every prompt's last token
    changed &= ~last
    return {"changed": changed, "last": last, "other": real & ~changed & ~last}


def relp_split(sm: SplicedModel, batch: Batch, sites) -> dict:
    """Pair by pair: per site and role, summed feature and error effect (mean over pairs), the
    pooled effects, and each pair's own top-100 error share."""
    split = {s.name: {r: [0.0, 0.0] for r in ROLES} for s in sites}
    pooled: dict = {}
    per_pair = []
    for i in range(len(batch)):
        one = batch.select([i])
        ne = node_effects(sm, one, "relp", batch_size=1, progress=False)
        where = {r: m[0] for r, m in roles(one).items()}
        full = ne.mean("none")
        for s in sites:
            v = full[s.name]
            for r, m in where.items():
                split[s.name][r][0] += float(v.f[m].sum()) / len(batch)
                split[s.name][r][1] += float(v.err[m].sum()) / len(batch)
        summed = ne.mean("sum")  # one aggregation per pair (it covers every site)
        eff = {s.name: summed[s.name] for s in sites}
        pooled = eff if not pooled else {k: pooled[k] + eff[k] for k in eff}
        scores, space = candidate_effects(eff, sites)
        per_pair.append(error_share(eff, space.unflatten(NodeSpace.top_k(scores, TOP))))
        print(f"\r  relp pair {i + 1}/{len(batch)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    pooled = {k: v / len(batch) for k, v in pooled.items()}
    scores, space = candidate_effects(pooled, sites)
    top = space.unflatten(NodeSpace.top_k(scores, TOP))
    return {"split": split, "pooled_error_share": error_share(pooled, top),
            "pooled_error_nodes": int(sum(int(top[s].err.sum()) for s in top)),
            "per_pair_error_share": per_pair}


def metric_difference(sm: SplicedModel, batch: Batch, hook=None, sites=None) -> float:
    """Mean metric on the clean prompts minus on the counterfactual ones (one forward for both),
    with ``hook`` at ``sites`` if given."""
    inputs = {"input_ids": torch.cat([batch.clean_ids, batch.patch_ids]),
              "attention_mask": torch.cat([batch.clean_mask, batch.patch_mask])}
    with torch.no_grad():
        m = metric(sm.run(inputs, hook, sites), batch.clean_answer.repeat(2), batch.patch_answer.repeat(2))
    return float(m[:len(batch)].mean() - m[len(batch):].mean())


def difference_kept(sm: SplicedModel, batch: Batch, site, bos: int, plain: float, dictionary=None) -> float:
    """Metric difference with ``site``'s SAE (``dictionary``, default the spliced set's) replacing
    the activation without its error term on both prompts, over ``plain``, the same difference
    of the unspliced model."""
    d = sm.dictionary(site) if dictionary is None else dictionary
    ids = torch.cat([batch.clean_ids, batch.patch_ids])
    keep = (torch.cat([batch.clean_mask, batch.patch_mask]).bool() & (ids != bos)).unsqueeze(-1)

    def hook(_, x):
        return torch.where(keep, d.decode(d.encode(x)).to(x.dtype), x)

    return metric_difference(sm, batch, hook, [site]) / plain


def measure(sm: SplicedModel, task: str, n: int, bos: int) -> dict:
    """Both measures on ``n`` discovery pairs of ``task`` (seed 0, as ``starter_targets.py``)."""
    t0 = time.perf_counter()
    batch, dropped = tokenize_pairs(make_pairs(task, n, 0), sm.model.tokenizer)
    sites = evaluated_sites(sm)
    r = relp_split(sm, batch, sites)
    plain = metric_difference(sm, batch)
    kept = {s.name: difference_kept(sm, batch, s, bos, plain) for s in sites}
    r.update({"task": task, "pairs": len(batch), "dropped": len(dropped),
              "metric_difference": plain, "difference_kept": kept,
              "seconds": round(time.perf_counter() - t0, 1)})
    return r


def _pct(x: float) -> str:
    return f"{x:.0%}"


def render(label: str, saes: str, results: list[dict]) -> str:
    lines = [f"# Where the error nodes hold the effect: {label}", "",
             f"`.venv/bin/python scripts/error_sites.py --saes {saes} --label {label} --tasks "
             f"{' '.join(r['task'] for r in results)}` (discovery pairs, seed 0, as `starter_targets.py`).", "",
             "Per site, RelP (two-point) effects of the features and of the error node, in logits of the behaviour "
             "(counterfactual-minus-clean metric; at every residual site they add up to all of it), summed over "
             "positions of each kind and averaged over pairs; *error share* = error / (features + error). "
             "*changed*: tokens that differ between the clean and the counterfactual prompt (when the last token "
             "is the one that differs, as in sva-simple, it counts as *last*). *kept*: the share of the behaviour "
             "left when this one site's SAE replaces the activation without its error term on both prompts "
             "(exact; 1 = all of it; to first order 1 - error share). Sites with under "
             f"{MIN_SITE_SHARE:.0%} of the behaviour are left out, and so are shares of parts under that.", ""]
    for r in results:
        gap = -r["metric_difference"]  # the metric is logit[counterfactual] - logit[clean]: the behaviour is its rise
        pp = sorted(r["per_pair_error_share"])
        lines += [f"## {r['task']} ({r['pairs']} pairs)", "",
                  f"Behaviour (metric counterfactual - clean): {gap:+.2f} logits. "
                  f"Top-{TOP} error share: pooled {_pct(r['pooled_error_share'])} ({r['pooled_error_nodes']} error nodes); "
                  f"each pair's own top {TOP}: median {_pct(pp[len(pp) // 2])} "
                  f"(range {_pct(pp[0])}-{_pct(pp[-1])}).", "",
                  "| site | effect | error share | at changed tokens: effect / error share | "
                  "at the last token | elsewhere | kept (exact) |",
                  "|---|---|---|---|---|---|---|"]
        for site, by_role in r["split"].items():
            tot = sum(f + e for f, e in by_role.values())
            if abs(tot) < MIN_SITE_SHARE * abs(gap):
                continue
            err = sum(e for _, e in by_role.values())
            cells = []
            for role in ROLES:
                f, e = by_role[role]
                share = _pct(e / (f + e)) if abs(f + e) >= MIN_SITE_SHARE * abs(gap) else "–"
                cells.append(f"{f + e:+.2f} / {share}")
            kept = r["difference_kept"].get(site)
            lines.append(f"| {site} | {tot:+.2f} | {_pct(err / tot)} | " + " | ".join(cells)
                         + f" | {'–' if kept is None else f'{kept:.2f}'} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--saes", default="starter")
    ap.add_argument("--model", default="gemma-3-270m-offline")
    ap.add_argument("--label", default=None, help="name of this measurement (default: the set's name)")
    ap.add_argument("--tasks", nargs="+", default=["ioi", "sva-rc"])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "results" / "starter_targets"))
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from this label's .json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.render:
        if args.label is None or not (out / f"error_sites-{args.label}.json").is_file():
            raise SystemExit(f"--render needs --label of a measurement in {out}")
        meta = json.loads((out / f"error_sites-{args.label}.json").read_text())
        atomic_write(out / f"error_sites-{args.label}.md", lambda p: p.write_text(render(args.label, meta["saes"], meta["tasks"])))
        return 0
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    dicts = load_dictionary_set(args.saes, model.adapter, args.model)
    sm = SplicedModel(model, dicts)
    label = args.label or dicts.name
    results = []
    for task in args.tasks:
        r = measure(sm, task, args.n, model.tokenizer.bos_token_id)
        print(f"{task}: top-{TOP} error share pooled {r['pooled_error_share']:.0%}, per pair median "
              f"{sorted(r['per_pair_error_share'])[len(r['per_pair_error_share']) // 2]:.0%} ({r['seconds']} s)", flush=True)
        results.append(r)
    meta = {"saes": args.saes, "label": label, "dictionaries_sha256": dicts.digest(), "tasks": results}
    atomic_write(out / f"error_sites-{label}.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
    atomic_write(out / f"error_sites-{label}.md", lambda p: p.write_text(render(label, args.saes, results)))
    print(f"-> {out / f'error_sites-{label}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
