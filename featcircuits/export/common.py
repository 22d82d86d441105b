"""Names of the files in a run folder and the helpers every format shares (plain JSON values, typed node attributes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


GRAPHML = "graph.graphml"
DOT = "graph.dot"
JSON = "graph.json"
CIRCUIT_TRACER = "graph.circuit-tracer.json"
CIRCUIT_TRACER_INDEX = "graph-metadata.json"
EFFECTS = "node_effects.safetensors"
SUMMARY = "summary.json"
HTML = "circuit.html"
CARDS = "cards.json"  # the cards of the circuit's feature nodes (node id -> card), read by the html export
PICTURE = "circuit"  # stem: circuit.png, circuit.svg

#: Every format :func:`save_circuit` knows, in the order it writes them.
FORMATS = ("graphml", "dot", "json", "circuit-tracer", "effects", "html", "summary", "png", "svg")
#: What it writes by default: everything, the matplotlib picture ``circuit.png``/``.svg`` and
#: the viewer ``circuit.html`` included, so a circuit saved from Python holds what
#: ``featcircuits discover`` writes.
DEFAULT_FORMATS = FORMATS
JSON_FORMAT_VERSION = "featcircuits.circuit/1"

# Node attributes and their types (GraphML/DOT need one type per attribute).
_INT_ATTRS = ("layer", "feature", "position")
_FLOAT_ATTRS = ("effect", "activation_clean", "activation_patch")
_STR_ATTRS = ("site", "kind", "label", "neuronpedia", "token")


# --------------------------------------------------------------------------- helpers

def _plain(value: Any) -> Any:
    """Python scalars for numpy/torch scalars and 0-d tensors; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and not isinstance(value, (str, bytes)) and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def _jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types (tuples become lists, tensors lists, paths strings)."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    return str(obj)


def _typed_node_attrs(data: dict) -> dict:
    """Node attributes coerced to their declared types; None values dropped."""
    out = {}
    for k, v in data.items():
        v = _plain(v)
        if v is None:
            continue
        if k in _INT_ATTRS:
            v = int(v)
        elif k in _FLOAT_ATTRS:
            v = float(v)
        elif k in _STR_ATTRS:
            v = str(v)
        out[k] = v
    return out


def _scalar_for_graphml(v: Any) -> Any:
    """A value GraphML can type: bool/int/float/str kept, anything else as JSON text."""
    v = _plain(v)
    if isinstance(v, (bool, int, float, str)):
        return v
    return json.dumps(_jsonable(v))


def _flatten(d: dict, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        elif v is None or isinstance(v, (dict, list, tuple)):
            out[key] = json.dumps(_jsonable(v))  # null, [], {} and lists as JSON text
        else:
            out[key] = _scalar_for_graphml(v)
    return out


def _task_name(prov: dict) -> str:
    task = prov.get("task")
    if isinstance(task, dict):
        return str(task.get("name") or task.get("path") or "task")
    return str(task) if task is not None else "task"


def _seconds(prov: dict) -> dict:
    secs = dict(prov.get("seconds") or {})
    for k in ("nodes", "edges", "total"):
        secs.setdefault(k, None)
    return secs
