"""``circuit.html`` (the offline viewer, :mod:`featcircuits.viewer`) and ``cards.json`` of a run folder."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..graph import Circuit
from ..io import write_json
from .common import CARDS
from .nodelink import to_node_link


def write_cards(cards: dict[str, dict], path: str | Path) -> Path:
    """The cards of a circuit's nodes (node id -> card) as JSON."""
    return write_json(path, cards)


def read_cards(folder: str | Path) -> dict[str, dict]:
    """``cards.json`` of a run folder; {} when it has none (a run made with ``--cards off``)."""
    path = Path(folder) / CARDS
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must map node ids to cards")
    return data


def write_circuit_html(circuit: Circuit, path: str | Path, cards: dict[str, dict] | None = None) -> Path:
    """The viewer page for ``circuit``; labels and node facts are its node attributes,
    the prompt tokens its provenance's."""
    from ..viewer import write_html

    return write_html(path, to_node_link(circuit), cards or {})
