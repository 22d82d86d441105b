"""Curves: faithfulness and completeness against circuit size per method, AUC, comparisons."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Sequence

import torch

from .. import distributed, lrp
from ..errors import UserError
from ..nodes import Act, NodeSpace
from ..tasks import Batch
from ..tracing import SplicedModel
from .evaluator import Evaluator
from .masks import candidate_effects

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint


def size_grid(n_max: int, points: int = 15, n_min: int = 1) -> list[int]:
    """``points`` log-spaced node counts from ``n_min`` to ``n_max`` (rounded, distinct)."""
    n_max = max(int(n_max), 1)
    n_min = max(1, min(int(n_min), n_max))
    if points <= 1:
        return [n_max]
    grid = torch.logspace(math.log10(n_min), math.log10(n_max), points, dtype=torch.float64)
    return sorted({int(round(float(v))) for v in grid})


def log_auc(n_nodes: Sequence[float], values: Sequence[float]) -> float | None:
    """Area under ``values`` vs log10(n_nodes), divided by the log10 range (trapezoids):
    the mean of the curve over log-size, in the curve's own units (1 = 1 at every size)."""
    pts = [(math.log10(n), v) for n, v in zip(n_nodes, values) if n > 0 and v is not None and math.isfinite(v)]
    if len(pts) < 2:
        return None
    pts.sort()
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pts, pts[1:]))
    span = pts[-1][0] - pts[0][0]
    return area / span if span > 0 else None


def nodes_to_reach(n_nodes: Sequence[int], values: Sequence[float], target: float = 0.8) -> int | None:
    """The smallest node count of the grid whose value reaches ``target`` (None if none does)."""
    for n, v in zip(n_nodes, values):
        if v is not None and math.isfinite(v) and v >= target:
            return int(n)
    return None



def faithfulness_curves(sm: SplicedModel, discovery: Batch, evaluation: Batch,
                        methods: Sequence[str] = ("relp", "ig", "atp", "random"), *,
                        points: int = 15, n_min: int = 1, n_max: int | None = None,
                        ablation: str = "mean", errors: str = "ablate", aggregation: str = "sum",
                        start_layer: int = -1, steps: int = 10, rules=None, random_draws: int = 3,
                        seed: int = 0, batch_size: int = 16, stack: int = 4,
                        effects: dict | None = None, progress: bool = True,
                        checkpoint_dir=None, resume: bool = False, by_cases: bool = True) -> dict:
    """Node effects per method on ``discovery``, top-k circuits on a shared log-spaced size
    grid, faithfulness and completeness of each on ``evaluation``; random circuits of the
    same sizes (``random_draws`` seeded draws, averaged). Returns the JSON-ready result.

    The size grid runs from ``n_min`` to ``n_max`` (default: the largest number of nodes with
    a non-zero effect under any method, i.e. every node any method ranks above the rest).
    ``effects`` may hand in precomputed ``NodeEffects`` per method (tests, reuse); the
    methods it lacks are computed and added to it.
    With ``checkpoint_dir``, node effects and ablation sums are checkpointed per chunk of
    examples (one stage per method) and ``resume=True`` continues a killed run; the result
    equals an uninterrupted run's. With ``by_cases``, the same circuits are also evaluated on
    each case's evaluation pairs alone when there are several (:func:`curves_by_case`).
    """
    from ..attribution import METHODS as EFFECT_METHODS, node_effects

    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in EFFECT_METHODS and m != "random"]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(EFFECT_METHODS)}, random")
    if not methods:
        raise UserError("give at least one method")
    if points < 1:
        raise UserError(f"--thresholds must be at least 1, got {points}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    distributed.setup(sm.model.device)  # under torchrun: every stage below shards its chunks and all-reduces
    progress = progress and distributed.is_writer()  # one set of bars
    ev = Evaluator(sm, evaluation, ablation=ablation, errors=errors, start_layer=start_layer, seed=seed,
                   batch_size=batch_size, stack=stack, progress=progress)
    timings["evaluation_setup_seconds"] = round(time.perf_counter() - t0, 3)
    include_errors = errors == "ablate"
    checkpoints: dict[str, "Checkpoint"] = {}
    if checkpoint_dir is not None:
        from ..checkpoint import Checkpoint
        from ..discover import _batch_digest

        config = {"methods": methods, "points": points, "n_min": n_min, "n_max": n_max, "ablation": ablation,
                  "errors": errors, "aggregation": aggregation, "start_layer": start_layer, "steps": steps,
                  "rules": lrp.rules_key(rules), "random_draws": random_draws, "seed": seed, "batch_size": batch_size,
                  "stack": stack, "dictionaries": sm.dictionaries.digest(),
                  "discovery": _batch_digest(discovery), "evaluation": _batch_digest(evaluation),
                  "world": list(distributed.world())}
        suffix = distributed.checkpoint_suffix()  # one checkpoint file per rank
        for m in methods:
            for stage in ([f"curves-nodes-{m}"] if m != "random" else []) + [f"curves-ablate-{m}"]:
                checkpoints[stage] = Checkpoint(checkpoint_dir, stage + suffix, config, resume)
    effects = effects if effects is not None else {}
    effect_info = {}
    scored = {}
    for m in methods:
        if m == "random":
            continue
        if m not in effects:
            effects[m] = node_effects(sm, discovery, m, steps=steps, rules=rules, batch_size=batch_size,
                                      progress=progress, checkpoint=checkpoints.get(f"curves-nodes-{m}"))
        ne = effects[m]
        timings[f"effects_{m}_seconds"] = round(ne.seconds, 3)
        effect_info[m] = {"seconds": round(ne.seconds, 3), "passes": ne.passes, "params": ne.params,
                          "metric_clean": ne.metric_clean, "metric_patch": ne.metric_patch}
        scored[m] = candidate_effects(ne.mean(aggregation), ev.sites, include_errors)
    # the node universe (for random circuits and the default grid end)
    if scored:
        any_scores, spans = next(iter(scored.values()))
        nonzero = max(int((s > 0).sum()) for s, _ in scored.values())
    else:
        T = discovery.seq_len
        zeros = {s.name: Act(torch.zeros((T, sm.dictionary(s).d_sae) if aggregation == "none" else
                                         (sm.dictionary(s).d_sae,)), torch.zeros((T,) if aggregation == "none" else ()))
                 for s in ev.sites}
        any_scores, spans = candidate_effects(zeros, ev.sites, include_errors)
        nonzero = int(torch.isfinite(any_scores).sum())
    total_nodes = int(torch.isfinite(any_scores).sum())
    upper = min(n_max if n_max is not None else max(nonzero, 1), total_nodes)
    sizes = size_grid(upper, points, n_min)

    out_methods: dict[str, dict] = {}
    t1 = time.perf_counter()
    circuits_of: dict[str, list] = {}
    for m in methods:
        if m == "random":
            continue
        scores, sp = scored[m]
        circuits_of[m] = [sp.unflatten(NodeSpace.top_k(scores, k)) for k in sizes]
        res = ev.evaluate(circuits_of[m], desc=f"ablations ({m})", checkpoint=checkpoints.get(f"curves-ablate-{m}"))
        out_methods[m] = _curve(res)
    if "random" in methods:
        gen = torch.Generator().manual_seed(seed)
        draws = [[spans.unflatten(NodeSpace.random(any_scores, k, gen)) for k in sizes] for _ in range(random_draws)]
        res = ev.evaluate([c for d in draws for c in d], desc="ablations (random)",
                          checkpoint=checkpoints.get("curves-ablate-random"))
        per_draw = [res[i * len(sizes):(i + 1) * len(sizes)] for i in range(random_draws)]
        curve = {"n_nodes": [r["n_nodes"] for r in per_draw[0]]}
        for key in ("F_C", "F_complement", "faithfulness", "completeness"):
            vals = torch.tensor([[r[key] for r in d] for d in per_draw], dtype=torch.float64)
            curve[key] = vals.mean(0).tolist()
            curve[f"{key}_std"] = vals.std(0, unbiased=False).tolist()
            curve[f"{key}_draws"] = vals.tolist()
        curve["auc"] = log_auc(curve["n_nodes"], curve["faithfulness"])
        curve["completeness_auc"] = log_auc(curve["n_nodes"], curve["completeness"])
        curve["nodes_to_0.8"] = nodes_to_reach(curve["n_nodes"], curve["faithfulness"])
        curve["draws"] = random_draws
        out_methods["random"] = curve
    timings["ablation_seconds"] = round(time.perf_counter() - t1, 3)
    t2 = time.perf_counter()
    by_case = curves_by_case(sm, evaluation, circuits_of, ablation=ablation, errors=errors, start_layer=start_layer,
                             seed=seed, batch_size=batch_size, stack=stack, progress=progress) if by_cases else {}
    if by_case:
        timings["by_case_seconds"] = round(time.perf_counter() - t2, 3)
    timings["ablation_forward_passes"] = ev.forward_passes
    timings["total_seconds"] = round(time.perf_counter() - t0, 3)

    for ck in checkpoints.values():  # complete: a later run starts fresh
        ck.clear()
    comparison = relp_vs_ig(out_methods) if "relp" in out_methods and "ig" in out_methods else None
    return {
        "methods": out_methods,
        **({"by_case": by_case} if by_case else {}),
        "F_M": ev.F_M, "F_empty": ev.F_empty,
        "sizes": sizes,
        "node_universe": {"total_nodes": total_nodes, "nonzero_effect_nodes_max": nonzero},
        "relp_vs_ig": comparison,
        "effects": effect_info,
        "settings": {**ev.settings(), "aggregation": aggregation, "points": points, "n_min": n_min,
                     "n_max": upper, "steps_ig": steps, "rules_relp": effect_info.get("relp", {}).get("params", {})
                     .get("rules"), "random_draws": random_draws, "seed": seed, "batch_size": batch_size,
                     "stack": stack, "n_discovery": len(discovery)},
        "timings": timings,
        "definitions": DEFINITIONS,
    }


DEFINITIONS = {
    "F": "mean over evaluation examples of logit[clean answer] - logit[patch answer] on the clean prompt, "
         "with every node at the evaluated sites outside the circuit ablated",
    "faithfulness": "(F(C) - F(empty)) / (F(M) - F(empty))",
    "completeness": "faithfulness of the complement M \\ C (lower is more complete)",
    "n_nodes": "nodes in the circuit at the evaluated sites: SAE features (one per feature with aggregation "
               "'sum', per feature and position with 'none') plus error nodes (when errors are ablated)",
    "sizes": "circuits are the top-k nodes by |node effect| (aggregated on the discovery examples) for k on a "
             "shared log-spaced grid, so every method (and random) is evaluated at the same node counts",
    "auc": "area under faithfulness vs log10(n_nodes) over the grid (trapezoids), divided by the log10 range "
           "of the grid: the mean faithfulness over log-size (1 = faithful at every size); not clipped",
    "completeness_auc": "the same area for completeness (lower is better)",
    "nodes_to_0.8": "smallest grid size whose faithfulness is >= 0.8 (null: never reached on the grid)",
    "random": "k nodes drawn uniformly without replacement from all candidate nodes at the evaluated sites, "
              "seeded; values are the mean over draws (per-draw values and std alongside)",
    "relp_vs_ig": "faithfulness(RelP) - faithfulness(IG) at each grid size >= 50; within = |diff| <= 0.05",
}


def curves_by_case(sm: SplicedModel, evaluation: Batch, circuits_of: dict[str, list], **ev_kw) -> dict:
    """Faithfulness AUC per case (template, e.g. IOI's io-first / s-first) and method: the
    methods' circuits (random left out) evaluated on each case's evaluation pairs alone, with
    that case's F(M), F(empty) and ablation means. Empty when the pairs have one case. Not
    checkpointed: a run killed here redoes this part on ``--resume``."""
    cases = sorted({p.case for p in evaluation.pairs})
    if len(cases) < 2 or not circuits_of:
        return {}
    out = {}
    for case in cases:
        sub = evaluation.select([i for i, p in enumerate(evaluation.pairs) if p.case == case])
        ev = Evaluator(sm, sub, **ev_kw)  # (a subset too small for every rank gets smaller chunks there)
        curves = {m: _curve(ev.evaluate(c, desc=f"ablations ({m}, {case})")) for m, c in circuits_of.items()}
        out[case] = {"n_eval": len(sub), "F_M": ev.F_M, "F_empty": ev.F_empty,
                     "auc": {m: c["auc"] for m, c in curves.items()},
                     "faithfulness": {m: c["faithfulness"] for m, c in curves.items()}}
    return out


def _curve(results: list[dict]) -> dict:
    c = {k: [r[k] for r in results] for k in ("n_nodes", "F_C", "F_complement", "faithfulness", "completeness")}
    c["auc"] = log_auc(c["n_nodes"], c["faithfulness"])
    c["completeness_auc"] = log_auc(c["n_nodes"], c["completeness"])
    c["nodes_to_0.8"] = nodes_to_reach(c["n_nodes"], c["faithfulness"])
    return c


def relp_vs_ig(methods: dict[str, dict], min_nodes: int = 50, tol: float = 0.05) -> dict:
    """Where RelP's faithfulness curve is (not) within ``tol`` of IG's at sizes >= ``min_nodes``."""
    r, g = methods["relp"], methods["ig"]
    rows = [(n, fr - fg) for n, fr, fg in zip(r["n_nodes"], r["faithfulness"], g["faithfulness"])
            if n >= min_nodes and math.isfinite(fr) and math.isfinite(fg)]
    outside = [{"n_nodes": n, "diff": d} for n, d in rows if abs(d) > tol]
    return {"min_nodes": min_nodes, "tolerance": tol, "points": len(rows),
            "max_abs_diff": max((abs(d) for _, d in rows), default=None),
            "within": not outside, "outside": outside,
            "diffs": [{"n_nodes": n, "diff": d} for n, d in rows]}
