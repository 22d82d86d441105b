#!/usr/bin/env python
"""Where in an IOI prompt a site's SAE loses the behaviour.

For each site: the share of IOI's clean-vs-zero-ablation gap kept when the site's SAE
replaces the activation *without its error term* at one role's positions only (the rest
of the prompt keeps its real activation): the first mention of the subject (S1), the
indirect object (IO), the second mention of the subject (S2), the last position (END), and
every other non-BOS position. ``all`` splices every non-BOS position, as ``sae_report.py``
does. Zero-ablation (the reference of 0) is at every non-BOS position, as there.

Then whether the SAE tells the names apart: per name (at its IO positions), the mean SAE
code and the mean activation; the mean cosine between different names' codes (1 = one code
for every name) against that between their centred activations, and how many names have a
latent among their top 5 that no other name has among its top 5.

Then what the lost part is: ``all`` again, with the error term's component in the *name
subspace* put back (the span of the names' centred mean activations, measured on other
prompts, task seed + 1000, at the names' positions), against a random subspace of the same
rank. If the names' subspace brings the behaviour back and a random one does not, the SAE
loses exactly which name is where, and a set that keeps IOI needs that many directions'
worth of capacity for names at the site. And with only one direction put back per position:
the error's component along that token's own input embedding (what ``train-saes
--identity-coef`` trains the SAE to keep).

    .venv/bin/python scripts/ioi_positions.py --saes starter --sites resid_0,resid_1,resid_2,resid_3,resid_9,resid_10 \
        --out results/starter_targets/ioi_positions

With ``--error-ranks 1,2,4,8,16,32``: also the error's top-r principal directions (fit at the names'
and the last token's positions of the other prompts) put back, against r random ones: how many
directions the lost part needs (a few: a feature or two the SAE lacks; about one per name: identity).

Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from featcircuits.dictionaries import load_dictionary_set  # noqa: E402
from featcircuits.metric import metric  # noqa: E402
from featcircuits.models import load_model  # noqa: E402
from featcircuits.tasks import make_pairs, tokenize_pairs  # noqa: E402
from featcircuits.tracing import SplicedModel  # noqa: E402
from featcircuits.training.trainer import resolve_sites  # noqa: E402
from sae_report import recovered  # noqa: E402

ROLES = ("all", "S1", "IO", "S2", "END", "other")


def role_masks(ids: torch.Tensor, mask: torch.Tensor, io: torch.Tensor, s: torch.Tensor, bos: int) -> dict:
    """[b, T] bool per role. The subject is the answer token that occurs twice in the prompt."""
    real = mask.bool() & (ids != bos)
    io_count = (ids == io[:, None]).sum(1)
    subject = torch.where(io_count > 1, io, s)  # the built-in task's patch answer; found, not assumed
    indirect = torch.where(io_count > 1, s, io)
    is_s = (ids == subject[:, None]) & real
    nth = is_s.long().cumsum(1)
    end = torch.zeros_like(real)
    end[:, -1] = True  # prompts are left-padded: the last position is every prompt's last token
    m = {"all": real, "S1": is_s & (nth == 1), "S2": is_s & (nth == 2), "IO": (ids == indirect[:, None]) & real,
         "END": end & real}
    m["other"] = real & ~(m["S1"] | m["S2"] | m["IO"] | m["END"])
    return m


def site_activations(spliced, inputs: dict, site) -> torch.Tensor:
    """[b, T, d] float32 activations at ``site`` (the forward stops there)."""
    got = {}

    def hook(_, x):
        got["x"] = x.detach().float()

    with torch.no_grad():
        spliced.run(inputs, hook, [site], stop=True)
    return got["x"]


def name_codes(spliced, inputs: dict, site, dictionary, ids: torch.Tensor, where: torch.Tensor) -> dict:
    """How distinct the names' SAE codes are, against their activations (see the module doc)."""
    x, tok = site_activations(spliced, inputs, site)[where], ids[where]
    with torch.no_grad():
        codes = dictionary.encode(x).float()
    names = sorted(set(tok.tolist()))
    code = torch.stack([codes[tok == n].mean(0) for n in names])
    act = torch.stack([x[tok == n].mean(0) for n in names])
    act = act - act.mean(0)
    off = ~torch.eye(len(names), dtype=torch.bool)

    def mean_cos(m):
        m = torch.nn.functional.normalize(m, dim=-1)
        return float((m @ m.T)[off].mean())

    top = [set(c.topk(5).indices.tolist()) for c in code]
    own = sum(bool(top[i] - set().union(*(top[j] for j in range(len(names)) if j != i))) for i in range(len(names)))
    return {"names": len(names), "code_cos": mean_cos(code), "act_cos": mean_cos(act), "names_with_own_latent": own}


def name_subspace(spliced, inputs: dict, site, ids: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """[d, r] orthonormal basis of the names' centred mean activations at ``where`` (r = names - 1)."""
    x, tok = site_activations(spliced, inputs, site)[where], ids[where]
    means = torch.stack([x[tok == n].mean(0) for n in sorted(set(tok.tolist()))])
    u, sv, vh = torch.linalg.svd(means - means.mean(0), full_matrices=False)
    rank = int((sv > sv[0] * 1e-4).sum())
    return vh[:rank].T


def error_subspace(spliced, inputs: dict, site, dictionary, where: torch.Tensor, rank: int) -> torch.Tensor:
    """[d, rank] orthonormal: the top principal directions (uncentred) of the SAE's error term
    at ``where`` (positions of other prompts): the ``rank`` directions that hold most of what
    the SAE leaves out there."""
    x = site_activations(spliced, inputs, site)[where]
    with torch.no_grad():
        err = x - dictionary.decode(dictionary.encode(x)).float()
    _, _, vh = torch.linalg.svd(err, full_matrices=False)
    return vh[:rank].T


def random_subspace(d: int, rank: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, rank, generator=torch.Generator().manual_seed(seed)))
    return q


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--saes", default="starter")
    ap.add_argument("--model", default="gemma-3-270m-offline")
    ap.add_argument("--sites", default="resid_0,resid_1,resid_2,resid_3,resid_9,resid_10")
    ap.add_argument("--task", default="ioi")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1, help="task seed (held out from discovery's 0)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "results" / "starter_targets" / "ioi_positions"))
    ap.add_argument("--error-ranks", default="",
                    help="comma list of r: also put back the error's top-r principal directions at the names and the "
                         "last token (fit on other prompts), to ask how many directions the lost part needs")
    args = ap.parse_args()
    error_ranks = [int(v) for v in args.error_ranks.split(",") if v]
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = load_model(args.model)
    dset = load_dictionary_set(args.saes, model.adapter, args.model)
    batch, _ = tokenize_pairs(make_pairs(args.task, args.pairs, args.seed), model.tokenizer)
    ids, mask = batch.clean_ids, batch.clean_mask
    io, s = batch.clean_answer, batch.patch_answer
    roles = role_masks(ids, mask, io, s, model.tokenizer.bos_token_id)
    spliced = SplicedModel(model)
    inputs = {"input_ids": ids, "attention_mask": mask}

    other, _ = tokenize_pairs(make_pairs(args.task, args.pairs, args.seed + 1000), model.tokenizer)
    other_roles = role_masks(other.clean_ids, other.clean_mask, other.clean_answer, other.patch_answer,
                             model.tokenizer.bos_token_id)
    other_inputs = {"input_ids": other.clean_ids, "attention_mask": other.clean_mask}
    other_names = other_roles["S1"] | other_roles["S2"] | other_roles["IO"]

    own = torch.nn.functional.normalize(model.hf.get_input_embeddings().weight.detach().float()[ids], dim=-1)

    def run(site=None, where=None, zero=False, restore: torch.Tensor | None = None, restore_own=False) -> float:
        def hook(_, x):
            if zero:
                new = torch.zeros_like(x)
            else:
                xf = x.float()
                new = dset[site.name].decode(dset[site.name].encode(xf)).float()
                if restore is not None:  # put back the error's component in the subspace ``restore`` spans
                    new = new + ((xf - new) @ restore) @ restore.T
                if restore_own:  # put back the error's component along each token's own embedding
                    new = new + ((xf - new) * own).sum(-1, keepdim=True) * own
            return torch.where(where.unsqueeze(-1), new.to(x.dtype), x)

        with torch.no_grad():
            logits = spliced.run(inputs) if site is None else spliced.run(inputs, hook, [site])
        return float(metric(logits, io, s).mean())

    clean = run()
    rows = {}
    for site in resolve_sites(model.adapter, args.sites):
        zero = run(site, roles["all"], zero=True)
        rows[site.name] = {"zero": zero, **{r: recovered(run(site, roles[r]), clean, zero) for r in ROLES}}
        rows[site.name].update(name_codes(spliced, inputs, site, dset[site.name], ids, roles["IO"]))
        basis = name_subspace(spliced, other_inputs, site, other.clean_ids, other_names)
        rows[site.name]["subspace_rank"] = int(basis.shape[1])
        rows[site.name]["all_names_restored"] = recovered(run(site, roles["all"], restore=basis), clean, zero)
        rows[site.name]["all_random_restored"] = recovered(
            run(site, roles["all"], restore=random_subspace(basis.shape[0], basis.shape[1], 0)), clean, zero)
        rows[site.name]["all_own_embedding_restored"] = recovered(run(site, roles["all"], restore_own=True), clean, zero)
        for rank in error_ranks:
            pcs = error_subspace(spliced, other_inputs, site, dset[site.name], other_names | other_roles["END"], rank)
            rows[site.name][f"all_error_top{rank}_restored"] = recovered(run(site, roles["all"], restore=pcs), clean, zero)
            rows[site.name][f"all_random{rank}_restored"] = recovered(
                run(site, roles["all"], restore=random_subspace(pcs.shape[0], rank, 0)), clean, zero)
        print(site.name, {k: None if v is None else round(v, 3) for k, v in rows[site.name].items()}, flush=True)
    example = model.tokenizer.decode(ids[0][mask[0].bool()], skip_special_tokens=True)
    report = {"saes": args.saes, "model": args.model, "task": args.task, "pairs": args.pairs, "seed": args.seed,
              "error_ranks": error_ranks, "clean": clean, "example": example, "sites": rows, "wall_s": round(time.time() - t0, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(render(report, args))
    print(render(report, args))
    return 0


def render(r: dict, args: argparse.Namespace) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.2f}"

    lines = [f"# Where {r['saes']}'s SAEs lose {r['task']}", "",
             f"Written by `.venv/bin/python scripts/ioi_positions.py --saes {r['saes']} --sites {args.sites} "
             f"--pairs {r['pairs']} --seed {r['seed']}`. Share of the clean-vs-zero-ablation gap kept (1 = as clean, "
             f"0 = as with the site zeroed at every non-BOS position) when the site's SAE, without its error term, "
             f"replaces the activation at one role's positions only; `all` = every non-BOS position (the `saes.md` "
             f"measure). Clean metric {r['clean']:.2f}; e.g. \"{r['example']}\" (S1 = the subject's first mention, "
             "IO = the indirect object, S2 = the subject's second mention, END = the last token).", "",
             "| site | " + " | ".join(ROLES) + " |", "|---|" + "---|" * len(ROLES)]
    for name, row in r["sites"].items():
        lines.append(f"| {name} | " + " | ".join(f(row[k]) for k in ROLES) + " |")
    lines += ["", "Do the SAE's codes tell the names apart? Per name, its mean code and mean activation at its IO "
              "positions; mean cosine between different names (codes; activations centred over the names), and the "
              "names with a top-5 latent that no other name has in its top 5:", "",
              "| site | names | code cosine | activation cosine (centred) | names with a latent of their own |",
              "|---|---|---|---|---|"]
    for name, row in r["sites"].items():
        lines.append(f"| {name} | {row['names']} | {row['code_cos']:.2f} | {row['act_cos']:.2f} | "
                     f"{row['names_with_own_latent']} of {row['names']} |")
    if all("all_names_restored" in row for row in r["sites"].values()):
        lines += ["", "What is lost: `all` again (the SAE at every non-BOS position), with the error term's component "
                  "in the names' subspace put back (the span of the names' centred mean activations at their "
                  f"positions in other prompts, task seed {r['seed'] + 1000}), against a random subspace of the same "
                  "rank; and with one direction per position put back: the error's component along that token's own "
                  "input embedding (*own token*):", "",
                  "| site | all | all + names' subspace | all + random subspace | rank | all + own token |",
                  "|---|---|---|---|---|---|"]
        for name, row in r["sites"].items():
            lines.append(f"| {name} | {f(row['all'])} | {f(row['all_names_restored'])} | "
                         f"{f(row['all_random_restored'])} | {row['subspace_rank']} | "
                         f"{f(row.get('all_own_embedding_restored'))} |")
    ranks = r.get("error_ranks") or []
    if ranks:
        lines += ["", "How many directions the lost part needs: `all` with the error's top-r principal directions "
                  "put back (uncentred, fit on the errors at the names' and the last token's positions of other "
                  f"prompts, task seed {r['seed'] + 1000}), against r random directions:", "",
                  "| site | all | " + " | ".join(f"top {k} / random {k}" for k in ranks) + " |",
                  "|---|---|" + "---|" * len(ranks)]
        for name, row in r["sites"].items():
            lines.append(f"| {name} | {f(row['all'])} | " + " | ".join(
                f"{f(row[f'all_error_top{k}_restored'])} / {f(row[f'all_random{k}_restored'])}" for k in ranks) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
