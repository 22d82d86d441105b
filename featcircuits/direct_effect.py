"""A feature's direct effect on the output tokens: ``W_U . (g * w_dec)``.

``w_dec`` is the feature's decoder direction (``decode(e_i) - decode(0)``, so every
dictionary format works through the common interface), ``g`` the final norm's elementwise
weight with the norm's scale treated as a constant (the LN-rule), ``W_U`` the unembedding.
Every site's output joins the residual stream, so the same projection serves embed, attn,
mlp and resid features. For a LayerNorm the mean is removed first (that part is linear).
A final logit softcap (Gemma 2) is monotone and left out: the ranking is the same.
A feature of an attention site read at hook_z has a decoder direction in head space; it is
carried to the residual stream by the modules between z and the site's output
(``Adapter.z_readout``: the output projection's linear part, then any norm's gain, its scale
a constant as above) before the same projection.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapters import Site, resolve
from .dictionaries import Dictionary
from .models import LoadedModel

# Path of the final norm per adapter family. Kept here until the adapter carries a
# ``final_norm`` field (see notes/FEAT_INTEGRATION.md); the unembedding comes from
# ``get_output_embeddings()``, which every HF causal LM has.
# features projected at once: [CHUNK, vocab] logits (268 MB for Gemma's 262k vocabulary); 256
# rows ran ~10 % faster than 128 on the offline Gemma (2 cores), with bit-identical results
CHUNK = 256

FINAL_NORM = {
    "gpt_neox": "gpt_neox.final_layer_norm",
    "gpt2": "transformer.ln_f",
    "llama": "model.norm",
    "gemma2": "model.norm",
    "gemma3": "model.norm",
}


def final_norm(model: LoadedModel) -> nn.Module:
    """The model's final norm module (before the unembedding)."""
    return resolve(model.hf, FINAL_NORM[model.adapter.family])


def norm_gain(norm: nn.Module, d_model: int) -> torch.Tensor:
    """The norm's elementwise gain ``g`` [d_model]: ``weight``, or ``1 + weight`` for Gemma.

    Read through ``lrp._norm_weighted``, the one place that says how each norm applies its
    weight, as the linear part of ``y -> weighted(y)``.
    """
    from .lrp import _norm_weighted

    with torch.no_grad():
        ones = torch.ones(1, d_model)
        zeros = torch.zeros(1, d_model)
        return (_norm_weighted(norm, ones, ones) - _norm_weighted(norm, zeros, zeros))[0].float()


def unembedding(model: LoadedModel) -> torch.Tensor:
    """``W_U`` [vocab, d_model] (the output embedding's weight)."""
    return model.hf.get_output_embeddings().weight.detach()


def decoder_directions(d: Dictionary, features: torch.Tensor) -> torch.Tensor:
    """Decoder directions [n, d_in] of the given features: ``decode(e_i) - decode(0)``."""
    with torch.no_grad():
        basis = torch.zeros(len(features), d.d_sae)
        basis[torch.arange(len(features)), features] = 1.0
        return (d.decode(basis) - d.decode(torch.zeros(1, d.d_sae))).float()


def to_residual(model: LoadedModel, site: Site | None, dirs: torch.Tensor) -> torch.Tensor:
    """Directions at ``site`` [n, width] as residual-stream directions [n, d_model]: unchanged
    at output sites; at hook_z through the output projection (bias dropped: a direction) and
    the gain of any norm after it (``Adapter.z_readout_modules``)."""
    from .lrp import _is_norm  # the one place that says which modules are norms

    if site is None or not site.reads_input:
        return dirs
    for module in model.adapter.z_readout_modules(model.hf, site.layer):
        if _is_norm(module):
            if isinstance(module, nn.LayerNorm):
                dirs = dirs - dirs.mean(-1, keepdim=True)
            dirs = dirs * norm_gain(module, dirs.shape[-1]).to(dirs.device)
        else:  # a linear map (nn.Linear, GPT-2's Conv1D): its value minus its bias
            x = dirs.to(next(module.parameters()).dtype)
            dirs = (module(x) - module(torch.zeros_like(x[:1]))).float()
    return dirs


def direct_effects(model: LoadedModel, d: Dictionary, features: torch.Tensor | None = None,
                   k: int = 10, chunk: int = CHUNK, progress: Any = None,
                   site: Site | None = None) -> dict[str, torch.Tensor]:
    """Top and bottom ``k`` output tokens of each feature's direct effect.

    Returns ``up_ids``/``up_val`` and ``down_ids``/``down_val`` [n, k] (ids int32, values
    float32; ``down`` most negative first). ``features`` defaults to all of ``d``'s. ``site``
    (where ``d`` sits) matters only for hook_z sites, whose directions pass ``to_residual``.
    """
    norm = final_norm(model)
    g = norm_gain(norm, model.d_model)
    w_u = unembedding(model).float()
    feats = torch.arange(d.d_sae) if features is None else torch.as_tensor(features, dtype=torch.long)
    k = min(k, w_u.shape[0])
    out = {n: [] for n in ("up_ids", "up_val", "down_ids", "down_val")}
    with torch.no_grad():
        for start in range(0, len(feats), chunk):
            dirs = to_residual(model, site, decoder_directions(d, feats[start:start + chunk]))
            if isinstance(norm, nn.LayerNorm):
                dirs = dirs - dirs.mean(-1, keepdim=True)
            logits = (dirs * g) @ w_u.T  # [chunk, vocab]
            up = logits.topk(k, dim=-1)
            down = logits.topk(k, dim=-1, largest=False)
            out["up_ids"].append(up.indices.int())
            out["up_val"].append(up.values)
            out["down_ids"].append(down.indices.int())
            out["down_val"].append(down.values)
            if progress is not None:
                progress.update(1)
    empty_i, empty_v = torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k)
    return {n: torch.cat(v) if v else (empty_i if n.endswith("ids") else empty_v) for n, v in out.items()}
