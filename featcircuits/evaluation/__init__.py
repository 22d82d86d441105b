"""Evaluation: faithfulness and completeness of a circuit by ablating everything outside it.

Definitions (DESIGN.md, "Evaluation"). For a circuit ``C`` (``dict[site, Act]``, bool masks):

- ``F(C)``: mean *clean preference* ``logit[clean] - logit[patch]`` (``metric.preference``)
  over the evaluation examples when every node at the evaluated sites (those with
  ``layer >= start_layer``; ``embed`` is layer -1) that is **not** in ``C`` is ablated.
- ``F(M)``: nothing ablated (the spliced model, numerically the model itself).
- ``F(∅)``: every node at the evaluated sites ablated.
- ``faithfulness(C) = (F(C) - F(∅)) / (F(M) - F(∅))``; ``completeness(C)`` is the
  faithfulness of the complement ``M \\ C`` (near 0: nothing important left out).

Ablation happens inside one nnsight trace (``SplicedModel.run``): at each evaluated site
``x -> f = encode(x)``, ``err = x - decode(f)``, ``f' = where(mask, f, a_f)``,
``err' = err`` if the error node is in the circuit (or ``errors="keep"``) else ``a_err``,
and the model continues with ``decode(f') + err'``. Sites are visited in forward order, so
an ablation upstream changes what downstream sites encode (as in Sparse Feature Circuits).
A site (or a stacked circuit's row) whose mask is entirely True is left exactly as it is.

Ablation values ``a``: ``mean`` = mean over the *counterfactual* prompts of the evaluation
set, per position (weighted by the attention mask, so padding is not averaged in);
``zero``; ``resample`` = the value of a counterfactual prompt drawn uniformly (seeded,
with replacement) from the evaluation set, per example. The values come from an
unablated run of the counterfactual prompts.

Several circuits are evaluated in one forward by stacking them along the batch.
"""

from .curves import DEFINITIONS, faithfulness_curves, log_auc, nodes_to_reach, relp_vs_ig, size_grid
from .evaluator import ERROR_MODES, Evaluator
from .masks import (ABLATIONS, Masks, ablation_values, align_positions, candidate_effects, complement, empty_masks,
                    evaluated_sites, full_masks, mask_size)
from .pairs import EVAL_SEED_OFFSET, eval_pairs, pair_key
from .plots import plot_curves
from .runs import curves_summary, evaluate_circuit, run_curves

__all__ = ["ABLATIONS", "DEFINITIONS", "ERROR_MODES", "EVAL_SEED_OFFSET", "Evaluator", "Masks", "ablation_values",
           "align_positions", "candidate_effects", "complement", "empty_masks", "eval_pairs", "evaluated_sites",
           "faithfulness_curves", "full_masks", "log_auc", "mask_size", "nodes_to_reach", "pair_key", "plot_curves",
           "relp_vs_ig", "size_grid", "evaluate_circuit", "run_curves", "curves_summary"]
