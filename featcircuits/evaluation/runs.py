"""From a model and its dictionaries to evaluation results: what ``featcircuits evaluate``
and ``featcircuits curves`` run (and scripts call) after loading them."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from .. import distributed
from ..batching import resolve_batch_size
from ..dictionaries import DictionarySet
from ..discover import versions
from ..errors import UserError
from ..graph import Circuit
from ..io import atomic_write, write_json
from ..lrp import rules_key
from ..models import LoadedModel
from ..tasks import make_pairs, pair_warnings, tokenize_pairs
from ..tracing import SplicedModel
from .curves import DEFINITIONS, faithfulness_curves
from .evaluator import Evaluator
from .pairs import eval_pairs
from .plots import plot_curves


def evaluate_circuit(model: LoadedModel, dicts: DictionarySet, circuit: Circuit, *, task: str, n_eval: int | None = None, seed: int | None = None,
                     ablation: str = "mean", errors: str = "ablate", start_layer: int = -1,
                     batch_size: "int | str" = 16, stack: int = 4, progress: bool = False) -> dict:
    """Faithfulness and completeness of ``circuit`` (a ``graph.Circuit``) on evaluation pairs
    disjoint from its discovery pairs (regenerated from ``task``, the provenance's seed and
    pair count)."""
    prov = circuit.provenance or {}
    if not circuit.effects:
        raise UserError("the circuit folder has no node_effects.safetensors: cannot rebuild the site masks")
    digest = prov.get("dictionaries_sha256")
    if digest and digest != dicts.digest():
        print("featcircuits: warning: these dictionaries differ from the ones the circuit was found with "
              f"(sha256 {dicts.digest()} vs {digest})", file=sys.stderr)
    seed = int(prov.get("seed", 0) if seed is None else seed)
    n_disc = int(prov.get("pairs_requested") or prov.get("n") or 0)
    if n_disc < 1:
        raise UserError("the circuit's provenance does not say how many discovery pairs it used ('n')")
    n_eval = int(n_eval or prov.get("n") or n_disc)
    disc_pairs = make_pairs(task, n_disc, seed)
    ev_pairs, split = eval_pairs(task, n_eval, disc_pairs, seed)
    batch, dropped = tokenize_pairs(ev_pairs, model.tokenizer)
    split.update({"n_eval_requested": n_eval, "n_eval": len(batch), "eval_dropped": len(dropped),
                  "discovery_pairs_regenerated": n_disc, "discovery_seed": seed})
    sm = SplicedModel(model, dicts)
    batch_size, batching = resolve_batch_size(sm, batch, batch_size, (), forward_rows=stack)
    t0 = time.perf_counter()
    ev = Evaluator(sm, batch, ablation=ablation, errors=errors, start_layer=start_layer, seed=seed,
                   batch_size=batch_size, stack=stack, progress=progress)
    masks = circuit.masks()
    (res,) = ev.evaluate([masks])
    seconds = time.perf_counter() - t0
    return {**res, "F_M": ev.F_M, "F_empty": ev.F_empty,
            "n_nodes_in_graph": circuit.n_nodes,
            "settings": {**ev.settings(), "aggregation": prov.get("aggregation", "sum"), "seed": seed,
                         "batch_size": batch_size, "batching": batching},
            "split": split, "seconds": round(seconds, 3), "forward_passes": ev.forward_passes,
            "provenance": {"circuit_method": prov.get("method"), "task": task,
                           "circuit_thresholds": prov.get("thresholds"),
                           "dictionaries_sha256": dicts.digest()},
            "definitions": {k: DEFINITIONS[k] for k in ("F", "faithfulness", "completeness", "n_nodes")}}


def run_curves(model: LoadedModel, dicts: DictionarySet, *, task: str, n: int, n_eval: int, seed: int = 0, methods=("relp", "ig", "atp", "random"),
                points: int = 15, n_min: int = 1, n_max: int | None = None, ablation: str = "mean",
                errors: str = "ablate", aggregation: str = "sum", start_layer: int = -1, steps: int = 10,
                rules="default", random_draws: int = 3, batch_size: "int | str" = 16, stack: int = 4, out=None,
                model_spec: str | None = None, saes_spec: str | None = None, effects_cache=None,
                progress: bool = True, extra_timings: dict | None = None, title: str | None = None,
                resume: bool = False) -> dict:
    """Faithfulness and completeness curves from a model and its dictionaries (what
    ``featcircuits curves`` runs after loading them):
    discovery and evaluation pairs, node effects (cached when ``effects_cache`` is given),
    the curves, ``curves.json`` and the plots in ``out``. Returns the result dict.
    ``batch_size``: an int, or ``auto`` / ``auto:CAP`` (``featcircuits.batching``: the
    costliest of the methods' node stage and the stacked evaluation forwards).

    With ``out``, every stage checkpoints per chunk of examples into ``out/.checkpoint``;
    ``resume=True`` continues a killed run from there."""
    torch.manual_seed(seed)
    disc_pairs = make_pairs(task, n, seed)
    ev_pairs, split = eval_pairs(task, n_eval, disc_pairs, seed)
    disc, dropped_d = tokenize_pairs(disc_pairs, model.tokenizer)
    evb, dropped_e = tokenize_pairs(ev_pairs, model.tokenizer)
    for what, want, dropped, pairs in (("discovery", n, dropped_d, disc_pairs), ("evaluation", n_eval, dropped_e, ev_pairs)):
        for line in pair_warnings(task, want, pairs, dropped):
            print(f"featcircuits: {what} pairs: {line}", file=sys.stderr)
    split.update({"discovery_seed": seed, "n_discovery_requested": n, "n_discovery": len(disc),
                  "discovery_dropped": len(dropped_d), "n_eval_requested": n_eval, "n_eval": len(evb),
                  "eval_dropped": len(dropped_e)})
    sm = SplicedModel(model, dicts)
    distributed.setup(sm.model.device)  # before the batch size: ``auto`` is agreed across ranks
    batch_size, batching = resolve_batch_size(sm, disc, batch_size, [m for m in methods if m != "random"],
                                              steps=steps, rules=rules, edges=False,
                                              # exact patching stacks every position of an example
                                              forward_rows=max(stack, disc.seq_len if "exact" in methods else 0))
    effects = {}
    cache_info = {}
    paths = {}
    for m in methods:
        if m == "random" or effects_cache is None:
            continue
        key = _effects_key(model_spec or model.spec, dicts, disc, m, steps, rules, batch_size)
        paths[m] = Path(effects_cache) / f"{m}-{key}.pt"
        if paths[m].is_file():
            effects[m] = torch.load(paths[m], weights_only=False)
            cache_info[m] = {"path": str(paths[m]), "reused": True}
    result = faithfulness_curves(sm, disc, evb, methods, points=points, n_min=n_min, n_max=n_max,
                                 ablation=ablation, errors=errors, aggregation=aggregation,
                                 start_layer=start_layer, steps=steps, rules=rules, random_draws=random_draws,
                                 seed=seed, batch_size=batch_size, stack=stack, effects=effects,
                                 progress=progress, checkpoint_dir=out, resume=resume)
    for m, path in paths.items():
        if m not in cache_info and distributed.is_writer():  # computed in this run: keep for the next
            atomic_write(path, lambda p, e=effects[m]: torch.save(e, p))
            cache_info[m] = {"path": str(path), "reused": False}
    result["provenance"] = {
        "model": model_spec or model.spec, "saes": saes_spec or dicts.name,
        "dictionaries_sha256": dicts.digest(), "identity_sites": dicts.meta.get("identity_sites", []),
        "task": task, "seed": seed, "versions": versions(), "effects_cache": cache_info or None,
    }
    result["split"] = split
    result["settings"]["batching"] = batching
    result["timings"].update(extra_timings or {})
    if out is not None and distributed.is_writer():  # under torchrun rank 0 alone writes
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "curves.json", result)
        plot_curves(result, out / "curves", title=title or f"{task} — {model_spec or model.spec}, "
                                                           f"dictionaries {saes_spec or dicts.name}")
    return result


def _effects_key(model_spec: str, dicts, batch, method: str, steps: int, rules, batch_size: int) -> str:
    h = hashlib.sha256()
    for t in (batch.clean_ids, batch.patch_ids, batch.clean_answer, batch.patch_answer):
        h.update(t.numpy().tobytes())
    h.update(json.dumps([model_spec, dicts.digest(), method, steps if method == "ig" else None,
                         rules_key(rules) if method == "relp" else None, batch_size]).encode())
    return h.hexdigest()[:16]


def curves_summary(result: dict, out) -> str:
    """The lines ``featcircuits curves`` prints for a result of ``run_curves``."""
    lines = [f"F(M) {result['F_M']:+.4f}   F(empty) {result['F_empty']:+.4f}   sizes {result['sizes']}"]
    for m, c in result["methods"].items():
        auc = c["auc"]
        reach = c["nodes_to_0.8"]
        lines.append(f"  {m:<7} AUC {auc if auc is None else f'{auc:.3f}'}   nodes to faithfulness 0.8: "
                     f"{reach if reach is not None else 'not reached'}")
    for case, c in result.get("by_case", {}).items():
        lines.append(f"  case {case} (n={c['n_eval']}): AUC " + ", ".join(
            f"{m} {'n/a' if a is None else f'{a:.3f}'}" for m, a in c["auc"].items()))
    cmp_ = result.get("relp_vs_ig")
    if cmp_:
        lines.append(f"  RelP vs IG at >= {cmp_['min_nodes']} nodes: max |diff| {cmp_['max_abs_diff']}, "
                     f"{'within' if cmp_['within'] else 'NOT within'} {cmp_['tolerance']}")
    lines.append(f"-> {out}")
    return "\n".join(lines)
