"""``--batch-size auto``: the largest batch that fits in free memory.

The rule: ``batch = floor(fraction * free / per_example)``, clamped to ``[1, cap]`` (``cap``
defaults to the number of pairs). ``free`` is ``torch.cuda.mem_get_info`` on a CUDA device and
psutil's available memory on the CPU (and MPS, whose memory is the system's). ``per_example``
is measured, not guessed: one spliced forward + backward of the method on a probe of a few
pairs, counting every tensor autograd saves for the backward (deduplicated by storage, the
weights left out) plus the gradients, clean and counterfactual values the node stage
returns, divided by the probe size; to that the edge stage's batched vector-Jacobian
products are added as computed from the widths (``edge_cost``). IG stacks ``steps``
interpolation rows per example, which the probe includes. The default ``fraction`` of 0.5
leaves room for what the count does not see: allocator slack and transient buffers.
Stages without a backward (evaluation's stacked ablation forwards, exact patching) cost
``forward_cost``: the same count for one forward, times the rows each example is stacked
into. A run's cost per example is that of its costliest stage (``resolve_batch_size``).
"""

from __future__ import annotations

from typing import Iterable, Sequence

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
                 rules: Iterable[str] | str | None = None, probe: int = 2, edges: bool = True) -> int:
    """Bytes one example costs in one spliced forward + backward of ``method``, measured on
    ``probe`` examples: the tensors autograd saves for the backward (weights excluded: they
    are not per example), plus the per-site gradients and values the node stage keeps, plus
    (``edges``) the edge stage's batched vector-Jacobian products (``edge_cost``).

    IG's backward runs one site at a time (its graph freed before the next), so its probe
    runs the first site only; its ``steps`` stacked rows are in that measurement."""
    from .attribution import site_gradients

    chunk = batch.slice(0, min(probe, len(batch)))
    probed = sm.sites[:1] if method == "ig" else sm.sites
    saved = _saved_bytes(sm, lambda: site_gradients(sm, chunk, method, probed, steps=steps, rules=rules))
    # kept per example and site: gradient, clean and counterfactual value of features and error
    element = torch.finfo(sm.model.dtype).bits // 8
    return max(1, saved // len(chunk) + _kept(sm, batch.seq_len, element)
               + (edge_cost(sm, batch.seq_len, element) if edges else 0))


def forward_cost(sm: SplicedModel, batch: Batch, rows: int = 1, probe: int = 2) -> int:
    """Bytes per example of a spliced forward without gradients that stacks ``rows`` copies of
    each example (the evaluator's ``stack`` circuits, exact patching's positions or nodes per
    pass). Measured on ``probe`` examples as the tensors the same forward saves with the site
    values as gradient leaves: every activation from the first site on, an upper bound of what
    a forward without gradients holds at once; plus the clean and counterfactual site values
    the stages keep."""
    chunk = batch.slice(0, min(probe, len(batch)))
    saved = _saved_bytes(sm, lambda: sm.run_with_leaves(chunk.inputs("clean")))
    element = torch.finfo(sm.model.dtype).bits // 8
    return max(1, rows * saved // len(chunk) + _kept(sm, batch.seq_len, element))


def _kept(sm: SplicedModel, seq_len: int, element: int) -> int:
    """Bytes per example of three values (e.g. gradient, clean, counterfactual) of every site."""
    return 3 * seq_len * element * sum(sm.dictionary(s).d_sae + sm.dictionary(s).d_in for s in sm.sites)


def _saved_bytes(sm: SplicedModel, run) -> int:
    """Bytes of the tensors autograd saves while ``run()`` runs (deduplicated by storage, the
    model's and dictionaries' weights left out); the pass counters are left as they were."""
    weights = {t.untyped_storage().data_ptr() for m in (sm.model.hf, *sm.dictionaries.dictionaries.values())
               for t in (*m.parameters(), *m.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. functorch wrappers)
            seen[id(t)] = t.numel() * t.element_size()
        return t

    counters = sm.counters()
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    sm.n_forward, sm.n_backward, sm.rows_forward, sm.rows_backward = counters  # a probe, not the run's work
    return sum(seen.values())


def edge_cost(sm: SplicedModel, seq_len: int, element: int, chunk_nodes: int = 64) -> int:
    """Bytes per example of the edge stage's batched vector-Jacobian products: ``chunk_nodes``
    gradients of every upstream leaf of the widest downstream site, twice (the K-batched
    intermediate gradients of the backward are about as large). Computed, not measured: the
    probe above does not run the edge stage."""
    widest = max((sum(sm.dictionary(u).d_sae + sm.dictionary(u).d_in for u in sm.adapter.upstream(s.name))
                  for s in sm.sites), default=0)
    return 2 * chunk_nodes * seq_len * element * widest


def resolve_batch_size(sm: SplicedModel, batch: Batch, batch_size: "int | str",
                       method: "str | Sequence[str]" = "relp", *, steps: int = 10,
                       rules: Iterable[str] | str | None = None, fraction: float = FRACTION,
                       edges: bool = True, forward_rows: int = 0) -> tuple[int, dict]:
    """``batch_size`` as an int, and what decided it (recorded in the outputs).

    An int passes through; ``auto`` / ``auto:CAP`` applies the module's rule to the costliest
    stage of the run: the forward + backward of each gradient method in ``method`` (one name
    or several; ``exact`` and ``random`` need no backward and are left out), with the edge
    stage when ``edges``, and, when ``forward_rows`` > 0, forwards without gradients stacking
    that many rows per example (``forward_cost``). Every command's ``--batch-size auto``
    comes here."""
    if isinstance(batch_size, int):
        if batch_size < 1:
            raise UserError(f"batch size must be positive, got {batch_size}")
        return batch_size, {"batch_size": batch_size, "rule": "given"}
    batch_size = parse_batch_size(batch_size)
    if isinstance(batch_size, int):
        return batch_size, {"batch_size": batch_size, "rule": "given"}
    from .attribution import GRADIENT_METHODS

    cap = int(batch_size[5:]) if ":" in batch_size else len(batch)
    device = sm.model.device
    free = free_memory(device)
    methods = [method] if isinstance(method, str) else list(method)
    costs = {m: example_cost(sm, batch, m, steps=steps, rules=rules, edges=edges)
             for m in dict.fromkeys(methods) if m in GRADIENT_METHODS}
    if forward_rows > 0 or not costs:
        costs[f"forward x{max(forward_rows, 1)}"] = forward_cost(sm, batch, max(forward_rows, 1))
    per_example = max(costs.values())
    size = max(1, min(cap, int(fraction * free // per_example)))
    from .distributed import agree_min

    size = agree_min(size, device)  # under torchrun every rank must cut the same chunks
    return size, {"batch_size": size, "rule": "auto", "cap": cap, "free_bytes": free,
                  "bytes_per_example": per_example, "bytes_per_example_by_stage": costs,
                  "fraction": fraction, "device": str(device)}
