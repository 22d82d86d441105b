"""featcircuits: sparse feature circuit discovery with RelP and Integrated Gradients.

The data flow, one module per stage::

    tasks       counterfactual pairs and the metric      make_pairs, ioi_pairs, read_pairs, tokenize_pairs
    models      a model traced with nnsight + adapter     load_model
    dictionaries  SAEs at every site                       load_dictionary_set, load_dictionary
    nodes       features + error of a site, node ids, one   Act, NodeSpace, node_id
                flat space of all nodes with selections
    tracing     dictionaries spliced in (features + error) SplicedModel
    attribution node effects: exact, AtP, RelP, IG         node_effects
    edges       direct-path edge effects                   edge_effects
    graph       thresholds -> networkx circuit             Thresholds, Circuit
    discover    the stages above in one call               discover_circuit
    evaluation  faithfulness and completeness              evaluate_circuit, run_curves, Evaluator
    export      GraphML / DOT / JSON / circuit-tracer      save_circuit, load_circuit

A notebook session::

    import featcircuits as fc
    model = fc.load_model("gemma-3-270m-offline")
    sm = fc.SplicedModel(model, fc.load_dictionary_set("starter", model.adapter))
    batch, dropped = fc.tokenize_pairs(fc.make_pairs("sva-simple", 64), model.tokenizer)
    circuit = fc.discover_circuit(sm, batch, "relp", thresholds=fc.Thresholds(top_k=100))
    fc.save_circuit(circuit, "runs/sva-simple", model="gemma-3-270m-offline", task="sva-simple", saes="starter")

The metric and its sign are defined once, in ``featcircuits.metric``; the LRP rules in
``featcircuits.lrp`` (``with fc.lrp_rules(("ln", "identity", "half")): ...``). RelP's rule
set is a parameter whose default is the two-point rules (``fc.TWO_POINT_RULES``: every
operation linearised between the clean and the counterfactual run), which track exact
patching more closely than the RelP authors' rules on Gemma 3 and on a held-out
Llama-family model; ``fc.node_effects(sm, batch, "relp", rules="paper")`` gives the
authors' set (``fc.PAPER_RULES``; ``results/README.md``, "LRP rules").
"""

__version__ = "0.1.0"

from .errors import UserError
from .metric import metric, preference
from .tasks import Pair, ioi_pairs, make_pairs, read_pairs, tokenize_pairs
from .models import LoadedModel, load_model
from .dictionaries import DictionarySet, load_dictionary, load_dictionary_set
from .nodes import METRIC, Act, NodeSpace, node_id, parse_node_id
from .tracing import SplicedModel
from .lrp import DEFAULT_RULES, PAPER_RULES, TWO_POINT_RULES, lrp_rules
from .attribution import NodeEffects, exact_feature_effects, node_effects
from .edges import EdgeEffects, edge_effects
from .graph import Circuit, Thresholds
from .discover import discover_circuit
from .evaluation import Evaluator, evaluate_circuit, faithfulness_curves, run_curves


def save_circuit(circuit, out_dir, **kwargs):
    """Write a circuit folder (GraphML, DOT, JSON, circuit-tracer JSON, node effects,
    summary.json). See ``featcircuits.export.save_circuit``."""
    from .export import save_circuit as _save

    return _save(circuit, out_dir, **kwargs)


def load_circuit(folder):
    """Read a circuit folder written by ``save_circuit`` back into a ``Circuit``."""
    from .export import load_circuit as _load

    return _load(folder)


__all__ = [
    "UserError", "METRIC", "Act", "NodeSpace", "node_id", "parse_node_id", "metric", "preference", "Pair", "make_pairs", "ioi_pairs", "read_pairs", "tokenize_pairs",
    "LoadedModel", "load_model", "DictionarySet", "load_dictionary", "load_dictionary_set", "SplicedModel",
    "DEFAULT_RULES", "PAPER_RULES", "TWO_POINT_RULES", "lrp_rules", "NodeEffects", "node_effects", "exact_feature_effects",
    "EdgeEffects", "edge_effects", "Circuit", "Thresholds", "discover_circuit", "Evaluator", "evaluate_circuit",
    "faithfulness_curves", "run_curves", "save_circuit", "load_circuit",
]
