"""Checks that run before any expensive work: each a one-line UserError saying what to do."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import UserError


def check_output_folder(path: str | Path, need_bytes: int = 50 * 2**20, create: bool = True) -> Path:
    """Check that ``path`` is (or can become) a writable folder with enough free disk; create
    it only when ``create`` (so a run refused later leaves nothing behind)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {p} exists and is not a folder")
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"cannot write under {existing}: choose another --out")
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise UserError(f"only {free // 2**20} MiB free under {existing}; need about {need_bytes // 2**20} MiB")
    if create:
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create output folder {p}: {exc.strerror}") from None
    return p
