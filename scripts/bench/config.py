"""Sizes per model (tiny, offline Gemma), quick or full."""

from __future__ import annotations

import tempfile
from pathlib import Path

from featcircuits.dictionaries import identity_set, load_dictionary_set, registry
from featcircuits.models import OFFLINE_ALIAS, load_model

from .common import TASK


# --------------------------------------------------------------------------------------
# Configurations


def tiny_config(args) -> dict:
    from featcircuits.testing import random_saelens_set, tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="fc-bench-tiny-"))
    n_layers, d_model = 4, 64

    def load():
        model = tiny_model("gemma3", n_layers=n_layers, d_model=d_model)
        random_saelens_set(model, tmp / "w256", width=256)
        return model, load_dictionary_set(str(tmp / "w256"), model.adapter), \
            "random sae-lens set, width 256 (testing.random_saelens_set)"

    widths = [64, 256, 1024, 4096] if args.quick else [64, 256, 1024, 4096, 16384]

    def width_sets(model_):
        out = [("identity", lambda: identity_set(model_.adapter))]
        for w in widths:
            def make(w=w):
                folder = tmp / f"w{w}"
                if not folder.is_dir():
                    random_saelens_set(model_, folder, width=w)
                return load_dictionary_set(str(folder), model_.adapter)
            out.append((f"random sae-lens {w}", make))
        return out

    q = args.quick
    return {
        "description": f"tiny random Gemma 3 ({n_layers} layers, d_model {d_model}; featcircuits.testing.tiny_model)",
        "load": load, "n": 32, "batch_size": 16, "rounds": 1 if q else args.repeats or 5,
        "ig_steps": [5, 10, 20], "subset_sites": None, "validate_subset": 3,
        "ig_repeats": 1 if q else args.repeats or 5,
        "exact": True, "exact_repeats": 1 if q else args.repeats or 5, "exact_feature_sample": 32,
        "profile": not q, "top_k": 100, "edge_rounds": 1 if q else args.repeats or 5,
        "sweep_ks": [1, 2, 4, 8, 16, 32, 64, 128, 256], "sweep_rounds": 1 if q else 3,
        "discover_n": 32, "discover_ig": True, "discover_ig_steps": 10,
        "discover_rounds": 1 if q else args.repeats or 5, "discover_ig_repeats": 1 if q else args.repeats or 5,
        "scaling_n": [8, 32, 128] if q else [8, 16, 32, 64, 128, 256], "scaling_ig": True,
        "scaling_rounds": 1 if q else 3, "scaling_full_rounds_up_to": 256, "scaling_cut_note": None,
        "width_n": 32, "widths": width_sets, "width_rounds": 1 if q else 3, "cli": None,
    }


def starter_ready() -> tuple[bool, str]:
    """Whether the registry has a ``starter`` entry whose folder holds dictionaries."""
    from featcircuits.dictionaries import local_set_folder

    entry = registry().get("starter")
    if entry is None:
        return False, "no 'starter' entry in the dictionary registry"
    folder = local_set_folder(entry.get("path", "starter"))
    n = sum(1 for sub in folder.iterdir() if (sub / "cfg.json").is_file() or (sub / "ae.pt").is_file()) \
        if folder is not None else 0
    if not n:
        return False, f"'starter' is registered but its folder ({entry.get('path', 'starter')}) holds no dictionaries"
    return True, f"'starter' from the dictionary registry ({n} site dictionaries)"


def gemma_config(args) -> dict:
    saes = args.saes
    ready, why = starter_ready()
    if saes == "auto":
        saes = "starter" if ready else "identity"
        note = why if ready else f"{why}: identity dictionaries (neurons as features)"
    else:
        note = f"--saes {saes}"

    def load():
        model = load_model(OFFLINE_ALIAS)
        return model, load_dictionary_set(saes, model.adapter, OFFLINE_ALIAS), note

    def width_sets(model):
        adapter = model.adapter
        out = [("identity (640)", lambda: identity_set(adapter))]
        if ready:
            out.append(("starter", lambda: load_dictionary_set("starter", adapter, OFFLINE_ALIAS)))
        return out

    q = args.quick
    gn = 8 if q and args.gemma_n == 16 else args.gemma_n
    max_n = args.gemma_max_n or (32 if q else 128)
    scaling_n = [n for n in [8, 16, 32, 64, 128, 256] if n <= max_n]
    cut = None if scaling_n[-1] >= 256 else (
        f"cut at n={scaling_n[-1]} (of 8 -> 256) to keep the Gemma run near 20 minutes (n=256 alone took "
        f"about 6 minutes here, and the time went to the IG full discover instead); examples run in chunks "
        f"of 16, so from n=16 on the cost grows linearly (see seconds per example below); "
        f"--gemma-max-n 256 runs the full range")
    cli = None
    if not args.no_cli:
        cli = ["discover", "--model", OFFLINE_ALIAS, "--saes", saes, "--task", TASK, "--method", "relp",
               "--n", "64"]
    return {
        "description": f"offline Gemma 3 270M ({OFFLINE_ALIAS}), dictionaries: {saes}",
        "saes": saes, "load": load, "n": gn, "batch_size": 16, "rounds": 1 if q else args.repeats or 3,
        "ig_steps": [10] if q else [5, 10, 20], "subset_sites": None if args.gemma_sites == 0 else args.gemma_sites,
        "validate_subset": None, "ig_repeats": 1,
        "exact": True, "exact_repeats": 1, "exact_feature_sample": 8 if q else 16, "profile": True,
        "top_k": 100, "edge_rounds": 1 if q else 3, "sweep_ks": [1, 4, 16, 64], "sweep_rounds": 1 if q else 3,
        "discover_n": gn, "discover_ig": (not q) if args.gemma_full_ig is None else args.gemma_full_ig, "discover_ig_steps": 10,
        "discover_rounds": 1 if q else 2, "discover_ig_repeats": 1,
        "scaling_n": scaling_n, "scaling_ig": False, "scaling_rounds": 1 if q else 3,
        "scaling_full_rounds_up_to": 16, "scaling_cut_note": cut,
        "width_n": 16, "widths": width_sets, "width_rounds": 1 if q else 2, "cli": cli,
        # discover with cards vs --no-cards (real CLI, 5 runs): a real dictionary set only, not --quick
        "cards_cost": not q and not args.no_cli and saes != "identity",
    }
