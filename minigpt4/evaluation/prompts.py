"""Prompt CSVs -> validated rows, before any model loads.

A prompt set is one or more CSV files. Columns:
    prompt     required; <image> markers place the row's images, without markers they come first
    id         optional (default: the row number, 1-based); must be unique within its file
    image      optional; zero or more paths separated by ";", relative to the CSV's folder
    reference  optional expected answer; alternatives separated by "|"
    category   optional; results are also reported per category
    any other column is carried through to predictions.csv, except the names of its own
    columns (csv, answer, finish_reason, n_tokens, error and the metrics), which are refused.

Structural problems (no `prompt` column, empty file, not UTF-8, a duplicated id, a ragged row,
marker/image count mismatch) are one UserError naming file and line: they would make every
result doubtful. A missing or unreadable image only fails its own row, at run time. The file
itself is read by minigpt4/prompt_files.py, as fine-tuning CSVs are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from minigpt4.conversation import IMAGE_MARKER
from minigpt4.errors import UserError
from minigpt4.evaluation.metrics import ALL_METRICS
from minigpt4.prompt_files import IMAGE_SEP, image_paths, read_prompt_csv, split_list

log = logging.getLogger(__name__)

REFERENCE_SEP = "|"
KNOWN_COLUMNS = ("id", "prompt", "image", "reference", "category")
OUTPUT_COLUMNS = ("csv", "answer", "finish_reason", "n_tokens", "error", *ALL_METRICS)  # predictions.csv's own


@dataclass(frozen=True)
class PromptFile:
    """One CSV of the prompt set and the metrics chosen for it (None: the run's choice)."""

    path: Path
    metrics: tuple[str, ...] | None = None
    label: str = ""  # how the file is named in results (its file name, or its path if names clash)


@dataclass
class PromptRow:
    key: str  # "<label>#<id>", unique over the whole prompt set
    csv: str  # the file's label
    id: str
    line: int  # physical line in the CSV where the row ends (1 = header)
    prompt: str
    images: list[str]  # resolved paths
    references: list[str]
    category: str
    input: dict[str, str] = field(default_factory=dict)  # every original column, as written

    def to_record(self) -> dict:
        """What predictions.jsonl keeps of the input (enough to re-score without the CSV)."""
        return {"key": self.key, "csv": self.csv, "id": self.id, "line": self.line, "input": self.input}


def parse_files(entries) -> list[PromptFile]:
    """Config entries (a path, or {path, metrics}) -> PromptFiles with unique labels."""
    if entries is None or isinstance(entries, (str, Path)):
        entries = [] if entries is None else [entries]
    files = []
    for entry in entries:
        if isinstance(entry, (str, Path)):
            files.append(PromptFile(Path(str(entry))))
            continue
        try:
            path, metrics = entry["path"], entry.get("metrics")
        except (KeyError, TypeError, AttributeError):
            raise UserError(f"evaluate.prompts entry {entry!r}: give a path or {{path: a.csv, metrics: [...]}}") from None
        if isinstance(metrics, str):
            metrics = [metrics]
        files.append(PromptFile(Path(str(path)), tuple(metrics) if metrics is not None else None))
    if not files:
        raise UserError("evaluate.prompts is empty: give one or more CSV files, e.g. evaluate.prompts=[my.csv]")
    names = [f.path.name for f in files]
    labelled = []
    for f in files:
        label = f.path.name if names.count(f.path.name) == 1 else str(f.path)
        labelled.append(PromptFile(f.path, f.metrics, label))
    if len({f.label for f in labelled}) != len(labelled):
        raise UserError(f"evaluate.prompts lists the same file twice: {[str(f.path) for f in files]}")
    return labelled


def read_prompt_file(pf: PromptFile) -> list[PromptRow]:
    """One CSV -> rows; every structural problem is a UserError naming file and line."""
    path = pf.path
    if not path.is_file():
        raise UserError(f"prompt file {path}: no such file (evaluate.prompts=[path/to/prompts.csv])")
    header, csv_rows = read_prompt_csv(path, ["prompt"], "name the prompt column `prompt`")
    clash = [h for h in header if h in OUTPUT_COLUMNS]
    if clash:
        raise UserError(f"{path}:1: column(s) {clash} would be overwritten by predictions.csv's own; rename them "
                        f"(e.g. reference for expected answers)")
    for h in header:  # a near miss is carried through as a plain column: the row would lose its meaning
        known = next((k for k in KNOWN_COLUMNS if h != k and h.lower().rstrip("s") == k), None)
        if known:
            log.warning("%s: column %r is carried through unused; did you mean %r?", path, h, known)

    rows: list[PromptRow] = []
    seen: dict[str, int] = {}
    for number, csv_row in enumerate(csv_rows, 1):
        line, values = csv_row.line, csv_row.values
        row_id = values.get("id", "").strip() or str(number)
        if row_id in seen:
            raise UserError(f"{path}:{line}: id {row_id!r} repeats the id of line {seen[row_id]}; ids must be unique")
        seen[row_id] = line
        prompt = values["prompt"]
        if not prompt.strip():
            raise UserError(f"{path}:{line}: empty prompt")
        images = image_paths(values.get("image"), path.parent)
        markers = prompt.count(IMAGE_MARKER)
        if markers and markers != len(images):
            raise UserError(f"{path}:{line}: prompt has {markers} {IMAGE_MARKER} markers but the row lists {len(images)} images")
        rows.append(
            PromptRow(
                key=f"{pf.label}#{row_id}",
                csv=pf.label,
                id=row_id,
                line=line,
                prompt=prompt,
                images=images,
                references=split_list(values.get("reference"), REFERENCE_SEP),
                category=values.get("category", "").strip(),
                input=values,
            )
        )
    return rows


def load_prompt_set(files: list[PromptFile]) -> list[PromptRow]:
    """All files, validated in full before anything else happens."""
    rows: list[PromptRow] = []
    for pf in files:
        rows.extend(read_prompt_file(pf))
    return rows


def row_from_record(record: dict) -> PromptRow:
    """Rebuild a PromptRow from a predictions.jsonl record (for re-scoring without the CSVs)."""
    values = record["input"]
    return PromptRow(
        key=record["key"],
        csv=record["csv"],
        id=record["id"],
        line=record.get("line", 0),
        prompt=values.get("prompt", ""),
        images=split_list(values.get("image"), IMAGE_SEP),
        references=split_list(values.get("reference"), REFERENCE_SEP),
        category=values.get("category", "").strip(),
        input=values,
    )
