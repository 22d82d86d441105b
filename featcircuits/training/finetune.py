"""End-to-end fine-tuning of a trained SAE set on the model's own predictions.

Why: an SAE trained to reconstruct its site spends its latents on the directions with the
most variance, and the directions a behaviour reads may be left to the error term. Spliced
without its error term, starter-v3's early residual SAEs keep 0.06-0.37 of IOI although
their FVE is 0.9; more width or a larger k did not change that (results/pilot_width).
Braun et al. 2024 ("Identifying functionally important features with end-to-end sparse
dictionary learning") train SAEs so that the model *with the SAE in place of the site*
predicts what the clean model predicts. This phase does that to an existing set:

    loss = KL(clean || spliced) + mse_coef * |x_hat - x|^2 / |x - mean(x)|^2

where *spliced* is the model with one site replaced by ``decode(encode(x))`` at every
non-BOS position (no error term, exactly what ``scripts/sae_report.py`` measures), the KL
is over the full vocabulary at ``kl_positions`` random non-BOS positions per window (only
those pass through the 262k-row unembedding), and the normalised reconstruction term keeps
the SAE a reconstruction (Braun et al.'s "e2e+downstream" keeps one too; pure KL lets FVE
fall, which the graphs' error terms would then have to carry).

Each site trains alone (one SAE spliced at a time, as the report measures it); the clean
forward of a batch is shared by all sites. The SAEs are sae-lens's as loaded (float32, raw
activation units); Adam's step per tensor is ``lr`` times that tensor's RMS at the start
(the saved weights carry the training units folded in, so one absolute rate would not
suit ``W_enc`` and ``b_dec`` together). Sites not fine-tuned are copied unchanged, and the
new ``set.json`` keeps the base set's record with a ``finetune`` entry added.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..adapters import Site
from ..checkpoint import fault_point
from ..errors import UserError
from ..io import atomic_write, write_text
from .corpus import Corpus
from .trainer import CHECKPOINT, SET_META, evaluate, lr_factor, resolve_sites


@dataclass
class FinetuneConfig:
    """Everything that determines the fine-tuned weights (saved in set.json and the checkpoint)."""

    sites: list[str]
    tokens: int = 50_000  # tokens through each site's SAE (BOS excluded)
    batch_size: int = 8  # windows per step
    lr: float = 1e-3  # relative: each tensor's Adam rate is lr x its RMS at the start
    mse_coef: float = 1.0  # weight of the normalised reconstruction error beside the KL
    kl_positions: int = 16  # non-BOS positions per window whose next-token KL is trained
    kl_focus: str = "random"  # how they are chosen: "random", or "copies" first (see copy_positions)
    warmup_frac: float = 0.05
    decay_frac: float = 0.3  # linear decay to zero over the last fraction of steps
    seed: int = 0
    checkpoint_every: int = 10  # steps between checkpoints
    eval_tokens: int = 8192

    def n_steps(self, window: int) -> int:
        return max(1, math.ceil(self.tokens / (self.batch_size * (window - 1))))


def _check(cfg: FinetuneConfig, window: int) -> None:
    if cfg.tokens <= 0 or cfg.batch_size <= 0 or cfg.lr <= 0 or cfg.mse_coef < 0:
        raise UserError("--tokens, --batch-size and --lr must be positive and --mse-coef >= 0")
    if not 1 <= cfg.kl_positions <= window - 1:
        raise UserError(f"--kl-positions must be between 1 and {window - 1} (the window's non-BOS positions)")
    if cfg.kl_focus not in KL_FOCUS:
        raise UserError(f"--kl-focus must be one of {', '.join(KL_FOCUS)}, not {cfg.kl_focus!r}")


KL_FOCUS = ("random", "copies")
COMMON_SHARE = 1e-3  # a token this frequent in the corpus or more is "common": repeating it is no copy


def common_tokens(windows: torch.Tensor, vocab: int) -> torch.Tensor:
    """[vocab] bool: tokens making up at least ``COMMON_SHARE`` of the corpus's non-BOS positions."""
    counts = torch.bincount(windows[:, 1:].reshape(-1), minlength=vocab)
    return counts >= COMMON_SHARE * windows[:, 1:].numel()


def copy_positions(windows: torch.Tensor, common: torch.Tensor) -> torch.Tensor:
    """[b, T] bool: positions whose *next* token is a repeat of an uncommon token earlier in the
    window (after BOS): the positions where the model can only predict well by copying a
    token's identity from context, e.g. a name seen before. Splicing an early residual SAE
    loses exactly that identity at the earlier mention (starter-v3 loses IOI only at the name
    positions), and averaged KL at random positions rarely samples these positions."""
    nxt = windows[:, 1:]  # the token each position 0..T-2 predicts; also the tokens after BOS
    t = nxt.shape[1]
    # repeat[b, i] = next token of position i (= token i+1) occurs at some position 1..i
    same = nxt[:, :, None] == nxt[:, None, :]  # [b, i, j]: token i+1 == token j+1
    earlier = torch.ones(t, t, dtype=torch.bool).tril(-1)  # j < i
    repeat = (same & earlier).any(-1) & ~common[nxt]
    out = torch.zeros_like(windows, dtype=torch.bool)
    out[:, :-1] = repeat
    out[:, 0] = False  # BOS
    return out


def choose_positions(windows: torch.Tensor, k: int, focus: str, gen: torch.Generator,
                     common: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose KL a step trains: ``(positions, weights)``, ``positions`` the sorted 1-D
    union over the batch (only they pass through the unembedding) and ``weights`` [b, P] the
    0/1 mask of each window's own ``k`` positions. ``random``: the same k random non-BOS
    positions for every window (weights all ones). ``copies``: per window its copy positions
    first (``copy_positions``, at random when more than k), then random ones up to k."""
    b, t = windows.shape
    if focus == "random":
        positions = 1 + torch.randperm(t - 1, generator=gen)[:k].sort().values
        return positions, torch.ones(b, len(positions))
    copies = copy_positions(windows, common)
    score = torch.rand(b, t, generator=gen) + 2.0 * copies.float()  # copies rank first, then at random
    score[:, 0] = -1.0  # never BOS
    chosen = torch.zeros(b, t, dtype=torch.bool)
    chosen.scatter_(1, score.topk(k, dim=1).indices, True)
    positions = torch.nonzero(chosen.any(0)).flatten()
    return positions, chosen[:, positions].float()


def splice_loss(spliced: Any, sae: Any, site: Site, windows: torch.Tensor, positions: torch.Tensor,
                clean_logp: torch.Tensor, mse_coef: float,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one site's SAE on one batch: KL(clean || spliced) at ``positions`` (averaged
    with ``weights`` [b, len(positions)] where given) plus ``mse_coef`` x the normalised
    reconstruction error at the non-BOS positions.

    ``clean_logp`` [b, len(positions), vocab] are the clean model's log-probabilities.
    Returns the loss (with graph to the SAE's parameters) and its parts as floats."""
    parts: dict[str, torch.Tensor] = {}

    def hook(s: Site, x: torch.Tensor) -> torch.Tensor:
        real = x[:, 1:].float()  # BOS stays as it is (the SAEs never trained on it)
        f = sae.encode(real)
        x_hat = sae.decode(f)
        flat = real.reshape(-1, real.shape[-1])
        var = (flat - flat.mean(0)).pow(2).sum().clamp(min=1e-12)
        parts["nmse"] = (x_hat - real).pow(2).sum() / var
        parts["l0"] = (f.detach() != 0).float().sum(-1).mean()
        return torch.cat([x[:, :1], x_hat.to(x.dtype)], dim=1)

    inputs = {"input_ids": windows, "attention_mask": torch.ones_like(windows)}
    logits = spliced.run(inputs, hook, [site], positions=positions)
    logp = torch.log_softmax(logits.float(), dim=-1)
    kl_each = (clean_logp.exp() * (clean_logp - logp)).sum(-1)  # [b, P]
    if weights is not None:
        weights = weights.to(kl_each.device)
    kl = kl_each.mean() if weights is None else (kl_each * weights).sum() / weights.sum().clamp(min=1.0)
    loss = kl + mse_coef * parts["nmse"]
    return loss, {"kl": float(kl.detach()), "nmse": float(parts["nmse"].detach()), "l0": float(parts["l0"])}


def _param_groups(sae: Any, lr: float) -> list[dict[str, Any]]:
    """One Adam group per tensor, its rate ``lr`` x the tensor's RMS (b_enc: W_enc's column
    RMS times the input scale is not known here, so a near-zero bias borrows W_enc's)."""
    groups = []
    for name, p in sae.named_parameters():
        if name == "b_enc":
            ref = float(sae.W_enc.detach().pow(2).mean().sqrt()) * float(sae.b_dec.detach().pow(2).mean().sqrt())
            rms = max(float(p.detach().pow(2).mean().sqrt()), ref)
        else:
            rms = float(p.detach().pow(2).mean().sqrt())
        groups.append({"params": [p], "lr": lr * max(rms, 1e-8), "base_lr": lr * max(rms, 1e-8), "name": name})
    return groups


def finetune_set(model: Any, base: str, corpus: Corpus, out: str | Path, cfg: FinetuneConfig,
                 resume: bool = False, max_steps: int | None = None, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune the SAEs of set ``base`` (registered name or folder) at ``cfg.sites`` and
    write the whole set, the other sites copied, to ``out``. Returns the new set.json.

    ``max_steps`` stops after that many steps (counted from the start), checkpointing
    first; ``resume`` continues from ``out/checkpoint.pt`` (on any device). The SAEs train on
    the model's device; position choices draw from CPU generators wherever that is."""
    from ..dictionaries import load_dictionary, load_dictionary_set
    from ..tracing import SplicedModel

    out = Path(out)
    dset = load_dictionary_set(base, model.adapter, model.spec)
    folder = Path(dset.meta.get("path", base))
    if not (folder / SET_META).is_file():
        raise UserError(f"{base!r} is not a trained set folder with {SET_META} (fine-tuning needs one)")
    base_meta = json.loads((folder / SET_META).read_text())
    sites = resolve_sites(model.adapter, cfg.sites)
    not_topk = [s.name for s in sites if not hasattr(getattr(dset[s.name], "sae", None), "W_enc")
                or getattr(dset[s.name].sae.cfg, "k", None) is None]
    if not_topk:
        raise UserError(f"sites {', '.join(not_topk)} of {base!r} are not sae-lens TopK SAEs; only those can be "
                        "fine-tuned (a JumpReLU's threshold has no gradient here)")
    cfg = FinetuneConfig(**{**asdict(cfg), "sites": [s.name for s in sites]})
    window = int(corpus.train.shape[1])
    _check(cfg, window)
    n_steps = cfg.n_steps(window)
    if n_steps * cfg.batch_size > corpus.train.shape[0]:
        raise UserError(f"--tokens {cfg.tokens} needs {n_steps * cfg.batch_size} windows but the corpus has "
                        f"{corpus.train.shape[0]}; ask for fewer tokens")
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    base_digest = dset.digest()  # before training: the SAEs below are the set's own modules, changed in place
    saes = {s.name: dset[s.name].sae.float().to(model.device) for s in sites}
    for sae in saes.values():
        sae.requires_grad_(True)
    opts = {n: torch.optim.Adam(_param_groups(sae, cfg.lr), betas=(0.9, 0.999)) for n, sae in saes.items()}
    start, wall_before, history = 0, 0.0, {s.name: [] for s in sites}
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, weights_only=False, map_location=model.device)
        if ckpt["config"] != asdict(cfg) or ckpt["base"] != base_digest \
                or ckpt["corpus_sha256"] != corpus.recipe.get("train_sha256"):
            raise UserError(f"cannot resume {out}: the checkpoint was made with other settings, base set or corpus; "
                            "rerun with the same flags or without --resume")
        for n in saes:
            saes[n].load_state_dict(ckpt["saes"][n])
            opts[n].load_state_dict(ckpt["optimizers"][n])
        start, wall_before, history = int(ckpt["step"]), float(ckpt["wall_s"]), ckpt["history"]
        log(f"resuming {out} at step {start}/{n_steps}")
    elif ckpt_path.is_file():
        raise UserError(f"{out} holds a checkpoint of an unfinished run; pass --resume or choose another --out")

    spliced = SplicedModel(model)
    order = torch.randperm(corpus.train.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    common = common_tokens(corpus.train, int(corpus.train.max()) + 1) if cfg.kl_focus == "copies" else None
    t0 = time.time()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_steps, initial=start, unit="step", dynamic_ncols=True, mininterval=2.0)
    stop_at = n_steps if max_steps is None else min(n_steps, max_steps)
    for step in range(start, stop_at):
        windows = corpus.train[order[step * cfg.batch_size:(step + 1) * cfg.batch_size]]
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        positions, weights = choose_positions(windows, cfg.kl_positions, cfg.kl_focus, gen, common)
        with torch.no_grad():
            clean = spliced.run({"input_ids": windows, "attention_mask": torch.ones_like(windows)}, positions=positions)
            clean_logp = torch.log_softmax(clean.float(), dim=-1)
        scale = lr_factor(step, n_steps, cfg.warmup_frac, cfg.decay_frac)
        for s in sites:
            opt = opts[s.name]
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
            loss, parts = splice_loss(spliced, saes[s.name], s, windows, positions, clean_logp, cfg.mse_coef, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history[s.name].append([step, round(parts["kl"], 5), round(parts["nmse"], 5), round(parts["l0"], 1)])
        del clean_logp
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(" ".join(f"{n} kl {h[-1][1]:.3f} nmse {h[-1][2]:.3f}" for n, h in history.items()),
                                refresh=False)
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == stop_at:
            wall = wall_before + time.time() - t0
            state = {"config": asdict(cfg), "base": base_digest, "corpus_sha256": corpus.recipe.get("train_sha256"),
                     "step": done, "wall_s": wall, "history": history,
                     "saes": {n: sae.state_dict() for n, sae in saes.items()},
                     "optimizers": {n: o.state_dict() for n, o in opts.items()}}
            atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))
            fault_point("finetune", done)
            tok = done * cfg.batch_size * (window - 1)
            log(f"step {done}/{n_steps} ({tok} tokens per site, {wall / 60:.1f} min) | "
                + " ".join(f"{n} kl {_mean_tail(h, 1):.3f} nmse {_mean_tail(h, 2):.3f}" for n, h in history.items()))
    if bar is not None:
        bar.close()
    wall = wall_before + time.time() - t0
    if stop_at < n_steps:
        log(f"stopped after {stop_at} of {n_steps} steps; continue with --resume")
        return {"complete": False, "step": stop_at, "wall_s": wall}

    meta = _write_sites(folder, out, saes, sites, base_meta, cfg, base, base_digest, corpus, history, wall, n_steps)
    loaded = {s.name: load_dictionary(out / s.name) for s in sites}
    n_eval = max(1, min(corpus.eval.shape[0], math.ceil(cfg.eval_tokens / (window - 1))))
    metrics = evaluate(model, loaded, corpus.eval[:n_eval], sites, batch_size=16) \
        if corpus.eval.shape[0] and cfg.eval_tokens > 0 else {}
    for name, m in metrics.items():
        meta["sites"][name] = {**meta["sites"].get(name, {}), **m, "finetuned": True}
    meta["complete"] = True
    write_text(out / SET_META, json.dumps(meta, indent=1))
    ckpt_path.unlink(missing_ok=True)
    log(f"fine-tuned {len(sites)} SAEs of {base} on {n_steps * cfg.batch_size * (window - 1)} tokens each in "
        f"{wall / 60:.1f} min -> {out}")
    return meta


def _mean_tail(h: list, col: int, n: int = 10) -> float:
    tail = [r[col] for r in h[-n:]]
    return sum(tail) / max(1, len(tail))


def _write_sites(folder: Path, out: Path, saes: dict[str, Any], sites: list[Site], base_meta: dict,
                 cfg: FinetuneConfig, base: str, base_digest: str, corpus: Corpus, history: dict, wall: float,
                 n_steps: int) -> dict[str, Any]:
    """Copy the base set's other sites and save the fine-tuned ones (bf16, as the base); return the
    new set.json (the caller adds the held-out metrics and writes it, once)."""
    from .sae_step import save_site

    tuned = {s.name for s in sites}
    if folder.resolve() != out.resolve():
        for child in sorted(folder.iterdir()):
            if child.is_dir() and not child.name.startswith(".") and child.name not in tuned:
                target = out / child.name
                if target.exists():
                    shutil.rmtree(target)
                shutil.copytree(child, target)
    save_dtype = (base_meta.get("config") or {}).get("save_dtype", "bfloat16")
    for s in sites:
        sae = saes[s.name]
        scale = float(getattr(sae.cfg.metadata, "activation_scale", 1.0) or 1.0)
        # raw units already (scale 1, no per-dimension divisors); the original scale stays on record
        save_site(sae, 1.0, torch.ones(sae.cfg.d_in), out, s, save_dtype,
                  {"activation_scale": scale, "finetuned_e2e": True})
    meta = {**base_meta, "sites": dict(base_meta.get("sites") or {})}
    meta["finetune"] = {
        "base": base, "base_dictionaries_sha256": base_digest, "config": asdict(cfg),
        "corpus_sha256": corpus.recipe.get("train_sha256"), "steps": n_steps,
        "tokens_per_site": n_steps * cfg.batch_size * (int(corpus.train.shape[1]) - 1), "wall_s": round(wall, 1),
        "threads": torch.get_num_threads(),
        "loss_start": {n: h[0][1:] for n, h in history.items() if h},
        "loss_end": {n: [round(_mean_tail(h, 1), 5), round(_mean_tail(h, 2), 5)] for n, h in history.items() if h},
    }
    return meta
