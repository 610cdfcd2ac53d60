"""Conversations of the demo world: one picture or several, text-only chat, and held-out sets.

A dialogue is a list of Turns: the pictures attached before a question (as chat's /image
does), the question, its canonical answer and its kind. `to_conversation` replays it through
conversation.py exactly as chat.py builds a conversation, so training sees chat's prompts:

    turns = sample_dialogue(random.Random(0))    # training: a random conversation
    conv = to_conversation(turns, template)      # add_image / ask / add_answer, as chat does
    heldout_dialogues("earlier", 100, seed=1000) # held-out: the last turn is the one scored

With several pictures in a conversation:
  - a question that names a picture ("in the second picture") is about that picture;
  - "in all" / "in total" / "altogether" counts the shapes of every picture so far;
  - any other question about a picture is about the latest one.
Multi-picture kinds: total (count over all pictures), nth (about a named picture), more (which
picture has more or fewer shapes), same (yes/no: same colour, shape, count, size? backgrounds:
"white and gray, so no"),
difference (what differs), earlier (a named earlier picture after a later one was added, in a
later turn), latest (an unnamed question after a second picture was added).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from minigpt4.conversation import Conversation, Template
from minigpt4.data import synthetic
from minigpt4.data.synthetic import COUNT_WORDS, PLURALS, Spec

ORDINALS = ("first", "second", "third", "fourth")
MULTI_KINDS = ("total", "nth", "more", "same", "difference", "earlier", "latest")
ALL_KINDS = synthetic.KINDS + MULTI_KINDS
VARIED = ("colour", "shape", "count", "size", "background")  # what two pictures are compared on
VALUES = {"colour": list(synthetic.COLOURS), "shape": list(synthetic.SHAPES), "count": [1, 2, 3, 4],
          "size": list(synthetic.SIZES), "background": list(synthetic.BACKGROUNDS)}
SAME_NUMBER = "the same number"
REASONED = ("background",)  # "same ...?" answered with the two values first (same_question)

# How often each kind is asked in training (relative): positions, yes/no claims and comparisons
# need more examples than colours (docs/FINETUNE.md, "Why positions were not learnt"), and shapes
# (with the kinds that name them) more than colours and counts, which were learnt first.
SINGLE_WEIGHTS = {"colour": 0.7, "shape": 2.0, "count": 0.8, "position": 2.0, "size": 0.6, "background": 0.5,
                  "yesno": 2.0, "description": 1.5}
MULTI_WEIGHTS = {"total": 1.0, "nth": 1.5, "more": 1.0, "same": 1.5, "difference": 2.0, "latest": 0.7}
# pictures added between turns: the question that comes with a new picture, and a follow-up
WITH_NEW_PICTURE = {"latest": 2.0, "earlier": 1.0, "more": 1.0, "same": 1.0, "total": 1.0}
FOLLOW_UP = {"earlier": 2.0, "nth": 1.0, "same": 1.0, "difference": 1.0, "total": 1.0}


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str
    kind: str
    images: tuple[Spec, ...] = ()  # attached (in this order) just before the question


def to_conversation(turns: list[Turn], template: Template, answers: list[str] | None = None,
                    upto: int | None = None) -> Conversation:
    """The chat conversation of `turns[:upto]` (all by default), built with the calls chat.py
    makes (add_image, ask, add_answer); answers replace the canonical ones (the model's own, as
    in a real chat). With upto, turn `upto` is asked and left open for the model to answer."""
    conv = Conversation(template)
    for i, turn in enumerate(turns if upto is None else turns[: upto + 1]):
        for image in turn.images:
            conv.add_image(image)
        conv.ask(turn.question)
        if upto is None or i < upto:
            conv.add_answer(turn.answer if answers is None else answers[i])
    return conv


# ---- pictures that are worth comparing ------------------------------------------------------------
def changed(spec: Spec, rng: random.Random, **values) -> Spec:
    """Another picture of `spec` with some attributes set: its shapes in new cells, a new seed."""
    count = values.get("count", spec.count)
    return replace(spec, **values, cells=tuple(sorted(rng.sample(range(9), count))), seed=rng.randrange(2**31))


def variant(spec: Spec, rng: random.Random) -> Spec:
    """A new picture like `spec` but for 1-3 of colour, shape, count, size and background."""
    attributes = rng.sample(VARIED, rng.randint(1, 3))
    return changed(spec, rng, **{a: rng.choice([v for v in VALUES[a] if v != getattr(spec, a)]) for a in attributes})


def sample_pictures(n: int, rng: random.Random) -> list[Spec]:
    """n pictures; most are variants of an earlier one, so that "same colour?" is often yes."""
    pictures = [synthetic.sample_spec(rng)]
    while len(pictures) < n:
        pictures.append(variant(rng.choice(pictures), rng) if rng.random() < 0.6 else synthetic.sample_spec(rng))
    return pictures


def difference_text(a: Spec, b: Spec) -> str:
    """"colour: yellow vs green, count: 1 vs 3" (attributes in VARIED order); "only the positions"."""
    parts = [f"{attr}: {getattr(a, attr)} vs {getattr(b, attr)}" for attr in VARIED if getattr(a, attr) != getattr(b, attr)]
    if parts:
        return ", ".join(parts)
    return "nothing" if a.cells == b.cells else "only the positions"


# ---- questions about several pictures -------------------------------------------------------------
def _pair_words(n: int, i: int, j: int) -> tuple[str, str]:
    """('the two pictures', 'both pictures') for a pair of two; else named by ordinals."""
    if n == 2:
        return "the two pictures", "both pictures"
    both = f"the {ORDINALS[i]} and the {ORDINALS[j]} picture"
    return both, both


def total_question(pictures: list[Spec], rng: random.Random | None = None) -> tuple[str, str]:
    """How many shapes (or stars...) in all pictures; rng=None: the canonical question."""
    n, total = len(pictures), str(sum(p.count for p in pictures))
    if rng is None:
        return "How many shapes are there in all?", total
    if rng.random() < 0.3:  # one kind of shape, which may be in none of the pictures
        shape = rng.choice([p.shape for p in pictures] + list(synthetic.SHAPES))
        asked = str(sum(p.count for p in pictures if p.shape == shape))
        return rng.choice([f"How many {PLURALS[shape]} are there in all?", f"How many {PLURALS[shape]} are there in total?"]), asked
    phrasings = ["How many shapes are there in all?", "How many shapes are there in total?",
                 "How many shapes do you see altogether?", "How many shapes are in the pictures?",
                 "How many shapes are in both pictures?" if n == 2 else f"How many shapes are in the {COUNT_WORDS[n]} pictures?"]
    return rng.choice(phrasings), total


def more_question(pictures: list[Spec], i: int, j: int, rng: random.Random | None = None) -> tuple[str, str]:
    """Which of two pictures has more (or fewer) shapes: "the second" or "the same number"."""
    fewer = rng is not None and rng.random() < 0.3
    a, b = pictures[i].count, pictures[j].count
    winner = (i if a < b else j) if fewer else (i if a > b else j)
    answer = SAME_NUMBER if a == b else f"the {ORDINALS[winner]}"
    word = "fewer" if fewer else "more"
    if len(pictures) == 2:
        question = "Which picture has more shapes?" if rng is None else rng.choice(
            [f"Which picture has {word} shapes?", f"Which of the two pictures has {word} shapes?"])
    else:
        question = f"Which has {word} shapes, the {ORDINALS[i]} or the {ORDINALS[j]} picture?"
    return question, answer


def same_question(pictures: list[Spec], i: int, j: int, attribute: str, rng: random.Random | None = None) -> tuple[str, str]:
    """Do two pictures share an attribute? "yes" / "no"; for backgrounds the two first, then the
    verdict ("white and gray, so no"): the demo model names each background but did not learn
    to compare two of them (at chance); comparing two words it has just written, it does (98.7%;
    docs/FINETUNE.md, "same")."""
    pair, both = _pair_words(len(pictures), i, j)
    phrasings = {
        "colour": [f"Are the shapes in {pair} the same colour?", f"Do {pair} have the same colour?"],
        "shape": [f"Do {pair} show the same shape?", f"Is the shape the same in {both}?"],
        "count": [f"Do {pair} have the same number of shapes?", f"Is the number of shapes the same in {both}?"],
        "size": [f"Are the shapes in {pair} the same size?", f"Do {pair} have shapes of the same size?"],
        "background": [f"Do {pair} have the same background?", f"Is the background the same in {both}?"],
    }[attribute]
    first, second = getattr(pictures[i], attribute), getattr(pictures[j], attribute)
    verdict = "yes" if first == second else "no"
    answer = f"{first} and {second}, so {verdict}" if attribute in REASONED else verdict
    return (phrasings[0] if rng is None else rng.choice(phrasings)), answer


def difference_question(pictures: list[Spec], i: int, j: int, rng: random.Random | None = None) -> tuple[str, str]:
    pair, _ = _pair_words(len(pictures), i, j)
    phrasings = [f"What is the difference between {pair}?", f"How do {pair} differ?", f"What differs between {pair}?"]
    return (phrasings[0] if rng is None else rng.choice(phrasings)), difference_text(pictures[i], pictures[j])


@dataclass(frozen=True)
class Mix:
    """Which kinds training asks: all of them, or a subset (data.kinds=[colour,count]); and the
    share of conversations with pictures attached together that start from a minimal pair
    (data.minimal_pairs, see minimal_pair)."""

    kinds: frozenset[str] = frozenset(ALL_KINDS)
    minimal_pairs: float = 0.0

    def pick(self, weights: dict[str, float], rng: random.Random) -> str:
        allowed = {k: w for k, w in weights.items() if k in self.kinds}
        return rng.choices(list(allowed), list(allowed.values()))[0]

    def has(self, weights: dict[str, float]) -> bool:
        return any(k in self.kinds for k in weights)


def multi_turn(pictures: list[Spec], kind: str, rng: random.Random, mix: Mix = Mix()) -> Turn:
    """A training question of a multi-picture kind about the pictures so far (at least two)."""
    n = len(pictures)
    i, j = sorted(rng.sample(range(n), 2)) if rng.random() < 0.5 else (n - 2, n - 1)  # any pair, or the last two
    if kind == "total":
        q, a = total_question(pictures, rng)
    elif kind in ("nth", "earlier"):
        k = rng.randrange(n - 1) if kind == "earlier" else rng.randrange(n)
        q, a = synthetic.ask(pictures[k], mix.pick(SINGLE_WEIGHTS, rng), rng, ref=ORDINALS[k])
    elif kind == "more":
        q, a = more_question(pictures, i, j, rng)
    elif kind == "same":  # the answer is chosen first, so yes and no come equally often
        want = rng.choice(("yes", "no"))
        options = [(x, y, attr) for x in range(n) for y in range(x + 1, n) for attr in VARIED
                   if (getattr(pictures[x], attr) == getattr(pictures[y], attr)) == (want == "yes")]
        x, y, attr = rng.choice(options) if options else (i, j, rng.choice(VARIED))
        q, a = same_question(pictures, x, y, attr, rng)
    elif kind == "difference":
        q, a = difference_question(pictures, i, j, rng)
    elif kind == "latest":
        q, a = synthetic.ask(pictures[-1], mix.pick(SINGLE_WEIGHTS, rng), rng)
    else:
        raise ValueError(kind)
    return Turn(q, a, kind)


# ---- training conversations -----------------------------------------------------------------------
def _about(spec: Spec, kind: str, rng: random.Random, mix: Mix) -> list[Turn]:
    """A question of `kind` about the latest picture. A yes/no claim follows the plain question
    about its attribute 30% of the time: with the answer in the text, the comparison is easier
    to learn (a small tiny-Llama learns text-to-text equality in ~200 steps)."""
    if kind != "yesno":
        return [Turn(*synthetic.ask(spec, kind, rng), kind)]
    attribute = rng.choice(synthetic.ATTRIBUTES)
    first = [Turn(*synthetic.ask(spec, attribute, rng), attribute)] if attribute in mix.kinds and rng.random() < 0.3 else []
    return first + [Turn(*synthetic.claim(spec, attribute, rng.random() < 0.5, rng), kind)]


def _single_picture(rng: random.Random, max_turns: int, mix: Mix) -> list[Turn]:
    spec = synthetic.sample_spec(rng)
    turns = [t for _ in range(rng.randint(1, max_turns)) for t in _about(spec, mix.pick(SINGLE_WEIGHTS, rng), rng, mix)]
    turns[0] = replace(turns[0], images=(spec,))
    if rng.random() < 0.05:  # "Hi" first, then the picture
        greetings = [d[0] for d in synthetic.text_dialogues() if len(d) == 1 and d[0][1] == synthetic.GREETING]
        turns.insert(0, Turn(*rng.choice(greetings), "text"))
    return turns


def _pictures_together(rng: random.Random, max_turns: int, mix: Mix) -> list[Turn]:
    """2-4 pictures attached at once (chat.images=[a,b] or several /image), then questions; or,
    for a share mix.minimal_pairs of them, a minimal pair asked "same ...?" first."""
    if mix.minimal_pairs and "same" in mix.kinds and rng.random() < mix.minimal_pairs:
        pictures, first = minimal_pair(rng)
        turns = [first] + [multi_turn(pictures, mix.pick(MULTI_WEIGHTS, rng), rng, mix) for _ in range(rng.randint(0, max_turns - 1))]
    else:
        pictures = sample_pictures(rng.choice((2, 2, 3, 4)), rng)
        turns = [multi_turn(pictures, mix.pick(MULTI_WEIGHTS, rng), rng, mix) for _ in range(rng.randint(1, max_turns))]
    turns[0] = replace(turns[0], images=tuple(pictures))
    return turns


def minimal_pair(rng: random.Random) -> tuple[list[Spec], Turn]:
    """Two pictures that differ in the attribute asked about or not (yes and no equally often)
    and, independently, half the time in one other attribute -> (pictures, "same <attribute>?").
    Backgrounds are asked half the time: the demo model of 2026-12-02 compared every attribute
    but the background, whose answer followed whether the counts differed
    (bench/demo_experiments/probe_same_bg.py)."""
    others = [a for a in VARIED if a != "background"]
    attribute = "background" if rng.random() < 0.5 else rng.choice(others)
    first = synthetic.sample_spec(rng)
    changes = [attribute] if rng.random() < 0.5 else []
    if rng.random() < 0.5:
        changes.append(rng.choice([a for a in VARIED if a != attribute]))
    pictures = [first, changed(first, rng, **{a: rng.choice([v for v in VALUES[a] if v != getattr(first, a)]) for a in changes})]
    return pictures, Turn(*same_question(pictures, 0, 1, attribute, rng), "same")


def _pictures_between_turns(rng: random.Random, mix: Mix) -> list[Turn]:
    """A picture, a question or two, the next picture, ...: questions about the latest picture,
    about earlier ones by name, and across all of them."""
    pictures = sample_pictures(rng.choice((2, 2, 3, 4)), rng)
    turns = []
    for n in range(1, len(pictures) + 1):
        shown = pictures[:n]
        if n == 1:
            asked = _about(shown[0], mix.pick(SINGLE_WEIGHTS, rng), rng, mix)
        else:
            asked = [multi_turn(shown, mix.pick(WITH_NEW_PICTURE, rng), rng, mix)]
        turns += [replace(asked[0], images=(shown[-1],)), *asked[1:]]
        if n > 1 and mix.has(FOLLOW_UP) and rng.random() < 0.6:
            turns.append(multi_turn(shown, mix.pick(FOLLOW_UP, rng), rng, mix))
    return turns


def sample_dialogue(rng: random.Random, text_fraction: float = 0.08, multi_fraction: float = 0.5,
                    max_turns: int = 4, mix: Mix = Mix()) -> list[Turn]:
    """A random training conversation: text-only, one picture with 1-max_turns questions, or
    2-4 pictures, either attached together (1-max_turns questions) or one by one between
    turns (a question or two after each). `mix` limits the kinds asked (it must allow at least
    one single-picture kind; without multi-picture kinds every conversation has one picture)."""
    r = rng.random()
    if r < text_fraction:
        return [Turn(user, assistant, "text") for user, assistant in rng.choice(synthetic.text_dialogues())]
    together, between = mix.has(MULTI_WEIGHTS), mix.has(WITH_NEW_PICTURE)
    if r < text_fraction + multi_fraction and (together or between):
        if together and (not between or rng.random() < 0.5):
            return _pictures_together(rng, max_turns, mix)
        return _pictures_between_turns(rng, mix)
    return _single_picture(rng, max_turns, mix)


# ---- held-out conversations -----------------------------------------------------------------------
CORE = ("colour", "shape", "count", "position")  # what nth / earlier / latest questions ask, in turn


def _core_question(spec: Spec, i: int, ref: str | None = None) -> Turn:
    """The canonical question of the i-th CORE kind about one picture."""
    kind = CORE[i % len(CORE)]
    return next(Turn(q, a, kind) for q, a, k in synthetic.questions(spec, ref=ref) if k == kind)


def heldout_dialogues(kind: str, n: int, seed: int) -> list[list[Turn]]:
    """n conversations whose last turn asks the canonical question of `kind` (the one scored);
    pictures from `seed`, which training never uses. Single-picture kinds ask about the pictures
    of synthetic.sample_specs(n, seed), as before multi-picture kinds existed."""
    if kind in synthetic.KINDS:
        out = []
        for spec in synthetic.sample_specs(n, seed):
            question, answer = next((q, a) for q, a, k in synthetic.questions(spec) if k == kind)
            out.append([Turn(question, answer, kind, (spec,))])
        return out
    if kind not in MULTI_KINDS:
        raise ValueError(kind)
    rng = random.Random(f"heldout:{kind}:{seed}")
    out = []
    for i in range(n):
        pictures = sample_pictures(2 if kind in ("more", "same", "difference", "earlier", "latest") else 2 + i % 3, rng)
        if kind == "total":
            turns = [Turn(*total_question(pictures), kind)]
        elif kind == "nth":
            k = i % len(pictures)
            turns = [replace(_core_question(pictures[k], i // 3, ORDINALS[k]), kind=kind)]
        elif kind == "more":  # the first, the second and the same number equally often
            a, b = sorted(rng.sample(range(1, 5), 2), reverse=i % 3 == 1)
            pictures = [changed(pictures[0], rng, count=a), changed(pictures[1], rng, count=a if i % 3 == 0 else b)]
            turns = [Turn(*more_question(pictures, 0, 1), kind)]
        elif kind == "same":  # yes for even i, no for odd i; the attribute rotates
            attribute = VARIED[(i // 2) % len(VARIED)]
            value = getattr(pictures[0], attribute)
            if i % 2:
                value = rng.choice([v for v in VALUES[attribute] if v != value])
            pictures[1] = changed(pictures[1], rng, **{attribute: value})
            turns = [Turn(*same_question(pictures, 0, 1, attribute), kind)]
        elif kind == "difference":
            turns = [Turn(*difference_question(pictures, 0, 1), kind)]
        else:  # earlier, latest: a picture and a question, the next picture and a question (, then the first again)
            turns = [_core_question(pictures[0], i), replace(_core_question(pictures[1], i + 1), kind="latest")]
            if kind == "earlier":
                turns.append(replace(_core_question(pictures[0], i + 2, "first"), kind=kind))
        turns[0] = replace(turns[0], images=(pictures[0],) if kind in ("earlier", "latest") else tuple(pictures))
        if kind in ("earlier", "latest"):
            turns[1] = replace(turns[1], images=(pictures[1],))
        out.append(turns)
    return out


# ---- the tiny tokenizer's corpus -----------------------------------------------------------------
def tokenizer_texts() -> list[str]:
    """Every kind of text the demo data produces (for training the tiny tokenizer): questions
    about one picture in every phrasing, conversations about several pictures, text-only chat."""
    texts = []
    for i, spec in enumerate(synthetic.sample_specs(400, seed=7)):
        texts.append(synthetic.describe(spec))
        ref = None if i % 2 else ORDINALS[i // 2 % len(ORDINALS)]
        for question, answer, _ in synthetic.questions(spec, all_phrasings=True, rng=random.Random(spec.seed), ref=ref):
            texts.extend([question, answer])
    for i in range(2000):
        texts.extend(text for turn in sample_dialogue(random.Random(f"tokenizer:{i}")) for text in (turn.question, turn.answer))
    for dialogue in synthetic.text_dialogues():
        for user, assistant in dialogue:
            texts.extend([user, assistant])
    return texts
