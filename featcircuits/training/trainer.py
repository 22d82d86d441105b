"""Train SAEs at many sites of one model at once, offline, resumably, seeded.

One forward pass of the model collects every requested site (``SplicedModel.run`` with a
recording hook); the activations of that batch are shuffled and cut into SAE minibatches;
all SAEs step together under one Adam optimizer. The result is one sae-lens folder per
site (``cfg.json`` + ``sae_weights.safetensors``, loadable with ``SAE.load_from_disk``)
plus ``set.json`` with the recipe, corpus recipe and hash, per-site metrics and wall time.
The SAE-level pieces (loss, initialisation, resampling, folding the training units back
into the saved weights) are in ``sae_step.py``.

Architectures: TopK (L0 = k by construction, one hyperparameter for 55 very different
sites, no threshold to learn through a straight-through estimator) and BatchTopK
(Bussmann et al. 2024: k on average over the minibatch, so a token gets as many latents
as it needs; saved as a JumpReLU with the threshold sae-lens learns alongside).

What comes from sae-lens and what does not:
- The SAE classes and their forward passes are sae-lens's (``TopKTrainingSAE``,
  ``BatchTopKTrainingSAE``; saved as ``TopKSAE``/``JumpReLUSAE`` by their ``save_model``).
  The loss on the forward is ours (``sae_step.sae_loss`` says why).
- ``MultiSAETrainer`` (fed a dict of activations per hook) would drive the same lockstep
  loop, but is not used: it checkpoints at ``n_checkpoints`` evenly spaced points into
  plain folders (a kill mid-write leaves a broken checkpoint; here every checkpoint is one
  file written then ``os.replace``d), it does not record the position in the data stream,
  so a resumed run could not reproduce an uninterrupted one (here the data order is a pure
  function of corpus, seed and step, and the test checks resume is exact), and it holds
  one optimizer and scheduler per SAE where one Adam over all 55 is fewer kernel launches.
  ``ActivationsStore`` needs a TransformerLens model and a hub/on-disk dataset; our
  activations come from nnsight.
- Activations are divided per site by a scalar (unit centred norm: one Adam learning rate
  then suits every site) and optionally per dimension (``dim_clip``: the massive residual
  dimensions are shrunk); both are folded back into the saved weights, so the saved SAE
  reads raw activations.
- The decoder bias starts at the data mean (zero init leaves most latents dead on Gemma,
  whose residual norms are in the thousands), decoder rows start at centred activations of
  the first batch and are kept at unit norm (in training units) after every step.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..adapters import Site
from ..checkpoint import fault_point
from ..errors import UserError
from ..io import atomic_write, write_text
from . import sae_step
from .corpus import Corpus

CHECKPOINT = "checkpoint.pt"
SET_META = "set.json"
# Activations of one forward, by site name; the default source runs the model (``collect``).
ActivationSource = Callable[[int, torch.Tensor], dict[str, torch.Tensor]]


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
    resample_until: float = 0.8  # resample dead latents up to this share of training (0: never)
    resample_every: int = 0  # forwards between resamplings (0: at every checkpoint)
    outlier_norm: float = 8.0  # tokens beyond this centred norm (unit = typical) are down-weighted
    architecture: str = "topk"  # or "batchtopk" (saved as JumpReLU)
    dim_clip: float = 0.0  # >0: dimensions with std over dim_clip x the median std are shrunk to it
    # >0: extra weight on the reconstruction error along each token's own input-embedding
    # direction (taken into training units, unit norm). At the early residual sites the SAEs give rare tokens (names) one shared code
    # and leave which token it is to the error term; putting back only that one direction of
    # starter's error restored IOI at resid_1 from 0.15 to 0.70 (scripts/ioi_positions.py).
    identity_coef: float = 0.0

    def width_of(self, site: str) -> int:
        return self.attn_width if site.startswith("attn_") else self.width

    def n_forwards(self, window: int) -> int:
        per = self.batch_size * (window - int(self.skip_bos))
        return max(1, math.ceil(self.tokens / per))


def lr_factor(step: int, total: int, warmup_frac: float, decay_frac: float) -> float:
    """The schedule's multiplier at ``step`` of ``total``: linear warm-up over the first
    ``warmup_frac``, 1, then linear decay to zero over the last ``decay_frac``."""
    warm = max(1, int(total * warmup_frac))
    decay_start = int(total * (1 - decay_frac))
    if step < warm:
        return (step + 1) / warm
    if step >= decay_start and total > decay_start:
        return max(0.0, (total - step) / (total - decay_start))
    return 1.0


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    return cfg.lr * lr_factor(step, total, cfg.warmup_frac, cfg.decay_frac)


# ----------------------------------------------------------------------------------------
# Activations


def collect(model: Any, windows: torch.Tensor, sites: Sequence[Site], skip_bos: bool = True) -> dict[str, torch.Tensor]:
    """One forward, stopped after the last site; each site's activations as [n_tokens, d_model]
    float32 (BOS dropped), on the model's device. Stopping early matters for the early sites:
    a run at resid_0-2 of an 18-layer model then pays for 3 layers, not 18."""
    from ..tracing import SplicedModel

    spliced = SplicedModel(model)
    acts: dict[str, torch.Tensor] = {}

    def record(site: Site, x: torch.Tensor) -> None:
        v = x[:, 1:] if skip_bos else x
        acts[site.name] = v.detach().reshape(-1, v.shape[-1]).float()
        return None

    inputs = {"input_ids": windows, "attention_mask": torch.ones_like(windows)}
    with torch.no_grad():
        spliced.run(inputs, record, list(sites), stop=True)
    return acts


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
            x = acts[s.name].double().cpu()  # the loaded dictionaries are on the CPU
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


def _check(cfg: TrainConfig) -> None:
    if cfg.k <= 0 or cfg.width < cfg.k or cfg.attn_width < cfg.k:
        raise UserError(f"--k must be positive and at most the width (k={cfg.k}, widths {cfg.width}/{cfg.attn_width})")
    if cfg.tokens <= 0 or cfg.batch_size <= 0 or cfg.sae_batch <= 0:
        raise UserError("--tokens, --batch-size and --sae-batch must be positive")
    if cfg.architecture not in sae_step.ARCHITECTURES:
        raise UserError(f"--architecture must be one of {', '.join(sae_step.ARCHITECTURES)}, not {cfg.architecture!r}")
    if not 0 <= cfg.resample_until <= 1 or cfg.resample_every < 0:
        raise UserError("--resample-until must be in [0, 1] and --resample-every >= 0")
    if cfg.identity_coef < 0:
        raise UserError("--identity-coef must be >= 0")


def progress_line(fwd: int, n_fwd: int, per_fwd: int, tok_s: float, fve: dict[str, float],
                  dead: dict[str, float]) -> str:
    """One log line: position, tokens/s, ETA, then FVE (running mean) and dead share per site."""
    left = (n_fwd - fwd) * per_fwd / tok_s if tok_s > 0 else float("nan")
    vals = sorted(fve.values())
    head = (f"forward {fwd}/{n_fwd} ({fwd * per_fwd} tokens) {tok_s:.0f} tok/s, ETA {left / 3600:.1f} h | "
            f"FVE median {vals[len(vals) // 2]:.3f} min {vals[0]:.3f} | dead median "
            f"{sorted(dead.values())[len(dead) // 2]:.1%} max {max(dead.values()):.1%} |")
    return head + " " + " ".join(f"{n} {fve[n]:.2f}/{dead[n]:.0%}" for n in fve)


def train_saes(model: Any, corpus: Corpus, out: str | Path, cfg: TrainConfig, resume: bool = False,
               max_steps: int | None = None, progress: bool = True,
               log: Callable[[str], None] = print, source: ActivationSource | None = None) -> dict[str, Any]:
    """Train one SAE per site in ``cfg.sites`` on ``corpus``; write them under ``out``.

    ``max_steps`` stops after that many forwards (counted from the start of training, not
    of this call), checkpointing first: a controlled "kill" for tests. ``source(fwd,
    windows)`` replaces the model forward that collects a batch's activations (a pilot
    feeds cached activations; they must be what ``collect`` returns for those windows).
    The SAEs train on the model's device (``load_model(..., device=...)``; ``--device``): the
    data order, initialisation and resampling draw from CPU generators, so a run's choices
    do not depend on where it runs, and a checkpoint resumes on any device.
    Returns the set metadata (also written to ``out/set.json`` when training is complete).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sites = resolve_sites(model.adapter, cfg.sites)
    cfg = TrainConfig(**{**asdict(cfg), "sites": [s.name for s in sites]})
    _check(cfg)
    window = int(corpus.train.shape[1])
    n_fwd = cfg.n_forwards(window)
    if n_fwd * cfg.batch_size > corpus.train.shape[0]:
        have = corpus.train.shape[0] * (window - int(cfg.skip_bos))
        raise UserError(f"--tokens {cfg.tokens} needs {n_fwd * cfg.batch_size} windows but the corpus has "
                        f"{corpus.train.shape[0]} ({have} tokens); ask for fewer tokens")
    per_fwd = cfg.batch_size * (window - int(cfg.skip_bos))
    n_mb = max(1, round(per_fwd / cfg.sae_batch))  # near-equal minibatches use every token
    total_steps = n_fwd * n_mb
    resample_every = cfg.resample_every or cfg.checkpoint_every
    d = model.adapter.d_model
    ckpt_path = out / CHECKPOINT
    device = model.device
    embedding = model.hf.get_input_embeddings().weight.detach() if cfg.identity_coef > 0 else None
    if source is None:
        def source(fwd: int, windows: torch.Tensor) -> dict[str, torch.Tensor]:
            return collect(model, windows, sites, cfg.skip_bos)

    saes: dict[str, Any] = {}
    scales: dict[str, float] = {}
    dims: dict[str, torch.Tensor] = {}
    since: dict[str, torch.Tensor] = {}
    start_fwd, wall_before = 0, 0.0
    ckpt = None
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, weights_only=False, map_location=device)
        saved = {**asdict(TrainConfig(sites=[])), **ckpt["config"], "sites": ckpt["config"]["sites"]}
        if saved != asdict(cfg) or ckpt["corpus_sha256"] != corpus.recipe.get("train_sha256"):
            diff = sorted(k for k in saved if saved.get(k) != asdict(cfg).get(k))
            raise UserError(f"cannot resume {out}: the checkpoint was made with other settings "
                            f"({', '.join(diff) or 'corpus'} differ); rerun with the same flags or without --resume")
        start_fwd, wall_before = int(ckpt["forward"]), float(ckpt["wall_s"])
        log(f"resuming {out} at forward {start_fwd}/{n_fwd}")
    elif resume:
        log(f"--resume: no checkpoint in {out}, starting from scratch")
    elif ckpt_path.is_file():
        raise UserError(f"{out} holds a checkpoint of an unfinished run; pass --resume or choose another --out")

    saes.update(_site_saes(sites, d, cfg, model.spec, ckpt, device))
    since.update({s.name: torch.zeros(cfg.width_of(s.name), dtype=torch.int64, device=device) for s in sites})
    if ckpt is not None:
        scales, since = dict(ckpt["scales"]), {k: v.clone() for k, v in ckpt["since"].items()}
        dims = {k: v.clone() for k, v in ckpt.get("dims", {k: torch.ones(d, device=device) for k in scales}).items()}
    params = [p for sae in saes.values() for p in sae.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), foreach=True)
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
    fve_ema: dict[str, float] = dict(ckpt["fve_ema"]) if ckpt is not None else {}

    def save_checkpoint(fwd: int, wall: float) -> None:
        state = {
            "config": asdict(cfg), "corpus_sha256": corpus.recipe.get("train_sha256"), "forward": fwd, "window": window,
            "wall_s": wall, "saes": {k: v.state_dict() for k, v in saes.items()}, "scales": scales,
            "dims": dims, "since": since, "optimizer": opt.state_dict(), "fve_ema": fve_ema,
        }
        atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))  # a kill mid-write keeps the old one
        fault_point("train", fwd)

    def dead_share() -> dict[str, float]:
        return _dead_share(since, cfg.dead_tokens)

    t_start = time.time()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_fwd * per_fwd, initial=start_fwd * per_fwd, unit="tok", unit_scale=True,
                   dynamic_ncols=True, mininterval=2.0, smoothing=0.1)
    stop_at = n_fwd if max_steps is None else min(n_fwd, max_steps)
    for fwd in range(start_fwd, stop_at):
        windows = corpus.train[fwd * cfg.batch_size:(fwd + 1) * cfg.batch_size]
        acts = {name: x.to(device) for name, x in source(fwd, windows).items()}
        if not scales:
            # The first batch fixes each site's units and decoder bias (the mean). The scale is
            # the RMS norm of the *centred* activations (after the per-dimension shrink): at many
            # Gemma sites the mean is almost the whole norm, and scaling by the raw norm left the
            # signal tiny and half the latents dead (measured on cached activations).
            for i, s in enumerate(sites):
                x = acts[s.name]
                dims[s.name] = sae_step.dim_scales(x, cfg.dim_clip)
                xs = x / dims[s.name]
                scales[s.name] = float((xs - xs.mean(0)).pow(2).sum(-1).mean().sqrt().clamp(min=1e-6))
                with torch.no_grad():
                    saes[s.name].b_dec.copy_(xs.mean(0) / scales[s.name])
                    if cfg.init == "data":
                        sae_step.data_init(saes[s.name], xs / scales[s.name], cfg.seed * 100_003 + i)
        units = {s.name: dims[s.name] * scales[s.name] for s in sites}
        n_tok = next(iter(acts.values())).shape[0]
        # the tokens behind the activation rows (collect flattens [b, T - BOS] row-major)
        tokens = windows[:, int(cfg.skip_bos):].reshape(-1).to(device) if cfg.identity_coef > 0 else None
        perm = torch.randperm(n_tok, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + fwd))
        chunks = torch.tensor_split(perm, n_mb)
        for mb in range(n_mb):
            step = fwd * n_mb + mb
            idx = chunks[mb].to(device)
            # the minibatch's token embeddings, gathered once for every site (only the units differ)
            token_emb = None if tokens is None else embedding[tokens[idx]].float()
            total = None
            for s in sites:
                sae = saes[s.name]
                x = acts[s.name][idx] / units[s.name]
                dead = since[s.name] >= cfg.dead_tokens
                # the embedding direction u taken into training units (u / dims, unit norm): measured
                # in raw units (dims * u) the few massive dimensions dominated the term again, and at
                # weight 30 the pilot's SAEs lost FVE 0.95 -> 0.65 and both tasks (results/pilot_rare)
                dirs = None if token_emb is None else torch.nn.functional.normalize(token_emb / dims[s.name], dim=-1)
                loss, x_hat, feats = sae_step.sae_loss(sae, x, dead, step, cfg.aux_coef, cfg.outlier_norm,
                                                       dirs, cfg.identity_coef)
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
        if cfg.resample_until > 0 and (fwd + 1) % resample_every == 0 \
                and (fwd + 1) * per_fwd >= cfg.dead_tokens and fwd + 1 < cfg.resample_until * n_fwd:
            gen = torch.Generator().manual_seed(cfg.seed * 7_919 + fwd)
            for s in sites:
                dead = since[s.name] >= cfg.dead_tokens
                if sae_step.resample_dead(saes[s.name], opt, acts[s.name] / units[s.name], dead, gen):
                    since[s.name][dead] = 0
        del acts
        if bar is not None:
            bar.update(per_fwd)
            vals = list(fve_ema.values())
            worst = min(fve_ema, key=fve_ema.get)
            bar.set_postfix_str(f"fve mean {sum(vals) / len(vals):.3f} min {fve_ema[worst]:.3f} ({worst}) "
                                f"dead max {max(dead_share().values()):.0%}", refresh=False)
        done = fwd + 1
        if done % cfg.checkpoint_every == 0 or done == stop_at:
            save_checkpoint(done, wall_before + time.time() - t_start)
            tok_s = (done - start_fwd) * per_fwd / max(time.time() - t_start, 1e-9)
            log(progress_line(done, n_fwd, per_fwd, tok_s, fve_ema, dead_share()))
    if bar is not None:
        bar.close()
    wall = wall_before + time.time() - t_start
    if stop_at < n_fwd:
        log(f"stopped after {stop_at} of {n_fwd} steps; continue with --resume")
        return {"complete": False, "forward": stop_at, "wall_s": wall}

    extra = {"corpus_sha256": corpus.recipe.get("train_sha256"), "architecture_trained": cfg.architecture}
    for s in sites:
        sae_step.save_site(saes[s.name], scales[s.name], dims[s.name], out, s, cfg.save_dtype, extra)
    # Evaluate the weights as saved (bf16 included), loaded back the way users load them.
    from ..dictionaries import load_dictionary

    t_eval = time.time()
    loaded = {s.name: load_dictionary(out / s.name) for s in sites}
    n_eval_windows = max(1, min(corpus.eval.shape[0], math.ceil(cfg.eval_tokens / (window - int(cfg.skip_bos)))))
    metrics = evaluate(model, loaded, corpus.eval[:n_eval_windows], sites, cfg.batch_size, cfg.skip_bos) \
        if corpus.eval.shape[0] and cfg.eval_tokens > 0 else {}
    dead_now = dead_share()
    for name, m in metrics.items():
        m["train_fve_ema"] = fve_ema.get(name)
        m["train_dead_frac"] = dead_now[name]
        m["activation_scale"] = scales[name]
        m["dims_shrunk"] = int((dims[name] > 1).sum())
    meta = {
        "model": model.spec, "architecture": cfg.architecture, "config": asdict(cfg),
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


def _dead_share(since: dict[str, torch.Tensor], dead_tokens: int) -> dict[str, float]:
    """Per site, the share of latents that have not fired for ``dead_tokens`` tokens."""
    return {n: float((v >= dead_tokens).float().mean()) for n, v in since.items()}


def _site_saes(sites: Sequence[Site], d: int, cfg: TrainConfig, model_spec: str,
               ckpt: dict[str, Any] | None = None, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The run's SAEs, one per site in order, each seeded by its position, on ``device``; with a
    checkpoint's weights loaded when ``ckpt`` is given (resume and snapshot build them the same way)."""
    saes = {}
    for i, s in enumerate(sites):
        sae = sae_step.new_sae(s, d, cfg.width_of(s.name), cfg.k, model_spec, cfg.seed * 100_003 + i,
                               cfg.architecture).to(device)
        if ckpt is not None:
            sae.load_state_dict(ckpt["saes"][s.name])
        saes[s.name] = sae
    return saes


def snapshot_run(model: Any, run: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the SAEs of an unfinished run's checkpoint (``run/checkpoint.pt``) as a set in
    ``out``, to inspect a long run midway (``featcircuits train-saes --out RUN --snapshot OUT``).

    The weights are folded and saved exactly as a finished run saves them; ``out/set.json``
    says ``complete: false`` and how far the run was. The run itself is not touched."""
    run, out = Path(run), Path(out)
    ckpt_path = run / CHECKPOINT
    if not ckpt_path.is_file():
        raise UserError(f"{run} has no {CHECKPOINT} (a finished run is already a set: use it directly)")
    ckpt = torch.load(ckpt_path, weights_only=False, map_location="cpu")  # a GPU run's checkpoint too
    cfg = TrainConfig(**{**asdict(TrainConfig(sites=[])), **ckpt["config"]})
    sites = resolve_sites(model.adapter, cfg.sites)
    out.mkdir(parents=True, exist_ok=True)
    d = model.adapter.d_model
    extra = {"corpus_sha256": ckpt["corpus_sha256"], "architecture_trained": cfg.architecture}
    for s, sae in zip(sites, _site_saes(sites, d, cfg, model.spec, ckpt).values()):
        dims = ckpt.get("dims", {}).get(s.name, torch.ones(d))
        sae_step.save_site(sae, ckpt["scales"][s.name], dims, out, s, cfg.save_dtype, extra)
    dead = _dead_share(ckpt["since"], cfg.dead_tokens)
    fwd = int(ckpt["forward"])
    # checkpoints made before "window" was recorded used the CLI default, 128
    per_fwd = cfg.batch_size * (int(ckpt.get("window", 128)) - int(cfg.skip_bos))
    meta = {"model": model.spec, "architecture": cfg.architecture, "config": asdict(cfg),
            "corpus_sha256": ckpt["corpus_sha256"], "complete": False, "snapshot_of": str(run),
            "forward": fwd, "tokens_trained": fwd * per_fwd, "optimizer_steps": fwd * max(1, round(per_fwd / cfg.sae_batch)),
            "wall_s": round(float(ckpt["wall_s"]), 1), "threads": None, "torch": torch.__version__,
            "sites": {n: {"train_fve_ema": ckpt["fve_ema"].get(n), "train_dead_frac": dead.get(n)} for n in cfg.sites}}
    write_text(out / SET_META, json.dumps(meta, indent=1))
    return meta
