"""Output directories that are either complete or absent: everything is written into a hidden
temporary sibling (`.NAME.partial-*`), which is renamed to NAME only at the very end."""

from __future__ import annotations

import shutil
from pathlib import Path

from minigpt4.checkpoints import atomic_write
from minigpt4.errors import UserError

GB = 1 << 30


def check_target(target: Path, need_bytes: int, force: bool, flag: str = "--out") -> None:
    """Fail before writing: a non-empty target without --force, or too little disk space."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise UserError(f"{flag} {target} exists and is not empty: choose a new directory or pass --force")
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < need_bytes * 1.02 + 64 * 1024 * 1024:
        raise UserError(f"{flag} {target}: needs {need_bytes / GB:.1f} GB free on its disk, only {free / GB:.1f} GB are")


def staged_dir(target: Path):
    """A temporary folder beside `target` that replaces it on success, with the usual modes
    (checkpoints.atomic_write: the project's one atomic writer)."""
    return atomic_write(target, folder=True)
