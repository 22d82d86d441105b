"""``circuit.html``: one self-contained, offline page to read a circuit.

Plain JS and SVG (no library, no CDN; a Content-Security-Policy forbids any network
access): sites as rows (embed at the bottom, the metric on top), token positions as
columns when the circuit keeps them, node size and colour by effect with features and
error nodes on separate scales (so feature signs stay visible), an edge-weight slider,
search by id or label, and a click pins a node's card (label, effect, activation, top
contexts with highlighted tokens, promoted and suppressed tokens, strongest edges).

Safety: the data goes into a ``<script type="application/json">`` block with ``<``, ``>``,
``&`` and the JS line separators escaped as ``\\uXXXX``, so no string in it can close the
block; the page's script inserts every string with ``textContent``, never as HTML.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from ..io import write_text

_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def embed_json(obj: Any) -> str:
    """``obj`` as JSON safe to place inside a ``<script type="application/json">`` element."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, default=str)
    for ch, esc in _ESCAPES.items():
        text = text.replace(ch, esc)
    return text


def _finite(x: Any) -> Any:
    """NaN/inf (not JSON) as None, recursively."""
    if isinstance(x, float) and x != x or x in (float("inf"), float("-inf")):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def viewer_data(node_link: dict, cards: dict[str, dict] | None = None, labels: dict[str, str] | None = None,
                title: str | None = None, prompt_tokens: list[str] | None = None) -> dict:
    """What the page reads: nodes (with labels merged in), links, cards of its nodes, title, tokens."""
    meta = node_link.get("metadata") or {}
    prov = meta.get("provenance") or {}
    nodes = []
    for d in node_link.get("nodes", []):
        d = dict(d)
        if labels and str(d.get("id")) in labels:
            d["label"] = labels[str(d["id"])]
        nodes.append(d)
    ids = {str(d["id"]) for d in nodes}
    links = [{"source": str(l["source"]), "target": str(l["target"]), "weight": l.get("weight", 0.0)}
             for l in node_link.get("links", node_link.get("edges", []))]
    task = prov.get("task")
    task = task.get("name") if isinstance(task, dict) else task
    default_title = " / ".join(str(x) for x in (task, prov.get("method"), prov.get("model")) if x) or "circuit"
    tokens = prompt_tokens if prompt_tokens is not None else prov.get("prompt_tokens")
    return _finite({"title": title or default_title, "nodes": nodes, "links": links,
                    "cards_source": cards_source(prov.get("cards")),
                    "cards": {k: v for k, v in (cards or {}).items() if k in ids},
                    "prompt_tokens": [str(t) for t in tokens] if isinstance(tokens, list) else []})


def cards_source(info: dict | None) -> str:
    """Where the cards' contexts come from, as the card headings say it ("" when not recorded)."""
    from ..text_corpus import corpus_name

    corpus = (info or {}).get("corpus") or {}
    if not corpus.get("source"):
        return ""
    return f"{corpus_name(corpus)}, {int(corpus.get('tokens', 0)):,} tokens"


def render_html(node_link: dict, cards: dict[str, dict] | None = None, labels: dict[str, str] | None = None,
                title: str | None = None, prompt_tokens: list[str] | None = None) -> str:
    """The page as a string (see :func:`write_html`)."""
    pkg = resources.files(__package__)
    template = (pkg / "template.html").read_text(encoding="utf-8")
    script = (pkg / "viewer.js").read_text(encoding="utf-8")
    data = embed_json(viewer_data(node_link, cards, labels, title, prompt_tokens))
    head, _, tail = template.partition("__DATA__")
    tail_a, _, tail_b = tail.partition("__SCRIPT__")
    return head + data + tail_a + script + tail_b  # no str.replace on data: it may hold the markers


def write_html(path: str | Path, node_link: dict, cards: dict[str, dict] | None = None,
               labels: dict[str, str] | None = None, title: str | None = None,
               prompt_tokens: list[str] | None = None) -> Path:
    """Write ``circuit.html`` (atomically) for a node-link circuit
    (:func:`featcircuits.export.to_node_link`) and the cards of its nodes."""
    return write_text(path, render_html(node_link, cards, labels, title, prompt_tokens))
