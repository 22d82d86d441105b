"""Writing a circuit to disk in formats other tools read, and reading it back.

One run folder holds (each written atomically, see :mod:`featcircuits.io`):

- ``graph.graphml``: nodes and edges with every attribute, typed (``int`` for layer,
  feature, position; ``double`` for effect and weight; ``string`` otherwise); the
  provenance as graph attributes ``provenance.<key>`` (nested keys joined with dots,
  lists and ``null`` as JSON text). GraphML has no null: an attribute whose value is
  ``None`` is left out of that node, and reading treats "absent" as "None".
- ``graph.dot``: Graphviz DOT, drawn bottom to top (embed first, metric last), with the
  same attributes on every node and edge (names Graphviz reserves, ``label``, ``layer``,
  ``weight``, carry a ``circuit_`` prefix); rendered to ``graph.svg`` / ``graph.png`` when
  the Graphviz ``dot`` binary is installed (the summary says so when it is not).
- ``graph.json``: networkx node-link JSON (``nodes``, ``links``) with a ``metadata``
  block holding the provenance. This is what :func:`load_circuit` reads.
- ``graph.circuit-tracer.json``: the same circuit in the attribution-graph schema of
  circuit-tracer's front end (``metadata``, ``qParams``, ``nodes``, ``links``), and a folder
  ``circuit-tracer/`` its local server serves (``<slug>.json``, ``graph-metadata.json``, the
  feature cards as its feature files in ``<slug>-features/``).
- ``node_effects.safetensors``: the dense aggregated node effects, ``features/<site>`` and
  ``errors/<site>``, provenance as string metadata.
- ``circuit.html``: the offline viewer (:mod:`featcircuits.viewer`), and ``cards.json``
  (the feature cards of the circuit's nodes) when cards were given.
- ``summary.json``: the provenance plus counts (``n_nodes``, ``n_edges``, per kind and per
  site), ``method``, ``seconds`` (``nodes``, ``edges``, ``total``), the files written and
  any notes, merged with the caller's ``extra``.
- ``circuit.png`` / ``circuit.svg``: a matplotlib picture (:mod:`featcircuits.draw`), when
  asked for (formats ``png``/``svg``; not in :data:`DEFAULT_FORMATS`).
"""


from __future__ import annotations

from .common import (CARDS, CIRCUIT_TRACER, CIRCUIT_TRACER_INDEX, DEFAULT_FORMATS, DOT, EFFECTS, FORMATS, GRAPHML,
                     HTML, JSON, JSON_FORMAT_VERSION, PICTURE, SUMMARY)  # noqa: F401
from .graphml import read_graphml, to_graphml_graph, write_graphml  # noqa: F401
from .dot import (DOT_RESERVED, GRAPHVIZ_MISSING, graphviz_available, render_dot, render_dot_many, to_dot,
                  write_dot)  # noqa: F401
from .nodelink import from_node_link, to_node_link, write_json_graph  # noqa: F401
from .circuit_tracer import SERVE_DIR, feature_file, run_slug, to_circuit_tracer, write_circuit_tracer  # noqa: F401
from .effects import read_effects, write_effects  # noqa: F401
from .html import read_cards, write_cards, write_circuit_html  # noqa: F401
from .folder import load_circuit, save_circuit, summary_dict  # noqa: F401
from .diff import circuit_diff, circuits_equal  # noqa: F401
