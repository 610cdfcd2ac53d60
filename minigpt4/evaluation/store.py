"""predictions.jsonl: one finished row per line, appended and fsynced as it finishes.

A kill -9 can at worst leave a torn last line (no newline): readers ignore it and the writer
cuts it off before appending, so a resumed run loses no finished row and duplicates none.
Several processes never share a file: rank r writes shards/predictions.rank{r}.jsonl and rank 0
merges them into predictions.jsonl at the end. Two runs never share a folder: the process that
starts one holds RUN_DIR/.lock (see run_lock).

A write that fails (full or read-only disk) is one line naming the file and the cause; what
was fsynced stays, no half line or temporary file is left behind, and resume continues from there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

from minigpt4.checkpoints import atomic_write
from minigpt4.errors import UserError

PREDICTIONS = "predictions.jsonl"
SHARDS = "shards"
LOCK = ".lock"


def rank_file(run_dir: Path, rank: int, world_size: int) -> Path:
    """Where a process appends its rows (one process: predictions.jsonl itself)."""
    if world_size == 1:
        return run_dir / PREDICTIONS
    return run_dir / SHARDS / f"predictions.rank{rank}.jsonl"


def _intact_lines(path: Path) -> tuple[list[dict], int]:
    """(records, byte length of the intact part). A torn last line is left out; a corrupt line
    elsewhere means the file was edited by hand and is an error."""
    data = path.read_bytes()
    records, good_end, start = [], 0, 0
    while start < len(data):
        end = data.find(b"\n", start)
        if end < 0:  # torn tail: the writer died mid-line
            break
        line = data[start:end].strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                number = data[:start].count(b"\n") + 1
                raise UserError(f"{path}:{number}: not a JSON line; remove or fix that line to resume") from None
        good_end = start = end + 1
    return records, good_end


def cannot_write(path: Path, err: OSError) -> UserError:
    """A failed write as one line: the file, the cause ("no space left on device", "read-only
    file system") and how to go on without losing the rows already saved."""
    run_dir = path.parent.parent if path.parent.name == SHARDS else path.parent
    cause = (err.strerror or str(err)).lower()
    return UserError(f"cannot write {path}: {cause}; the rows answered so far are kept: make room (or make "
                     f"the folder writable), then continue with `python evaluate.py resume={run_dir}`")


def write_atomically(path: Path, write: Callable[[IO], None], binary: bool = False) -> None:
    """write(file) into a temporary file that then replaces path (checkpoints.atomic_write):
    readers see the old file or the new one, and a failed write leaves no temporary file."""
    mode = {"mode": "wb"} if binary else {"mode": "w", "newline": "", "encoding": "utf-8"}
    try:
        with atomic_write(path) as tmp, open(tmp, **mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise cannot_write(path, err) from None


def write_json(path: Path, data: dict) -> None:
    write_atomically(path, lambda f: f.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def read_records(path: Path) -> list[dict]:
    return _intact_lines(path)[0] if path.is_file() else []


def prediction_files(run_dir: Path) -> list[Path]:
    """The merged file first, then any rank files left by an interrupted multi-process run."""
    files = [run_dir / PREDICTIONS] if (run_dir / PREDICTIONS).is_file() else []
    shard_dir = run_dir / SHARDS
    if shard_dir.is_dir():
        files += sorted(shard_dir.glob("predictions.rank*.jsonl"))
    return files


def collect(run_dir: Path) -> dict[str, dict]:
    """key -> record over every predictions file of a run: a row's first answer, or, while it
    has none, its latest error (evaluate.retry_failed appends new tries)."""
    records: dict[str, dict] = {}
    for path in prediction_files(run_dir):
        for record in read_records(path):
            seen = records.get(record["key"])
            if seen is None or seen.get("error") is not None:
                records[record["key"]] = record
    return records


class RecordWriter:
    """Appends records to one file, each one fsynced before the next row starts. A failed write
    is cut off again, so the file ends with the last whole record."""

    def __init__(self, path: Path):
        self.path = path
        self.good_end = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file():
                self.good_end = _intact_lines(path)[1]
                if self.good_end < path.stat().st_size:
                    with open(path, "r+b") as f:  # cut the torn line a killed run left behind
                        f.truncate(self.good_end)
            self.file = open(path, "ab", buffering=0)  # unbuffered: nothing half-written lingers in memory
        except OSError as err:
            raise cannot_write(path, err) from None

    def write(self, record: dict) -> None:
        data = memoryview((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        try:
            while data:  # a raw write may be partial
                data = data[self.file.write(data):]
            os.fsync(self.file.fileno())
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(self.file.fileno(), self.good_end)
            raise cannot_write(self.path, err) from None
        self.good_end = self.file.tell()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge(run_dir: Path, order: list[str]) -> dict[str, dict]:
    """All predictions of a run into predictions.jsonl in prompt-set order (atomic rename);
    rank files are removed afterwards. Keys not in `order` go last, in their saved order."""
    records = collect(run_dir)
    rank = {key: i for i, key in enumerate(order)}
    ordered = sorted(records.values(), key=lambda r: rank.get(r["key"], len(rank)))
    write_atomically(run_dir / PREDICTIONS,
                     lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    shard_dir = run_dir / SHARDS
    if shard_dir.is_dir():
        for path in shard_dir.glob("*.rank*.json*"):  # rank predictions and stats
            path.unlink()
        if not any(shard_dir.iterdir()):
            shard_dir.rmdir()
    return {r["key"]: r for r in ordered}


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Held by the process that writes a run folder (not by the other ranks of the same run), so
    that two runs never write one folder. flock: the OS releases it when its holder dies, even by
    kill -9; a .lock file left behind then blocks nothing."""
    path = run_dir / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise cannot_write(path, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 20, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"run {run_dir} is being written by another process (pid {pid}); wait for it to "
                            "finish (or stop it), then try again") from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed the file as we opened it: take the new one
    with contextlib.suppress(OSError):  # the pid is only for the message above
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # still holding the lock: a process waiting on this file retries
        os.close(fd)
