"""The activations node facts are made of, summed during the attribution's own forwards.

Node effects already run the clean and the patch prompts through the spliced model (AtP
and RelP: one patch forward and one clean forward with gradients per chunk; IG: a clean
cache pass). Summing each site's features over the examples there, weighted by the
attention mask, and the softmax probability of both answers at the last clean position,
costs a few element-wise passes over values already in memory, where computing them
afterwards (``featcircuits.readable.node_facts``) needed two more forwards per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SIDES = ("clean", "patch")


def answer_probs(logits: torch.Tensor, clean_answer: torch.Tensor, patch_answer: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the clean and the patch answer, [b, 2] float32, from last-position logits."""
    probs = logits.detach().float().softmax(-1)
    rows = torch.arange(len(probs), device=probs.device)
    return torch.stack([probs[rows, clean_answer.to(probs.device)], probs[rows, patch_answer.to(probs.device)]], 1)


@dataclass
class ActivationSums:
    """Per side and site, ``sum_b f[b, t, :] * mask[b, t]`` ([T, d_sae], float32 on the model's
    device: together twice the node-effect sums' memory), and over the clean prompts the
    summed probabilities of the clean and the patch answer."""

    sums: dict[str, dict[str, torch.Tensor]] = field(default_factory=lambda: {s: {} for s in SIDES})
    p_clean_answer: float = 0.0
    p_patch_answer: float = 0.0
    n: int = 0  # examples added

    def add(self, side: str, site: str, f: torch.Tensor, mask: torch.Tensor) -> None:
        """Add one chunk's features ``f`` [b, T, d_sae] at ``site`` (``mask`` [b, T])."""
        part = (f.detach().float() * mask.to(f.device, torch.float32)[..., None]).sum(0)
        have = self.sums[side].get(site)
        self.sums[side][site] = part if have is None else have + part

    def add_answers(self, probs: torch.Tensor) -> None:
        """Add one chunk's :func:`answer_probs` [b, 2] (and count its examples)."""
        self.p_clean_answer += float(probs[:, 0].sum())
        self.p_patch_answer += float(probs[:, 1].sum())
        self.n += len(probs)

    def state(self) -> dict:
        """Plain tensors and floats (for checkpoints)."""
        return {"sums": self.sums, "p": [self.p_clean_answer, self.p_patch_answer], "n": self.n}

    @classmethod
    def from_state(cls, state: dict | None) -> "ActivationSums | None":
        if not state:
            return None
        return cls({s: dict(state["sums"][s]) for s in SIDES}, float(state["p"][0]), float(state["p"][1]),
                   int(state["n"]))

    def tensors(self) -> list[torch.Tensor]:
        """Every sum tensor in a fixed order (summed over ranks under torchrun)."""
        return [self.sums[side][k] for side in SIDES for k in sorted(self.sums[side])]
