"""Evaluation: faithfulness and completeness of a circuit by ablating everything outside it.

Definitions (DESIGN.md, "Evaluation"). For a circuit ``C`` (``dict[site, Act]``, bool masks):

- ``F(C)``: mean *clean preference* ``logit[clean] - logit[patch]`` (``metric.preference``)
  over the evaluation examples when every node at the evaluated sites (those with
  ``layer >= start_layer``; ``embed`` is layer -1) that is **not** in ``C`` is ablated.
- ``F(M)``: nothing ablated (the spliced model, numerically the model itself).
- ``F(∅)``: every node at the evaluated sites ablated.
- ``faithfulness(C) = (F(C) - F(∅)) / (F(M) - F(∅))``; ``completeness(C)`` is the
  faithfulness of the complement ``M \\ C`` (near 0: nothing important left out).

Ablation happens inside one nnsight trace (``SplicedModel.run``): at each evaluated site
``x -> f = encode(x)``, ``err = x - decode(f)``, ``f' = where(mask, f, a_f)``,
``err' = err`` if the error node is in the circuit (or ``errors="keep"``) else ``a_err``,
and the model continues with ``decode(f') + err'``. Sites are visited in forward order, so
an ablation upstream changes what downstream sites encode (as in Sparse Feature Circuits).
A site (or a stacked circuit's row) whose mask is entirely True is left exactly as it is.

Ablation values ``a``: ``mean`` = mean over the *counterfactual* prompts of the evaluation
set, per position (weighted by the attention mask, so padding is not averaged in);
``zero``; ``resample`` = the value of a counterfactual prompt drawn uniformly (seeded,
with replacement) from the evaluation set, per example. The values come from an
unablated run of the counterfactual prompts.

Several circuits are evaluated in one forward by stacking them along the batch.
"""

from __future__ import annotations

import math
import random
import time
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from . import lrp
from .adapters import Site
from .errors import UserError
from .metric import preference
from .nodes import Act, Acts, NodeSpace
from .tasks import Batch, Pair, make_pairs
from .tracing import SplicedModel

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

ABLATIONS = ("mean", "zero", "resample")
ERROR_MODES = ("ablate", "keep")
Masks = Acts  # per site, which nodes are in the circuit (a bool ``Act``)


# --------------------------------------------------------------------------------------
# Evaluation examples disjoint from the discovery examples


def pair_key(p: Pair) -> tuple[str, str, str, str]:
    return (p.clean_prefix, p.patch_prefix, p.clean_answer, p.patch_answer)


EVAL_SEED_OFFSET = 1_000_003


def eval_pairs(task: str, n_eval: int, discovery: Sequence[Pair], seed: int = 0) -> tuple[list[Pair], dict]:
    """``n_eval`` pairs of ``task`` disjoint from ``discovery`` (no identical pair), distinct.

    Drawn with seed ``seed + EVAL_SEED_OFFSET`` (a different generator stream from the
    discovery seed); any pair that also occurs in the discovery set is dropped, as are
    repeats. For a task file the candidates are the whole file shuffled with that seed.
    Returns the pairs and a description of the split for the JSON outputs.
    """
    if n_eval <= 0:
        raise UserError(f"--n-eval must be positive, got {n_eval}")
    eval_seed = seed + EVAL_SEED_OFFSET
    taken = {pair_key(p) for p in discovery}
    out: list[Pair] = []
    seen: set = set()
    overlap = 0
    pool = max(4 * n_eval, 256)
    for _ in range(4):  # grow the candidate pool until enough pairs survive
        out, seen, overlap = [], set(), 0
        for p in make_pairs(task, pool, seed=eval_seed):
            k = pair_key(p)
            if k in taken:
                overlap += 1
                continue
            if k in seen:
                continue
            seen.add(k)
            out.append(p)
            if len(out) == n_eval:
                break
        if len(out) == n_eval:
            break
        pool *= 4
    if len(out) < n_eval:
        raise UserError(f"task {task!r} has only {len(out)} pairs outside the discovery set; "
                        f"ask for --n-eval {len(out)} or fewer")
    info = {"eval_seed": eval_seed, "n_eval": len(out), "discovery_pairs": len(taken),
            "candidates_dropped_as_in_discovery": overlap,
            "rule": (f"evaluation pairs drawn with seed {eval_seed} (discovery seed {seed} + "
                     f"{EVAL_SEED_OFFSET}); every pair identical to a discovery pair (same prompts and "
                     "answers) and every repeat dropped, so the two sets share no pair")}
    return out, info


# --------------------------------------------------------------------------------------
# Masks


def evaluated_sites(sm: SplicedModel, start_layer: int = -1) -> list[Site]:
    """Sites ablated by the evaluation: every site with ``layer >= start_layer`` (embed = -1)."""
    sites = [s for s in sm.sites if s.layer >= start_layer]
    if not sites:
        raise UserError(f"--start-layer {start_layer} leaves no site to evaluate "
                        f"(the model has layers -1..{sm.adapter.n_layers - 1})")
    return sites


def full_masks(sm: SplicedModel, sites: Iterable[Site], positions: int | None = None) -> Masks:
    """Every node in: features [d_sae] + error [] (``positions=None``) or [T, d_sae] + [T]."""
    out = {}
    for s in sites:
        d = sm.dictionary(s).d_sae
        if positions is None:
            out[s.name] = Act(torch.ones(d, dtype=torch.bool), torch.tensor(True))
        else:
            out[s.name] = Act(torch.ones(positions, d, dtype=torch.bool), torch.ones(positions, dtype=torch.bool))
    return out


def empty_masks(sm: SplicedModel, sites: Iterable[Site], positions: int | None = None) -> Masks:
    return {k: ~m for k, m in full_masks(sm, sites, positions).items()}


def complement(masks: Masks) -> Masks:
    """M \\ C: every node not in C (at the sites the masks name)."""
    return {s: ~m for s, m in masks.items()}


def mask_size(masks: Masks, include_errors: bool = True) -> int:
    return sum(int(m.f.sum()) + (int(m.err.sum()) if include_errors else 0) for m in masks.values())


def align_positions(mask: Act, seq_len: int) -> Act:
    """A per-position mask ([T, d_sae] + [T]) aligned at the last token to ``seq_len``
    positions (prompts are left-padded): positions the mask does not cover are not in the
    circuit; a per-feature mask ([d_sae] + []) is returned unchanged."""
    f, e = mask.f, mask.err
    if f.ndim == 1:
        return mask
    t = f.shape[0]
    if t == seq_len:
        return mask
    if t > seq_len:
        return Act(f[t - seq_len:], e[t - seq_len:])
    pad = seq_len - t
    return Act(torch.cat([torch.zeros(pad, f.shape[1], dtype=torch.bool), f]),
                    torch.cat([torch.zeros(pad, dtype=torch.bool), e]))


# --------------------------------------------------------------------------------------
# Ablation values


def ablation_values(sm: SplicedModel, batch: Batch, sites: list[Site], ablation: str = "mean", *,
                    seed: int = 0, batch_size: int = 16) -> Acts:
    """What an ablated node becomes at each of ``sites``, from unablated runs of ``batch``'s
    counterfactual prompts: ``f`` and ``err`` broadcastable to [b, T, .] ([1, T, .] for mean,
    [1, 1, .] zeros, [n, T, .] per example for resample)."""
    if ablation not in ABLATIONS:
        raise UserError(f"unknown ablation {ablation!r}; choose from {', '.join(ABLATIONS)}")
    if ablation == "zero":
        return {s.name: Act(torch.zeros(1, 1, sm.dictionary(s).d_sae), torch.zeros(1, 1, sm.adapter.d_model))
                for s in sites}
    return _ablation_values(sm, batch, sites, ablation, seed=seed, batch_size=batch_size)


def _ablation_values(sm: SplicedModel, batch: Batch, sites: list[Site], ablation: str, *,
                     seed: int, batch_size: int) -> Acts:
    names = {s.name for s in sites}
    sums_f: dict[str, torch.Tensor] = {}
    sums_e: dict[str, torch.Tensor] = {}
    per_f: dict[str, list[torch.Tensor]] = {s: [] for s in names}
    per_e: dict[str, list[torch.Tensor]] = {s: [] for s in names}
    weight = torch.zeros(batch.seq_len)
    for chunk in batch.chunks(batch_size):
        with torch.no_grad():
            _, vals = sm.cache(chunk.inputs("patch"))
        w = chunk.patch_mask.to(torch.float32)  # [b, T]
        weight += w.sum(0)
        for s in names:
            v = vals[s]
            if ablation == "mean":
                wf = w.unsqueeze(-1)
                sums_f[s] = sums_f.get(s, 0) + (v.f.float() * wf).sum(0)
                sums_e[s] = sums_e.get(s, 0) + (v.err.float() * wf).sum(0)
            else:
                per_f[s].append(v.f)
                per_e[s].append(v.err)
    out = {}
    if ablation == "mean":
        denom = weight.clamp(min=1.0).view(-1, 1)  # positions where every prompt is padding: zero
        for s in names:
            out[s] = Act((sums_f[s] / denom).unsqueeze(0), (sums_e[s] / denom).unsqueeze(0))
        return out
    rng = random.Random(f"resample:{seed}")
    n = len(batch)
    donor = torch.tensor([rng.randrange(n) for _ in range(n)], dtype=torch.long)
    for s in names:
        f, e = torch.cat(per_f[s]), torch.cat(per_e[s])
        out[s] = Act(f[donor], e[donor])
    return out


# --------------------------------------------------------------------------------------
# The evaluator


def _stack_site(masks_list: list[Masks], site: str, d_sae: int, seq_len: int,
                errors: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack one site's masks of K circuits: features [K, 1, 1|T, d_sae], error [K, 1, 1|T, 1],
    which rows keep the whole site [K] and which ablate all of it [K]. A site a circuit does not name is fully ablated."""
    fs, es = [], []
    per_position = any(site in m and m[site].f.ndim == 2 for m in masks_list)
    for masks in masks_list:
        m = masks.get(site)
        if m is None:
            f = torch.zeros(seq_len if per_position else 1, d_sae, dtype=torch.bool)
            e = torch.zeros(seq_len if per_position else 1, dtype=torch.bool)
        else:
            m = align_positions(m, seq_len)
            if m.f.shape[-1] != d_sae:
                raise UserError(f"circuit mask for {site} has {m.f.shape[-1]} features but the "
                                f"dictionary has {d_sae}: the circuit was found with other dictionaries")
            f = m.f.bool().reshape(-1, d_sae)
            e = m.err.bool().reshape(-1)
            if per_position and f.shape[0] == 1:
                f, e = f.expand(seq_len, d_sae), e.expand(seq_len)
        if errors == "keep":
            e = torch.ones_like(e)
        fs.append(f)
        es.append(e)
    mf = torch.stack(fs).unsqueeze(1)  # [K, 1, 1|T, d_sae]
    me = torch.stack(es).unsqueeze(1).unsqueeze(-1)  # [K, 1, 1|T, 1]
    full = mf.flatten(1).all(1) & me.flatten(1).all(1)
    empty = ~mf.flatten(1).any(1) & ~me.flatten(1).any(1)
    return mf, me, full, empty


class Evaluator:
    """F(C) for circuits on one evaluation batch, with F(M) and F(∅) computed once.

    ``ablation``: mean | zero | resample; ``errors``: ablate (error nodes outside the circuit
    are ablated) or keep (error nodes are always kept); ``start_layer``: first evaluated
    layer (embed = -1); ``stack``: circuits per forward pass (stacked along the batch).
    """

    def __init__(self, sm: SplicedModel, batch: Batch, *, ablation: str = "mean", errors: str = "ablate",
                 start_layer: int = -1, seed: int = 0, batch_size: int = 16, stack: int = 4,
                 progress: bool = False):
        if errors not in ERROR_MODES:
            raise UserError(f"--errors must be one of {', '.join(ERROR_MODES)}, got {errors!r}")
        if stack < 1:
            raise UserError("stack must be at least 1")
        self.sm, self.batch = sm, batch
        self.ablation, self.errors, self.start_layer = ablation, errors, start_layer
        self.batch_size, self.stack, self.progress = batch_size, stack, progress
        self.sites = evaluated_sites(sm, start_layer)
        t0 = time.perf_counter()
        self.values = ablation_values(sm, batch, self.sites, ablation, seed=seed, batch_size=batch_size)
        self.per_example = ablation == "resample"  # values per evaluation example, not broadcast
        with torch.no_grad():  # a site's value when all of it is ablated: decode(a_f) + a_err
            self.ablated = {s: sm.dictionary(s).decode(v.f) + v.err for s, v in self.values.items()}
        self.forward_passes = 0
        self.F_M, self.F_empty = self.scores([full_masks(sm, self.sites), empty_masks(sm, self.sites)])
        self.setup_seconds = time.perf_counter() - t0

    # -- raw scores -------------------------------------------------------------------
    def scores(self, circuits: Sequence[Masks], desc: str = "ablations",
               checkpoint: "Checkpoint | None" = None) -> list[float]:
        """F(C) (mean clean preference) for each circuit.

        With a ``checkpoint`` the running sums are saved after every chunk of examples and a
        resumed call skips the chunks done (sums are added in the same order either way)."""
        circuits = list(circuits)
        total = torch.zeros(len(circuits), dtype=torch.float64)
        groups = [list(range(i, min(i + self.stack, len(circuits)))) for i in range(0, len(circuits), self.stack)]
        chunks = self.batch.chunks(self.batch_size)
        done = 0
        saved = checkpoint.load() if checkpoint is not None else None
        if saved is not None:
            done, state = saved
            total = state["total"]
            if total.shape != (len(circuits),):
                raise UserError(f"checkpoint {checkpoint.path} holds {total.numel()} circuits, this run has "
                                f"{len(circuits)}; delete it or match the original arguments")
        bar = tqdm(total=len(groups) * len(chunks), initial=done * len(groups), desc=desc,
                   disable=not self.progress, leave=False)
        start = sum(len(c) for c in chunks[:done])
        for n_done, chunk in enumerate(chunks[done:], start=done + 1):
            for g in groups:
                total[g] += self._run(chunk, start, [circuits[i] for i in g]).sum(1).double()
                bar.update(1)
            start += len(chunk)
            if checkpoint is not None:
                checkpoint.save(n_done, {"total": total})
        bar.close()
        return (total / len(self.batch)).tolist()

    def _run(self, chunk: Batch, start: int, circuits: list[Masks]) -> torch.Tensor:
        """Clean preference [K, b] of the chunk under each of K circuits (stacked)."""
        sm, K, b = self.sm, len(circuits), len(chunk)
        T = chunk.seq_len
        stacked = {}
        for s in self.sites:
            d = sm.dictionary(s)
            stacked[s.name] = _stack_site(circuits, s.name, d.d_sae, T, self.errors)

        def hook(site: Site, x: torch.Tensor) -> torch.Tensor | None:
            mf, me, full, empty = stacked[site.name]
            if bool(full.all()):
                return None  # nothing ablated here: the site stays exactly x
            d = sm.dictionary(site)
            a = self.values[site.name]
            sl = slice(start, start + b) if self.per_example else slice(None)
            with torch.no_grad():
                xs = x.reshape(K, b, T, -1)
                # rows with the whole site ablated take the precomputed decode(a_f) + a_err
                out = torch.where(empty.view(K, 1, 1, 1), self.ablated[site.name][sl].to(x.dtype), xs)
                part = torch.nonzero(~full & ~empty).flatten()
                if part.numel():
                    P = part.numel()
                    xp = xs[part].reshape(P * b, T, -1)
                    f = d.encode(xp)
                    f2 = torch.where(mf[part], f.view(P, b, T, -1), a.f[sl].to(f.dtype))
                    rec = d.decode(f2.reshape(P * b, T, -1)).view(P, b, T, -1)
                    if bool(me[part].any()):
                        err = (xp - d.decode(f)).view(P, b, T, -1)
                        rec = rec + torch.where(me[part], err, a.err[sl].to(err.dtype))
                    else:
                        rec = rec + a.err[sl].to(rec.dtype)
                    out[part] = rec.to(x.dtype)
            return out.reshape(x.shape)

        inputs = {k: v.repeat(K, 1) for k, v in chunk.inputs("clean").items()}
        with torch.no_grad():
            logits = sm.run(inputs, hook, self.sites)
        self.forward_passes += 1
        pref = preference(logits, chunk.clean_answer.repeat(K), chunk.patch_answer.repeat(K))
        return pref.view(K, b)

    # -- normalised measures ------------------------------------------------------------
    def normalise(self, score: float) -> float:
        """(F - F(∅)) / (F(M) - F(∅)); NaN when the model does not separate M from ∅."""
        denom = self.F_M - self.F_empty
        return (score - self.F_empty) / denom if abs(denom) > 1e-12 else math.nan

    def evaluate(self, circuits: Sequence[Masks], desc: str = "ablations",
                 checkpoint: "Checkpoint | None" = None) -> list[dict]:
        """Faithfulness and completeness of each circuit (both runs stacked)."""
        circuits = list(circuits)
        scores = self.scores(circuits + [complement(self._restrict(c)) for c in circuits], desc=desc,
                             checkpoint=checkpoint)
        n = len(circuits)
        out = []
        for i, c in enumerate(circuits):
            fc, fcomp = scores[i], scores[n + i]
            out.append({"n_nodes": mask_size(self._restrict(c), include_errors=self.errors == "ablate"),
                        "F_C": fc, "F_complement": fcomp,
                        "faithfulness": self.normalise(fc), "completeness": self.normalise(fcomp)})
        return out

    def _restrict(self, masks: Masks) -> Masks:
        """The circuit's masks at the evaluated sites, every evaluated site present."""
        out = {}
        for s in self.sites:
            if s.name in masks:
                out[s.name] = masks[s.name]
            else:
                d = self.sm.dictionary(s).d_sae
                out[s.name] = Act(torch.zeros(d, dtype=torch.bool), torch.tensor(False))
        return out

    def settings(self) -> dict:
        return {"ablation": self.ablation, "errors": self.errors, "start_layer": self.start_layer,
                "evaluated_sites": [s.name for s in self.sites], "n_eval": len(self.batch),
                "mean_ablation_source": ("counterfactual (patch) prompts of the evaluation set, per position, "
                                         "attention-mask weighted" if self.ablation == "mean" else None),
                "resample_source": ("counterfactual prompt of an evaluation example drawn uniformly with "
                                    "replacement (seeded), per example" if self.ablation == "resample" else None)}


# --------------------------------------------------------------------------------------
# Circuits from node effects: top-k and random


def candidate_effects(effects: Acts, sites: Iterable[Site], include_errors: bool = True) -> tuple[torch.Tensor, NodeSpace]:
    """All candidate node scores |effect| at ``sites`` in one vector, with the node space to map
    back (``space.unflatten(NodeSpace.top_k(scores, k))``). Error nodes get score -inf (never
    chosen) when ``include_errors`` is False."""
    chosen = {s.name: effects[s.name].abs() for s in sites}
    if not include_errors:
        chosen = {s: Act(v.f, torch.full_like(v.err, -math.inf)) for s, v in chosen.items()}
    space = NodeSpace.of(chosen)
    return space.flatten(chosen).float(), space


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


# --------------------------------------------------------------------------------------
# Curves: faithfulness and completeness against circuit size, per method


def faithfulness_curves(sm: SplicedModel, discovery: Batch, evaluation: Batch,
                        methods: Sequence[str] = ("relp", "ig", "atp", "random"), *,
                        points: int = 15, n_min: int = 1, n_max: int | None = None,
                        ablation: str = "mean", errors: str = "ablate", aggregation: str = "sum",
                        start_layer: int = -1, steps: int = 10, rules=None, random_draws: int = 3,
                        seed: int = 0, batch_size: int = 16, stack: int = 4,
                        effects: dict | None = None, progress: bool = True,
                        checkpoint_dir=None, resume: bool = False) -> dict:
    """Node effects per method on ``discovery``, top-k circuits on a shared log-spaced size
    grid, faithfulness and completeness of each on ``evaluation``; random circuits of the
    same sizes (``random_draws`` seeded draws, averaged). Returns the JSON-ready result.

    The size grid runs from ``n_min`` to ``n_max`` (default: the largest number of nodes with
    a non-zero effect under any method, i.e. every node any method ranks above the rest).
    ``effects`` may hand in precomputed ``NodeEffects`` per method (tests, reuse); the
    methods it lacks are computed and added to it.
    With ``checkpoint_dir``, node effects and ablation sums are checkpointed per chunk of
    examples (one stage per method) and ``resume=True`` continues a killed run; the result
    equals an uninterrupted run's.
    """
    from .attribution import METHODS as EFFECT_METHODS, node_effects

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
    ev = Evaluator(sm, evaluation, ablation=ablation, errors=errors, start_layer=start_layer, seed=seed,
                   batch_size=batch_size, stack=stack, progress=progress)
    timings["evaluation_setup_seconds"] = round(time.perf_counter() - t0, 3)
    include_errors = errors == "ablate"
    checkpoints: dict[str, "Checkpoint"] = {}
    if checkpoint_dir is not None:
        from .checkpoint import Checkpoint
        from .discover import _batch_digest

        config = {"methods": methods, "points": points, "n_min": n_min, "n_max": n_max, "ablation": ablation,
                  "errors": errors, "aggregation": aggregation, "start_layer": start_layer, "steps": steps,
                  "rules": lrp.rules_key(rules), "random_draws": random_draws, "seed": seed, "batch_size": batch_size,
                  "stack": stack, "dictionaries": sm.dictionaries.digest(),
                  "discovery": _batch_digest(discovery), "evaluation": _batch_digest(evaluation)}
        for m in methods:
            if m != "random":
                checkpoints[f"curves-nodes-{m}"] = Checkpoint(checkpoint_dir, f"curves-nodes-{m}", config, resume)
            checkpoints[f"curves-ablate-{m}"] = Checkpoint(checkpoint_dir, f"curves-ablate-{m}", config, resume)
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
    for m in methods:
        if m == "random":
            continue
        scores, sp = scored[m]
        circuits = [sp.unflatten(NodeSpace.top_k(scores, k)) for k in sizes]
        res = ev.evaluate(circuits, desc=f"ablations ({m})", checkpoint=checkpoints.get(f"curves-ablate-{m}"))
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
    timings["ablation_forward_passes"] = ev.forward_passes
    timings["total_seconds"] = round(time.perf_counter() - t0, 3)

    for ck in checkpoints.values():  # complete: a later run starts fresh
        ck.clear()
    comparison = relp_vs_ig(out_methods) if "relp" in out_methods and "ig" in out_methods else None
    return {
        "methods": out_methods,
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


# --------------------------------------------------------------------------------------
# Plot


def plot_curves(result: dict, path_stem, title: str = "") -> list:
    """Faithfulness and completeness vs number of nodes (log x), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plotting import METHOD_LABELS, method_color, save_figure

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
