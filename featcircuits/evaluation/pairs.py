"""Evaluation examples disjoint from the discovery examples."""

from __future__ import annotations

from typing import Sequence

from ..errors import UserError
from ..tasks import Pair, make_pairs


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
