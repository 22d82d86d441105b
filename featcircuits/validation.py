"""Checks that run before any expensive work: each a one-line UserError saying what to do."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import UserError


def check_output_folder(path: str | Path, need_bytes: int = 50 * 2**20) -> Path:
    """Create ``path`` if needed and make sure it is a writable folder with some free disk."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {p} exists and is not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {p}: {exc.strerror}") from None
    if not os.access(p, os.W_OK):
        raise UserError(f"output folder {p} is not writable")
    free = shutil.disk_usage(p).free
    if free < need_bytes:
        raise UserError(f"only {free // 2**20} MiB free under {p}; need about {need_bytes // 2**20} MiB")
    return p
