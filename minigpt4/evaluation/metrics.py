"""Answer-vs-reference metrics: per-row scores and their aggregates.

    exact_match   normalised answer equals a normalised reference            (0/1, mean)
    contains      a normalised reference occurs in the answer as whole words  (0/1, mean)
    vqa_accuracy  VQA-style soft accuracy over the references (see below)     (0..1, mean)
    bleu          sacrebleu BLEU (default 13a tokenisation), per row sentence BLEU and corpus
                  BLEU as the aggregate                                       (0..100)
The first three are the default; BLEU is for free-text references and must be chosen.

Normalisation (VQA evaluation style): lower case, commas inside numbers dropped, other
punctuation to spaces, number words zero..ten to digits, articles a/an/the dropped, spaces
collapsed. So "Two." == "2", "a red circle" == "Red circle".

VQA accuracy with n references (alternatives of the `reference` column, "|"-separated):
min(1, matches / min(3, n)); with more than 3 references it is averaged over the n
leave-one-out subsets, as the official VQA evaluation does with its 10 human answers. With one
reference it equals exact match.

A row that failed (no answer) scores 0 on every metric: failures are never silently dropped.
"""

from __future__ import annotations

import re
from typing import Callable

from minigpt4.errors import UserError

_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[!\"#$%&'()*+,\-/:;<=>?@\[\\\]^_`{|}~]")


def normalize(text: str) -> str:
    text = text.lower().replace("\u2019", "'")
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # 1,000 -> 1000
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # full stops, not decimal points
    text = re.sub(r"'", "", text)  # don't -> dont
    text = _PUNCT.sub(" ", text)
    words = [_NUMBERS.get(w, w) for w in text.split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def exact_match(answer: str, references: list[str]) -> float:
    a = normalize(answer)
    return float(any(a == normalize(r) for r in references))


def contains(answer: str, references: list[str]) -> float:
    a = f" {normalize(answer)} "
    return float(any(normalize(r) and f" {normalize(r)} " in a for r in references))


def vqa_accuracy(answer: str, references: list[str]) -> float:
    a = normalize(answer)
    hits = [normalize(r) == a for r in references]
    n = len(hits)
    need = min(3, n)
    if n <= 3:
        return min(1.0, sum(hits) / need)
    return sum(min(1.0, (sum(hits) - h) / need) for h in hits) / n


def sentence_bleu(answer: str, references: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_bleu(answer, references).score)


def corpus_bleu(answers: list[str], references: list[list[str]]) -> float:
    import sacrebleu

    width = max(len(r) for r in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    return float(sacrebleu.corpus_bleu(answers, streams).score)


ROW_METRICS: dict[str, Callable[[str, list[str]], float]] = {
    "exact_match": exact_match,
    "contains": contains,
    "vqa_accuracy": vqa_accuracy,
    "bleu": sentence_bleu,
}
ALL_METRICS = tuple(ROW_METRICS)
# For files that choose nothing: short-answer metrics. BLEU is for free-text references and is
# chosen explicitly (corpus BLEU of one-word answers is 0 for want of 4-grams).
DEFAULT_METRICS = ("exact_match", "contains", "vqa_accuracy")


def check_metrics(names, where: str) -> tuple[str, ...]:
    names = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in ROW_METRICS]
    if unknown:
        raise UserError(f"{where}: unknown metric(s) {unknown}; choose from {list(ALL_METRICS)}")
    if not names:
        raise UserError(f"{where}: no metrics given; choose from {list(ALL_METRICS)}")
    return names


def score_row(answer: str | None, references: list[str], metrics: tuple[str, ...]) -> dict[str, float]:
    """Per-row scores; none without references; a failed row (answer None) scores 0."""
    if not references:
        return {}
    if answer is None:
        return {m: 0.0 for m in metrics}
    return {m: ROW_METRICS[m](answer, references) for m in metrics}


def aggregate(rows: list[tuple[str | None, list[str], dict[str, float]]]) -> tuple[dict[str, float], dict[str, int]]:
    """[(answer, references, scores)] -> ({metric: value}, {metric: rows scored}).

    Means of the row scores; BLEU is corpus BLEU over the rows it scored."""
    values: dict[str, float] = {}
    counts: dict[str, int] = {}
    names = [m for m in ALL_METRICS if any(m in s for _, _, s in rows)]
    for m in names:
        scored = [(a, refs, s[m]) for a, refs, s in rows if m in s]
        counts[m] = len(scored)
        if m == "bleu":
            values[m] = corpus_bleu([a or "" for a, _, _ in scored], [refs for _, refs, _ in scored])
        else:
            values[m] = sum(v for _, _, v in scored) / len(scored)
    return values, counts
