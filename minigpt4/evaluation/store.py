"""predictions.jsonl: one finished row per line, appended and fsynced as it finishes.

A kill -9 can at worst leave a torn last line (no newline): readers ignore it and the writer
cuts it off before appending, so a resumed run loses no finished row and duplicates none.
Several processes never share a file: rank r writes shards/predictions.rank{r}.jsonl and rank 0
merges them into predictions.jsonl at the end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from minigpt4.errors import UserError

PREDICTIONS = "predictions.jsonl"
SHARDS = "shards"


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


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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
    """Appends records to one file, each one flushed and fsynced before the next row starts."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            _, good_end = _intact_lines(path)
            if good_end < path.stat().st_size:
                with open(path, "r+b") as f:  # cut the torn line a killed run left behind
                    f.truncate(good_end)
        self.path = path
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge(run_dir: Path, order: list[str]) -> dict[str, dict]:
    """All predictions of a run into predictions.jsonl in prompt-set order (atomic rename);
    rank files are removed afterwards. Keys not in `order` go last, in their saved order."""
    records = collect(run_dir)
    rank = {key: i for i, key in enumerate(order)}
    ordered = sorted(records.values(), key=lambda r: rank.get(r["key"], len(rank)))
    tmp = run_dir / (PREDICTIONS + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in ordered:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / PREDICTIONS)
    shard_dir = run_dir / SHARDS
    if shard_dir.is_dir():
        for path in shard_dir.glob("*.rank*.json*"):  # rank predictions and stats
            path.unlink()
        if not any(shard_dir.iterdir()):
            shard_dir.rmdir()
    return {r["key"]: r for r in ordered}
