"""Writing: every file and folder the project writes is complete or absent, and readable as any
file the user writes (atomic_write, the one atomic writer); tensors go into safetensors shards
that memory holds one at a time."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from minigpt4.errors import UserError

GB = 1 << 30
# safetensors header metadata of the tensors we write: "pt" as transformers writes it, and ours.
SAFETENSORS_METADATA = {"format": "pt", "minigpt4": "1"}


@contextlib.contextmanager
def atomic_write(target: str | os.PathLike, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target` (`.NAME.partial-*`: an empty folder with folder=True,
    else a file name to write); when the block succeeds it gets the umask's usual modes and
    replaces `target`, when it fails it is removed. So a crash never leaves half a checkpoint, and
    the files are not owner-only: mkstemp/mkdtemp (and safetensors) create 0600 files in 0700
    folders, which other users of a shared machine cannot read."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.partial-"
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for path in [tmp, *tmp.rglob("*")]:
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        if folder and target.exists():  # a folder cannot be renamed over a non-empty one
            old = tmp.with_name(tmp.name.replace(".partial-", ".old-"))
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def check_target(target: Path, need_bytes: int, force: bool, flag: str = "--out") -> None:
    """Fail before writing: a non-empty target without --force, or too little disk space."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise UserError(f"{flag} {target} exists and is not empty: choose a new directory or pass --force")
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < need_bytes * 1.02 + 64 * 1024 * 1024:
        raise UserError(f"{flag} {target}: needs {need_bytes / GB:.1f} GB free on its disk, only {free / GB:.1f} GB are")


def clone_aliases(items):
    """(name, tensor) pairs with every tensor whose storage an earlier one shares (tied weights)
    cloned: safetensors and save_pretrained refuse or drop aliases."""
    seen = set()
    for name, tensor in items:
        ptr = (tensor.device, tensor.untyped_storage().data_ptr())
        yield name, (tensor.clone() if ptr in seen else tensor)
        seen.add(ptr)


def save_shards(
    items, directory: str | os.PathLike, max_shard_bytes: int, prefix: str = "model", metadata: dict | None = None
) -> dict[str, str]:
    """Write (name, tensor) pairs, as they come, into safetensors shards of at most max_shard_bytes
    (a bigger tensor gets a shard of its own): `{prefix}.safetensors`, or `{prefix}-00001-of-0000N.safetensors`
    plus `{prefix}.safetensors.index.json` (the Hugging Face layout). Memory holds one shard at a time.
    Returns the weight map (name -> file name)."""
    directory = Path(directory)
    written: list[tuple[Path, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        part = directory / f".{prefix}-part{len(written)}.tmp"
        save_file(pending, str(part), metadata=metadata)
        written.append((part, list(pending)))
        pending.clear()

    for name, tensor in clone_aliases(items):
        nbytes = tensor.numel() * tensor.element_size()
        if pending and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        pending[name] = tensor.detach().contiguous().cpu()
        size += nbytes
        total += nbytes
    if pending or not written:
        flush()
    weight_map = {}
    for i, (part, names) in enumerate(written):
        final = f"{prefix}.safetensors" if len(written) == 1 else f"{prefix}-{i + 1:05d}-of-{len(written):05d}.safetensors"
        part.rename(directory / final)
        weight_map.update({n: final for n in names})
    if len(written) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return weight_map


def save_tensors(state: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """One safetensors file in our names (checkpoint.proj= reads it), written atomically."""
    path = Path(path)
    with atomic_write(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=SAFETENSORS_METADATA)
    return path


def save_official_projection(state: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """{"model": {"llama_proj.weight", "llama_proj.bias"}}: what the official code loads."""
    path = Path(path)
    proj = {k: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith("llama_proj.")}
    with atomic_write(path) as tmp:
        torch.save({"model": proj}, tmp)
    return path
