"""How well each node-effect estimator agrees with exact activation patching.

(Over ~400 lines: the sampling, the computation and its markdown/plots are one report whose
parts read the same result dict; the node space itself is ``featcircuits.nodes``.)

Two granularities (issue 3):

- ``components``: identity dictionaries, one node per site and position (the whole site
  vector); every estimator's prompt-averaged effect forms a layer x position grid per site
  kind (``embed``, ``attn``, ``mlp``, ``resid``), compared with exact patching of every cell.
- ``features``: one node per feature and error node (aggregation ``sum`` or ``none``); exact
  patching covers a sample of nodes per site kind: the top nodes by every method plus a
  random sample of the nodes some method gives a nonzero effect, described in the result.

Methods are ``atp``, ``relp`` (the rule set given, default the two-point rules), ``relp+ah``
(the same rules plus the AH-rule), ``relp:<rules>`` (RelP under another rule set, joined by ``+``, e.g.
``relp:ln+identity+half-qk``, so several rule sets meet the same exact-patching sample) and
``ig``. Next to ``relp`` a comparison column is added automatically, so the RelP paper's
comparison is always reproduced: the authors' rules (``relp:ln+identity+half``) beside the
default, or ``relp+ah`` when ``relp`` itself runs the authors' rules (``--rules paper``). AtP and the RelP variants are timed on the same batch with
interleaved repeats (the median is reported); exact patching and IG run once.

``run_agreement`` computes a result dict; ``write_agreement`` writes ``agreement.json``,
``agreement.md`` and the scatter plots (``scatter.png``/``.svg``) into a folder.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from . import distributed, lrp
from .adapters import site_kind
from .batching import resolve_batch_size
from .attribution import FeatureNode, NodeEffects, check_aggregation, exact_feature_effects, node_effects
from .errors import UserError
from .nodes import NodeSpace
from .tasks import Batch
from .tracing import SplicedModel

GRANULARITIES = ("components", "features")
ESTIMATORS = ("atp", "relp", "relp+ah", "ig")
TIMED = ("atp", "relp")  # bases of the cheap estimators: repeated, interleaved, median reported
KIND_ORDER = ("resid", "attn", "mlp", "embed")  # column order of the tables
# Issue 3's targets (components granularity, RelP with the default rule set).
TARGET_MIN_R = {"resid": 0.9, "mlp": 0.9}
TARGET_MAX_DEFICIT = 0.02
TARGET_MAX_COST = 1.3


@dataclass(frozen=True)
class MethodSpec:
    name: str  # as reported: atp, relp, relp+ah, relp:<rules>, ig
    base: str  # as node_effects calls it
    rules: tuple[str, ...] | None = None  # LRP rule set (relp variants only)


def resolve_methods(methods: Iterable[str] | str, rules: Iterable[str] | str | None = None,
                    add_ah: bool = True) -> list[MethodSpec]:
    """``"atp,relp,ig"`` -> method specs. ``relp`` uses ``rules`` (default: the two-point
    rules); ``relp+ah`` the same set plus the AH-rule; ``relp:ln+identity+half-qk`` RelP under
    the rule set after the colon (``relp:paper`` = the RelP authors' rules). With ``add_ah``
    a comparison column is added after ``relp``: the authors' rules (``relp:ln+identity+half``)
    when ``relp`` uses other rules, else ``relp+ah``."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    names = list(dict.fromkeys(methods))
    if not names:
        raise UserError("--methods is empty: give some of " + ", ".join(ESTIMATORS))
    bad = [m for m in names if m not in ESTIMATORS and not m.startswith("relp:")]
    if bad:
        hint = " (exact patching is always computed: it is the reference)" if "exact" in bad else ""
        raise UserError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(ESTIMATORS)}{hint}")
    base_rules = lrp.parse_rules(rules)
    ah_rules = base_rules | {"ah"}
    ordered = lambda rs: tuple(r for r in lrp.RULES if r in rs)  # noqa: E731
    paper = lrp.parse_rules("paper")
    paper_name = "relp:" + "+".join(ordered(paper))
    if add_ah and "relp" in names:
        # The comparison the RelP paper makes stays one column away: beside the default
        # (two-point) RelP the authors' rules; beside the authors' rules their AH variant.
        variant = "relp+ah" if base_rules == paper else paper_name
        same = {"relp+ah", paper_name, "relp:paper"} & set(names)
        if not same:
            names.insert(names.index("relp") + 1, variant)
    specs = []
    for name in names:
        if name == "relp":
            specs.append(MethodSpec(name, "relp", ordered(base_rules)))
        elif name == "relp+ah":
            specs.append(MethodSpec(name, "relp", ordered(ah_rules)))
        elif name.startswith("relp:"):
            own = ordered(lrp.parse_rules(name[len("relp:"):].replace("+", ",")))
            if not own:
                raise UserError(f"{name!r} names no rule: write e.g. relp:ln+identity+half-qk")
            specs.append(MethodSpec("relp:" + "+".join(own), "relp", own))
        else:
            specs.append(MethodSpec(name, name))
    return specs


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson r of two equally long vectors (NaN when either is constant or too short)."""
    x = x.detach().flatten().double()
    y = y.detach().flatten().double()
    if x.numel() != y.numel():
        raise ValueError(f"pearson: {x.numel()} values against {y.numel()}")
    if x.numel() < 2:
        return math.nan
    x = x - x.mean()
    y = y - y.mean()
    den = torch.sqrt((x * x).sum() * (y * y).sum())
    if not torch.isfinite(den) or den <= 0:
        return math.nan
    return float((x * y).sum() / den)


def _kinds(sm: SplicedModel) -> list[str]:
    present = {s.kind for s in sm.sites}
    return [k for k in KIND_ORDER if k in present]


def _grids(sm: SplicedModel, effects: NodeEffects) -> dict[str, torch.Tensor]:
    """Prompt-averaged component effects as a [layers, T] grid per site kind."""
    comp = effects.components()
    out = {}
    for kind in _kinds(sm):
        out[kind] = torch.stack([comp[s.name] for s in sm.sites if s.kind == kind])
    return out


# --------------------------------------------------------------------------------------
# Running the estimators (with interleaved timing)


def _run_methods(sm: SplicedModel, batch: Batch, specs: list[MethodSpec], *, steps: int, batch_size: int,
                 repeats: int, progress: bool) -> tuple[dict[str, NodeEffects], dict[str, list[float]]]:
    """Each estimator once, the cheap ones (AtP, RelP variants) ``repeats`` times interleaved
    (atp, relp, relp+ah, atp, relp, ...) after an untimed warm-up, so that load from other
    jobs hits them alike."""
    effects: dict[str, NodeEffects] = {}
    runs: dict[str, list[float]] = {s.name: [] for s in specs}
    timed = [s for s in specs if s.base in TIMED]
    # one chunk per rank (under torchrun each rank warms up on its own chunk)
    warm = batch.slice(0, min(len(batch), batch_size * distributed.world()[1]))
    for spec in timed:  # untimed warm-up: the first backward of a process pays for allocations
        node_effects(sm, warm, spec.base, steps=steps, rules=spec.rules, batch_size=batch_size, progress=False)
    for r in range(max(1, repeats)):
        for spec in timed:
            ne = node_effects(sm, batch, spec.base, steps=steps, rules=spec.rules, batch_size=batch_size,
                              progress=progress and r == 0)
            runs[spec.name].append(ne.seconds)
            effects.setdefault(spec.name, ne)
    for spec in specs:
        if spec.base not in TIMED:
            ne = node_effects(sm, batch, spec.base, steps=steps, rules=spec.rules, batch_size=batch_size,
                              progress=progress)
            runs[spec.name].append(ne.seconds)
            effects[spec.name] = ne
    return effects, runs


def _seconds(runs: dict[str, list[float]]) -> dict[str, float]:
    return {m: round(statistics.median(v), 4) for m, v in runs.items() if v}


# --------------------------------------------------------------------------------------
# Features: a flat index over every node, and the sample exact patching covers


def node_space(sm: SplicedModel, aggregation: str, seq_len: int) -> NodeSpace:
    """Every feature and error node of a spliced model, flattened in site order with the
    error after the features of each position (``interleaved``; the sample drawn from it
    depends on that order, so it stays as it was)."""
    check_aggregation(aggregation)
    per_pos = aggregation == "none"
    shapes = {s.name: (((seq_len,) if per_pos else ()) + (sm.dictionary(s).d_sae,), (seq_len,) if per_pos else ())
              for s in sm.sites}
    return NodeSpace(shapes, layout="interleaved")


def feature_node(space: NodeSpace, i: int) -> FeatureNode:
    """The node at flat index ``i`` of ``space``, for exact patching."""
    site, index, position = space.locate(i)
    return FeatureNode(site, index, None if position < 0 else position)


def _select_nodes(index: NodeSpace, values: dict[str, torch.Tensor], kinds: list[str], top_k: int,
                  n_random: int, seed: int) -> tuple[list[int], dict[int, list[str]], dict]:
    """Per site kind: the ``top_k`` nodes of largest |effect| by each method, plus ``n_random``
    drawn uniformly from the other nodes to which some method gives a nonzero effect."""
    gen = torch.Generator().manual_seed(seed)
    chosen: dict[int, list[str]] = {}
    described = {}
    nonzero_any = torch.zeros(index.size, dtype=torch.bool)
    for v in values.values():
        nonzero_any |= v != 0
    for kind in kinds:
        mask = index.site_mask([s for s in index.sites if site_kind(s) == kind])
        idx = torch.nonzero(mask).flatten()
        tops: dict[str, int] = {}
        for method, v in values.items():
            cand = idx[v[idx] != 0]
            k = min(top_k, cand.numel())
            if k == 0:
                continue
            top = cand[torch.topk(v[cand].abs(), k).indices]
            for i in top.tolist():
                chosen.setdefault(i, []).append(f"top:{method}")
            tops[method] = k
        pool = idx[nonzero_any[idx]]
        taken = torch.tensor(sorted(i for i in chosen if mask[i]), dtype=torch.long)
        rest = pool[~torch.isin(pool, taken)] if taken.numel() else pool
        k = min(n_random, rest.numel())
        pick = rest[torch.randperm(rest.numel(), generator=gen)[:k]] if k else rest[:0]
        for i in pick.tolist():
            chosen.setdefault(i, []).append("random")
        described[kind] = {"nodes": int(mask.sum()), "nonzero_by_some_method": int(pool.numel()),
                           "top_per_method": tops, "random": k,
                           "sampled": sum(1 for i in chosen if mask[i])}
    order = sorted(chosen)
    return order, chosen, described


# --------------------------------------------------------------------------------------
# The agreement computation


def run_agreement(sm: SplicedModel, batch: Batch, methods: Iterable[str] | str = ("atp", "relp", "ig"),
                  granularity: str = "components", *, rules: Iterable[str] | str | None = None,
                  steps: int = 10, batch_size: "int | str" = 8, repeats: int = 3, aggregation: str = "sum",
                  top_k: int = 16, n_random: int = 48, seed: int = 0, nodes_per_pass: int = 16,
                  add_ah: bool = True, progress: bool = True, by_case: bool = True) -> dict[str, Any]:
    """Exact patching and each estimator on ``batch``; Pearson r per method and site kind
    (and, with ``by_case``, per case when the pairs have several: :func:`agreement_by_case`).

    ``batch_size``: an int, or ``auto`` / ``auto:CAP`` (``featcircuits.batching``).
    Returns a JSON-ready dict with at least ``pearson`` ({method: {kind: r}}), ``seconds``
    ({method: s}, the median of the interleaved repeats for AtP/RelP) and ``n``; the
    effects compared (``grids`` for components, ``sample`` for features) come along for
    plotting.
    """
    if granularity not in GRANULARITIES:
        raise UserError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if min(steps, repeats) < 1:
        raise UserError("--steps and --repeats must be at least 1")
    specs = resolve_methods(methods, rules, add_ah)
    distributed.setup(sm.model.device)  # under torchrun: every estimator shards its chunks and all-reduces
    # exact patching stacks every position (components) or nodes_per_pass nodes (features) per example
    batch_size, batching = resolve_batch_size(
        sm, batch, batch_size, [s.base for s in specs], steps=steps, rules=rules, edges=False,
        forward_rows=batch.seq_len if granularity == "components" else nodes_per_pass)
    progress = progress and distributed.is_writer()  # one set of bars
    kinds = _kinds(sm)
    effects, runs = _run_methods(sm, batch, specs, steps=steps, batch_size=batch_size, repeats=repeats,
                                 progress=progress)
    result: dict[str, Any] = {
        "granularity": granularity, "n": len(batch), "seq_len": batch.seq_len, "site_kinds": kinds,
        "methods": [s.name for s in specs],
        "method_params": {s.name: {"base": s.base, "rules": list(s.rules) if s.rules else None,
                                   "steps": steps if s.base == "ig" else None} for s in specs},
        "repeats": repeats, "batch_size": batch_size, "batching": batching,
        # positions (left-padded, aligned at the end) where some pair's prompts differ in a token
        "differing_positions": torch.nonzero((batch.clean_ids != batch.patch_ids).any(0)).flatten().tolist(),
        "metric_clean": next(iter(effects.values())).metric_clean,
        "metric_patch": next(iter(effects.values())).metric_patch,
    }
    if granularity == "components":
        exact = node_effects(sm, batch, "exact", batch_size=batch_size, progress=progress)
        runs["exact"] = [exact.seconds]
        grids = {"exact": _grids(sm, exact)}
        grids.update({name: _grids(sm, ne) for name, ne in effects.items()})
        result["pearson"] = {m: {k: pearson(grids["exact"][k], grids[m][k]) for k in kinds} for m in effects}
        result["pearson_all"] = {m: pearson(torch.cat([grids["exact"][k].flatten() for k in kinds]),
                                            torch.cat([grids[m][k].flatten() for k in kinds])) for m in effects}
        result["grid"] = {"rows": "layer (embed: one row)", "columns": "position (left-padded, last = answer)",
                          "values": "prompt-averaged effect of patching the whole site vector at one position"}
        result["cells"] = {k: {"all": grids["exact"][k].numel(), "nonzero_exact": int((grids["exact"][k] != 0).sum())}
                           for k in kinds}
        result["grids"] = {m: {k: g.tolist() for k, g in gs.items()} for m, gs in grids.items()}
        result["points"] = {m: {k: (grids["exact"][k].flatten().tolist(), g.flatten().tolist())
                                for k, g in gs.items()} for m, gs in grids.items() if m != "exact"}
    else:
        index = node_space(sm, aggregation, batch.seq_len)
        values = {name: index.flatten(ne.mean(aggregation)) for name, ne in effects.items()}
        order, sources, described = _select_nodes(index, values, kinds, top_k, n_random, seed)
        nodes = [feature_node(index, i) for i in order]
        t0 = time.perf_counter()
        exact = exact_feature_effects(sm, batch, nodes, batch_size=batch_size, nodes_per_pass=nodes_per_pass,
                                      progress=progress)
        runs["exact"] = [time.perf_counter() - t0]
        order_t = torch.tensor(order, dtype=torch.long)
        node_kinds = [site_kind(n.site) for n in nodes]
        is_random = torch.tensor(["random" in sources[i] for i in order])
        result["pearson"], result["pearson_random"], result["points"] = {}, {}, {}
        for m, v in values.items():
            est = v[order_t]
            result["pearson"][m], result["pearson_random"][m], result["points"][m] = {}, {}, {}
            for kind in kinds:
                sel = torch.tensor([k == kind for k in node_kinds])
                result["pearson"][m][kind] = pearson(exact[sel], est[sel])
                result["pearson_random"][m][kind] = pearson(exact[sel & is_random], est[sel & is_random])
                result["points"][m][kind] = (exact[sel].tolist(), est[sel].tolist())
        result["pearson_all"] = {m: pearson(exact, v[order_t]) for m, v in values.items()}
        result["sample"] = {
            "description": (f"exact patching covers, per site kind, the top {top_k} nodes by |effect| under each "
                            f"method plus {n_random} nodes drawn uniformly (seed {seed}) from the other nodes "
                            "that some method gives a nonzero effect"),
            "aggregation": aggregation, "top_k": top_k, "random": n_random, "seed": seed, "per_kind": described,
            "nodes": [{"site": n.site, "feature": n.index if n.index >= 0 else "err", "position": n.position,
                       "selected_by": sources[i], "exact": float(exact[j]),
                       **{m: float(values[m][i]) for m in values}}
                      for j, (i, n) in enumerate(zip(order, nodes))],
        }
    result["seconds"] = _seconds(runs)
    result["seconds_runs"] = {m: [round(s, 4) for s in v] for m, v in runs.items()}
    result["passes"] = {name: ne.passes for name, ne in effects.items()}
    result["targets"] = target_checks(result)
    kw = dict(rules=rules, steps=steps, batch_size=batch_size, aggregation=aggregation, top_k=top_k,
              n_random=n_random, seed=seed, nodes_per_pass=nodes_per_pass, add_ah=add_ah, progress=progress)
    cases = agreement_by_case(sm, batch, methods, granularity, **kw) if by_case else {}
    if cases:
        result["by_case"] = cases
    return result


def agreement_by_case(sm: SplicedModel, batch: Batch, methods: Iterable[str] | str, granularity: str,
                      **kw: Any) -> dict[str, dict[str, Any]]:
    """Pearson r per ``case`` (template, e.g. IOI's io-first / s-first) when the pairs have
    several: every estimator and exact patching rerun on each case's pairs alone (one timing
    run each). Empty for a task of one case."""
    cases = sorted({p.case for p in batch.pairs})
    if len(cases) < 2:
        return {}
    out = {}
    for case in cases:
        sub = batch.select([i for i, p in enumerate(batch.pairs) if p.case == case])
        if len(sub) < 2:
            out[case] = {"n": len(sub), "pearson": None, "pearson_all": None}
            continue
        sized = {**kw, "batch_size": distributed.fitting_batch_size(len(sub), kw["batch_size"])}
        r = run_agreement(sm, sub, methods, granularity, repeats=1, by_case=False, **sized)
        out[case] = {"n": len(sub), "pearson": r["pearson"], "pearson_all": r["pearson_all"]}
    return out


def target_checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 3's targets, evaluated on a result: RelP r >= 0.9 for resid and mlp, RelP not
    worse than AtP by more than 0.02 for any site kind, RelP at most 1.3x AtP's time."""
    checks = []
    r = result["pearson"]
    if "relp" in r:
        for kind, lo in TARGET_MIN_R.items():
            if kind in r["relp"]:
                v = r["relp"][kind]
                checks.append({"check": f"RelP r ({kind}) >= {lo}", "value": _num(v),
                               "passed": bool(v == v and v >= lo)})
    if "relp" in r and "atp" in r:
        for kind in result["site_kinds"]:
            a, b = r["atp"].get(kind), r["relp"].get(kind)
            if a is None or b is None or a != a or b != b:
                continue
            checks.append({"check": f"RelP r ({kind}) >= AtP r - {TARGET_MAX_DEFICIT}", "value": _num(b - a),
                           "passed": bool(b >= a - TARGET_MAX_DEFICIT)})
    sec = result.get("seconds", {})
    if sec.get("relp") and sec.get("atp"):
        ratio = sec["relp"] / sec["atp"]
        checks.append({"check": f"RelP time <= {TARGET_MAX_COST} x AtP time", "value": round(ratio, 3),
                       "passed": bool(ratio <= TARGET_MAX_COST)})
    return checks


def _num(v: float) -> float | None:
    return None if v is None or v != v else round(float(v), 4)


# --------------------------------------------------------------------------------------
# Outputs


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and v != v) else f"{v:+.3f}"


def markdown_table(result: dict[str, Any], title: str | None = None) -> str:
    """The Pearson table (one row per method, one column per site kind) with timings and
    the targets' verdicts."""
    from .plotting import method_label

    kinds = result["site_kinds"]
    sec = result["seconds"]
    lines = []
    if title:
        lines += [f"### {title}", ""]
    head = ["method", *kinds, "all", "seconds", "x AtP"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in result["methods"]:
        ratio = f"{sec[m] / sec['atp']:.2f}" if m in sec and sec.get("atp") else "n/a"
        rules = result["method_params"][m]["rules"]
        label = method_label(m) + (f" [{','.join(rules)}]" if rules and not m.startswith("relp:") else "")
        row = [label, *(_fmt(result["pearson"][m].get(k)) for k in kinds),
               _fmt(result["pearson_all"].get(m)), f"{sec.get(m, float('nan')):.2f}", ratio]
        lines.append("| " + " | ".join(row) + " |")
    if "exact" in sec:
        lines.append(f"| exact patching (reference) | {' | '.join('1' for _ in kinds)} | 1 | {sec['exact']:.2f} | "
                     f"{sec['exact'] / sec['atp']:.2f} |" if sec.get("atp") else
                     f"| exact patching (reference) | {' | '.join('1' for _ in kinds)} | 1 | {sec['exact']:.2f} | n/a |")
    lines.append("")
    if result["granularity"] == "components":
        lines.append(f"Pearson r against exact patching over the prompt-averaged layer x position grid, "
                     f"n = {result['n']} pairs; seconds: median of {result['repeats']} interleaved runs for AtP "
                     "and RelP, one run for the others.")
        few = [k for k, c in result.get("cells", {}).items() if c["nonzero_exact"] < 3]
        if few:
            lines.append(f"Few cells carry an effect for {', '.join(few)} (" + ", ".join(
                f"{k}: {result['cells'][k]['nonzero_exact']} of {result['cells'][k]['all']}" for k in few)
                + "): there r says little more than whether the signs agree.")
    else:
        s = result["sample"]
        lines.append(f"Pearson r against exact patching over a sample of nodes (aggregation {s['aggregation']}): "
                     f"{s['description']}; sampled per kind: "
                     + ", ".join(f"{k} {v['sampled']}" for k, v in s["per_kind"].items())
                     + f". n = {result['n']} pairs. On the random part alone: "
                     + "; ".join(f"{m} " + ", ".join(f"{k} {_fmt(v)}" for k, v in r.items())
                                 for m, r in result["pearson_random"].items()) + ".")
    if result.get("targets"):
        lines += ["", "Targets (issue 3; defined for components granularity): "
                  + "; ".join(f"{c['check']}: {'met' if c['passed'] else 'MISSED'} ({c['value']})"
                              for c in result["targets"]) + "."]
    if result.get("by_case"):
        lines += ["", "By case (each case's pairs alone):", "", "| case | n | method | " + " | ".join(kinds) + " | all |",
                  "|" + "---|" * (len(kinds) + 4)]
        lines += ["| " + " | ".join(row) + " |" for row in by_case_rows(result)]
    return "\n".join(lines) + "\n"


def by_case_rows(result: dict[str, Any]) -> list[list[str]]:
    """[case, n, method, r per site kind..., r over all] for each case and method (tables, CLI)."""
    rows = []
    for case, c in result.get("by_case", {}).items():
        for m in result["methods"]:
            per_kind = (c["pearson"] or {}).get(m, {})
            rows.append([case, str(c["n"]), m, *(_fmt(per_kind.get(k)) for k in result["site_kinds"]),
                         _fmt((c["pearson_all"] or {}).get(m))])
    return rows


def scatter_plot(result: dict[str, Any], stem: str | Path, title: str | None = None) -> list[Path]:
    """One panel per site kind: each method's estimate against exact patching (PNG + SVG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plotting import method_color, method_label, save_figure

    kinds = result["site_kinds"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        lo = hi = 0.0
        for m in result["methods"]:
            x, y = result["points"][m][kind]
            if not x:
                continue
            r = result["pearson"][m][kind]
            ax.scatter(x, y, s=10, alpha=0.6, color=method_color(m), edgecolors="none",
                       label=f"{method_label(m)} (r={_fmt(r)})")
            lo, hi = min(lo, *x, *y), max(hi, *x, *y)
        ax.plot([lo, hi], [lo, hi], color="#888888", lw=0.8, ls="--", zorder=0)
        ax.axhline(0, color="#dddddd", lw=0.6, zorder=0)
        ax.axvline(0, color="#dddddd", lw=0.6, zorder=0)
        ax.set_title(kind)
        ax.set_xlabel("exact patching effect")
        ax.legend(fontsize=7, loc="best")
    axes[0][0].set_ylabel("estimated effect")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        return save_figure(fig, stem)
    finally:
        plt.close(fig)


def write_agreement(result: dict[str, Any], out: str | Path, title: str | None = None) -> list[Path]:
    """``agreement.json``, ``agreement.md`` and ``scatter.png``/``.svg`` into ``out`` (atomic)."""
    from .io import write_json, write_text

    if not distributed.is_writer():  # under torchrun rank 0 alone writes; the others hold the same result
        return []
    out = Path(out)
    json_safe = _nan_to_none(result)
    paths = [write_json(out / "agreement.json", json_safe),
             write_text(out / "agreement.md", markdown_table(result, title))]
    paths += scatter_plot(result, out / "scatter", title)
    return paths


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if obj != obj else obj
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


__all__ = ["GRANULARITIES", "ESTIMATORS", "MethodSpec", "node_space", "feature_node", "markdown_table", "pearson",
           "resolve_methods", "run_agreement", "scatter_plot", "target_checks", "write_agreement"]
