"""The one reader of prompt CSVs: the files evaluate.py answers and finetune.py trains on.

Both are UTF-8 CSV files (a BOM is fine) whose first line is a header. A row's `image` cell lists
zero or more paths separated by ";" (relative to the CSV's folder, or absolute) and its `prompt`
may place them with <image> markers (conversation.IMAGE_MARKER; conversation.build_prompt turns
a row into a conversation). Reading is strict: a file read half right would make every result
doubtful, so an unreadable file, a bad header or a ragged row is one UserError naming file and
line. What a row means (ids and references, or answers) is the caller's.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from minigpt4.errors import UserError

IMAGE_SEP = ";"


@dataclass
class CsvRow:
    line: int  # physical line where the row ends (1 = the header), for messages
    values: dict[str, str]  # column -> cell, as written


def split_list(text: str | None, sep: str) -> list[str]:
    """A cell holding several values ("a.png; b.png") -> the non-empty values, stripped."""
    return [part.strip() for part in (text or "").split(sep) if part.strip()]


def image_paths(cell: str | None, folder: Path) -> list[str]:
    """An `image` cell -> its paths, relative ones taken from `folder` (the CSV's)."""
    return [str(p if Path(p).is_absolute() else folder / p) for p in split_list(cell, IMAGE_SEP)]


def read_prompt_csv(path: Path, required: Sequence[str], fix: str) -> tuple[list[str], list[CsvRow]]:
    """(header, non-blank rows) of an existing file. `fix` says how to name the columns; it ends
    the message for a header without one of `required`."""
    names = ", ".join(f"`{c}`" for c in required)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from None
    if not text.strip():
        raise UserError(f"{path}:1: empty file; the first line must be a header with the column(s) {names}")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [h.strip() for h in next(reader)]
    except csv.Error as err:
        raise UserError(f"{path}:1: unreadable CSV header ({err})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise UserError(f"{path}:1: no {', '.join(f'`{c}`' for c in missing)} column in the header {header}; {fix}")
    if not all(header) or len(set(header)) != len(header):
        raise UserError(f"{path}:1: header has empty or repeated column names {header}")
    rows: list[CsvRow] = []
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise UserError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
        if not any(c.strip() for c in cells):
            continue  # a blank line
        if len(cells) != len(header):
            raise UserError(f"{path}:{reader.line_num}: {len(cells)} fields but the header has {len(header)}; "
                            "quote fields that hold commas")
        rows.append(CsvRow(reader.line_num, dict(zip(header, cells))))
    if not rows:
        raise UserError(f"{path}:2: no rows below the header")
    return header, rows
