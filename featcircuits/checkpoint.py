"""Per-batch checkpoints so a killed run continues where it stopped (``--resume``).

A checkpoint holds running sums (tensors) and how many chunks they cover, tagged with a
fingerprint of the run's settings: a resume with other settings is refused rather than
mixed in. Sums are added in the same chunk order either way, so a resumed run gives the
same numbers as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .io import atomic_write


def fingerprint(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fault_point(stage: str, done: int) -> None:
    """Fault injection for the reliability tests and script: with
    ``FEATCIRCUITS_FAULT_AFTER=<stage>:<done>`` the process dies (exit 137, like kill -9)
    right after that checkpoint is on disk (under torchrun: every rank, ``stage`` without its rank
    suffix); with ``<stage>:<done>:sigint`` it sends itself a Ctrl-C there instead (a test that
    signals from outside races a fast run)."""
    spec = os.environ.get("FEATCIRCUITS_FAULT_AFTER", "")
    sigint = spec.endswith(":sigint")
    if spec.removesuffix(":sigint") == f"{stage.split('.rank')[0]}:{done}":
        if sigint:
            import signal

            os.kill(os.getpid(), signal.SIGINT)
        else:
            os._exit(137)


# The last checkpoint this process saved: (folder, stage, chunks done), so an interrupted run
# can say how far it got and that ``--resume`` continues from there.
LAST_SAVED: tuple[Path, str, int] | None = None


class PassCounter:
    """Forward and backward passes of one stage, including those of its checkpointed part
    before a resume (stored in the checkpoint's state as ``passes``)."""

    def __init__(self, sm: Any, before: dict[str, int] | None = None):
        self.sm, self.f0, self.b0 = sm, sm.n_forward, sm.n_backward
        self.before = {"forward": 0, "backward": 0, **(before or {})}

    def counts(self) -> dict[str, int]:
        return {"forward": int(self.before["forward"]) + self.sm.n_forward - self.f0,
                "backward": int(self.before["backward"]) + self.sm.n_backward - self.b0}


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Checkpoint:
    """Checkpoints of one stage of one run, under ``folder/.checkpoint/<stage>.pt``."""

    def __init__(self, folder: str | Path, stage: str, config: dict[str, Any], resume: bool = True):
        self.path = Path(folder) / ".checkpoint" / f"{stage}.pt"
        self.stage = stage
        self.key = fingerprint(config)
        self.config = json.loads(json.dumps(config, sort_keys=True, default=str))  # plain, to name differences
        self.resume = resume
        if not resume and self.path.exists():
            self.path.unlink()

    def load(self) -> tuple[int, dict[str, Any]] | None:
        """(chunks done, saved state) or None when there is nothing to resume."""
        if not self.resume or not self.path.exists():
            return None
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated file from a kill mid-write cannot happen (atomic), but a tampered one can
            raise UserError(f"checkpoint {self.path} is unreadable ({exc}); delete it or run without --resume") from None
        if blob.get("key") != self.key:
            raise UserError(f"checkpoint {self.path} was made with other settings ({self._differences(blob)}); "
                            "rerun with the original arguments, or without --resume to start over")
        return int(blob["done"]), blob["state"]

    def _differences(self, blob: dict[str, Any]) -> str:
        """``n: 16 then, 32 now; method: ig then, relp now`` (what a checkpoint recorded vs now)."""
        old = blob.get("config")
        if not isinstance(old, dict):
            return "an older checkpoint that does not record them"
        keys = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
        return "; ".join(f"{k}: {_short(old.get(k))} then, {_short(self.config.get(k))} now" for k in keys) \
            or "same settings, other fingerprint"

    def save(self, done: int, state: dict[str, Any]) -> None:
        blob = {"key": self.key, "config": self.config, "done": done, "state": state}
        atomic_write(self.path, lambda p: torch.save(blob, p))
        global LAST_SAVED
        LAST_SAVED = (self.path.parent.parent, self.stage, done)
        fault_point(self.stage, done)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        try:
            self.path.parent.rmdir()
        except OSError:
            pass
