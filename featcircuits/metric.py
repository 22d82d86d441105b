"""The one place that defines the metric and its sign.

Discovery (Sparse Feature Circuits convention): ``m = logit[patch_answer] -
logit[clean_answer]`` at the last token of the clean run. A node whose patching moves the
model toward the counterfactual answer gets a *positive* effect, so the nodes that carry
the behaviour score high.

Evaluation reports the clean preference ``logit[clean_answer] - logit[patch_answer] = -m``
so that the full model scores above the empty circuit.
"""

from __future__ import annotations

import torch


def metric(logits: torch.Tensor, clean_answer: torch.Tensor, patch_answer: torch.Tensor) -> torch.Tensor:
    """Discovery metric per example: logit[patch] - logit[clean]. ``logits`` is [b, vocab].

    Computed in float32 whatever the model's dtype (``featcircuits.devices.ACCUMULATE``), on
    the logits' device."""
    idx = torch.arange(logits.shape[0], device=logits.device)
    logits = logits.float()
    return logits[idx, patch_answer.to(logits.device)] - logits[idx, clean_answer.to(logits.device)]


def preference(logits: torch.Tensor, clean_answer: torch.Tensor, patch_answer: torch.Tensor) -> torch.Tensor:
    """Evaluation measure per example: logit[clean] - logit[patch] (= -metric)."""
    return -metric(logits, clean_answer, patch_answer)
