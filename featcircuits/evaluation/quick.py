"""The quick evaluation ``discover`` runs on its own circuit: how good is what it found?

Faithfulness and completeness of the selected circuit (its nodes, mean ablation, error
nodes ablated unless in the circuit) on held-out pairs (:func:`eval_pairs`), the share of
the circuit's |effect| that sits in error nodes and, when faithfulness is below
:data:`LOW_FAITHFULNESS`, a sweep over top-k sizes that suggests a size reaching it.
"""

from __future__ import annotations

import time
from typing import Sequence

from ..errors import UserError
from ..graph import Circuit
from ..tasks import Pair, tokenize_pairs
from ..tracing import SplicedModel
from .evaluator import Evaluator
from .masks import candidate_effects
from .pairs import eval_pairs

LOW_FAITHFULNESS = 0.5
#: multiples of the circuit's size tried by the sweep (one stacked evaluation)
SWEEP_FACTORS = (2, 4, 8, 16, 32)
DEFAULT_N_EVAL = 32


def error_share(circuit: Circuit) -> float | None:
    """The share of the circuit's total |effect| (its nodes, metric excluded) in error nodes."""
    eff = [(d.get("kind"), abs(float(d.get("effect", 0.0)))) for _, d in circuit.graph.nodes(data=True)
           if d.get("kind") != "metric"]
    total = sum(e for _, e in eff)
    return sum(e for k, e in eff if k == "error") / total if total else None


def circuit_quality(sm: SplicedModel, circuit: Circuit, task: str, discovery: Sequence[Pair], *,
                    n_eval: int = DEFAULT_N_EVAL, seed: int = 0, batch_size: int = 16, sweep: bool = True,
                    progress: bool = False) -> dict:
    """Faithfulness, completeness and error share of ``circuit`` on ``n_eval`` held-out pairs.

    With ``sweep`` and faithfulness below :data:`LOW_FAITHFULNESS`, top-k circuits of
    :data:`SWEEP_FACTORS` times the circuit's size (by |effect| of ``circuit.effects``) are
    evaluated too and ``suggested_top_k`` is the smallest that reaches it (None if none does).
    A task with too few pairs outside the discovery set gives ``{"skipped": reason}``.
    """
    t0 = time.perf_counter()
    out: dict = {"error_share": error_share(circuit)}
    try:
        pairs, split = eval_pairs(task, n_eval, discovery, seed)
    except UserError as exc:
        return {**out, "skipped": str(exc)}
    batch, dropped = tokenize_pairs(pairs, sm.model.tokenizer)
    ev = Evaluator(sm, batch, seed=seed, batch_size=batch_size, progress=progress)
    masks = circuit.masks()
    (res,) = ev.evaluate([masks], desc="quick evaluation")
    out.update({"faithfulness": res["faithfulness"], "completeness": res["completeness"],
                "F_C": res["F_C"], "F_M": ev.F_M, "F_empty": ev.F_empty, "n_nodes": res["n_nodes"],
                "n_eval": len(batch), "eval_dropped": len(dropped), "eval_seed": split["eval_seed"],
                "settings": ev.settings()})
    if sweep and res["faithfulness"] is not None and res["faithfulness"] < LOW_FAITHFULNESS:
        out["sweep"] = _sweep(ev, circuit, res["n_nodes"])
        reach = [r["top_k"] for r in out["sweep"] if r["faithfulness"] is not None
                 and r["faithfulness"] >= LOW_FAITHFULNESS]
        out["suggested_top_k"] = min(reach) if reach else None
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def _sweep(ev: Evaluator, circuit: Circuit, size: int) -> list[dict]:
    from ..nodes import NodeSpace

    scores, space = candidate_effects(circuit.effects, ev.sites)
    n_max = int((scores > 0).sum())
    sizes = sorted({min(n_max, max(1, size) * f) for f in SWEEP_FACTORS} - {0})
    if not sizes:
        return []
    circuits = [space.unflatten(NodeSpace.top_k(scores, k)) for k in sizes]
    raw = ev.scores(circuits, desc="size sweep")  # faithfulness only: no complements, half the passes
    return [{"top_k": k, "faithfulness": ev.normalise(f)} for k, f in zip(sizes, raw)]


def quality_lines(q: dict) -> list[str]:
    """What discover prints about its circuit's quality (one line, plus a warning when low)."""
    share = q.get("error_share")
    share_s = "n/a" if share is None else f"{100 * share:.0f} %"
    if "skipped" in q:
        return [f"quality: not evaluated ({q['skipped']}); error nodes hold {share_s} of |effect|"]
    lines = [f"quality on {q['n_eval']} held-out pairs: faithfulness {q['faithfulness']:.3f}, "
             f"completeness {q['completeness']:.3f}; error nodes hold {share_s} of |effect|"]
    if q["faithfulness"] < LOW_FAITHFULNESS:
        k = q.get("suggested_top_k")
        hint = (f"try --top-k {k}" if k else "no top-k size up to "
                f"{max((r['top_k'] for r in q.get('sweep', [])), default=q['n_nodes'])} reaches it")
        lines.append(f"featcircuits: warning: faithfulness {q['faithfulness']:.2f} < {LOW_FAITHFULNESS}: "
                     f"the circuit recovers little of the behaviour ({hint})")
    return lines
