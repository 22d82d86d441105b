"""The dense aggregated node effects as safetensors (``features/<site>``, ``errors/<site>``)."""

from __future__ import annotations

import json
from pathlib import Path

from ..adapters import site_sort_key
from ..graph import Circuit
from ..io import write_tensors
from ..nodes import Act, Acts
from .common import _jsonable


# --------------------------------------------------------------------------- node effects

def write_effects(circuit: Circuit, path: str | Path) -> Path:
    tensors = {}
    for site, v in circuit.effects.items():
        tensors[f"features/{site}"] = v.f
    for site, v in circuit.effects.items():
        tensors[f"errors/{site}"] = v.err
    meta = {"format": "featcircuits.node_effects/1",
            "sites": json.dumps(list(circuit.effects)),
            "provenance": json.dumps(_jsonable(circuit.provenance))}
    return write_tensors(path, tensors, metadata=meta)


def read_effects(path: str | Path) -> tuple[Acts, dict]:
    """``(effects, metadata)`` from a ``node_effects.safetensors``, in site order."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    sites = json.loads(meta["sites"]) if "sites" in meta else \
        sorted({k.split("/", 1)[1] for k in keys}, key=site_sort_key)
    effects = {s: Act(tensors[f"features/{s}"], tensors[f"errors/{s}"]) for s in sites
               if f"features/{s}" in tensors and f"errors/{s}" in tensors}
    return effects, meta
