#!/usr/bin/env python
"""Pilot of end-to-end KL fine-tuning (featcircuits.training.finetune) at a set's weakest sites.

For each site: the share of the task behaviour kept when the site's SAE replaces the
activation *without its error term* (``sae_report.site_metrics``, sva-simple and ioi,
held-out task seed 1), and held-out FVE / L0 / dead share, before and after fine-tuning
the set's SAE on the set's own corpus. Writes OUT/pilot_finetune.json and .md.

Usage (the sites that lose IOI in starter-v3)::

    python scripts/pilot_finetune.py --saes starter --sites resid_1,resid_2,resid_10 \
        --tokens 24000 --lr 1e-3 --mse-coef 1 --out results/pilot_finetune/lr1e-3_mse1

``--summary DIR`` writes DIR/README.md, one table over every variant's pilot_finetune.json under DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from featcircuits.dictionaries import load_dictionary, load_dictionary_set  # noqa: E402
from featcircuits.metric import metric  # noqa: E402
from featcircuits.models import load_model  # noqa: E402
from featcircuits.tasks import make_pairs, tokenize_pairs  # noqa: E402
from featcircuits.tracing import SplicedModel  # noqa: E402
from featcircuits.training.corpus import corpus_of_set  # noqa: E402
from featcircuits.training.finetune import KL_FOCUS, FinetuneConfig, finetune_set  # noqa: E402
from featcircuits.training.trainer import evaluate, resolve_sites  # noqa: E402
from sae_report import TASKS, recovered, site_metrics  # noqa: E402


def measure(model, dicts: dict, sites, corpus, eval_tokens: int, pairs: int, seed: int) -> dict:
    """Per site: held-out FVE/L0/dead and each task's recovered share."""
    window = corpus.eval.shape[1]
    n_win = min(corpus.eval.shape[0], -(-eval_tokens // (window - 1)))
    quality = evaluate(model, dicts, corpus.eval[:n_win], sites, batch_size=16)
    spliced = SplicedModel(model)
    bos = model.tokenizer.bos_token_id
    out = {s.name: dict(quality[s.name]) for s in sites}
    for task in TASKS:
        batch, _ = tokenize_pairs(make_pairs(task, pairs, seed), model.tokenizer)
        with torch.no_grad():
            clean = float(metric(spliced.run(batch.inputs("clean")), batch.clean_answer, batch.patch_answer).mean())
        for s in sites:
            r = site_metrics(spliced, batch, s, dicts[s.name], bos)
            out[s.name][f"{task}_recovered"] = recovered(r["sae"], clean, r["zero"])
            out[s.name][f"{task}_sae"], out[s.name][f"{task}_zero"], out[s.name][f"{task}_clean"] = r["sae"], r["zero"], clean
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--saes", default="starter")
    ap.add_argument("--model", default="gemma-3-270m-offline")
    ap.add_argument("--sites", default="resid_1,resid_2,resid_10")
    ap.add_argument("--tokens", type=int, default=24_000, help="fine-tuning tokens per site")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--mse-coef", type=float, default=1.0)
    ap.add_argument("--kl-positions", type=int, default=16)
    ap.add_argument("--kl-focus", choices=KL_FOCUS, default="random")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1, help="task seed (held out from discovery's 0)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/work/sae-runs/finetune", help="where the fine-tuned set is written")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--out", default=None, help="folder for this variant's pilot_finetune.json and .md")
    ap.add_argument("--summary", metavar="DIR", default=None, help="only write DIR/README.md from the variants in DIR")
    args = ap.parse_args()
    if args.summary:
        path = Path(args.summary) / "README.md"
        path.write_text(summary(Path(args.summary)))
        print(path.read_text())
        return 0
    if not args.out:
        ap.error("--out is required (or --summary DIR)")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = load_model(args.model)
    base = load_dictionary_set(args.saes, model.adapter, args.model)
    corpus = corpus_of_set(base.meta.get("set", {}), model.tokenizer, model.hf)
    sites = resolve_sites(model.adapter, args.sites)
    before = measure(model, {s.name: base[s.name] for s in sites}, sites, corpus, args.eval_tokens, args.pairs, args.seed)
    print("before", json.dumps(before, indent=1), flush=True)
    cfg = FinetuneConfig(sites=[s.name for s in sites], tokens=args.tokens, lr=args.lr, mse_coef=args.mse_coef,
                         kl_positions=args.kl_positions, kl_focus=args.kl_focus, batch_size=args.batch_size, eval_tokens=0)
    work = Path(args.work) / Path(args.out).name
    meta = finetune_set(model, args.saes, corpus, work, cfg, resume=args.resume, progress=False)
    tuned = {s.name: load_dictionary(work / s.name) for s in sites}
    after = measure(model, tuned, sites, corpus, args.eval_tokens, args.pairs, args.seed)
    report = {"set": args.saes, "model": args.model, "config": asdict(cfg), "finetune": meta["finetune"],
              "corpus_sha256": corpus.recipe["train_sha256"], "set_corpus_sha256": base.meta.get("set", {}).get("corpus_sha256"),
              "task_seed": args.seed, "pairs": args.pairs, "before": before, "after": after,
              "wall_s": round(time.time() - t0, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pilot_finetune.json").write_text(json.dumps(report, indent=1))
    (out / "pilot_finetune.md").write_text(render(report))
    print(render(report))
    return 0


def _f(v, fmt="{:.2f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def render(r: dict) -> str:
    c, ft = r["config"], r["finetune"]
    lines = [f"# End-to-end fine-tuning pilot: {r['set']} at {', '.join(c['sites'])}", "",
             f"Written by `scripts/pilot_finetune.py --saes {r['set']} --sites {','.join(c['sites'])} --tokens {c['tokens']} "
             f"--lr {c['lr']:g} --mse-coef {c['mse_coef']:g} --kl-positions {c['kl_positions']} --kl-focus "
             f"{c.get('kl_focus', 'random')}`. Loss = KL(clean ‖ spliced without error term) at "
             f"{c['kl_positions']} positions per window ({c.get('kl_focus', 'random')}) + {c['mse_coef']:g} × normalised MSE; {ft['tokens_per_site']:,} "
             f"tokens per site in {ft['steps']} steps, {ft['wall_s'] / 60:.1f} min ({ft['threads']} thread). Recovered = "
             f"share of the clean-vs-zero-ablation gap kept with the SAE spliced without its error term ({r['pairs']} "
             f"pairs, task seed {r['task_seed']}); FVE/L0/dead on held-out text of the set's corpus.", "",
             "| site | IOI recovered before → after | SVA recovered before → after | FVE before → after | "
             "dead before → after | KL start → end |", "|---|---|---|---|---|---|"]
    for s in c["sites"]:
        b, a = r["before"][s], r["after"][s]
        kl0, kl1 = ft["loss_start"].get(s, [None])[0], ft["loss_end"].get(s, [None])[0]
        lines.append(f"| {s} | {_f(b['ioi_recovered'])} → {_f(a['ioi_recovered'])} | "
                     f"{_f(b['sva-simple_recovered'])} → {_f(a['sva-simple_recovered'])} | {_f(b['fve'], '{:.3f}')} → "
                     f"{_f(a['fve'], '{:.3f}')} | {_f(b['dead_frac'], '{:.1%}')} → {_f(a['dead_frac'], '{:.1%}')} | "
                     f"{_f(kl0, '{:.3f}')} → {_f(kl1, '{:.3f}')} |")
    if r["corpus_sha256"] != r.get("set_corpus_sha256"):
        lines += ["", "This machine rebuilt the set's corpus with other docstrings (package versions differ), so the "
                  "held-out text is not byte-identical to the one the set was reported on."]
    return "\n".join(lines) + "\n"


def summary(folder: Path) -> str:
    """One table over every variant under ``folder``: per site, IOI / SVA recovered and FVE before -> after."""
    lines = ["# End-to-end fine-tuning pilots", "",
             f"Written by `scripts/pilot_finetune.py --summary {folder.as_posix()}` from the variants below (each "
             "folder's pilot_finetune.md names the command that made it). Recovered = share of the clean-vs-zero-"
             "ablation gap kept with the site's SAE spliced without its error term (held-out task seed); KL = "
             "the fine-tuning objective's KL term (nats) on the first step's batch -> mean of the last 10 steps.", "",
             "| variant | tokens/site | site | IOI rec. before → after | SVA rec. before → after | FVE before → after "
             "| KL start → end |", "|---|---|---|---|---|---|---|"]
    for f in sorted(folder.glob("*/pilot_finetune.json")):
        r = json.loads(f.read_text())
        ft = r["finetune"]
        for s in r["config"]["sites"]:
            b, a = r["before"][s], r["after"][s]
            lines.append(f"| [{f.parent.name}]({f.parent.name}/pilot_finetune.md) (lr {r['config']['lr']:g}, mse "
                         f"{r['config']['mse_coef']:g}, {r['config'].get('kl_focus', 'random')} "
                         f"{r['config']['kl_positions']}) | {ft['tokens_per_site']:,} | {s} | {_f(b['ioi_recovered'])} → "
                         f"{_f(a['ioi_recovered'])} | {_f(b['sva-simple_recovered'])} → {_f(a['sva-simple_recovered'])} | "
                         f"{_f(b['fve'], '{:.3f}')} → {_f(a['fve'], '{:.3f}')} | {_f(ft['loss_start'][s][0], '{:.3f}')} → "
                         f"{_f(ft['loss_end'][s][0], '{:.3f}')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
