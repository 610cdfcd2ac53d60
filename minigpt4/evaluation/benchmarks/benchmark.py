"""A benchmark config (conf/benchmark/*.yaml) -> the rows evaluate.py answers, as PromptRows.

Each row of the file becomes one PromptRow (with benchmark.circular=true, one per rotation of
its options), answered by recipes/evaluate.py exactly as a prompt CSV's rows are. Its `input` keeps what
scoring needs without the file (so score_only works from predictions.jsonl alone): the prompt,
the question, the options (A, B, ...), `reference` (the expected answer(s), "|"-separated),
category, l2-category, split and `group` (MME: the picture's two questions; circular: one
question's rotations).

The file's columns are found by name: `benchmark.columns.FIELD` lists the names to try for a
field (id, question, answer, hint, category, l2-category, split, group, options, image); the
defaults below fit VLMEvalKit, LLaVA and lmms-eval files. Multiple-choice options come from
the columns A, B, C, ..., choice_a, choice_b, ..., or a list column (choices, options).
"""

from __future__ import annotations

import ast
import json
import logging
import math
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from minigpt4.errors import UserError
from minigpt4.evaluation.benchmarks.answers import read_answers
from minigpt4.evaluation.benchmarks.readers import (
    IMAGE_COLUMNS,
    RawRow,
    detect_format,
    files_of,
    is_pattern,
    read_raw_rows,
)
from minigpt4.evaluation.benchmarks.scorers import (
    LETTERS,
    REFERENCE_SEP,
    SCORERS,
    Scorer,
)
from minigpt4.evaluation.prompts import PromptRow

log = logging.getLogger(__name__)

DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "id": ("index", "question_id", "id", "data_id"),
    "question": ("question", "text"),
    "answer": ("answer", "answers", "label", "multiple_choice_answer"),
    "hint": ("hint",),
    "category": ("category",),
    "l2-category": ("l2-category",),
    "split": ("split",),
    "group": ("image_path",),
    "options": ("choices", "options"),
    "image": IMAGE_COLUMNS,
}
FORMATS = {"auto": None, "tsv": "tsv", "jsonl": "jsonl", "parquet": "table", "arrow": "table"}
ROTATION = 1_000_000  # VLMEvalKit: rotation k of question i has the index i + k * 1,000,000
PROMPT_FIELDS = ("question", "hint", "options")  # besides any column of the file


@dataclass(frozen=True)
class Benchmark:
    name: str
    path: Path
    format: str
    images: Path | None
    answers: Path | None
    scorer: Scorer
    prompt: str
    circular: bool
    columns: dict[str, tuple[str, ...]]
    limit: int | None

    @property
    def label(self) -> str:
        """How results name the benchmark's rows (predictions' `csv` column, keys)."""
        return self.path.name

    @classmethod
    def from_dict(cls, node: dict, files_needed: bool = True) -> Benchmark:
        """Checked in full before any model loads; paths are made absolute. files_needed=False:
        re-scoring saved answers, which needs the settings but not the files."""
        where = _existing if files_needed else (lambda value, key: Path(str(value)))
        if node.get("path") in (None, "", "???"):
            name = f" {node['name']}" if node.get("name") else ""
            raise UserError(f"the benchmark{name} needs its file: benchmark.path=/path/to/FILE "
                            "(docs/BENCHMARKS_VLM.md says where each benchmark's file comes from)")
        path = where(node["path"], "benchmark.path")
        fmt = str(node.get("format") or "auto")
        if fmt not in FORMATS:
            raise UserError(f"benchmark.format={fmt}: use one of {list(FORMATS)}")
        scorer = str(node.get("scorer"))
        if scorer not in SCORERS:
            raise UserError(f"benchmark.scorer={scorer}: use one of {list(SCORERS)}")
        columns = dict(DEFAULT_COLUMNS)
        given = node.get("columns")
        for field, names in (given or {}).items():
            if field not in DEFAULT_COLUMNS:
                raise UserError(f"benchmark.columns.{field}: no such field; name the columns of {list(DEFAULT_COLUMNS)}")
            columns[field] = tuple([names] if isinstance(names, str) else names)
        limit = node.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise UserError(f"benchmark.limit={limit}: use a whole number of 1 or more, or null for every row")
        prompt = str(node.get("prompt") or "{question}")
        _check_template(prompt)
        return cls(
            name=str(node.get("name") or path.stem), path=path, format=fmt,
            images=where(node["images"], "benchmark.images") if node.get("images") else None,
            answers=where(node["answers"], "benchmark.answers") if node.get("answers") else None,
            scorer=SCORERS[scorer], prompt=prompt, circular=bool(node.get("circular", False)), columns=columns,
            limit=limit)

    def saved_paths(self) -> dict[str, str | None]:
        """The config keys to save, absolute, so resume works from any directory."""
        return {"path": str(self.path), "images": self.images and str(self.images),
                "answers": self.answers and str(self.answers)}

    # ---- rows ----------------------------------------------------------------------------------
    def read_rows(self) -> list[PromptRow]:
        """Every row of the file, validated (a structural problem is one UserError naming the row)."""
        fmt = FORMATS[self.format] or detect_format(self.path)
        answers = read_answers(self.answers) if self.answers else None
        questions, seen = [], {}
        for number, raw in enumerate(read_raw_rows(self.path, fmt, list(self.columns["image"]), self.images), 1):
            if self.limit and number > self.limit:
                break
            if answers is not None:
                extra = answers.get(str(self._value(raw.fields, "id")), {})
                raw.fields.update({k: v for k, v in extra.items() if k not in raw.fields})
            question = self._question(raw, number)
            if question["id"] in seen:
                raise UserError(f"{raw.where}: id {question['id']!r} repeats the id of {seen[question['id']]}; ids "
                                "must be unique (benchmark.columns.id names the id column)")
            seen[question["id"]] = raw.where
            questions.append((raw, question))
        if not questions:
            raise UserError(f"benchmark.path={self.path}: no rows")
        if not any(q["reference"] for _, q in questions):
            log.warning("%s: no answers in the file (%s): the answers are saved but not scored", self.path,
                        ", ".join(self.columns["answer"]))
        return [self._prompt_row(raw, q, line) for line, (raw, q) in enumerate(self._rotated(questions), 1)]

    def _value(self, fields: dict, field: str) -> Any:
        """The first of the field's columns that the row has and that is not empty."""
        for column in self.columns[field]:
            if column in fields and not _empty(fields[column]):
                return fields[column]
        return None

    def _question(self, raw: RawRow, number: int) -> dict:
        fields, where = raw.fields, raw.where
        text = self._value(fields, "question")
        if text is None:
            raise UserError(f"{where}: no question (looked for the column(s) {list(self.columns['question'])} in "
                            f"{sorted(fields)}); name it with benchmark.columns.question=COLUMN")
        row_id = self._value(fields, "id")
        row_id = _text(row_id) if row_id is not None else str(number)
        if fields.get("source_file"):
            row_id = f"{fields['source_file']}/{row_id}"
        question = {"id": row_id, "question": _text(text), "hint": _text(self._value(fields, "hint") or ""),
                    "options": self._options(fields) if self.scorer.reference_kind == "letter" else {}}
        for field in ("category", "l2-category", "split"):
            question[field] = _text(self._value(fields, field) or "")
        if self.scorer.reference_kind == "letter" and len(question["options"]) < 2:
            raise UserError(f"{where}: fewer than 2 options (looked for the columns A, B, ..., choice_a, ..., or a "
                            f"list in {list(self.columns['options'])}); is this a multiple-choice file?")
        question["reference"] = self._references(self._value(fields, "answer"), question["options"], where)
        question["group"] = _text(self._value(fields, "group") or raw.image_key) if self.scorer.groups else ""
        question["images"] = raw.images
        return question

    def _options(self, fields: dict) -> dict[str, str]:
        listed = self._value(fields, "options")
        if isinstance(listed, str) and listed.strip().startswith("["):
            listed = _parse_list(listed)
        if isinstance(listed, list):
            return {LETTERS[i]: _text(v) for i, v in enumerate(listed[: len(LETTERS)]) if not _empty(v)}
        for columns in ([letter for letter in LETTERS], [f"choice_{letter.lower()}" for letter in LETTERS]):
            present = [c for c in columns if c in fields]
            if present:
                return {letter: _text(fields[c]) for letter, c in zip(LETTERS, columns)
                        if c in fields and not _empty(fields[c])}
        return {}

    def _references(self, answer: Any, options: dict[str, str], where: str) -> list[str]:
        """The file's answer as this scorer compares it: yes/no, an option letter, or answer texts."""
        if answer is None:
            return []
        kind = self.scorer.reference_kind
        if kind == "letter":
            return [_letter(answer, options, where)]
        if isinstance(answer, str) and answer.strip().startswith("["):
            answer = _parse_list(answer)
        answers = [a.get("answer", "") if isinstance(a, dict) else _text(a) for a in
                   (answer if isinstance(answer, list) else [answer])]
        if kind == "yes_no":
            if len(answers) != 1 or answers[0].strip().lower() not in ("yes", "no"):
                raise UserError(f"{where}: the answer {answer!r} is not yes or no")
            return [answers[0].strip().lower()]
        return [a.replace(REFERENCE_SEP, "/") for a in answers]

    def _rotated(self, questions: list[tuple[RawRow, dict]]) -> list[tuple[RawRow, dict]]:
        """With circular evaluation, each question's rotations share a group: the file's own
        (VLMEvalKit's index + k * 1,000,000) or, when the file has none, made here."""
        if not self.circular:
            return [(raw, {**q, "group": q["id"]} if self.scorer.reference_kind == "letter" else q)
                    for raw, q in questions]
        numeric = all(q["id"].isdigit() for _, q in questions)
        if numeric and any(int(q["id"]) >= ROTATION for _, q in questions):
            return [(raw, {**q, "group": str(int(q["id"]) % ROTATION)}) for raw, q in questions]
        out = []
        for raw, q in questions:
            letters = list(q["options"])
            texts = list(q["options"].values())
            for k in range(len(letters)):
                rotated = dict(zip(letters, texts[k:] + texts[:k]))
                reference = [letters[(letters.index(q["reference"][0]) - k) % len(letters)]] if q["reference"] else []
                row_id = q["id"] if k == 0 else str(int(q["id"]) + k * ROTATION) if numeric else f"{q['id']}@{k}"
                out.append((raw, {**q, "id": row_id, "options": rotated, "reference": reference, "group": q["id"]}))
        return out

    def _prompt_row(self, raw: RawRow, q: dict, line: int) -> PromptRow:
        options = "\n".join(f"{letter}. {text}" for letter, text in q["options"].items())
        values = {**{k: "" if _empty(v) else _text(v) for k, v in raw.fields.items()},
                  "question": q["question"], "hint": q["hint"], "options": options}
        prompt = render(self.prompt, values, raw.where)
        names = [image if isinstance(image, str) else image.name for image in q["images"]]
        saved = {"prompt": prompt, "question": q["question"], "hint": q["hint"], **q["options"],
                 "reference": REFERENCE_SEP.join(q["reference"]), "category": q["category"],
                 "l2-category": q["l2-category"], "split": q["split"], "group": q["group"], "image": ";".join(names)}
        return PromptRow(key=f"{self.label}#{q['id']}", csv=self.label, id=q["id"], line=line, prompt=prompt,
                         images=list(q["images"]), references=list(q["reference"]), category=q["category"],
                         input={k: v for k, v in saved.items() if v != ""})


# ---- helpers ---------------------------------------------------------------------------------------
def render(template: str, values: dict[str, str], where: str) -> str:
    """The prompt of one row. A line whose placeholders are all empty is left out (no "Hint:"
    line without a hint), and so is a line without placeholders that the question already holds
    (LLaVA's question files carry their instruction)."""
    lines = []
    for line in template.split("\n"):
        names = [name for _, name, _, _ in string.Formatter().parse(line) if name is not None]
        if not names:
            if not (line.strip() and line.strip() in values["question"]):
                lines.append(line)
            continue
        missing = [n for n in names if n not in values and n not in PROMPT_FIELDS]
        if missing:
            raise UserError(f"{where}: benchmark.prompt uses {{{missing[0]}}} but the row has no such column; "
                            f"use {{question}}, {{hint}}, {{options}} or a column of the file")
        if all(not values.get(n) for n in names):
            continue
        lines.append(line.format_map({n: values.get(n, "") for n in names}))
    return "\n".join(lines).strip()


def _check_template(prompt: str) -> None:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None]
    except ValueError as err:
        raise UserError(f"benchmark.prompt={prompt!r}: {err}; write a literal brace as {{{{ or }}}}") from None
    if "question" not in names:
        raise UserError(f"benchmark.prompt={prompt!r}: the prompt must hold {{question}}")
    if any(not name or not name.replace("-", "_").isidentifier() for name in names):
        raise UserError(f"benchmark.prompt={prompt!r}: name each placeholder, e.g. {{question}} or {{options}}")


def _existing(value, key: str) -> Path:
    """The path made absolute; it must exist (a pattern: match a file)."""
    path = Path(str(value)).expanduser()
    if is_pattern(path):
        path = path.parent.resolve() / path.name
        files_of(path)
        return path
    if not path.exists():
        raise UserError(f"{key}={value}: no such file or folder")
    return path.resolve()


def _empty(value: Any) -> bool:
    """None, an empty cell, or what pandas writes for a missing option (nan)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return isinstance(value, str) and value.strip() in ("", "nan", "NaN")


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value.strip() if isinstance(value, str) else str(value)


def _parse_list(text: str) -> Any:
    """A list written into a cell, as JSON or as Python writes it (VLMEvalKit: "['a', 'b']")."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _letter(answer: Any, options: dict[str, str], where: str) -> str:
    """An answer as its option letter: a letter, an index into the options, or an option's text."""
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        return list(options)[answer]
    text = _text(answer)
    if text.upper() in options and len(text) == 1:
        return text.upper()
    same = [letter for letter, option in options.items() if option == text]
    if len(same) == 1:
        return same[0]
    raise UserError(f"{where}: the answer {text!r} is none of the options {list(options)}")
