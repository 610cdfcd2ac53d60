"""The answers file of a LLaVA-style question file (benchmark.answers=FILE): the expected
answers by question_id, in whichever form the benchmark ships them.

    JSON lines or a JSON list  {question_id, answer | answers | label, ...} per question
                               (POPE's label files, converted answer files)
    VQAv2 annotations          {"annotations": [{question_id, answers: [{answer}], answer_type}]}
    TextVQA                    {"data": [{question_id, answers: [...]}]}
    GQA questions              {question_id: {answer, fullAnswer, ...}}

Each question's entry is merged into its row (the question file's own columns win), so an
annotation's answer_type can serve as the category.
"""

from __future__ import annotations

import json
from pathlib import Path

from minigpt4.errors import UserError
from minigpt4.evaluation.benchmarks.readers import json_entries


def read_answers(path: Path) -> dict[str, dict]:
    """question_id (as text) -> that question's answer fields."""
    if not path.is_file():
        raise UserError(f"benchmark.answers={path}: no such file")
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        while head.isspace():
            head = f.read(1)
    if head == "{":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            data = None  # JSON lines whose lines are objects
        if isinstance(data, dict):
            return _from_object(data, path)
    answers = {}
    for where, entry in json_entries(path):
        if not isinstance(entry, dict) or "question_id" not in entry:
            raise UserError(f"{where}: an answers entry needs question_id and answer (or answers, label)")
        answers[str(entry["question_id"])] = entry
    return answers


def _from_object(data: dict, path: Path) -> dict[str, dict]:
    for key in ("annotations", "data"):  # VQAv2, TextVQA
        if isinstance(data.get(key), list):
            return {str(e["question_id"]): e for e in data[key] if isinstance(e, dict) and "question_id" in e}
    if data and all(isinstance(v, dict) for v in data.values()):  # GQA: {question_id: {...}}
        return {str(k): v for k, v in data.items()}
    raise UserError(f"benchmark.answers={path}: not a form of answers file this reads (JSON lines with "
                    "question_id, VQA annotations, TextVQA data, or GQA questions)")
