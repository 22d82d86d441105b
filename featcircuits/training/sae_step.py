"""One site's SAE while it trains: construction, loss, initialisation, resampling, saving.

The SAE classes are sae-lens's (``TopKTrainingSAE`` or ``BatchTopKTrainingSAE``; saved as
``TopKSAE`` or ``JumpReLUSAE`` folders by their own ``save_model``). The training loop that
drives all sites together is ``trainer.py``.

Training units: a site's activations are divided per dimension by ``v = scale * s`` while
training, where ``scale`` (a scalar) brings the centred norm to ~1 so that one learning
rate suits every site, and ``s`` (per dimension, >= 1) shrinks the few massive dimensions
of Gemma's residual stream (``dim_scales``). ``save_site`` folds ``v`` back into the
weights, so the saved SAE reads raw activations and computes, exactly, what it computed
in training: with ``z = x / v``, ``pre = (z - b) W + c = (x - b*v) (W / v[:, None]) + c``
and ``x_hat = v * (f W_dec + b)``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from ..adapters import Site

ARCHITECTURES = ("topk", "batchtopk")


def new_sae(site: Site, d_in: int, width: int, k: int, model_spec: str, seed: int,
            architecture: str = "topk") -> Any:
    """A sae-lens training SAE for one site (float32, CPU until moved)."""
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    cls, cfg_cls = {"topk": (TopKTrainingSAE, TopKTrainingSAEConfig),
                    "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig)}[architecture]
    cfg = cfg_cls(
        d_in=d_in, d_sae=width, k=k, dtype="float32", device="cpu", apply_b_dec_to_input=True,
        normalize_activations="none", rescale_acts_by_decoder_norm=False, decoder_init_norm=1.0,
        aux_loss_coefficient=0.0,  # sae-lens's AuxK is replaced by ours (see sae_loss)
        **({"topk_threshold_lr": 0.05} if architecture == "batchtopk" else {}),
        metadata=SAEMetadata(model_name=model_spec, hook_name=site.path, site=site.name,
                             context_size=None, prepend_bos=True),
    )
    # BatchTopK's inference threshold is an EMA (from 0) of each minibatch's smallest kept
    # activation; at sae-lens's rate 0.01 it reaches only 85 % of its value in a 200-step
    # pilot and the saved JumpReLU then fires on far more than k latents (L0 400 at k=64 in
    # a short dry run); 0.05 settles in ~60 steps.
    torch.manual_seed(seed)
    return cls(cfg)


def dim_scales(x: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-dimension divisors ``s >= 1``: a dimension whose (centred) standard deviation is
    more than ``clip`` times the median dimension's is scaled down to ``clip`` times it.

    Gemma's residual stream has a handful of dimensions with 10-100x the typical spread;
    under a plain MSE they are most of the loss, the SAE spends its latents on them, and
    the directions the tasks use are left to the error term. ``clip <= 0`` turns this off.
    """
    if clip <= 0:
        return torch.ones(x.shape[-1], device=x.device)
    std = x.std(0)
    ref = std.median().clamp(min=1e-12) * clip
    return (std / ref).clamp(min=1.0)


def sae_loss(sae: Any, x: torch.Tensor, dead: torch.Tensor, step: int, aux_coef: float,
             outlier_norm: float, identity_dirs: torch.Tensor | None = None,
             identity_coef: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, reconstruction and feature activations for one site's minibatch ``x`` [N, d].

    The forward pass is sae-lens's own ``training_forward_pass`` (its dense decode: a
    gather/``embedding_bag`` sparse decode with a hand-written backward was measured on this
    shared 2-core CPU and lost, its index_add/gather backward being memory-bound, and
    sae-lens's own sparse path fails on CPU). The auxiliary loss against dead latents is ours:
    sae-lens's version (coefficient 1, un-ReLU'd auxiliary activations, gradient reaching
    ``b_dec`` through the encoder) wrecked the first starter run the moment latents were first
    declared dead (mean FVE 0.84 -> 0.50 within 10k tokens, one site at -6.5). This one
    follows Gao et al. 2024: ReLU'd top-k_aux dead latents reconstruct the detached residual,
    coefficient 1/32, and the gradient reaches only the dead latents' own parameters.

    ``identity_dirs`` [N, d] (with ``identity_coef`` > 0): per token, its own embedding
    direction in training units; the squared error along it is added with that weight (see
    ``TrainConfig.identity_coef`` for why).
    """
    from sae_lens.saes.sae import TrainStepInput

    res = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                                   n_training_steps=step, is_logging_step=False))
    # Tokens with massive activations (Sun et al. 2024: norms 20-40x the median at Gemma's
    # middle layers, ~1 in 10^4 tokens) get their loss down-weighted so that no token counts
    # more than one at ``outlier_norm`` times the typical (unit) centred norm. Left at full
    # weight, one such token in a minibatch outweighs the other 255 by 10x, jolts b_dec, and
    # inflates Adam's second moments for a thousand steps: the first starter run collapsed
    # at exactly those sites (resid_7-10, mlp_4/5/8: a few always-on latents, >85 % dead).
    with torch.no_grad():
        norm2 = (x - sae.b_dec).pow(2).sum(-1)
        weight = (outlier_norm ** 2 / norm2.clamp(min=1e-12)).clamp(max=1.0)
    diff = res.sae_out - x
    loss = (weight * diff.pow(2).sum(-1)).mean()
    if identity_dirs is not None and identity_coef > 0:
        along = (diff * identity_dirs).sum(-1)
        loss = loss + identity_coef * (weight * along.pow(2)).mean()
    n_dead = int(dead.sum())
    if n_dead and aux_coef > 0:
        cols = dead.nonzero().squeeze(-1)
        pre = (x - sae.b_dec.detach()) @ sae.W_enc[:, cols] + sae.b_enc[cols]
        k_aux = min(x.shape[-1] // 2, n_dead)
        top = pre.topk(k_aux, dim=-1, sorted=False)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        recon = acts @ sae.W_dec[cols]
        resid = (x - res.sae_out).detach()
        loss = loss + aux_coef * (weight * (recon - resid).pow(2).sum(-1)).mean()
    return loss, res.sae_out.detach(), res.feature_acts.detach()


@torch.no_grad()
def data_init(sae: Any, x: torch.Tensor, seed: int) -> None:
    """Decoder rows = distinct centred activations (unit norm), encoder = decoder transposed.

    With only a few hundred optimizer steps in a CPU budget, starting from directions the
    data actually takes gives every latent something to fire on from step one (a random
    start spends most steps finding them, and leaves more latents dead).
    """
    w = sae.W_dec.shape[0]
    centred = x - x.mean(0)
    pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:w].to(x.device)
    rows = centred[pick]
    if rows.shape[0] < w:  # fewer tokens than latents: keep random rows for the rest
        rows = torch.cat([rows, sae.W_dec[rows.shape[0]:]])
    rows = rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    sae.W_dec.copy_(rows)
    sae.W_enc.copy_(rows.T)
    # Data directions are correlated, so k projections summed overshoot x by a large factor;
    # scale the encoder by the least-squares gain on this batch (top-k choices do not change).
    f = sae.encode(x)
    recon = f @ sae.W_dec
    target = x - sae.b_dec
    gain = float((target * recon).sum() / recon.pow(2).sum().clamp(min=1e-12))
    if gain > 0:
        sae.W_enc.mul_(gain)


@torch.no_grad()
def resample_dead(sae: Any, opt: torch.optim.Optimizer, x: torch.Tensor, dead: torch.Tensor,
                  gen: torch.Generator) -> int:
    """Point dead latents at what the SAE reconstructs worst (Anthropic, "Towards
    Monosemanticity", 2023): decoder row = a residual ``x - x_hat`` drawn with probability
    proportional to its squared norm, encoder column = the same direction at a fifth of the
    live latents' encoder norm, bias 0, Adam state of those entries reset.

    AuxK alone did not keep up here: within a 100k-token budget, on narrow docstring text,
    half the latents of the early sites stopped firing (measured on cached activations).
    """
    cols = dead.nonzero().squeeze(-1)
    if cols.numel() == 0:
        return 0
    x_hat = sae.decode(sae.encode(x))
    err = (x - x_hat).pow(2).sum(-1)
    # drawn on the CPU (``gen`` is a CPU generator): the same picks wherever the run trains
    pick = torch.multinomial(err.clamp(min=1e-12).cpu(), cols.numel(), replacement=cols.numel() > x.shape[0],
                             generator=gen).to(x.device)
    dirs = x[pick] - x_hat[pick]
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    live_norm = sae.W_enc[:, ~dead].norm(dim=0).mean() if bool((~dead).any()) else 1.0
    sae.W_dec[cols] = dirs
    sae.W_enc[:, cols] = dirs.T * (0.2 * live_norm)
    sae.b_enc[cols] = 0.0
    for p, index in ((sae.W_dec, (cols,)), (sae.W_enc, (slice(None), cols)), (sae.b_enc, (cols,))):
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][index] = 0.0
    return int(cols.numel())


def folded_state(sae: Any, scale: float, dims: torch.Tensor) -> dict[str, torch.Tensor]:
    """The saved weights: training units folded into raw-activation units (module docstring).

    The scalar ``scale`` goes into the biases (feature activations come out ``scale`` times
    the training ones, decoder rows keep their norm); the per-dimension ``dims`` into the
    encoder rows and decoder columns. For BatchTopK the threshold scales with the
    activations, and decoder rows are then brought back to unit norm (exact for a JumpReLU:
    scaling a latent's pre-activation and its threshold by the same factor keeps its gate;
    for TopK it would change which k win, so TopK rows keep their norm).
    """
    with torch.no_grad():
        dims = dims.to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)
        state = {
            "W_enc": sae.W_enc.detach() / dims[:, None],
            "b_enc": sae.b_enc.detach() * scale,
            "W_dec": sae.W_dec.detach() * dims[None, :],
            "b_dec": sae.b_dec.detach() * dims * scale,
        }
        state = {name: value.cpu() for name, value in state.items()}  # saved from the CPU, wherever it trained
        if hasattr(sae, "topk_threshold"):
            thr = torch.full_like(state["b_enc"], float(sae.topk_threshold) * scale)
            norm = state["W_dec"].norm(dim=-1).clamp(min=1e-12)
            state["W_dec"] = state["W_dec"] / norm[:, None]
            state["W_enc"] = state["W_enc"] * norm[None, :]
            state["b_enc"] = state["b_enc"] * norm
            state["threshold"] = thr * norm
    return state


def save_site(sae: Any, scale: float, dims: torch.Tensor, out: Path, site: Site, save_dtype: str,
              extra_meta: dict[str, Any] | None = None) -> None:
    """Fold the training units into the weights and write a sae-lens folder (atomically)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig

    state = folded_state(sae, scale, dims)
    meta = sae.cfg.metadata
    meta.activation_scale = float(scale)
    for key, value in (extra_meta or {}).items():
        setattr(meta, key, value)
    common = dict(d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, dtype=save_dtype, device="cpu",
                  apply_b_dec_to_input=True, normalize_activations="none", metadata=meta)
    torch.manual_seed(0)  # the classes initialise before we overwrite: keep global RNG use predictable
    if "threshold" in state:
        inf = JumpReLUSAE(JumpReLUSAEConfig(**common))
    else:
        inf = TopKSAE(TopKSAEConfig(k=sae.cfg.k, rescale_acts_by_decoder_norm=False, **common))
    inf.load_state_dict(state)
    inf = inf.to(dtype=getattr(torch, save_dtype))
    tmp = out / f".{site.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    inf.save_model(tmp)
    final = out / site.name
    if final.exists():
        old = out / f".{site.name}.old"
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
