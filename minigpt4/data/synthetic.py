"""The demo model's world: seeded pictures of simple shapes, questions with exact answers,
descriptions and short text-only dialogues (conversations over several pictures: dialogues.py).

Everything is a pure function of a seed, so a held-out set is just another seed, and any
engineer can regenerate the exact picture a test talks about:

    specs = sample_specs(100, seed=1)          # list[Spec]
    image = make_picture(specs[0])             # PIL RGB, 224x224 by default
    for question, answer, kind in questions(specs[0]): ...          # canonical, one per kind
    questions(specs[0], ref="second")          # the same, about "the second picture"
    describe(specs[0])                         # "Three small red circles on a white background."
    text_dialogues()                           # [[(user, assistant), ...], ...]

A picture holds 1-4 copies of one shape in one colour and one size, each in its own cell of a
3x3 grid, on a plain background. Answers are short and canonical (lower case, no final
period) so that exact match is a fair metric: colour "red", shape "circle", count "3",
position "top left" (several shapes: "top, center and bottom right", reading order), size
"small", background "white", yes/no "yes" (claims about any attribute, true half the time).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
SIZES = {"small": 0.10, "large": 0.15}  # shape radius as a fraction of the picture side
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
KINDS = ("colour", "shape", "count", "position", "size", "background", "yesno", "description")


@dataclass(frozen=True)
class Spec:
    """One picture. `cells` are the grid cells (0-8, row-major) holding the shapes; `seed`
    drives the small jitter of positions and shades, so the picture is a function of the spec."""

    shape: str
    colour: str
    count: int
    size: str
    background: str
    cells: tuple[int, ...]
    seed: int

    @property
    def position(self) -> str | None:
        """Where the shape is (single shapes only)."""
        return POSITIONS[self.cells[0]] if self.count == 1 else None

    @property
    def noun(self) -> str:
        return self.shape if self.count == 1 else PLURALS[self.shape]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Spec:
        return cls(**{**d, "cells": tuple(d["cells"])})


def sample_spec(rng: random.Random) -> Spec:
    count = rng.randint(1, 4)
    colour = rng.choice(list(COLOURS))
    return Spec(
        shape=rng.choice(SHAPES),
        colour=colour,
        count=count,
        size=rng.choice(list(SIZES)),
        background=rng.choice(list(BACKGROUNDS)),
        cells=tuple(sorted(rng.sample(range(9), count))),
        seed=rng.randrange(2**31),
    )


def sample_specs(n: int, seed: int = 0) -> list[Spec]:
    """n pictures; the same (n, seed) always gives the same list (a prefix of a longer one)."""
    rng = random.Random(seed)
    return [sample_spec(rng) for _ in range(n)]


# ---- drawing ----------------------------------------------------------------------------------
def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a) + r * 0.15) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(shape)


def make_picture(spec: Spec, size: int = 224) -> Image.Image:
    """The picture of a spec (RGB, size x size). Drawn at 2x and box-downsampled for smooth edges."""
    rng = random.Random(spec.seed)
    scale = 2
    side = size * scale
    shade = rng.randint(-8, 8)
    background = tuple(min(255, max(0, c + shade)) for c in BACKGROUNDS[spec.background])
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)
    colour = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[spec.colour])
    radius = SIZES[spec.size] * side
    cell = side / 3
    slack = max(0.0, cell / 2 - radius * 1.05)  # jitter that keeps every shape inside its cell
    for index in spec.cells:
        row, col = divmod(index, 3)
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        if spec.shape == "circle":
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
        else:
            draw.polygon(_polygon(spec.shape, cx, cy, radius), fill=colour)
    return image.reduce(scale)


# ---- language -----------------------------------------------------------------------------------
ATTRIBUTES = ("colour", "shape", "count", "position", "size", "background")  # what yes/no claims are about


def _a(word: str) -> str:
    """'a red', 'an orange'."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _listed(words: list[str]) -> str:
    """['a'] -> 'a'; ['a', 'b', 'c'] -> 'a, b and c'."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def positions_text(spec: Spec) -> str:
    """Where the shapes are, in reading order: "top left" or "top, center and bottom right"."""
    return _listed([POSITIONS[c] for c in spec.cells])


def _at(position: str) -> str:
    return "in the center" if position == "center" else f"at the {position}"


def claim(spec: Spec, attribute: str, true: bool, rng: random.Random, ref: str | None = None) -> tuple[str, str]:
    """A yes/no question claiming something about `attribute` (one of ATTRIBUTES), true or false
    as asked; a false claim names a value drawn with `rng` from those the picture does not have."""
    inp = "" if ref is None else f" in the {ref} picture"
    noun, be = spec.noun, ("is" if spec.count == 1 else "are")

    def pick(actual, choices):
        return actual if true else rng.choice([c for c in choices if c != actual])

    if attribute == "colour":
        colour = pick(spec.colour, list(COLOURS))
        question = rng.choice([f"{be.capitalize()} the {noun}{inp} {colour}?", f"Is there {_a(colour)} {spec.shape}{inp}?"])
    elif attribute == "shape":
        shape = pick(spec.shape, SHAPES)
        question = rng.choice([f"Is there {_a(shape)}{inp}?", f"Are there any {PLURALS[shape]}{inp}?"])
    elif attribute == "count":
        n = pick(spec.count, list(COUNT_WORDS))
        question = f"Is there only one shape{inp}?" if n == 1 else f"Are there {COUNT_WORDS[n]} shapes{inp}?"
    elif attribute == "position":
        occupied = [POSITIONS[c] for c in spec.cells]
        position = rng.choice(occupied) if true else rng.choice([p for p in POSITIONS if p not in occupied])
        question = f"Is there a shape {_at(position)}{inp}?"
    elif attribute == "size":
        question = f"{be.capitalize()} the {noun}{inp} {pick(spec.size, list(SIZES))}?"
    elif attribute == "background":
        question = f"Is the background{inp} {pick(spec.background, list(BACKGROUNDS))}?"
    else:
        raise ValueError(attribute)
    return question, "yes" if true else "no"


def _phrasings(spec: Spec, ref: str | None = None) -> dict[str, list[tuple[str, str]]]:
    """kind -> [(question, answer)] about one picture; the first phrasing of each kind is the
    canonical one. ref=None asks about the latest picture ("the picture", "it"); ref="second"
    about the second picture of the conversation ("in the second picture")."""
    noun, shapes = spec.noun, PLURALS[spec.shape]
    be = "is" if spec.count == 1 else "are"
    pic = "the picture" if ref is None else f"the {ref} picture"
    inp = "" if ref is None else f" in the {ref} picture"
    it = [] if ref is not None else [("it" if spec.count == 1 else "they")]
    where = f"Where {be} the {noun}{inp}?"
    out = {
        "colour": [(f"What colour {be} the {noun}{inp}?", spec.colour), (f"What color {be} the {noun}{inp}?", spec.colour),
                   (f"Which colour {be} the {'shape' if spec.count == 1 else 'shapes'}{inp}?", spec.colour)]
                  + [(f"What colour {be} {w}?", spec.colour) for w in it],
        "shape": [(f"What shape is in {pic}?", spec.shape), (f"Which shape do you see{inp}?", spec.shape),
                  (f"What kind of shape is shown{inp}?", spec.shape)] + [(f"What shape {be} {w}?", spec.shape) for w in it],
        "count": [(f"How many shapes are there{inp}?", str(spec.count)), (f"How many {shapes} are there{inp}?", str(spec.count)),
                  (f"How many shapes do you see{inp}?", str(spec.count)), (f"Count the shapes{inp}.", str(spec.count))],
        "position": [(where, positions_text(spec)),
                     (f"Where {be} the {'shape' if spec.count == 1 else 'shapes'}{inp}?", positions_text(spec)),
                     (f"Where {be} the {spec.colour} {noun}{inp}?", positions_text(spec)),
                     (f"In which part of {pic} {be} the {noun}?", positions_text(spec))],
        "size": [(f"{be.capitalize()} the {noun}{inp} small or large?", spec.size), (f"How big {be} the {noun}{inp}?", spec.size),
                 (f"What size {be} the {noun}{inp}?", spec.size)],
        "background": [(f"What colour is the background{inp}?", spec.background),
                       (f"What color is the background{inp}?", spec.background)],
        "description": ([("Describe this image.", describe(spec)), ("What is in the picture?", describe(spec)),
                         ("What do you see?", describe(spec)), ("Describe the picture.", describe(spec))] if ref is None else
                        [(f"Describe the {ref} picture.", describe(spec)), (f"What is in the {ref} picture?", describe(spec))]),
    }
    return out


def canonical_claim(spec: Spec, ref: str | None = None) -> tuple[str, str]:
    """The held-out yes/no question of a picture: the attribute, and whether the claim is true,
    follow from the spec's seed, so a set of pictures asks about every attribute with balanced answers."""
    attribute = ATTRIBUTES[spec.seed % len(ATTRIBUTES)]
    return claim(spec, attribute, (spec.seed // len(ATTRIBUTES)) % 2 == 0, random.Random(spec.seed), ref)


def ask(spec: Spec, kind: str, rng: random.Random, ref: str | None = None) -> tuple[str, str]:
    """One (question, answer) of `kind` about `spec` in a random phrasing (training); yes/no
    questions are about a random attribute and true half of the time."""
    if kind == "yesno":
        return claim(spec, rng.choice(ATTRIBUTES), rng.random() < 0.5, rng, ref)
    return rng.choice(_phrasings(spec, ref)[kind])


def questions(spec: Spec, all_phrasings: bool = False, rng: random.Random | None = None,
              ref: str | None = None) -> list[tuple[str, str, str]]:
    """[(question, answer, kind)] about one picture, one per kind (KINDS order): the canonical
    question of each kind, or with all_phrasings every phrasing (yes/no: a true and a false claim
    about each attribute, false values drawn with `rng`)."""
    phrasings, out = _phrasings(spec, ref), []
    for kind in KINDS:
        if kind == "yesno":
            claims = [(attribute, true) for attribute in ATTRIBUTES for true in (True, False)]
            pairs = ([claim(spec, a, t, rng or random.Random(spec.seed), ref) for a, t in claims] if all_phrasings
                     else [canonical_claim(spec, ref)])
        else:
            pairs = phrasings[kind] if all_phrasings else phrasings[kind][:1]
        out += [(question, answer, kind) for question, answer in pairs]
    return out


def describe(spec: Spec) -> str:
    """One-sentence description, e.g. "A large red circle at the top left on a white background."."""
    if spec.count == 1:
        return f"A {spec.size} {spec.colour} {spec.shape} {_at(spec.position)} on a {spec.background} background."
    return f"{COUNT_WORDS[spec.count].capitalize()} {spec.size} {spec.colour} {spec.noun} on a {spec.background} background."


GREETING = "Hello! I am a tiny MiniGPT-4 demo. Show me a picture of shapes and ask me about it."
ABILITIES = ("I can describe pictures of simple shapes and answer questions about their colour, shape, "
             "count, size and position, and compare several pictures.")
IDENTITY = "I am a tiny MiniGPT-4 demo model, trained on pictures of simple shapes."
OUT_OF_WORLD = "I am a tiny demo model: I only know about pictures of simple shapes."
NO_PICTURE = "Please show me a picture first."


def text_dialogues() -> list[list[tuple[str, str]]]:
    """Short text-only dialogues [(user, assistant), ...]: greetings, what the model can do,
    thanks, and a polite refusal for what it cannot know."""
    greet = ["Hello", "Hello!", "Hi", "Hi!", "Hey", "Hey there!", "Good morning", "Good evening", "Hello there"]
    ask_abilities = ["What can you do?", "What can you do for me?", "How can you help me?", "What do you know?"]
    ask_identity = ["Who are you?", "What are you?", "What is your name?"]
    thanks = ["Thanks!", "Thank you", "Thank you!", "Thanks a lot"]
    bye = ["Bye", "Goodbye", "Bye!", "See you"]
    unknown = ["What is the capital of France?", "Tell me a joke.", "What time is it?", "Write a poem.",
               "What is two plus two?", "Who won the football match?"]
    no_picture = ["Describe this image.", "What colour is the circle?", "How many shapes are there?",
                  "Which picture has more shapes?", "Is there a red square?"]
    dialogues: list[list[tuple[str, str]]] = []
    for g in greet:
        dialogues.append([(g, GREETING)])
        dialogues.append([(g, GREETING), (ask_abilities[len(dialogues) % len(ask_abilities)], ABILITIES)])
    for q in ask_abilities:
        dialogues.append([(q, ABILITIES)])
    for q in ask_identity:
        dialogues.append([(q, IDENTITY)])
        dialogues.append([(greet[len(dialogues) % len(greet)], GREETING), (q, IDENTITY)])
    for q in unknown:
        dialogues.append([(q, OUT_OF_WORLD)])
    for q in no_picture:
        dialogues.append([(q, NO_PICTURE)])
    for t in thanks:
        dialogues.append([(t, "You are welcome!")])
    for b in bye:
        dialogues.append([(b, "Goodbye!")])
    return dialogues
