"""Train TopK SAEs at many sites of one model at once, offline, resumably, seeded.

One forward pass of the model collects every requested site (``SplicedModel.run`` with a
recording hook); the activations of that batch are shuffled and cut into SAE minibatches;
all SAEs step together under one Adam optimizer. The result is one sae-lens folder per
site (``cfg.json`` + ``sae_weights.safetensors``, loadable with ``SAE.load_from_disk``)
plus ``set.json`` with the recipe, corpus hash, per-site metrics and wall time.

Why TopK (and not JumpReLU): TopK fixes L0 = k by construction, so one hyperparameter
gives the sparsity we want at 55 very different sites (norms from ~20 to ~6000) without
tuning an L1/L0 coefficient per site; it has no threshold to learn through a
straight-through estimator, trains stably from step one, and its auxiliary loss (AuxK,
Gao et al. 2024) keeps latents alive. JumpReLU reaches a slightly better sparsity/fidelity
frontier when tuned per site, which a 1-hour CPU budget does not allow.

What comes from sae-lens and what does not:
- The SAE classes are sae-lens's: ``TopKTrainingSAE``/``TopKTrainingSAEConfig`` hold the
  parameters and initialise them; the saved SAE is a sae-lens ``TopKSAE`` written by its
  own ``save_model``. The encoder is sae-lens's (``(x - b_dec) @ W_enc + b_enc``, top-k,
  ReLU), so training and inference compute the same thing.
- The forward pass is sae-lens's ``training_forward_pass``; the loss on it is ours: an MSE
  that down-weights tokens with massive activations, and an auxiliary loss against dead
  latents (``_sae_loss`` says why: sae-lens's plain versions wrecked starter runs here).
- ``MultiSAETrainer`` (fed a dict of activations per hook) would drive the same lockstep
  loop, but is not used: it checkpoints at ``n_checkpoints`` evenly spaced points into
  plain folders (a kill mid-write leaves a broken checkpoint; here every checkpoint is one
  file written then ``os.replace``d), it does not record the position in the data stream,
  so a resumed run could not reproduce an uninterrupted one (here the data order is a pure
  function of corpus, seed and step, and the test checks resume is exact), and it holds
  one optimizer and scheduler per SAE where one Adam over all 55 is fewer kernel launches.
  Its ``lr_end`` default would also have to be overridden. ``ActivationsStore`` needs a
  TransformerLens model and a hub/on-disk dataset; our activations come from nnsight.
- Activations are scaled per site to unit mean norm while training (one Adam learning
  rate then suits every site) and the scale is folded back into the saved weights
  (``b_enc, b_dec`` times the scale; pre-activations, hence top-k choices, scale by the
  same positive factor), so the saved SAE reads raw activations.
- The decoder bias starts at the data mean (zero init leaves most latents dead on Gemma,
  whose residual norms are in the thousands), decoder rows start at centred activations of
  the first batch (``_data_init``) and are kept at unit norm after every step.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..adapters import Site
from ..checkpoint import fault_point
from ..errors import UserError
from ..io import atomic_write, write_text
from .corpus import Corpus

CHECKPOINT = "checkpoint.pt"
SET_META = "set.json"


@dataclass
class TrainConfig:
    """Everything that determines the trained weights (saved in set.json and the checkpoint)."""

    sites: list[str]
    width: int = 1024  # latents for embed, mlp and resid sites
    attn_width: int = 768  # latents for attn sites (their output is lower-rank)
    k: int = 32
    tokens: int = 1_000_000  # training tokens (BOS positions excluded)
    batch_size: int = 32  # windows per model forward
    sae_batch: int = 512  # tokens per optimizer step
    lr: float = 4e-3
    warmup_frac: float = 0.02
    decay_frac: float = 0.2  # linear decay to zero over the last fraction of steps
    seed: int = 0
    aux_coef: float = 1 / 32  # AuxK coefficient of Gao et al. 2024
    dead_tokens: int = 20_000  # a latent is dead after this many training tokens without firing
    checkpoint_every: int = 20  # forwards between checkpoints
    skip_bos: bool = True  # BOS activations are outliers (norm ~1e5 in Gemma resid): not trained on
    save_dtype: str = "bfloat16"
    eval_tokens: int = 8192
    init: str = "data"  # decoder rows from centred activations of the first batch, or "random"
    resample_until: float = 0.8  # resample dead latents at each checkpoint up to this share of training
    outlier_norm: float = 8.0  # tokens beyond this centred norm (unit = typical) are down-weighted

    def width_of(self, site: str) -> int:
        return self.attn_width if site.startswith("attn_") else self.width

    def n_forwards(self, window: int) -> int:
        per = self.batch_size * (window - int(self.skip_bos))
        return max(1, math.ceil(self.tokens / per))


# ----------------------------------------------------------------------------------------
# Activations


def collect(model: Any, windows: torch.Tensor, sites: Sequence[Site], skip_bos: bool = True) -> dict[str, torch.Tensor]:
    """One forward; each site's activations as [n_tokens, d_model] float32 (BOS dropped)."""
    from ..tracing import SplicedModel

    spliced = SplicedModel(model)
    acts: dict[str, torch.Tensor] = {}

    def record(site: Site, x: torch.Tensor) -> None:
        v = x[:, 1:] if skip_bos else x
        acts[site.name] = v.detach().reshape(-1, v.shape[-1]).float()
        return None

    inputs = {"input_ids": windows, "attention_mask": torch.ones_like(windows)}
    with torch.no_grad():
        spliced.run(inputs, record, list(sites))
    return acts


# ----------------------------------------------------------------------------------------
# The SAE step (sparse decode)


def _new_sae(site: Site, d_in: int, width: int, k: int, model_spec: str, seed: int) -> Any:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    cfg = TopKTrainingSAEConfig(
        d_in=d_in, d_sae=width, k=k, dtype="float32", device="cpu", apply_b_dec_to_input=True,
        normalize_activations="none", rescale_acts_by_decoder_norm=False, decoder_init_norm=1.0,
        aux_loss_coefficient=0.0,  # sae-lens's AuxK is replaced by ours (see _sae_loss)
        metadata=SAEMetadata(model_name=model_spec, hook_name=site.path, site=site.name,
                             context_size=None, prepend_bos=True),
    )
    torch.manual_seed(seed)
    return TopKTrainingSAE(cfg)


def _sae_loss(sae: Any, x: torch.Tensor, dead: torch.Tensor, step: int, aux_coef: float,
              outlier_norm: float = TrainConfig.outlier_norm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, reconstruction and feature activations for one site's minibatch ``x`` [N, d].

    The forward pass is sae-lens's own ``training_forward_pass`` (its dense decode: a
    gather/``embedding_bag`` sparse decode with a hand-written backward was measured on this
    shared 2-core CPU and lost, its index_add/gather backward being memory-bound, and
    sae-lens's own sparse path fails on CPU). The auxiliary loss against dead latents is ours:
    sae-lens's version (coefficient 1, un-ReLU'd auxiliary activations, gradient reaching
    ``b_dec`` through the encoder) wrecked the starter run here the moment latents were first
    declared dead (mean FVE 0.84 -> 0.50 within 10k tokens, one site at -6.5). This one
    follows Gao et al. 2024: ReLU'd top-k_aux dead latents reconstruct the detached residual,
    coefficient 1/32, and the gradient reaches only the dead latents' own parameters.
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
    loss = (weight * (res.sae_out - x).pow(2).sum(-1)).mean()
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


def _data_init(sae: Any, x: torch.Tensor, seed: int) -> None:
    """Decoder rows = distinct centred activations (unit norm), encoder = decoder transposed.

    With only a few hundred optimizer steps in a CPU budget, starting from directions the
    data actually takes gives every latent something to fire on from step one (a random
    start spends most steps finding them, and leaves more latents dead).
    """
    w = sae.W_dec.shape[0]
    centred = x - x.mean(0)
    pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:w]
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
def _resample_dead(sae: Any, opt: torch.optim.Optimizer, x: torch.Tensor, dead: torch.Tensor,
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
    pick = torch.multinomial(err.clamp(min=1e-12), cols.numel(), replacement=cols.numel() > x.shape[0],
                             generator=gen)
    dirs = x[pick] - x_hat[pick]
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    live_norm = sae.W_enc[:, ~dead].norm(dim=0).mean() if bool((~dead).any()) else torch.tensor(1.0)
    sae.W_dec[cols] = dirs
    sae.W_enc[:, cols] = dirs.T * (0.2 * live_norm)
    sae.b_enc[cols] = 0.0
    for p, index in ((sae.W_dec, (cols,)), (sae.W_enc, (slice(None), cols)), (sae.b_enc, (cols,))):
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][index] = 0.0
    return int(cols.numel())


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = max(1, int(total * cfg.warmup_frac))
    decay_start = int(total * (1 - cfg.decay_frac))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if step >= decay_start and total > decay_start:
        return cfg.lr * max(0.0, (total - step) / (total - decay_start))
    return cfg.lr


# ----------------------------------------------------------------------------------------
# Checkpoints and saving


def _save_site(sae: Any, scale: float, out: Path, site: Site, save_dtype: str) -> None:
    """Fold the training scale into the weights and write a sae-lens ``TopKSAE`` folder."""
    from sae_lens import TopKSAE, TopKSAEConfig

    with torch.no_grad():
        state = {
            "W_enc": sae.W_enc.detach().clone(),
            "b_enc": sae.b_enc.detach() * scale,
            "W_dec": sae.W_dec.detach().clone(),
            "b_dec": sae.b_dec.detach() * scale,
        }
    meta = sae.cfg.metadata
    meta.activation_scale = float(scale)
    cfg = TopKSAEConfig(d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, k=sae.cfg.k, dtype=save_dtype, device="cpu",
                        apply_b_dec_to_input=True, normalize_activations="none",
                        rescale_acts_by_decoder_norm=False, metadata=meta)
    torch.manual_seed(0)  # TopKSAE initialises before we overwrite: keep global RNG use predictable
    inf = TopKSAE(cfg)
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


# ----------------------------------------------------------------------------------------
# Evaluation on held-out windows


def evaluate(model: Any, dictionaries: dict[str, Any], windows: torch.Tensor, sites: Sequence[Site],
             batch_size: int = 32, skip_bos: bool = True) -> dict[str, dict[str, float]]:
    """Held-out fraction of variance explained, L0 and never-firing share per site.

    ``dictionaries`` maps site name -> an object with ``encode``/``decode`` (a featcircuits
    ``Dictionary``). FVE = 1 - sum|x - x_hat|^2 / sum|x - mean(x)|^2 over all tokens.
    """
    sse: dict[str, float] = {}
    sx: dict[str, torch.Tensor] = {}
    sxx: dict[str, float] = {}
    l0: dict[str, float] = {}
    fired: dict[str, torch.Tensor] = {}
    n = 0
    for i in range(0, windows.shape[0], batch_size):
        acts = collect(model, windows[i:i + batch_size], sites, skip_bos)
        for s in sites:
            x = acts[s.name].double()
            d = dictionaries[s.name]
            with torch.no_grad():
                f = d.encode(x.float())
                x_hat = d.decode(f).double()
            sse[s.name] = sse.get(s.name, 0.0) + float((x - x_hat).pow(2).sum())
            sx[s.name] = sx.get(s.name, 0) + x.sum(0)
            sxx[s.name] = sxx.get(s.name, 0.0) + float(x.pow(2).sum())
            l0[s.name] = l0.get(s.name, 0.0) + float((f != 0).sum())
            fired[s.name] = fired.get(s.name, torch.zeros(f.shape[-1], dtype=torch.bool)) | (f != 0).any(0)
        n += next(iter(acts.values())).shape[0]
    out = {}
    for s in sites:
        var = sxx[s.name] - float(sx[s.name].pow(2).sum()) / n  # total squared deviation from the mean
        out[s.name] = {
            "fve": 1.0 - sse[s.name] / var if var > 0 else float("nan"),
            "l0": l0[s.name] / n,
            "dead_frac": float((~fired[s.name]).float().mean()),
            "width": int(fired[s.name].numel()),
            "eval_tokens": n,
        }
    return out


# ----------------------------------------------------------------------------------------
# The training loop


def resolve_sites(adapter: Any, spec: str | Sequence[str]) -> list[Site]:
    """``all`` or a comma list of site names -> Site objects in forward order."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if names == ["all"]:
        return adapter.sites()
    for n in names:
        adapter.site(n)  # raises UserError naming the valid sites
    want = set(names)
    return [s for s in adapter.sites() if s.name in want]


def train_saes(model: Any, corpus: Corpus, out: str | Path, cfg: TrainConfig, resume: bool = False,
               max_steps: int | None = None, progress: bool = True,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train one TopK SAE per site in ``cfg.sites`` on ``corpus``; write them under ``out``.

    ``max_steps`` stops after that many forwards (counted from the start of training, not
    of this call), checkpointing first: a controlled "kill" for tests. Returns the set
    metadata (also written to ``out/set.json`` when training is complete).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sites = resolve_sites(model.adapter, cfg.sites)
    cfg = TrainConfig(**{**asdict(cfg), "sites": [s.name for s in sites]})
    if cfg.k <= 0 or cfg.width < cfg.k or cfg.attn_width < cfg.k:
        raise UserError(f"--k must be positive and at most the width (k={cfg.k}, widths {cfg.width}/{cfg.attn_width})")
    if cfg.tokens <= 0 or cfg.batch_size <= 0 or cfg.sae_batch <= 0:
        raise UserError("--tokens, --batch-size and --sae-batch must be positive")
    window = int(corpus.train.shape[1])
    n_fwd = cfg.n_forwards(window)
    if n_fwd * cfg.batch_size > corpus.train.shape[0]:
        have = corpus.train.shape[0] * (window - int(cfg.skip_bos))
        raise UserError(f"--tokens {cfg.tokens} needs {n_fwd * cfg.batch_size} windows but the corpus has "
                        f"{corpus.train.shape[0]} ({have} tokens); ask for fewer tokens")
    per_fwd = cfg.batch_size * (window - int(cfg.skip_bos))
    n_mb = max(1, round(per_fwd / cfg.sae_batch))  # near-equal minibatches use every token
    total_steps = n_fwd * n_mb
    d = model.adapter.d_model
    ckpt_path = out / CHECKPOINT

    saes: dict[str, Any] = {}
    scales: dict[str, float] = {}
    since: dict[str, torch.Tensor] = {}
    start_fwd, wall_before = 0, 0.0
    ckpt = None
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, weights_only=False)
        saved = ckpt["config"]
        if saved != asdict(cfg) or ckpt["corpus_sha256"] != corpus.recipe.get("train_sha256"):
            diff = sorted(k for k in saved if saved.get(k) != asdict(cfg).get(k))
            raise UserError(f"cannot resume {out}: the checkpoint was made with other settings "
                            f"({', '.join(diff) or 'corpus'} differ); rerun with the same flags or without --resume")
        start_fwd, wall_before = int(ckpt["forward"]), float(ckpt["wall_s"])
    elif resume:
        log(f"--resume: no checkpoint in {out}, starting from scratch")
    elif ckpt_path.is_file():
        raise UserError(f"{out} holds a checkpoint of an unfinished run; pass --resume or choose another --out")

    for i, s in enumerate(sites):
        saes[s.name] = _new_sae(s, d, cfg.width_of(s.name), cfg.k, model.spec,
                                 cfg.seed * 100_003 + i)
        since[s.name] = torch.zeros(cfg.width_of(s.name), dtype=torch.int64)
    if ckpt is not None:
        for name, sae in saes.items():
            sae.load_state_dict(ckpt["saes"][name])
        scales, since = dict(ckpt["scales"]), {k: v.clone() for k, v in ckpt["since"].items()}
    params = [p for sae in saes.values() for p in sae.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), foreach=True)
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
    fve_ema: dict[str, float] = dict(ckpt["fve_ema"]) if ckpt is not None else {}

    def save_checkpoint(fwd: int, wall: float) -> None:
        state = {
            "config": asdict(cfg), "corpus_sha256": corpus.recipe.get("train_sha256"), "forward": fwd,
            "wall_s": wall, "saes": {k: v.state_dict() for k, v in saes.items()}, "scales": scales,
            "since": since, "optimizer": opt.state_dict(), "fve_ema": fve_ema,
        }
        atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))  # a kill mid-write keeps the old one
        fault_point("train", fwd)

    t_start = time.time()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_fwd * per_fwd, initial=start_fwd * per_fwd, unit="tok", unit_scale=True,
                   dynamic_ncols=True, mininterval=2.0, smoothing=0.1)
    stop_at = n_fwd if max_steps is None else min(n_fwd, max_steps)
    fwd = start_fwd
    for fwd in range(start_fwd, stop_at):
        windows = corpus.train[fwd * cfg.batch_size:(fwd + 1) * cfg.batch_size]
        acts = collect(model, windows, sites, cfg.skip_bos)
        if not scales:
            # First batch fixes each site's scale and decoder bias (the mean). The scale is the
            # RMS norm of the *centred* activations: at many Gemma sites the mean is almost the
            # whole norm, and scaling by the raw norm left the signal tiny and half the
            # latents dead (measured on cached activations).
            for i, s in enumerate(sites):
                x = acts[s.name]
                scales[s.name] = float((x - x.mean(0)).pow(2).sum(-1).mean().sqrt().clamp(min=1e-6))
                with torch.no_grad():
                    saes[s.name].b_dec.copy_(x.mean(0) / scales[s.name])
                    if cfg.init == "data":
                        _data_init(saes[s.name], x / scales[s.name], cfg.seed * 100_003 + i)
        n_tok = next(iter(acts.values())).shape[0]
        perm = torch.randperm(n_tok, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + fwd))
        chunks = torch.tensor_split(perm, n_mb)
        for mb in range(n_mb):
            step = fwd * n_mb + mb
            idx = chunks[mb]
            total = None
            for s in sites:
                sae = saes[s.name]
                x = acts[s.name][idx] / scales[s.name]
                dead = since[s.name] >= cfg.dead_tokens
                loss, x_hat, feats = _sae_loss(sae, x, dead, step, cfg.aux_coef, cfg.outlier_norm)
                total = loss if total is None else total + loss
                with torch.no_grad():
                    hit = (feats > 0).any(0)
                    since[s.name] += x.shape[0]
                    since[s.name][hit] = 0
                    var = (x - x.mean(0)).pow(2).sum()
                    fve = 1.0 - float((x - x_hat).pow(2).sum() / var.clamp(min=1e-12))
                    fve_ema[s.name] = fve if s.name not in fve_ema else 0.9 * fve_ema[s.name] + 0.1 * fve
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total_steps, cfg)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            with torch.no_grad():  # unit-norm decoder rows: the scale of a feature lives in its activation
                for sae in saes.values():
                    sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp(min=1e-8))
        if cfg.resample_until > 0 and (fwd + 1) % cfg.checkpoint_every == 0 \
                and (fwd + 1) * per_fwd >= cfg.dead_tokens and fwd + 1 < cfg.resample_until * n_fwd:
            gen = torch.Generator().manual_seed(cfg.seed * 7_919 + fwd)
            for s in sites:
                dead = since[s.name] >= cfg.dead_tokens
                if _resample_dead(saes[s.name], opt, acts[s.name] / scales[s.name], dead, gen):
                    since[s.name][dead] = 0
        del acts
        if bar is not None:
            bar.update(per_fwd)
            vals = list(fve_ema.values())
            worst = min(fve_ema, key=fve_ema.get)
            n_dead = max(int((v >= cfg.dead_tokens).sum()) for v in since.values())
            bar.set_postfix_str(f"fve mean {sum(vals) / len(vals):.3f} min {fve_ema[worst]:.3f} ({worst}) "
                                f"dead max {n_dead}", refresh=False)
        done = fwd + 1
        if done % cfg.checkpoint_every == 0 or done == stop_at:
            save_checkpoint(done, wall_before + time.time() - t_start)
    if bar is not None:
        bar.close()
    wall = wall_before + time.time() - t_start
    if stop_at < n_fwd:
        log(f"stopped after {stop_at} of {n_fwd} steps; continue with --resume")
        return {"complete": False, "forward": stop_at, "wall_s": wall}

    for s in sites:
        _save_site(saes[s.name], scales[s.name], out, s, cfg.save_dtype)
    # Evaluate the weights as saved (bf16 included), loaded back the way users load them.
    from ..dictionaries import load_dictionary

    t_eval = time.time()
    loaded = {s.name: load_dictionary(out / s.name) for s in sites}
    n_eval_windows = max(1, min(corpus.eval.shape[0], math.ceil(cfg.eval_tokens / (window - int(cfg.skip_bos)))))
    metrics = evaluate(model, loaded, corpus.eval[:n_eval_windows], sites, cfg.batch_size, cfg.skip_bos) \
        if corpus.eval.shape[0] else {}
    for name, m in metrics.items():
        m["train_fve_ema"] = fve_ema.get(name)
        m["train_dead_frac"] = float((since[name] >= cfg.dead_tokens).float().mean())
        m["activation_scale"] = scales[name]
    meta = {
        "model": model.spec, "architecture": "topk", "config": asdict(cfg),
        "corpus": corpus.recipe, "corpus_sha256": corpus.recipe.get("train_sha256"),
        "tokens_trained": n_fwd * per_fwd, "optimizer_steps": total_steps,
        "wall_s": round(wall, 1), "eval_wall_s": round(time.time() - t_eval, 1),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "sites": metrics, "complete": True,
    }
    write_text(out / SET_META, json.dumps(meta, indent=1))
    ckpt_path.unlink(missing_ok=True)  # done: a later run into this folder starts fresh
    if metrics:
        fves = [m["fve"] for m in metrics.values()]
        log(f"trained {len(sites)} SAEs on {n_fwd * per_fwd} tokens in {wall / 60:.1f} min; held-out FVE "
            f"mean {sum(fves) / len(fves):.3f} min {min(fves):.3f}")
    return meta


# ----------------------------------------------------------------------------------------
# CLI


def add_train_saes_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``featcircuits train-saes``."""
    p = subparsers.add_parser("train-saes", help="train TopK SAEs at many sites offline (sae-lens format)",
                              description="Train one TopK SAE per site on the offline docstring corpus; "
                                          "one forward collects all sites, all SAEs train together.")
    p.add_argument("--model", required=True, help="model spec, e.g. gemma-3-270m-offline")
    p.add_argument("--sites", default="all", help="'all' or a comma list such as resid_3,mlp_3")
    p.add_argument("--width", type=int, default=1024, help="latents per SAE for embed/mlp/resid sites")
    p.add_argument("--attn-width", type=int, default=None, help="latents for attn sites (default 3/4 of --width)")
    p.add_argument("--k", type=int, default=32, help="active latents per token (TopK)")
    p.add_argument("--tokens", type=int, default=1_000_000, help="training tokens")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per site + set.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="128-token windows per model forward")
    p.add_argument("--sae-batch", type=int, default=512, help="tokens per optimizer step")
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--checkpoint-every", type=int, default=20, help="forwards between checkpoints")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for the final metrics")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine one thread ran 2.4x faster "
                        "than two, whose OpenMP barriers spin against other processes)")
    p.add_argument("--init", choices=("data", "random"), default="data", help="decoder initialisation")
    p.add_argument("--max-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help="continue from out/checkpoint.pt after a kill")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=train_saes_main)
    return p


def train_saes_main(args: argparse.Namespace) -> int:
    """Entry point of ``featcircuits train-saes``."""
    from ..models import load_model
    from .corpus import build_corpus

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    sites = resolve_sites(model.adapter, args.sites)
    cfg = TrainConfig(
        sites=[s.name for s in sites], width=args.width,
        attn_width=args.attn_width or max(args.k, (3 * args.width) // 4), k=args.k, tokens=args.tokens,
        batch_size=args.batch_size, sae_batch=args.sae_batch, lr=args.lr, seed=args.seed,
        checkpoint_every=args.checkpoint_every, eval_tokens=args.eval_tokens, init=args.init,
    )
    corpus = build_corpus(model.tokenizer, seed=args.seed, log=print)
    print(f"corpus: {corpus.recipe['train_tokens']} train / {corpus.recipe['eval_tokens']} held-out tokens, "
          f"sha256 {corpus.recipe['train_sha256'][:16]}", flush=True)
    train_saes(model, corpus, args.out, cfg, resume=args.resume, max_steps=args.max_steps,
               progress=not args.no_progress)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m featcircuits.training.trainer ...``: the train-saes command without the main CLI."""
    parser = argparse.ArgumentParser(prog="featcircuits")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_saes_parser(sub)
    args = parser.parse_args(["train-saes", *(argv if argv is not None else __import__("sys").argv[1:])])
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=__import__("sys").stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
