"""Short labels for circuit nodes: automatic from feature cards, overridden by annotations.

An automatic label names the tokens a feature fires on (the peak tokens of its top
contexts, most frequent first) and the tokens it promotes (its direct effect), e.g.
``keys|doors → are|were``. A user annotations file (the Sparse Feature Circuits style: a
JSON object mapping node id to label) overrides it; an annotation for ``resid_5/12`` also
covers the positional nodes ``resid_5/12@k``. Error nodes say which site (and token).
For hub sets that Neuronpedia hosts, :func:`neuronpedia_url` gives a feature's page, read
from sae-lens's own directory of pretrained SAEs (no network).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from .errors import UserError

MAX_TOKENS = 3  # tokens named on each side of the arrow


def _show(token: str) -> str:
    """A token as a label shows it: stripped, with blank ones made visible."""
    t = token.strip()
    return t if t else repr(token)


def fires_on(card: dict, n: int = MAX_TOKENS) -> list[str]:
    """The peak tokens of a card's top contexts, most frequent first."""
    counts = Counter(_show(e["tokens"][e["peak"]]) for e in card.get("top", []) if e.get("tokens"))
    return [t for t, _ in counts.most_common(n)]


def auto_label(card: dict | None, n: int = MAX_TOKENS) -> str | None:
    """``fires-on tokens → promoted tokens`` from a card; None without a card or examples."""
    if not card:
        return None
    left = fires_on(card, n)
    right = []
    for t in card.get("promoted", []):
        s = _show(t["token"])
        if s not in right:
            right.append(s)
        if len(right) == n:
            break
    if not left and not right:
        return None
    return f"{'|'.join(left) or '(never active)'} → {'|'.join(right)}"


def error_label(site: str, token: str | None = None) -> str:
    """An error node's label: which site's reconstruction error, at which token."""
    return f"error at {site}" + (f" @ {_show(token)}" if token is not None else "")


def load_annotations(path: str | Path | None) -> dict[str, str]:
    """A user annotations file: a JSON object node id -> label (strings)."""
    if path is None:
        return {}
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read annotations {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"annotations {path} is not JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise UserError(f"annotations {path} must be a JSON object mapping node ids to label strings")
    return data


def label_nodes(nodes: Iterable[dict], cards: dict[str, dict], annotations: dict[str, str] | None = None,
                prompt_tokens: list[str] | None = None) -> dict[str, str]:
    """node id -> label for node-link ``nodes`` (dicts with ``id``, ``kind``, ``site``,
    ``position``): the annotation, else the card's automatic label, else (error nodes) the site."""
    annotations = annotations or {}
    out: dict[str, str] = {}
    for d in nodes:
        nid = str(d["id"])
        pos = d.get("position", -1)
        token = prompt_tokens[pos] if prompt_tokens and pos is not None and 0 <= pos < len(prompt_tokens) else None
        label = annotations.get(nid) or annotations.get(nid.partition("@")[0])
        if label is None and d.get("kind") == "error":
            label = error_label(str(d.get("site")), token)
        if label is None:
            label = auto_label(cards.get(nid))
        if label is not None:
            out[nid] = label
    return out


def neuronpedia_id(release: str, sae_id: str) -> str | None:
    """Neuronpedia's ``model/sae`` id for a sae-lens release and SAE id, if it hosts it."""
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:  # pragma: no cover - sae-lens is a dependency
        return None
    entry = get_pretrained_saes_directory().get(release)
    ids: Any = getattr(entry, "neuronpedia_id", None) or {}
    return ids.get(sae_id)


def neuronpedia_url(release: str, sae_id: str, feature: int) -> str | None:
    """The Neuronpedia page of one feature of a hub SAE (Gemma Scope...), or None."""
    np_id = neuronpedia_id(release, sae_id)
    return f"https://www.neuronpedia.org/{np_id}/{int(feature)}" if np_id else None


def source_neuronpedia_url(source: str, feature: int) -> str | None:
    """The same from a dictionary's ``source`` (``saelens:RELEASE/SAE_ID``); None for local ones."""
    if not source.startswith("saelens:"):
        return None
    release, _, sae_id = source[len("saelens:"):].partition("/")
    return neuronpedia_url(release, sae_id, feature)
