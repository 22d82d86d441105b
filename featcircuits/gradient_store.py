"""The node stage's gradients, handed to the edge stage: in memory, then on disk.

RelP and AtP edges need, for every chunk of pairs, the same metric gradients and site values
the node stage already computed (``attribution.SiteGradients``). Keeping every chunk in
memory makes memory grow with the pairs; recomputing the chunks past a memory budget costs
one more node-stage pass per pair (measured: 1.59x the time per pair at n = 2,048). So a
``GradientStore`` keeps chunks in memory up to ``keep_bytes`` and writes the rest to a private
folder on disk (``torch.save``: the values hold nested dataclasses and the two-point rules'
tape, which safetensors cannot hold), which the edge stage reads back one chunk at a time.
Past ``disk_bytes`` a chunk is dropped and the edge stage recomputes it (the result is the
same, only slower). ``close`` deletes the folder; so does garbage collection and exit.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.serialization import config as serialization_config

if TYPE_CHECKING:
    from .attribution import SiteGradients


class GradientStore:
    """Per-chunk ``SiteGradients``: the first ``keep_bytes`` in memory, then on disk.

    ``spill_dir``: the folder under which a private temporary folder is made (default: the
    system's temporary folder); ``disk_bytes``: what may be written there (default: half the
    free disk when the first chunk spills). ``spill=False`` recomputes instead of spilling.
    """

    def __init__(self, keep_bytes: int | None = None, *, spill: bool = True,
                 spill_dir: str | Path | None = None, disk_bytes: int | None = None) -> None:
        self.keep_bytes = keep_bytes
        self.spill = spill
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        self.disk_bytes = disk_bytes
        self._entries: list[Any] = []
        self._kept = 0
        self._written = 0
        self._folder: Path | None = None
        self._cleanup: weakref.finalize | None = None

    def reset(self, n_chunks: int) -> None:
        """Start over with ``n_chunks`` empty slots (the node stage calls this)."""
        self.close()
        self._entries = [None] * n_chunks
        self._kept = self._written = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, i: int, sg: "SiteGradients") -> None:
        """Hold chunk ``i``'s gradients: in memory while the budget allows, else on disk."""
        size = sg.nbytes()
        if self.keep_bytes is None or self._kept + size <= self.keep_bytes:
            self._entries[i] = sg
            self._kept += size
            return
        if not self.spill:
            return
        folder = self._spill_folder()
        if self._written + size > self.disk_bytes:
            return  # past the disk budget: the edge stage recomputes this chunk
        path = folder / f"chunk-{i:06d}.pt"
        # no CRC-32 over the bytes: a fifth to two fifths of a spill's write time (timed by hand), and
        # these private files live only as long as the call that writes them (loads back onto the
        # device it was on)
        with serialization_config.patch("save.compute_crc32", False):
            torch.save(sg, path)
        self._entries[i] = path
        self._written += size

    def get(self, i: int) -> "SiteGradients | None":
        """Chunk ``i``'s gradients (read back from disk if spilled), or None: recompute it."""
        if i >= len(self._entries):
            return None
        entry = self._entries[i]
        if isinstance(entry, Path):
            return torch.load(entry, weights_only=False)
        return entry

    def counts(self) -> dict[str, int]:
        """How many chunks are held in memory, on disk, and neither (to be recomputed)."""
        memory = sum(e is not None and not isinstance(e, Path) for e in self._entries)
        disk = sum(isinstance(e, Path) for e in self._entries)
        return {"memory": memory, "disk": disk, "recompute": len(self._entries) - memory - disk}

    @property
    def folder(self) -> Path | None:
        """The private spill folder, once a chunk has spilled."""
        return self._folder

    def close(self) -> None:
        """Drop every chunk and delete the spill folder."""
        self._entries = [None] * len(self._entries)
        if self._cleanup is not None:
            self._cleanup()
        self._folder = self._cleanup = None

    def _spill_folder(self) -> Path:
        if self._folder is None:
            base = self.spill_dir
            if base is not None:
                base.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix="featcircuits-gradients-", dir=base))
            if self.disk_bytes is None:  # fixed at the first spill: half of what was free then
                self.disk_bytes = shutil.disk_usage(self._folder).free // 2
            # removed with the store, or at exit, whichever comes first
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._folder), True)
        return self._folder

