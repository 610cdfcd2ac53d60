"""The demo model's world: seeded pictures of simple shapes, questions with exact answers,
descriptions and short text-only dialogues.

Everything is a pure function of a seed, so a held-out set is just another seed, and any
engineer can regenerate the exact picture a test talks about:

    specs = sample_specs(100, seed=1)          # list[Spec]
    image = make_picture(specs[0])             # PIL RGB, 224x224 by default
    for question, answer, kind in questions(specs[0]): ...
    describe(specs[0])                         # "Three small red circles on a white background."
    text_dialogues()                           # [[(user, assistant), ...], ...]

A picture holds 1-4 copies of one shape in one colour and one size, each in its own cell of a
3x3 grid, on a plain background. Answers are short and canonical (lower case, no final
period) so that exact match is a fair metric: colour "red", shape "circle", count "3",
position "top left", size "small", background "white", yes/no "yes".
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
    def from_dict(cls, d: dict) -> "Spec":
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
def _phrasings(spec: Spec, rng: random.Random | None = None) -> dict[str, list[tuple[str, str]]]:
    """kind -> [(question, answer)]; the first phrasing of each kind is the canonical one."""
    noun, it = spec.noun, ("it" if spec.count == 1 else "they")
    be = "is" if spec.count == 1 else "are"
    out = {
        "colour": [(f"What colour {be} the {noun}?", spec.colour), (f"What color {be} the {noun}?", spec.colour),
                   (f"Which colour {be} the shapes?" if spec.count > 1 else "Which colour is the shape?", spec.colour),
                   (f"What colour {be} {it}?", spec.colour)],
        "shape": [("What shape is in the picture?", spec.shape), (f"What shape {be} {it}?", spec.shape),
                  ("Which shape do you see?", spec.shape), ("What kind of shape is shown?", spec.shape)],
        "count": [("How many shapes are there?", str(spec.count)),
                  (f"How many {PLURALS[spec.shape]} are there?", str(spec.count)),
                  ("How many shapes do you see?", str(spec.count)), ("Count the shapes.", str(spec.count))],
        "background": [("What colour is the background?", spec.background),
                       ("What color is the background?", spec.background)],
    }
    if spec.count == 1:
        out["position"] = [(f"Where is the {spec.shape}?", spec.position), ("Where is the shape?", spec.position)]
        out["size"] = [(f"Is the {spec.shape} small or large?", spec.size), ("How big is the shape?", spec.size)]
    # yes/no: one true and one false claim about colour and shape
    other_colour = next(c for c in COLOURS if c != spec.colour) if rng is None else rng.choice([c for c in COLOURS if c != spec.colour])
    other_shape = next(s for s in SHAPES if s != spec.shape) if rng is None else rng.choice([s for s in SHAPES if s != spec.shape])
    out["yesno"] = [(f"Is there {_a(spec.colour)} {spec.shape}?", "yes"), (f"Is there {_a(other_colour)} {spec.shape}?", "no"),
                    (f"Is there {_a(spec.colour)} {other_shape}?", "no"), (f"Are there any {PLURALS[spec.shape]}?", "yes")]
    out["description"] = [("Describe this image.", describe(spec)), ("What is in the picture?", describe(spec)),
                          ("What do you see?", describe(spec)), ("Describe the picture.", describe(spec))]
    return out


def _a(word: str) -> str:
    """'a red', 'an orange'."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def questions(spec: Spec, all_phrasings: bool = False, rng: random.Random | None = None) -> list[tuple[str, str, str]]:
    """[(question, answer, kind)]: one canonical question per kind that applies to the picture
    (position and size only for a single shape), or every phrasing with all_phrasings (training
    draws from these with its own rng)."""
    out = []
    for kind, pairs in _phrasings(spec, rng).items():
        if not all_phrasings:  # the canonical yes/no claim is true for even seeds, false for odd ones
            pairs = pairs[spec.seed % 2 : spec.seed % 2 + 1] if kind == "yesno" else pairs[:1]
        for question, answer in pairs:
            out.append((question, answer, kind))
    return out


def describe(spec: Spec) -> str:
    """One-sentence description, e.g. "A large red circle at the top left on a white background."."""
    if spec.count == 1:
        where = "in the center" if spec.position == "center" else f"at the {spec.position}"
        return f"A {spec.size} {spec.colour} {spec.shape} {where} on a {spec.background} background."
    return f"{COUNT_WORDS[spec.count].capitalize()} {spec.size} {spec.colour} {spec.noun} on a {spec.background} background."


GREETING = "Hello! I am a tiny MiniGPT-4 demo. Show me a picture of shapes and ask me about it."
ABILITIES = ("I can describe pictures of simple shapes and answer questions about their colour, shape, "
             "count, size and position.")
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
    no_picture = ["Describe this image.", "What colour is the circle?", "How many shapes are there?"]
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


def tokenizer_texts() -> list[str]:
    """Every kind of text the demo data produces (for training the tiny tokenizer)."""
    texts = []
    for spec in sample_specs(400, seed=7):
        texts.append(describe(spec))
        for question, answer, _ in questions(spec, all_phrasings=True, rng=random.Random(spec.seed)):
            texts.extend([question, answer])
    for dialogue in text_dialogues():
        for user, assistant in dialogue:
            texts.extend([user, assistant])
    return texts
