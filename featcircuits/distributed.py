"""Pairs sharded across processes with torch.distributed (``torchrun --nproc-per-node N``).

Under torchrun (``WORLD_SIZE`` > 1 in the environment) the process group is set up on first
use: ``nccl`` when the model is on a CUDA device, ``gloo`` otherwise. The batch is cut into
the same chunks as a single-process run and each rank takes one contiguous block of them
(``shard``), so every chunk's numbers are the single-process numbers and only the order of
the final sum differs; node-effect, edge and metric sums are then all-reduced, every rank
continues with the same totals, and rank 0 alone writes files (``is_writer``).
Without torchrun every function here is the identity.
"""

from __future__ import annotations

import os
from typing import Sequence, TypeVar

import torch

from .errors import UserError

T = TypeVar("T")


def requested() -> bool:
    """True when launched by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> None:
    """Join the process group torchrun describes (once; nothing to do in a single process)."""
    import torch.distributed as dist

    if not requested() or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)


def local_device() -> str | None:
    """``cuda:LOCAL_RANK`` for ``--device auto`` under torchrun on a CUDA machine, else None."""
    if requested() and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return None


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_writer() -> bool:
    """Only rank 0 writes outputs."""
    return world()[0] == 0


def shard(chunks: Sequence[T]) -> list[tuple[int, T]]:
    """This rank's contiguous block of ``chunks``, with their indices in the whole list.

    Deterministic: rank r of W takes chunks [r*n/W, (r+1)*n/W). Every rank needs one chunk at
    least (each must contribute tensors of every shape to the all-reduce)."""
    rank, size = world()
    n = len(chunks)
    if size > n:
        raise UserError(f"{size} processes but only {n} chunks of pairs: use fewer processes, "
                        "more pairs or a smaller --batch-size")
    start, stop = rank * n // size, (rank + 1) * n // size
    return [(i, chunks[i]) for i in range(start, stop)]


def fitting_batch_size(n: int, batch_size: int) -> int:
    """``batch_size``, lowered under torchrun so that ``n`` examples make a chunk for every rank
    (for small subsets such as one case's pairs; only the order of the sums changes)."""
    size = world()[1]
    return batch_size if size == 1 else max(1, min(batch_size, -(-n // size)))


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over all ranks, in place (same order of tensors on every rank)."""
    import torch.distributed as dist

    if world()[1] == 1:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_reduce_floats(*values: float, device: torch.device | str = "cpu") -> list[float]:
    """Python floats summed over all ranks (float64 on the wire)."""
    if world()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    all_reduce_sum([t])
    return [float(v) for v in t.cpu()]


def agree_min(value: int, device: torch.device | str = "cpu") -> int:
    """The smallest of every rank's ``value`` (so e.g. ``--batch-size auto`` cuts the same chunks everywhere)."""
    import torch.distributed as dist

    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def barrier() -> None:
    """Wait for every rank (e.g. before rank 0 moves the run folder the others wrote into)."""
    import torch.distributed as dist

    if world()[1] > 1:
        dist.barrier()


def run_id() -> str | None:
    """The id torchrun gives this launch (the same on every rank), None outside torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID") if requested() else None


def checkpoint_suffix() -> str:
    """``.rank1-of-2`` under torchrun: one checkpoint file per rank."""
    rank, size = world()
    return "" if size == 1 else f".rank{rank}-of-{size}"
