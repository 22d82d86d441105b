"""Checks that run before any expensive work: each a one-line UserError saying what to do."""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


# What marks a folder as holding an earlier run (a rerun into it must say what to do with it).
RUN_OUTPUTS = ("graph.json", "summary.json", "evaluation.json", "curves.json", "agreement.json")
CHECKPOINT_DIR = ".checkpoint"


class RunFolder:
    """The ``--out`` of one run, checked before any work (:func:`prepare_run_folder`).

    ``path``: where the result ends up; ``work``: where the run writes (``path`` itself, or
    with ``--overwrite`` a sibling temporary folder swapped into place by :meth:`writing`)."""

    def __init__(self, path: Path, swap: bool):
        self.path = path
        self.swap = swap
        from .distributed import run_id

        # under torchrun every rank writes (checkpoints) into the same folder: named by the launch
        self.shared = run_id()
        self.work = path.parent / f".{path.name}.new-{self.shared or os.getpid()}" if swap else path

    def open(self) -> Path:
        """Create ``work`` (once every input is checked) and return it."""
        if self.swap and self.work.exists() and not self.shared:  # a dead process's folder under a reused pid
            shutil.rmtree(self.work)
        try:
            self.work.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create output folder {self.work}: {exc.strerror}") from None
        return self.work

    def commit(self) -> Path:
        """The run is complete: with ``--overwrite`` put ``work`` in place of ``path`` (one atomic
        exchange where the OS has one, else two renames). A run that never commits leaves the
        old folder as it was; its temporary folder is removed by the next run into ``path``."""
        from . import distributed

        distributed.barrier()  # under torchrun: every rank is done with ``work`` before rank 0 moves it
        if self.swap and distributed.is_writer():
            _swap_into_place(self.work, self.path)
        return self.path

    @contextmanager
    def writing(self) -> Iterator[Path]:
        """``open``, yield ``work``, ``commit`` on success; on failure remove a temporary ``work``."""
        work = self.open()
        try:
            yield work
        except BaseException:
            if self.swap:
                shutil.rmtree(work, ignore_errors=True)
            raise
        self.commit()


def prepare_run_folder(path: str | Path, resume: bool = False, overwrite: bool = False,
                       need_bytes: int = 50 * 2**20) -> RunFolder:
    """Check ``--out`` (:func:`check_output_folder`) and what it holds, creating nothing.

    A folder holding an earlier run (any of :data:`RUN_OUTPUTS` or a checkpoint) is refused
    unless ``resume`` (continue from its checkpoint, which must be there) or ``overwrite``
    (the new run is written beside it and swapped in at the end, so a kill leaves either the
    old folder or the new one)."""
    p = check_output_folder(path, need_bytes=need_bytes, create=False)
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    _recover_interrupted_swap(p)
    has_ckpt = (p / CHECKPOINT_DIR).is_dir() and any((p / CHECKPOINT_DIR).iterdir())
    previous = [n for n in RUN_OUTPUTS if (p / n).exists()]
    if resume:
        if not has_ckpt and previous:
            raise UserError(f"--resume: {p} holds no checkpoint (its run finished: {', '.join(previous)}); "
                            "add --overwrite instead of --resume to start over, or choose another --out")
        if not has_ckpt:
            print(f"featcircuits: warning: --resume: no checkpoint in {p}; starting from the beginning",
                  file=sys.stderr)
        return RunFolder(p, swap=False)
    if overwrite:
        return RunFolder(p, swap=p.exists() and (has_ckpt or bool(previous)))
    if has_ckpt:
        raise UserError(f"--out {p}: a killed run's checkpoint is here: rerun with --resume "
                        "(or --overwrite to start over)")
    if previous:
        raise UserError(f"--out {p} holds a previous run ({', '.join(previous)}): add --overwrite to replace it, "
                        "or choose another --out")
    return RunFolder(p, swap=False)


def check_output_file(path: str | Path, overwrite: bool = False) -> Path:
    """A single output file (``evaluate``'s JSON): refused when it exists, unless ``overwrite``
    (the write itself is atomic, see :func:`featcircuits.io.atomic_write`)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p} is a folder: give a file name for the output")
    if p.exists() and not overwrite:
        raise UserError(f"{p} exists (a previous evaluation): add --overwrite to replace it, or give another --out")
    check_output_folder(p.parent, need_bytes=2**20, create=False)
    return p


def _old_name(path: Path) -> Path:
    return path.parent / f".{path.name}.old"


def _swap_into_place(new: Path, path: Path) -> None:
    """Put folder ``new`` at ``path`` and drop what was there. Linux's renameat2(RENAME_EXCHANGE)
    swaps the two names in one step; elsewhere ``path`` is renamed aside first, and
    :func:`_recover_interrupted_swap` undoes a kill between the two renames."""
    from .checkpoint import fault_point

    old = _old_name(path)
    if old.exists():
        shutil.rmtree(old)
    if path.exists() and _exchange(new, path):
        fault_point("overwrite-swap", 1)
        shutil.rmtree(new)  # ``new`` now names the old run
        return
    if path.exists():
        os.replace(path, old)
        fault_point("overwrite-swap", 1)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2 RENAME_EXCHANGE); False where unavailable.
    The standard library has no wrapper for it, hence ctypes."""
    if not sys.platform.startswith("linux") or os.environ.get("FEATCIRCUITS_NO_EXCHANGE"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _recover_interrupted_swap(path: Path) -> None:
    """After a kill between the two renames of a non-atomic swap, ``path`` is missing and the old
    run sits at ``.<name>.old``: put it back. Leftover ``.<name>.new-*`` folders of killed runs go."""
    old = _old_name(path)
    if old.is_dir() and not path.exists():
        os.replace(old, path)
        print(f"featcircuits: warning: restored {path} from an interrupted --overwrite", file=sys.stderr)
    for stale in path.parent.glob(f".{path.name}.new-*") if path.parent.is_dir() else ():
        shutil.rmtree(stale, ignore_errors=True)
