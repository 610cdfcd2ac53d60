"""Benchmark scores as each benchmark's own evaluation computes them; no LLM judge.

    mme          MME's eval_tool (calculation.py): the answer, lower-cased, is yes or no when it is
                 exactly that, else when "yes" (then "no") occurs in its first 4 characters, else
                 "other" (wrong). Per subtask: acc (questions right) and acc+ (pictures with
                 both questions right), x100; the subtask's score is acc + acc+ (max 200);
                 perception sums its 10 subtasks (max 2000), cognition its 4 (max 800).
    pope         POPE's evaluate.py: the first sentence of the answer (up to a "."), commas
                 dropped, is "no" when one of its words is "No", "no" or "not", else "yes".
                 Accuracy, precision, recall, F1 and yes-ratio (x100) per split (random, popular,
                 adversarial), and their mean over the splits (as LLaVA-1.5 reports POPE).
    choice       Multiple choice (MMBench, SEED-Bench, ScienceQA-IMG): the option the answer names
                 (extract_option); an answer naming none is wrong and counted as unanswerable.
                 Accuracy (x100) overall and per category; with circular evaluation (MMBench) a
                 question is right only if every rotation of its options is answered right.
    vqa          VQA accuracy (VQAv2, TextVQA): min(#humans who gave the answer / 3, 1),
                 averaged over the ten leave-one-out subsets of the ten human answers, after the
                 official answer normalisation (metrics.normalize); x100, per category.
    exact_match  GQA: the normalised answer equals the normalised reference; x100, per category.

A row that failed (no answer) is wrong in every scorer, never left out; rows without a
reference (a test split) are not scored. Each scorer gives, per row, what it read from the
answer (`extracted`) and its score, and for the run a summary block and chart panels.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from statistics import mean

from minigpt4.evaluation.metrics import exact_match, normalize, vqa_accuracy

REFERENCE_SEP = "|"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
              "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
NO_CATEGORY = "(none)"


@dataclass
class Scored:
    fields: dict[str, str]  # the row's saved input (reference, options, category, group, split)
    answer: str | None  # None: the row failed
    extracted: str | None  # what the answer says (yes/no, an option letter); None: nothing
    score: float | None  # 0..1; None: no reference to score against


@dataclass
class Panel:
    """One chart panel: a bar per label."""

    title: str
    labels: list[str]
    values: list[float]
    top: float  # the axis maximum (200 for an MME subtask, 100 for a percentage)


def references(fields: dict[str, str]) -> list[str]:
    """The saved reference answers, every one kept (VQA counts humans: an empty one still counts)."""
    text = fields.get("reference", "")
    return text.split(REFERENCE_SEP) if text else []


def options_of(fields: dict[str, str]) -> dict[str, str]:
    """The options a multiple-choice row showed: letter -> text."""
    return {letter: fields[letter] for letter in LETTERS if fields.get(letter)}


# ---- reading the answer ----------------------------------------------------------------------------
def mme_yes_no(answer: str) -> str:
    """MME eval_tool's parse_pred_ans: yes, no or other."""
    text = answer.strip().lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def pope_yes_no(answer: str) -> str:
    """POPE's evaluate.py: no or yes."""
    first_sentence = answer.split(".")[0] if "." in answer else answer
    words = first_sentence.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


_TOKEN_SPLIT = re.compile(r"[\s.()\[\],:;!*#{}\"'<>]+")


def extract_option(answer: str, options: dict[str, str]) -> str | None:
    """The option letter an answer names, or None.

    1. A letter standing alone: "B", "(B)", "B.", "B: ...", "The answer is B." (VLMEvalKit's
       can_infer_option): exactly one of the options' letters occurs as a word of its own, an
       "A" followed by a lower-case word ("A red circle") counting as the article, not the option.
    2. Else the option's text (can_infer_text): exactly one option's normalised text occurs in
       the normalised answer as whole words (when several do, the longest wins if it holds the
       others, e.g. "red circle" over "circle").
    """
    words = [w for w in _TOKEN_SPLIT.split(answer) if w]
    named = set()
    for i, word in enumerate(words):
        if word in options:
            following = words[i + 1] if i + 1 < len(words) else ""
            article = word == "A" and following[:1].islower() and following not in ("or", "and")
            if not article:
                named.add(word)
    if len(named) == 1:
        return named.pop()
    said = f" {normalize(answer)} "
    found = {letter: normalize(text) for letter, text in options.items()
             if normalize(text) and f" {normalize(text)} " in said}
    longest = [letter for letter, text in found.items()
               if all(f" {other} " in f" {text} " for other in found.values())]
    return longest[0] if len(longest) == 1 else None


# ---- scorers ---------------------------------------------------------------------------------------
class Scorer:
    """How one benchmark reads an answer, scores a row and sums up the run."""

    name = ""
    reference_kind = "text"  # what the reader must turn the file's answer into: text, yes_no, letter
    groups = False  # whether rows are scored in groups (MME: a picture's questions; circular: rotations)

    def extract(self, answer: str, fields: dict[str, str]) -> str | None:
        return answer

    def row_score(self, extracted: str | None, fields: dict[str, str]) -> float:
        return float(extracted == fields.get("reference"))

    def score(self, fields: dict[str, str], answer: str | None) -> Scored:
        extracted = self.extract(answer, fields) if answer is not None else None
        if not fields.get("reference"):
            return Scored(fields, answer, extracted, None)
        return Scored(fields, answer, extracted, self.row_score(extracted, fields) if answer is not None else 0.0)

    def summary(self, rows: list[Scored]) -> dict:
        raise NotImplementedError

    def panels(self, summary: dict) -> list[Panel]:
        """accuracy per category, and overall."""
        categories = summary.get("per_category", {})
        title = "accuracy (circular)" if summary.get("circular") else "accuracy"
        return [Panel(title, [*categories, "all"],
                      [*categories.values(), summary["accuracy"]], 100)]


def _percent(values) -> float:
    values = list(values)
    return round(100 * mean(values), 2) if values else 0.0


def _counts(rows: list[Scored]) -> dict:
    scored = [r for r in rows if r.score is not None]
    return {"rows": len(rows), "scored": len(scored), "failed": sum(r.answer is None for r in scored),
            "without_reference": len(rows) - len(scored)}


class MME(Scorer):
    name = "mme"
    reference_kind = "yes_no"
    groups = True

    def extract(self, answer, fields):
        return mme_yes_no(answer)

    def summary(self, rows):
        pictures: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r.score is not None:
                pictures[_subtask(r.fields.get("category", ""))][r.fields.get("group", "")].append(r.score)
        subtasks = {}
        for name, groups in sorted(pictures.items()):
            answers = [s for scores in groups.values() for s in scores]
            acc, acc_plus = _percent(answers), _percent(float(all(scores)) for scores in groups.values())
            subtasks[name] = {"acc": acc, "acc_plus": acc_plus, "score": round(acc + acc_plus, 2),
                              "questions": len(answers), "images": len(groups),
                              "images_without_two_questions": sum(len(s) != 2 for s in groups.values())}
        return {
            "perception": round(sum(subtasks[t]["score"] for t in PERCEPTION if t in subtasks), 2),
            "cognition": round(sum(subtasks[t]["score"] for t in COGNITION if t in subtasks), 2),
            "perception_subtasks": sum(t in subtasks for t in PERCEPTION),
            "cognition_subtasks": sum(t in subtasks for t in COGNITION),
            "other_subtasks": [t for t in subtasks if t not in PERCEPTION + COGNITION],
            "subtasks": subtasks,
            "other_answers": sum(r.extracted == "other" for r in rows if r.score is not None),
            **_counts(rows),
        }

    def panels(self, summary):
        names = [t for t in (*PERCEPTION, *COGNITION) if t in summary["subtasks"]] + summary["other_subtasks"]
        title = (f"MME score per subtask: perception {summary['perception']:.1f} / 2000, "
                 f"cognition {summary['cognition']:.1f} / 800")
        return [Panel(title, names, [summary["subtasks"][t]["score"] for t in names], 200)]


def _subtask(category: str) -> str:
    """A category as MME's eval_tool names its subtasks ("OCR", "code_reasoning")."""
    key = re.sub(r"[\s-]+", "_", category.strip()).lower()
    return next((t for t in PERCEPTION + COGNITION if t.lower() == key), category.strip() or NO_CATEGORY)


POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


class POPE(Scorer):
    name = "pope"
    reference_kind = "yes_no"

    def extract(self, answer, fields):
        return pope_yes_no(answer)

    def summary(self, rows):
        splits: dict[str, list[Scored]] = defaultdict(list)
        for r in rows:
            if r.score is not None:
                splits[_pope_split(r.fields.get("split", ""))].append(r)
        per_split = {name: _pope_numbers(group) for name, group in sorted(splits.items())}
        overall = {m: mean(s[m] for s in per_split.values()) if per_split else 0.0 for m in POPE_METRICS}
        return {**_rounded(overall), "per_split": {name: _rounded(s) for name, s in per_split.items()}, **_counts(rows)}

    def panels(self, summary):
        splits = summary["per_split"]
        return [Panel(metric, [*splits, "mean"], [*(s[metric] for s in splits.values()), summary[metric]], 100)
                for metric in POPE_METRICS]


def _pope_split(name: str) -> str:
    """"coco_pope_random" (POPE's file names) -> "random"."""
    words = re.split(r"[_\-\s]+", name.lower())
    return next((w for w in ("random", "popular", "adversarial") if w in words), name or NO_CATEGORY)


def _pope_numbers(rows: list[Scored]) -> dict:
    """POPE's evaluate.py over one split (yes is the positive class). A failed row predicts
    nothing: wrong, and a miss when the truth is yes."""
    said_yes = [r.extracted == "yes" for r in rows]
    truth_yes = [r.fields["reference"] == "yes" for r in rows]
    tp = sum(s and t for s, t in zip(said_yes, truth_yes))
    fp = sum(s and not t for s, t in zip(said_yes, truth_yes))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / sum(truth_yes) if any(truth_yes) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": 100 * mean(r.score for r in rows), "precision": 100 * precision, "recall": 100 * recall,
            "f1": 100 * f1, "yes_ratio": 100 * mean(said_yes), "questions": len(rows), "true_positives": tp,
            "false_positives": fp}


def _rounded(numbers: dict) -> dict:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in numbers.items()}


class Choice(Scorer):
    name = "choice"
    reference_kind = "letter"
    groups = True

    def extract(self, answer, fields):
        return extract_option(answer, options_of(fields))

    def summary(self, rows):
        questions: dict[str, list[Scored]] = defaultdict(list)  # circular: the rotations of one question
        for r in rows:
            if r.score is not None:
                questions[r.fields.get("group") or str(id(r))].append(r)
        right = {q: float(all(r.score for r in group)) for q, group in questions.items()}
        circular = any(len(group) > 1 for group in questions.values())
        summary = {"accuracy": _percent(right.values()), "questions": len(questions), "circular": circular}
        if circular:
            summary["accuracy_first_rotation"] = _percent(group[0].score for group in questions.values())
        for field, key in (("category", "per_category"), ("l2-category", "per_l2_category")):
            if any(group[0].fields.get(field) for group in questions.values()):
                summary[key] = _per((group[0].fields.get(field), right[q]) for q, group in questions.items())
        answered = [r for r in rows if r.score is not None and r.answer is not None]
        summary["unanswerable"] = sum(r.extracted is None for r in answered)
        summary["unanswerable_examples"] = [r.answer[:120] for r in answered if r.extracted is None][:5]
        return {**summary, **_counts(rows)}


def _per(pairs) -> dict[str, float]:
    """[(category, score)] -> {category: accuracy (x100)}."""
    by: dict[str, list[float]] = defaultdict(list)
    for name, value in pairs:
        by[name or NO_CATEGORY].append(value)
    return {name: _percent(values) for name, values in sorted(by.items())}


class VQA(Scorer):
    name = "vqa"

    def extract(self, answer, fields):
        return normalize(answer)  # what is compared with the references

    def row_score(self, extracted, fields):
        return vqa_accuracy(extracted, references(fields))

    def summary(self, rows):
        scored = [r for r in rows if r.score is not None]
        summary = {"accuracy": _percent(r.score for r in scored), "questions": len(scored)}
        if any(r.fields.get("category") for r in scored):
            summary["per_category"] = _per((r.fields.get("category"), r.score) for r in scored)
        return {**summary, **_counts(rows)}


class ExactMatch(VQA):
    name = "exact_match"

    def row_score(self, extracted, fields):
        return exact_match(extracted, references(fields))


SCORERS: dict[str, Scorer] = {s.name: s for s in (MME(), POPE(), Choice(), VQA(), ExactMatch())}
