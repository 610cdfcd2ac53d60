"""Answer-vs-reference metrics: per-row scores and their aggregates.

    exact_match   normalised answer equals a normalised reference            (0/1, mean)
    contains      a normalised reference occurs in the answer as whole words  (0/1, mean)
    vqa_accuracy  VQA-style soft accuracy over the references (see below)     (0..1, mean)
    bleu          sacrebleu BLEU (default 13a tokenisation), per row sentence BLEU and corpus
                  BLEU as the aggregate                                       (0..100)
The first three are the default; BLEU is for free-text references and must be chosen.

Normalisation: the official VQA evaluation's (vqaEval.py, also the EvalAI server's): newlines
and tabs to spaces; punctuation ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! dropped where it
touches a space (or anywhere when the text holds a number like 1,000), else turned into a
space; full stops dropped unless a digit follows; lower case; number words none/zero..ten to
digits; articles a/an/the dropped; contractions written without an apostrophe restored
("dont" -> "don't"). So "Two." == "2", "a red circle" == "Red circle".

VQA accuracy with n references (alternatives of the `reference` column, "|"-separated):
min(1, matches / min(3, n)); with more than 3 references it is averaged over the n
leave-one-out subsets, as the official VQA evaluation does with its 10 human answers. With one
reference it equals exact match.

A row that failed (no answer) scores 0 on every metric: failures are never silently dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from minigpt4.errors import UserError

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_NUMBER_WITH_COMMA = re.compile(r"(\d)(,)(\d)")
_FULL_STOP = re.compile(r"\.(?!\d)")
_CONTRACTED = [
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "i'd've", "i'm",
    "i've", "isn't", "it'd", "it'd've", "it'll", "let's", "ma'am", "mightn't", "mightn't've", "might've",
    "mustn't", "must've", "needn't", "not've", "o'clock", "oughtn't", "shan't", "she'd've", "she's",
    "should've", "shouldn't", "shouldn't've", "somebody'd've", "somebody'll", "somebody's", "someone'd",
    "someone'd've", "someone'll", "someone's", "something'd", "something'd've", "something'll", "that's",
    "there'd", "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've",
    "'twas", "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's",
    "where'd", "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're",
    "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd",
    "you'd've", "you'll", "you're", "you've",
]


def _without_apostrophes(word: str) -> list[str]:
    """Every way of writing `word` with one or more of its apostrophes left out."""
    parts = word.split("'")
    forms = [parts[0]]
    for part in parts[1:]:
        forms = [f + sep + part for f in forms for sep in ("'", "")]
    return [f for f in forms if f != word]


_CONTRACTIONS = {form: word for word in _CONTRACTED for form in _without_apostrophes(word)}


def normalize(text: str) -> str:
    """The official VQA answer normalisation (processPunctuation + processDigitArticle)."""
    text = text.replace("\n", " ").replace("\t", " ").replace("\u2019", "'").strip()
    drop_all = _NUMBER_WITH_COMMA.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        out = out.replace(p, "" if drop_all or p + " " in text or " " + p in text else " ")
    out = _FULL_STOP.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


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
