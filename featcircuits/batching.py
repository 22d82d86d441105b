"""``--batch-size auto``: the largest batch that fits in free memory.

The rule: ``batch = floor(fraction * free / per_example)``, clamped to ``[1, cap]`` (``cap``
defaults to the number of pairs). ``free`` is ``torch.cuda.mem_get_info`` on a CUDA device and
psutil's available memory on the CPU (and MPS, whose memory is the system's). ``per_example``
is measured, not guessed: one spliced forward + backward of the method on a probe of a few
pairs, counting every tensor autograd saves for the backward (deduplicated by storage) plus
the gradients, clean and counterfactual values the node stage returns, divided by the probe
size. IG stacks ``steps`` interpolation rows per example, which the probe includes. The
default ``fraction`` of 0.5 leaves room for what the count does not see: the batched
vector-Jacobian products of the edge stage, allocator slack and the model's transient buffers.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .errors import UserError
from .tasks import Batch
from .tracing import SplicedModel

FRACTION = 0.5


def parse_batch_size(text: str) -> "int | str":
    """``16`` -> 16; ``auto`` or ``auto:CAP`` (CAP a positive int) kept as text for ``resolve``."""
    text = str(text).strip().lower()
    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit() and int(text[5:]) > 0):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise UserError(f"batch size must be a positive integer, 'auto' or 'auto:CAP', got {text!r}")


def free_memory(device: torch.device) -> int:
    """Bytes free for tensors on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def example_cost(sm: SplicedModel, batch: Batch, method: str = "relp", *, steps: int = 10,
                 rules: Iterable[str] | str | None = None, probe: int = 2) -> int:
    """Bytes one example costs in one spliced forward + backward of ``method`` (measured on
    ``probe`` examples: saved-for-backward tensors plus the returned per-site values)."""
    from .attribution import site_gradients

    chunk = batch.slice(0, min(probe, len(batch)))
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            seen[key] = key[1]
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. functorch wrappers)
            seen[(id(t), 0)] = t.numel() * t.element_size()
        return t

    counters = sm.counters()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sg = site_gradients(sm, chunk, method, sm.sites, steps=steps, rules=rules)
    sm.n_forward, sm.n_backward, sm.rows_forward, sm.rows_backward = counters  # a probe, not the run's work
    kept = sum(t.numel() * t.element_size() for part in (sg.grads, sg.clean, sg.patch)
               for v in part.values() for t in v)
    return max(1, (sum(seen.values()) + kept) // len(chunk))


def resolve_batch_size(sm: SplicedModel, batch: Batch, batch_size: "int | str", method: str = "relp", *,
                       steps: int = 10, rules: Iterable[str] | str | None = None,
                       fraction: float = FRACTION) -> tuple[int, dict]:
    """``batch_size`` as an int, and what decided it (recorded in summary.json).

    An int passes through; ``auto`` / ``auto:CAP`` applies the module's rule."""
    if isinstance(batch_size, int):
        if batch_size < 1:
            raise UserError(f"batch size must be positive, got {batch_size}")
        return batch_size, {"batch_size": batch_size, "rule": "given"}
    batch_size = parse_batch_size(batch_size)
    if isinstance(batch_size, int):
        return batch_size, {"batch_size": batch_size, "rule": "given"}
    cap = int(batch_size[5:]) if ":" in batch_size else len(batch)
    device = sm.model.device
    free = free_memory(device)
    per_example = example_cost(sm, batch, method, steps=steps, rules=rules)
    size = max(1, min(cap, int(fraction * free // per_example)))
    from .distributed import agree_min

    size = agree_min(size, device)  # under torchrun every rank must cut the same chunks
    return size, {"batch_size": size, "rule": "auto", "cap": cap, "free_bytes": free,
                  "bytes_per_example": per_example, "fraction": fraction, "device": str(device)}
