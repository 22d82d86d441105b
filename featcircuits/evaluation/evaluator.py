"""The evaluator: F(C) of many circuits on one evaluation batch, stacked along the batch."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Sequence

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..adapters import Site
from ..errors import UserError
from ..metric import preference
from ..nodes import Act
from ..tasks import Batch
from ..tracing import SplicedModel
from .masks import Masks, ablation_values, complement, empty_masks, evaluated_sites, full_masks, mask_size, \
    align_positions, resample_donors

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint

ERROR_MODES = ("ablate", "keep")


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
        # under torchrun every rank needs a chunk (e.g. discover's quick evaluation of 32 pairs
        # after a large --batch-size auto): smaller chunks, only the order of the sums changes
        batch_size = distributed.fitting_batch_size(len(batch), batch_size)
        self.batch_size, self.stack, self.progress = batch_size, stack, progress
        self.sites = evaluated_sites(sm, start_layer)
        t0 = time.perf_counter()
        # resample: each example's donor value is computed with its chunk (memory flat in n);
        # mean / zero: one broadcast value per site, computed here
        self.per_example = ablation == "resample"
        self.donors = resample_donors(len(batch), seed) if self.per_example else None
        if self.per_example:
            self.values = self.ablated = {}
        else:
            self.values = ablation_values(sm, batch, self.sites, ablation, seed=seed, batch_size=batch_size)
            self.ablated = self._ablated(self.values)
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
        n_groups = math.ceil(len(circuits) / self.stack)
        chunks = self.batch.chunks(self.batch_size)
        offsets = [sum(len(c) for c in chunks[:i]) for i in range(len(chunks))]
        mine = distributed.shard(chunks)  # all chunks in one process; a contiguous block per rank under torchrun
        done = 0
        saved = checkpoint.load() if checkpoint is not None else None
        if saved is not None:
            done, state = saved
            total = state["total"]
            if total.shape != (len(circuits),):
                raise UserError(f"checkpoint {checkpoint.path} holds {total.numel()} circuits, this run has "
                                f"{len(circuits)}; delete it or match the original arguments")
        bar = tqdm(total=n_groups * len(mine), initial=done * n_groups, desc=desc,
                   disable=not self.progress, leave=False)
        for n_done, (i, chunk) in enumerate(mine[done:], start=done + 1):
            total += self._chunk_prefs(chunk, offsets[i], circuits, bar.update).sum(1).double().cpu()
            if checkpoint is not None:
                checkpoint.save(n_done, {"total": total})
        bar.close()
        total = torch.tensor(distributed.all_reduce_floats(*total.tolist(), device=self.sm.model.device),
                             dtype=torch.float64)
        return (total / len(self.batch)).tolist()

    def pair_scores(self, circuits: Sequence[Masks], desc: str = "ablations") -> torch.Tensor:
        """Each example's clean preference under each circuit, ``[len(circuits), n]`` (float64).

        ``scores`` is the mean of these rows; kept per example so that the spread of a measure
        over its pairs can be estimated (a bootstrap over pairs). One process only: under
        torchrun use ``scores``."""
        if distributed.world()[1] > 1:
            raise UserError("pair_scores runs in one process; use scores() under torchrun")
        circuits = list(circuits)
        cols, start = [], 0
        for chunk in tqdm(self.batch.chunks(self.batch_size), desc=desc, disable=not self.progress, leave=False):
            cols.append(self._chunk_prefs(chunk, start, circuits).double().cpu())
            start += len(chunk)
        return torch.cat(cols, dim=1)

    def _chunk_prefs(self, chunk: Batch, start: int, circuits: list[Masks], on_group=None) -> torch.Tensor:
        """Clean preference [K, b] of examples ``start .. start + b`` under each of K circuits,
        ``stack`` circuits per forward pass; ``on_group(1)`` after each pass (progress)."""
        values = self._chunk_values(start, len(chunk))
        rows = []
        for i in range(0, len(circuits), self.stack):
            rows.append(self._run(chunk, values, circuits[i:i + self.stack]))
            if on_group is not None:
                on_group(1)
        return torch.cat(rows)

    def _ablated(self, values: dict[str, Act]) -> dict[str, torch.Tensor]:
        """A site's value when all of it is ablated: decode(a_f) + a_err."""
        with torch.no_grad():
            return {s: self.sm.dictionary(s).decode(v.f) + v.err for s, v in values.items()}

    def _chunk_values(self, start: int, b: int) -> tuple[dict[str, Act], dict[str, torch.Tensor]]:
        """Ablation values and fully-ablated site values for examples ``start .. start + b``:
        the shared ones, or (resample) the counterfactual values of those examples' donors."""
        if not self.per_example:
            return self.values, self.ablated
        donors = self.batch.select(self.donors[start:start + b].tolist())
        with torch.no_grad():
            _, vals = self.sm.cache(donors.inputs("patch"))
        self.forward_passes += 1
        values = {s.name: vals[s.name] for s in self.sites}
        return values, self._ablated(values)

    def _run(self, chunk: Batch, values: tuple[dict[str, Act], dict[str, torch.Tensor]],
             circuits: list[Masks]) -> torch.Tensor:
        """Clean preference [K, b] of the chunk under each of K circuits (stacked)."""
        sm, K, b = self.sm, len(circuits), len(chunk)
        T = chunk.seq_len
        stacked = {}
        for s in self.sites:
            d = sm.dictionary(s)
            stacked[s.name] = _stack_site(circuits, s.name, d.d_sae, T, self.errors)

        def hook(site: Site, x: torch.Tensor) -> torch.Tensor | None:
            mf, me, full, empty = (t.to(x.device) for t in stacked[site.name])  # masks are built on the CPU
            if bool(full.all()):
                return None  # nothing ablated here: the site stays exactly x
            d = sm.dictionary(site)
            a, ablated = values[0][site.name], values[1][site.name]
            with torch.no_grad():
                xs = x.reshape(K, b, T, -1)
                # rows with the whole site ablated take the precomputed decode(a_f) + a_err
                out = torch.where(empty.view(K, 1, 1, 1), ablated.to(x.dtype), xs)
                part = torch.nonzero(~full & ~empty).flatten()
                if part.numel():
                    P = part.numel()
                    xp = xs[part].reshape(P * b, T, -1)
                    f = d.encode(xp)
                    f2 = torch.where(mf[part], f.view(P, b, T, -1), a.f.to(f.dtype))
                    rec = d.decode(f2.reshape(P * b, T, -1)).view(P, b, T, -1)
                    if bool(me[part].any()):
                        err = (xp - d.decode(f)).view(P, b, T, -1)
                        rec = rec + torch.where(me[part], err, a.err.to(err.dtype))
                    else:
                        rec = rec + a.err.to(rec.dtype)
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
