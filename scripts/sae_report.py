#!/usr/bin/env python
"""Quality report of a trained SAE set: results/saes.md and results/saes.json.

Per site: fraction of variance explained (FVE), L0 and never-firing latents on held-out
text (the corpus split the trainer never saw), and the task metric when that
one site's SAE replaces the activation *without the error term* (the site is patched to
``decode(encode(x))``), on ``sva-simple`` and ``ioi``, next to the clean model and to
zero-ablating the same positions. Every number in the outputs is computed here or read
from the set's ``set.json``; nothing is typed in.

Positions: the SAEs are trained without the BOS position (its activations are outliers,
norm ~1e5 in Gemma's residual stream), so the main columns replace every real token
except BOS. The ``incl. BOS`` column also replaces BOS, to show what that costs.

Usage: .venv/bin/python scripts/sae_report.py [--saes starter] [--model gemma-3-270m-offline]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from featcircuits.dictionaries import load_dictionary_set  # noqa: E402
from featcircuits.metric import metric  # noqa: E402
from featcircuits.models import load_model  # noqa: E402
from featcircuits.tasks import make_pairs, tokenize_pairs  # noqa: E402
from featcircuits.tracing import SplicedModel  # noqa: E402
from featcircuits.training.corpus import corpus_of_set  # noqa: E402
from featcircuits.training.trainer import evaluate  # noqa: E402

TASKS = ("sva-simple", "ioi")
TARGET_MEAN_FVE, TARGET_MIN_FVE, TARGET_MAX_DEAD = 0.8, 0.6, 0.10
# Below this clean-vs-zero gap (in logits) zero-ablating the site barely moves the metric, and
# the "recovered" ratio divides by almost nothing; it is reported as n/a there (the raw metric
# values stay in the table).
MIN_GAP = 1.0


MODES = ("sae", "zero", "sae_all")
PILOT_NOTE = ("How other training recipes compare on the same measure (5 sites, ~100k tokens each): "
              "[pilot_recipe.md](pilot_recipe.md), written by `scripts/pilot_recipe.py`.")


def site_metrics(spliced: SplicedModel, batch, site, dictionary, bos: int) -> dict[str, float]:
    """Mean metric (logit[patch] - logit[clean]) with ``site`` replaced at real tokens, for
    every mode in one forward (the batch is tiled once per mode)."""
    ids, mask = batch.clean_ids, batch.clean_mask
    b = ids.shape[0]
    real = mask.bool()
    keep = torch.cat([real & (ids != bos), real & (ids != bos), real]).unsqueeze(-1)  # sae, zero, sae_all
    zero_rows = torch.zeros(3 * b, 1, 1, dtype=torch.bool)
    zero_rows[b:2 * b] = True

    def hook(s, x):
        new = torch.where(zero_rows, torch.zeros_like(x), dictionary.decode(dictionary.encode(x)).to(x.dtype))
        return torch.where(keep, new, x)

    inputs = {"input_ids": ids.repeat(3, 1), "attention_mask": mask.repeat(3, 1)}
    with torch.no_grad():
        logits = spliced.run(inputs, hook, [site])
    m = metric(logits, batch.clean_answer.repeat(3), batch.patch_answer.repeat(3))
    return {mode: float(m[i * b:(i + 1) * b].mean()) for i, mode in enumerate(MODES)}


def recovered(m: float, clean: float, zero: float) -> float | None:
    """Share of the clean-vs-zero-ablation gap the SAE keeps (1 = as clean, 0 = as ablated)."""
    gap = clean - zero
    return None if abs(gap) < MIN_GAP else (m - zero) / gap


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--saes", default="starter", help="registered set name or folder")
    ap.add_argument("--model", default="gemma-3-270m-offline")
    ap.add_argument("--eval-tokens", type=int, default=16_384, help="held-out tokens for FVE/L0/dead")
    ap.add_argument("--pairs", type=int, default=32, help="prompt pairs per task")
    ap.add_argument("--seed", type=int, default=1, help="task seed (discovery uses 0; this is held out)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()

    model = load_model(args.model)
    dset = load_dictionary_set(args.saes, model.adapter, args.model)
    set_meta = dset.meta.get("set", {})
    trained = [s for s in model.adapter.sites() if s.name not in dset.meta.get("identity_sites", [])]
    if not trained:
        print("the set has no trained dictionaries", file=sys.stderr)
        return 2
    # The held-out text of the corpus the set was trained on: with the model's own samples
    # when its recipe has them (regenerated from the cache, or sampled again, same settings).
    corpus = corpus_of_set(set_meta, model.tokenizer, model.hf)
    if set_meta.get("corpus_sha256") and set_meta["corpus_sha256"] != corpus.recipe["train_sha256"]:
        print("warning: this machine's corpus differs from the one the set was trained on "
              "(other package versions); held-out text may differ", file=sys.stderr)
    window = corpus.eval.shape[1]
    n_win = min(corpus.eval.shape[0], -(-args.eval_tokens // (window - 1)))
    print(f"held-out FVE/L0/dead on {n_win} windows ...", flush=True)
    quality = evaluate(model, {s.name: dset[s.name] for s in trained}, corpus.eval[:n_win], trained, batch_size=16)

    spliced = SplicedModel(model)
    bos = model.tokenizer.bos_token_id
    tasks: dict[str, dict] = {}
    for task in TASKS:
        batch, dropped = tokenize_pairs(make_pairs(task, args.pairs, args.seed), model.tokenizer)
        with torch.no_grad():
            clean = float(metric(spliced.run(batch.inputs("clean")), batch.clean_answer, batch.patch_answer).mean())
        per_site = {}
        for site in trained:
            d = dset[site.name]
            r = site_metrics(spliced, batch, site, d, bos)
            r["recovered"] = recovered(r["sae"], clean, r["zero"])
            r["recovered_all"] = recovered(r["sae_all"], clean, r["zero"])
            per_site[site.name] = r
            print(f"{task} {site.name}: sae {r['sae']:+.2f} zero {r['zero']:+.2f} clean {clean:+.2f}", flush=True)
        tasks[task] = {"pairs": len(batch), "dropped": len(dropped), "clean": clean, "sites": per_site}

    fves = {s: q["fve"] for s, q in quality.items()}
    dead = {s: q["dead_frac"] for s, q in quality.items()}
    mean_fve = sum(fves.values()) / len(fves)
    worst = min(fves, key=fves.get)
    most_dead = max(dead, key=dead.get)
    summary = {
        "sites": len(trained), "mean_fve": mean_fve, "min_fve": fves[worst], "min_fve_site": worst,
        "max_dead_frac": dead[most_dead], "max_dead_site": most_dead,
        "mean_l0": sum(q["l0"] for q in quality.values()) / len(quality),
        "sites_below_0.6": sorted(s for s, v in fves.items() if v < TARGET_MIN_FVE),
        "sites_dead_over_10pct": sorted(s for s, v in dead.items() if v >= TARGET_MAX_DEAD),
        "targets": {"mean_fve": TARGET_MEAN_FVE, "min_fve": TARGET_MIN_FVE, "max_dead_frac": TARGET_MAX_DEAD},
        "met": {"mean_fve": mean_fve >= TARGET_MEAN_FVE, "min_fve": fves[worst] >= TARGET_MIN_FVE,
                "dead": dead[most_dead] < TARGET_MAX_DEAD},
        "training_wall_s": set_meta.get("wall_s"), "tokens_trained": set_meta.get("tokens_trained"),
        "eval_tokens": next(iter(quality.values()))["eval_tokens"],
    }
    for task, t in tasks.items():
        rec = sorted(r["recovered"] for r in t["sites"].values() if r["recovered"] is not None)
        summary[f"{task}_median_recovered"] = rec[len(rec) // 2] if rec else None
        summary[f"{task}_sites_with_gap"] = len(rec)
        summary[f"{task}_sites_recovered_over_half"] = sum(v >= 0.5 for v in rec)
        deltas = [r["sae"] - t["clean"] for r in t["sites"].values()]
        summary[f"{task}_mean_abs_shift"] = sum(abs(v) for v in deltas) / len(deltas)
    report = {"set": args.saes, "model": args.model, "dictionaries_sha256": dset.digest(), "summary": summary, "quality": quality, "tasks": tasks,
              "set_meta": {k: set_meta.get(k) for k in ("config", "corpus", "tokens_trained", "optimizer_steps",
                                                        "wall_s", "threads", "torch")},
              "report_wall_s": round(time.time() - t0, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "saes.json", json.dumps(report, indent=1))
    _write(out / "saes.md", render(report))
    print(f"wrote {out / 'saes.md'} and {out / 'saes.json'} in {time.time() - t0:.0f} s")
    return 0


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


_ARCH = {"topk": "TopK", "batchtopk": "BatchTopK (saved as JumpReLU)"}


def _sources(corpus: dict) -> str:
    docs = corpus.get("sources") or {}
    ms, pairs = corpus.get("model_samples"), corpus.get("model_pair_samples")
    text = "docstrings of " + ", ".join(k for k in docs if k not in ("model_samples", "model_pair_samples"))
    if ms:
        text += f" + {ms['kept']} of the model's own samples kept as English prose"
    if pairs:
        text += f" + {pairs['kept']} samples opened by two given names"
    return text


def _f(v, fmt="{:.3f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def render(r: dict) -> str:
    s = r["summary"]
    meta = r["set_meta"]
    cfg = meta.get("config") or {}
    corpus = meta.get("corpus") or {}
    wall = s.get("training_wall_s")
    lines = [
        f"# SAE quality report: `{r['set']}` on `{r['model']}`",
        "",
        "Generated by `scripts/sae_report.py`; every figure below is computed by that script or read",
        "from the set's `set.json` (written by the trainer).",
        "",
        "## Summary",
        "",
        f"- {s['sites']} {_ARCH.get(cfg.get('architecture', 'topk'), cfg.get('architecture'))} SAEs "
        f"(k={cfg.get('k')}, width {cfg.get('width')} for embed/mlp/resid, "
        f"{cfg.get('attn_width')} for attn; massive dimensions shrunk: "
        f"{'x' + str(cfg['dim_clip']) + ' median std' if cfg.get('dim_clip') else 'no'}; dead latents resampled "
        f"until {100 * cfg.get('resample_until', 0.8):.0f} % of training), trained on {s.get('tokens_trained')} tokens "
        f"({meta.get('optimizer_steps')} Adam steps, lr {cfg.get('lr')}) of the offline corpus "
        f"({_sources(corpus)}; train sha256 `{str(corpus.get('train_sha256'))[:16]}…`).",
        f"- Training wall time: {_f(wall, '{:.0f}')} s ({_f(wall / 60 if wall else None, '{:.1f}')} min) with "
        f"{meta.get('threads')} torch thread(s) on this shared 2-core CPU (`scripts/train_starter_saes.sh`).",
        f"- Held-out text: {s['eval_tokens']} tokens (BOS excluded).",
        f"- Mean FVE {s['mean_fve']:.3f} (target ≥ {s['targets']['mean_fve']}: "
        f"{'met' if s['met']['mean_fve'] else 'missed by %.3f' % (s['targets']['mean_fve'] - s['mean_fve'])}); "
        f"lowest {s['min_fve']:.3f} at `{s['min_fve_site']}` (target ≥ {s['targets']['min_fve']}: "
        f"{'met' if s['met']['min_fve'] else 'missed by %.3f' % (s['targets']['min_fve'] - s['min_fve'])}; "
        f"sites below: {', '.join(s['sites_below_0.6']) or 'none'}).",
        f"- Dead latents (never fire on the held-out text): at most {100 * s['max_dead_frac']:.1f} % "
        f"(`{s['max_dead_site']}`; target < {100 * s['targets']['max_dead_frac']:.0f} %: "
        f"{'met' if s['met']['dead'] else 'missed; sites at or over: ' + ', '.join(s['sites_dead_over_10pct'])}).",
        f"- Mean L0 {s['mean_l0']:.1f}.",
    ]
    for task in TASKS:
        t = r["tasks"][task]
        lines.append(f"- `{task}` ({t['pairs']} pairs, {t['dropped']} dropped): clean metric {t['clean']:+.3f}. "
                     f"One site's SAE spliced without error: median share recovered "
                     f"{_f(s.get(f'{task}_median_recovered'), '{:.2f}')} over the "
                     f"{s[f'{task}_sites_with_gap']} sites where zero-ablation moves the metric by "
                     f"≥ {MIN_GAP:g} logit ({s[f'{task}_sites_recovered_over_half']} of them ≥ 0.5); mean "
                     f"|m_SAE - m_clean| over all sites {s[f'{task}_mean_abs_shift']:.2f} logits.")
    lines += [
        "",
        "Metric = `logit[patch answer] - logit[clean answer]` at the last token (the discovery",
        "convention: negative when the model prefers the right answer). *recovered* =",
        "(m_SAE - m_zero) / (m_clean - m_zero): 1 means splicing the SAE (without its error term) at",
        "that one site keeps the behaviour, 0 means it is as bad as zero-ablating the site (n/a where",
        f"zero-ablation moves the metric by less than {MIN_GAP:g} logit). Zero",
        "ablation and the SAE replace the same positions (every real token except BOS); *incl. BOS*",
        "also replaces BOS, which the SAEs never saw in training. Circuits keep error nodes, so",
        "these figures bound what the features alone carry, they do not limit circuit discovery.",
        "",
        "## Per site",
        "",
        "| site | width | FVE | L0 | dead % | sva m SAE | sva m zero | sva rec. | sva rec. incl. BOS "
        "| ioi m SAE | ioi m zero | ioi rec. | ioi rec. incl. BOS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for site, q in r["quality"].items():
        sv, io = r["tasks"]["sva-simple"]["sites"][site], r["tasks"]["ioi"]["sites"][site]
        lines.append(
            f"| {site} | {q['width']} | {q['fve']:.3f} | {q['l0']:.1f} | {100 * q['dead_frac']:.1f} | "
            f"{sv['sae']:+.2f} | {sv['zero']:+.2f} | {_f(sv['recovered'], '{:.2f}')} | "
            f"{_f(sv['recovered_all'], '{:.2f}')} | {io['sae']:+.2f} | {io['zero']:+.2f} | "
            f"{_f(io['recovered'], '{:.2f}')} | {_f(io['recovered_all'], '{:.2f}')} |")
    lines += ["", f"Clean metric: sva-simple {r['tasks']['sva-simple']['clean']:+.3f}, "
                  f"ioi {r['tasks']['ioi']['clean']:+.3f}. Report computed in {r['report_wall_s']:.0f} s.", ""]
    if (ROOT / "results" / "pilot_recipe.md").is_file():
        lines += [PILOT_NOTE, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
