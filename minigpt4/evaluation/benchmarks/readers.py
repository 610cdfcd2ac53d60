"""Benchmark files as researchers have them -> raw rows, streamed, pictures left in the file.

    tsv      VLMEvalKit's files (MME.tsv, MMBench_DEV_EN.tsv, ...): a header, one row per question;
             `image` holds base64, a list of base64 for several pictures, or (a picture that repeats)
             the `index` of the row that holds it; `image_path` instead names files on disk.
    jsonl    LLaVA-style question files (question_id, image, text, ...) with an image folder and,
             optionally, an answers file (answers.py); a .json list works too, and so does a
             folder of such files (POPE's coco_pope_{random,popular,adversarial}.json).
    parquet  Hugging Face datasets (lmms-eval's), pictures embedded as bytes ({bytes, path});
    arrow    the same saved by `datasets`' save_to_disk (Arrow IPC files).

A reader yields RawRow: the row's small columns, and its pictures as StoredImage (read and
decoded only when the row is answered) or paths. So a 1 GB TSV of base64 pictures costs a few
bytes per row in memory, and a picture that is not valid base64 or does not decode fails its
own row at run time, through the same checks as an image file (minigpt4/images.py).
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import sys
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from minigpt4.errors import UserError
from minigpt4.images import ImageSource, StoredImage

IMAGE_COLUMNS = ("image", "images", "image_path", "image_file")
TABLE_SUFFIXES = (".parquet", ".arrow")
QUESTION_SUFFIXES = (".jsonl", ".json")
REFERENCE_MAX = 64  # VLMEvalKit: an `image` cell this short is the index of the row holding the picture


@dataclass
class RawRow:
    where: str  # "MME.tsv:12", for messages
    fields: dict[str, Any]  # the row's columns, pictures left out
    images: list[ImageSource] = field(default_factory=list)
    image_key: str = ""  # rows showing the same picture share it (MME scores pairs per picture)


def detect_format(path: Path) -> str:
    """tsv, jsonl or table, from the file's extension (a folder or a pattern: from its files)."""
    files = files_of(path)
    suffixes = {p.suffix.lower() for p in files}
    if suffixes <= {".tsv"}:
        return "tsv"
    if suffixes <= set(QUESTION_SUFFIXES):
        return "jsonl"
    if suffixes <= set(TABLE_SUFFIXES):
        return "table"
    raise UserError(f"benchmark.path={path}: cannot tell the format from {sorted(suffixes)}; name it with "
                    f"benchmark.format=tsv|jsonl|parquet|arrow")


def _folder_files(folder: Path) -> list[Path]:
    """The benchmark files in a folder (a Hugging Face snapshot keeps them in data/ or deeper)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in
                   (".tsv", *QUESTION_SUFFIXES, *TABLE_SUFFIXES) and not p.name.startswith("."))
    files = [p for p in files if p.name not in ("dataset_info.json", "state.json", "dataset_dict.json")]
    if not files:
        raise UserError(f"benchmark.path={folder}: no .tsv, .jsonl, .json, .parquet or .arrow file in this folder")
    return files


def files_of(path: Path) -> list[Path]:
    """The file itself, the benchmark files of a folder, or the files a pattern matches
    (data/validation-*.parquet: one split of a Hugging Face snapshot)."""
    if is_pattern(path):
        files = sorted(p for p in path.parent.glob(path.name) if p.is_file())
        if not files:
            raise UserError(f"benchmark.path={path}: no file matches")
        return files
    return _folder_files(path) if path.is_dir() else [path]


def is_pattern(path: Path) -> bool:
    return any(c in path.name for c in "*?[")


def _decode_base64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as err:
        raise UserError(f"{where}: the image is not valid base64 ({err}); re-download the file") from None


def _list_cell(text: str) -> list[str]:
    """A cell holding a list ("['a.jpg', 'b.jpg']", a JSON list of base64) -> its items, without
    parsing megabytes of base64 as Python (base64 has no quotes or commas)."""
    inner = text.strip()[1:-1]
    return [item.strip().strip("'\"") for item in inner.split(",") if item.strip().strip("'\"")]


# ---- VLMEvalKit TSV -------------------------------------------------------------------------------
class TsvFile:
    """One TSV, scanned once for its rows (byte offsets kept); a picture is read back from its
    row's bytes when needed. A quoted cell may span lines (pandas quotes cells with newlines)."""

    def __init__(self, path: Path, image_folder: Path | None):
        self.path = path
        self.image_folder = image_folder or path.parent
        self.spans: dict[str, tuple[int, int, int]] = {}  # index -> (start byte, end byte, line)
        self.image_column: int | None = None

    def _records(self) -> Iterator[tuple[int, int, int, list[str]]]:
        """(start byte, end byte, first line, cells) of each record, one record in memory at a time."""
        with open(self.path, "rb") as f:
            offset = start = first = quotes = 0
            parts: list[bytes] = []
            for number, line in enumerate(f, 1):
                if not parts:
                    start, first = offset, number
                parts.append(line)
                quotes += line.count(b'"')
                offset += len(line)
                if quotes % 2 == 0:  # every quoted cell is closed
                    if any(p.strip() for p in parts):
                        data = parts[0] if len(parts) == 1 else b"".join(parts)
                        if first == 1 and data.startswith(b"\xef\xbb\xbf"):  # a BOM
                            data = data[3:]
                        yield start, offset, first, self._cells(data, first)
                    parts, quotes = [], 0
            if parts:
                raise UserError(f"{self.path}:{first}: a quoted cell is never closed; the file is cut short or "
                                "not a TSV")

    def _cells(self, data: bytes, line: int) -> list[str]:
        try:
            if b'"' not in data:  # the common case: plain tab-separated cells, no copy through csv
                return [cell.decode("utf-8") for cell in data.rstrip(b"\r\n").split(b"\t")]
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{self.path}:{line}: not UTF-8 text ({err.reason}); save the file as UTF-8") from None
        try:
            return next(csv.reader([text.rstrip("\r\n")], delimiter="\t", strict=True))  # newlines only inside quotes
        except (csv.Error, StopIteration) as err:
            raise UserError(f"{self.path}:{line}: malformed TSV row ({err})") from None

    def rows(self) -> Iterator[RawRow]:
        _allow_long_cells()
        records = self._records()
        try:
            _, _, _, header = next(records)
        except StopIteration:
            raise UserError(f"{self.path}:1: empty file; a VLMEvalKit TSV starts with a header (index, image, "
                            "question, ...)") from None
        header = [h.strip() for h in header]
        if len(set(header)) != len(header) or not all(header):
            raise UserError(f"{self.path}:1: header has empty or repeated column names {header}")
        self.image_column = header.index("image") if "image" in header else None
        for number, (start, end, line, cells) in enumerate(records, 1):
            if len(cells) != len(header):
                raise UserError(f"{self.path}:{line}: {len(cells)} cells but the header has {len(header)}")
            fields = dict(zip(header, cells))
            where = f"{self.path.name}:{line}"
            index = fields.get("index", "").strip() or str(number)
            images, key = self._images(fields.pop("image", ""), fields.get("image_path", ""), index, where)
            if images and key == f"row:{index}":
                self.spans[index] = (start, end, line)
            yield RawRow(where, fields, images, key)

    def _images(self, cell: str, paths: str, index: str, where: str) -> tuple[list[ImageSource], str]:
        cell = cell.strip()
        if cell:
            items = _list_cell(cell) if cell.startswith("[") else [cell]
            if len(items) == 1 and len(items[0]) <= REFERENCE_MAX:  # the picture of another row
                holder = items[0]
                return [self._stored(holder, 0, f"{where} (the image of the row with index {holder})")], f"row:{holder}"
            return [self._stored(index, i, f"{where} image {i + 1}" if len(items) > 1 else where)
                    for i in range(len(items))], f"row:{index}"
        named = _list_cell(paths) if paths.strip().startswith("[") else [paths.strip()] if paths.strip() else []
        return [str(p if Path(p).is_absolute() else self.image_folder / p) for p in named], ";".join(named)

    def _stored(self, index: str, item: int, name: str) -> StoredImage:
        return StoredImage(name, partial(self.read_image, index, item, name))

    def read_image(self, index: str, item: int, name: str) -> bytes:
        """The picture `item` of the row with this index, read back from the file."""
        if index not in self.spans:
            raise UserError(f"{name}: no row with that index holds an image (an image cell of up to "
                            f"{REFERENCE_MAX} characters names the row whose picture it shares)")
        start, end, line = self.spans[index]
        with open(self.path, "rb") as f:
            f.seek(start)
            cells = self._cells(f.read(end - start), line)
        cell = cells[self.image_column].strip()
        items = _list_cell(cell) if cell.startswith("[") else [cell]
        return _decode_base64(items[item], name)


def _allow_long_cells() -> None:
    """csv refuses cells over 128 kB by default; a base64 picture is often larger."""
    limit = min(sys.maxsize, 2**31 - 1)
    if csv.field_size_limit() < limit:
        csv.field_size_limit(limit)


# ---- LLaVA question files ---------------------------------------------------------------------------
def read_questions(file: Path, image_folder: Path | None) -> Iterator[RawRow]:
    """A LLaVA-style question file: one JSON object per line (or a .json list); each names its
    picture(s) relative to the image folder (default: the question file's folder)."""
    folder = image_folder or file.parent
    for where, entry in json_entries(file):
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a JSON object per question, got {type(entry).__name__}")
        fields = dict(entry)
        named = fields.pop("image", None)
        named = [] if named in (None, "") else named if isinstance(named, list) else [named]
        images = [str(p if Path(str(p)).is_absolute() else folder / str(p)) for p in named]
        yield RawRow(where, fields, images, ";".join(str(p) for p in named))


def json_entries(file: Path) -> Iterator[tuple[str, Any]]:
    """(where, object) for a JSON-lines file, or a file holding one JSON list (POPE's .json files
    are JSON lines despite their name)."""
    with open(file, encoding="utf-8") as f:
        first = f.read(1)
        while first.isspace():
            first = f.read(1)
        f.seek(0)
        if first == "[":
            try:
                items = json.load(f)
            except json.JSONDecodeError as err:
                raise UserError(f"{file}:{err.lineno}: not valid JSON ({err.msg})") from None
            for number, item in enumerate(items, 1):
                yield f"{file.name}[{number}]", item
            return
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{file.name}:{number}", json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{file}:{number}: not a JSON line ({err.msg})") from None


# ---- parquet / arrow ----------------------------------------------------------------------------------
class TableFile:
    """One parquet or Arrow file, read a batch at a time. A picture is read back when its row is
    answered: an Arrow file is memory-mapped (no copy); a parquet file is read a row group at a
    time, the last few kept while they fit in CACHE_BYTES."""

    CACHE_BYTES = 256 * 2**20

    def __init__(self, path: Path, image_candidates: list[str], image_folder: Path | None):
        self.path = path
        self.image_folder = image_folder or path.parent
        self.image_candidates = image_candidates
        self.image_column: str | None = None
        self._arrow = None  # the memory-mapped table of an .arrow file
        self._parquet = None
        self._group_starts: list[int] = []
        self._cache: OrderedDict[int, Any] = OrderedDict()

    def _open_parquet(self):
        import pyarrow.parquet as pq

        if self._parquet is None:
            try:
                self._parquet = pq.ParquetFile(self.path)
            except Exception as err:  # noqa: BLE001 - pyarrow's errors: one line naming the file
                raise UserError(f"{self.path}: not a readable parquet file ({_first_line(err)})") from None
            starts, total = [], 0
            for i in range(self._parquet.num_row_groups):
                starts.append(total)
                total += self._parquet.metadata.row_group(i).num_rows
            self._group_starts = starts
        return self._parquet

    def _open_arrow(self):
        import pyarrow as pa

        if self._arrow is None:
            source = pa.memory_map(str(self.path))
            try:
                try:
                    self._arrow = pa.ipc.open_file(source).read_all()
                except pa.ArrowInvalid:
                    source.seek(0)
                    self._arrow = pa.ipc.open_stream(source).read_all()
            except Exception as err:  # noqa: BLE001
                raise UserError(f"{self.path}: not a readable Arrow file ({_first_line(err)})") from None
        return self._arrow

    def _batches(self):
        if self.path.suffix.lower() == ".arrow":
            yield from self._open_arrow().to_batches(max_chunksize=64)
        else:
            yield from self._open_parquet().iter_batches(batch_size=64)

    def rows(self) -> Iterator[RawRow]:
        number = 0
        for batch in self._batches():
            if self.image_column is None:
                self.image_column = next((c for c in self.image_candidates if c in batch.schema.names), "")
            pictures = batch.column(self.image_column) if self.image_column else None
            others = batch.select([n for n in batch.schema.names if n != self.image_column])
            for i, fields in enumerate(others.to_pylist()):  # pictures are copied out one row at a time
                number += 1
                where = f"{self.path.name}[{number}]"
                cell = pictures[i].as_py() if pictures is not None else None
                images, key = self._images(cell, number - 1, where)
                yield RawRow(where, fields, images, key)

    def _images(self, cell, row: int, where: str) -> tuple[list[ImageSource], str]:
        items = cell if isinstance(cell, list) else [] if cell is None else [cell]
        images, keys = [], []
        for i, item in enumerate(items):
            name = f"{where} image {i + 1}" if len(items) > 1 else where
            if isinstance(item, dict) and item.get("bytes") is None and item.get("path"):
                item = item["path"]  # a {bytes: null, path} struct: a file next to the dataset
            if isinstance(item, str) and len(item) <= 1024:  # a path; longer: base64
                path = item if Path(item).is_absolute() else str(self.image_folder / item)
                images.append(path)
                keys.append(item)
            elif item is None:
                continue
            else:
                images.append(StoredImage(name, partial(self.read_image, row, i, name)))
                keys.append(item.get("path") or f"row:{row}" if isinstance(item, dict) else f"row:{row}")
        return images, ";".join(keys)

    def read_image(self, row: int, item: int, name: str) -> bytes:
        cell = self._cell(row)
        value = (cell if isinstance(cell, list) else [cell])[item]
        if isinstance(value, dict):
            value = value.get("bytes")
        if isinstance(value, str):
            return _decode_base64(value, name)
        if not isinstance(value, (bytes, bytearray)):
            raise UserError(f"{name}: the image cell holds {type(value).__name__}, not image bytes")
        return bytes(value)

    def _cell(self, row: int):
        if self.path.suffix.lower() == ".arrow":
            return self._open_arrow().column(self.image_column)[row].as_py()
        import bisect

        parquet = self._open_parquet()
        group = bisect.bisect_right(self._group_starts, row) - 1
        if group not in self._cache:
            self._cache[group] = parquet.read_row_group(group, columns=[self.image_column]).column(0)
            while len(self._cache) > 1 and sum(c.nbytes for c in self._cache.values()) > self.CACHE_BYTES:
                self._cache.popitem(last=False)
        self._cache.move_to_end(group)
        return self._cache[group][row - self._group_starts[group]].as_py()


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]


def read_raw_rows(path: Path, fmt: str, image_candidates: list[str], image_folder: Path | None) -> Iterator[RawRow]:
    """Rows of a benchmark file in any supported format (fmt: tsv, jsonl, table; see
    detect_format). A folder is read file by file in name order (a Hugging Face snapshot, POPE's
    three files); its rows then carry `source_file`, the file's name without extension."""
    files = files_of(path)
    for file in files:
        if fmt == "tsv":
            rows = TsvFile(file, image_folder).rows()
        elif fmt == "jsonl":
            rows = read_questions(file, image_folder)
        else:
            rows = TableFile(file, image_candidates, image_folder).rows()
        for raw in rows:
            if len(files) > 1:
                raw.fields.setdefault("source_file", file.stem)
            yield raw
