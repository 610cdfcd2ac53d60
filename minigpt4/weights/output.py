"""Output directories that are either complete or absent: everything is written into a hidden
temporary sibling (`.NAME.partial-*`), which is renamed to NAME only at the very end."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

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


@contextlib.contextmanager
def staged_dir(target: Path):
    """Yield a temporary directory beside `target`; on success it replaces `target` (an old one
    is removed only then), on any error it is deleted."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, target: Path) -> None:
    """Usual permissions (mkdtemp and safetensors create owner-only ones), then rename into place."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [tmp, *tmp.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)
