"""Circuits as site masks at the evaluated sites, and what ablated nodes become.

A circuit is ``Acts`` of bool ``Act`` masks (``nodes.Act``): features [d_sae] and error []
per site, or [T, d_sae] and [T] with positions. Ablation values ``a``: ``mean`` = mean over
the counterfactual prompts of the evaluation set, per position (weighted by the attention
mask); ``zero``; ``resample`` = a counterfactual prompt's value drawn uniformly (seeded,
with replacement), per example.
"""

from __future__ import annotations

import math
import random
from typing import Iterable

import torch

from .. import distributed
from ..adapters import Site
from ..errors import UserError
from ..nodes import Act, Acts, NodeSpace
from ..tasks import Batch
from ..tracing import SplicedModel

ABLATIONS = ("mean", "zero", "resample")
Masks = Acts  # per site, which nodes are in the circuit (a bool ``Act``)


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



def candidate_effects(effects: Acts, sites: Iterable[Site], include_errors: bool = True) -> tuple[torch.Tensor, NodeSpace]:
    """All candidate node scores |effect| at ``sites`` in one vector, with the node space to map
    back (``space.unflatten(NodeSpace.top_k(scores, k))``). Error nodes get score -inf (never
    chosen) when ``include_errors`` is False."""
    chosen = {s.name: effects[s.name].abs() for s in sites}
    if not include_errors:
        chosen = {s: Act(v.f, torch.full_like(v.err, -math.inf)) for s, v in chosen.items()}
    space = NodeSpace.of(chosen)
    return space.flatten(chosen).float(), space


def ablation_values(sm: SplicedModel, batch: Batch, sites: list[Site], ablation: str = "mean", *,
                    seed: int = 0, batch_size: int = 16) -> Acts:
    """What an ablated node becomes at each of ``sites``, from unablated runs of ``batch``'s
    counterfactual prompts: ``f`` and ``err`` broadcastable to [b, T, .] ([1, T, .] for mean,
    [1, 1, .] zeros, [n, T, .] per example for resample)."""
    if ablation not in ABLATIONS:
        raise UserError(f"unknown ablation {ablation!r}; choose from {', '.join(ABLATIONS)}")
    if ablation == "zero":
        return {s.name: Act(torch.zeros(1, 1, sm.dictionary(s).d_sae), torch.zeros(1, 1, sm.dictionary(s).d_in))
                for s in sites}
    return _ablation_values(sm, batch, sites, ablation, seed=seed, batch_size=batch_size)


def resample_donors(n: int, seed: int = 0) -> torch.Tensor:
    """For each of ``n`` evaluation examples, the example whose counterfactual value it takes
    under ``resample`` ablation (uniform, with replacement, seeded)."""
    rng = random.Random(f"resample:{seed}")
    return torch.tensor([rng.randrange(n) for _ in range(n)], dtype=torch.long)


def _ablation_values(sm: SplicedModel, batch: Batch, sites: list[Site], ablation: str, *,
                     seed: int, batch_size: int) -> Acts:
    names = [s.name for s in sites]
    if ablation == "resample":  # every example's own donor value (the Evaluator streams these per chunk)
        donors = batch.select(resample_donors(len(batch), seed).tolist())
        with torch.no_grad():
            parts = [sm.cache(c.inputs("patch"))[1] for c in donors.chunks(batch_size)]
        return {s: Act(torch.cat([p[s].f for p in parts]), torch.cat([p[s].err for p in parts])) for s in names}
    sums_f: dict[str, torch.Tensor] = {}
    sums_e: dict[str, torch.Tensor] = {}
    weight = torch.zeros(batch.seq_len, device=sm.model.device)
    # sums over this rank's block of chunks, all-reduced under torchrun (the identity in one process)
    for _, chunk in distributed.shard(batch.chunks(batch_size)):
        with torch.no_grad():
            _, vals = sm.cache(chunk.inputs("patch"))
        w = chunk.patch_mask.to(device=sm.model.device, dtype=torch.float32)  # [b, T]; values are on the model's device
        weight += w.sum(0)
        wf = w.unsqueeze(-1)
        for s in names:
            v = vals[s]
            sums_f[s] = sums_f.get(s, 0) + (v.f.float() * wf).sum(0)
            sums_e[s] = sums_e.get(s, 0) + (v.err.float() * wf).sum(0)
    distributed.all_reduce_sum([weight, *(t for s in names for t in (sums_f[s], sums_e[s]))])
    denom = weight.clamp(min=1.0).view(-1, 1)  # all-padding positions: zero
    return {s: Act((sums_f[s] / denom).unsqueeze(0), (sums_e[s] / denom).unsqueeze(0)) for s in names}
