"""Fine-tuning data as (prompt, target, images) examples: cc_sbu_align, CSV files, synthetic.

Every example is a Conversation rendered by conversation.py, in one of two styles:
    stage2  Conversation.stage2_prompt(), the official alignment prompt:
            "###Human: <Img><ImageHere></Img> {instruction} ###Assistant: " (no system text), target + "###"
    chat    Conversation.prompt(): exactly what chat.py and evaluate.py send, so a
            model fine-tuned this way sees its training prompts at inference.
CSV files are read by prompt_files.py, the reader evaluate.py uses.
Images are references (a file path, or a synthetic Spec) that `open_image` turns into a
picture; training decides when to open them (or to use cached features instead).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from minigpt4.conversation import (
    STAGE2_INSTRUCTIONS,
    Conversation,
    Template,
    build_prompt,
)
from minigpt4.data import dialogues, synthetic
from minigpt4.errors import UserError
from minigpt4.images import load_image
from minigpt4.prompt_files import image_paths, read_prompt_csv
from minigpt4.settings import DataOptions

log = logging.getLogger(__name__)

ImageRef = str | synthetic.Spec  # a file path, or the spec of a synthetic picture
STYLES = ("stage2", "chat")


@dataclass
class Example:
    prompt: str  # with one <ImageHere> per image, in order
    target: str  # the answer (the end marker "###" is added when encoding)
    images: list[ImageRef] = field(default_factory=list)
    row: str = ""  # where it came from, for messages about bad rows
    conversation: Conversation | None = None  # a whole dialogue ending in `target`: every answer trains


@dataclass
class BadRow:
    row: str
    reason: str


def open_image(ref: ImageRef, picture_size: int = 224) -> Image.Image:
    """A reference -> an RGB picture (UserError for a missing or unreadable file)."""
    if isinstance(ref, synthetic.Spec):
        return synthetic.make_picture(ref, picture_size)
    return load_image(ref)


def render(conv: Conversation, style: str) -> str:
    """The example's prompt in the chosen style."""
    return conv.stage2_prompt() if style == "stage2" else conv.prompt()


def check_style(style: str) -> str:
    if style not in STYLES:
        raise UserError(f"data.style={style}: choose one of {list(STYLES)}")
    return style


# ---- cc_sbu_align -------------------------------------------------------------------------------
def load_cc_sbu_align(path: str | Path, style: str, template: Template, seed: int = 0) -> tuple[list[Example], list[BadRow]]:
    """The official stage-2 folder: filter_cap.json + image/{image_id}.jpg (or .png).
    Each row gets one of the four official instructions (seeded)."""
    root = Path(path)
    ann_file = root / "filter_cap.json"
    if not ann_file.is_file():
        raise UserError(f"data.path={root}: no filter_cap.json there; point data.path at the cc_sbu_align folder")
    try:
        annotations = json.loads(ann_file.read_text())["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{ann_file}: not a cc_sbu_align annotation file ({err})") from None
    rng = random.Random(seed)
    examples, bad = [], []
    for i, ann in enumerate(annotations):
        image_id = str(ann.get("image_id", "")) if isinstance(ann, dict) else ""
        caption = str(ann.get("caption") or "").strip() if isinstance(ann, dict) else ""
        label = f"{ann_file.name}#{i} ({image_id or '?'})"
        image = next((p for p in (root / "image" / f"{image_id}{ext}" for ext in (".jpg", ".png", ".jpeg")) if p.is_file()), None)
        instruction = rng.choice(STAGE2_INSTRUCTIONS)
        if not caption:
            bad.append(BadRow(label, "empty caption"))
        elif not image_id or image is None:
            bad.append(BadRow(label, f"no image/{image_id}.jpg or .png"))
        else:
            conv = Conversation(template)
            conv.add_image(str(image))
            conv.ask(instruction)
            examples.append(Example(render(conv, style), caption, conv.images, label))
    return examples, bad


# ---- CSV ------------------------------------------------------------------------------------------
def load_csv(path: str | Path, style: str, template: Template) -> tuple[list[Example], list[BadRow]]:
    """Columns image (';'-separated paths relative to the CSV; may be empty), prompt (may hold
    <image> markers), answer."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data.path={path}: no such CSV file")
    _, rows = read_prompt_csv(path, ["image", "prompt", "answer"], "a fine-tuning CSV has the columns image, prompt, answer")
    examples, bad = [], []
    for row in rows:
        label = f"{path.name}:{row.line}"
        answer = row.values["answer"].strip()
        images = [str(Path(p).resolve()) for p in image_paths(row.values["image"], path.parent)]
        if not answer:
            bad.append(BadRow(label, "empty answer"))
            continue
        absent = [p for p in images if not Path(p).is_file()]
        if absent:
            bad.append(BadRow(label, f"no such image {absent[0]}"))
            continue
        try:
            conv = build_prompt(template, row.values["prompt"], images)
        except UserError as err:
            bad.append(BadRow(label, str(err)))
            continue
        examples.append(Example(render(conv, style), answer, images, label))
    return examples, bad


# ---- synthetic ------------------------------------------------------------------------------------
class SyntheticExamples(Sequence[Example]):
    """`size` seeded examples, each built on demand from (seed, index) by dialogues.sample_dialogue:
    a text-only dialogue, one picture, or 2-4 pictures, with 1-max_turns questions; the whole
    conversation comes with the example (`conversation`), so every answer in it is trained."""

    def __init__(self, size: int, seed: int, style: str, template: Template, text_fraction: float = 0.08,
                 max_turns: int = 4, multi_fraction: float = 0.5, kinds: Sequence[str] | None = None,
                 minimal_pairs: float = 0.0):
        self.size, self.seed, self.style, self.template = size, seed, style, template
        self.text_fraction, self.max_turns, self.multi_fraction = text_fraction, max_turns, multi_fraction
        if not 0.0 <= minimal_pairs <= 1.0:
            raise UserError(f"data.minimal_pairs={minimal_pairs}: a share, between 0 and 1")
        self.mix = dialogues.Mix(frozenset(check_kinds(kinds)), minimal_pairs)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = random.Random(f"{self.seed}:{index}")
        label = f"synthetic#{index}"
        if self.style == "stage2":
            conv = Conversation(self.template)
            spec = synthetic.sample_spec(rng)
            conv.add_image(spec)
            conv.ask(rng.choice(STAGE2_INSTRUCTIONS))
            return Example(conv.stage2_prompt(), synthetic.describe(spec), conv.images, label)
        turns = dialogues.sample_dialogue(rng, self.text_fraction, self.multi_fraction, self.max_turns, self.mix)
        conv = dialogues.to_conversation(turns, self.template)
        prompt = dialogues.to_conversation(turns, self.template, upto=len(turns) - 1).prompt()
        return Example(prompt, turns[-1].answer, conv.images, label, conv)


def check_kinds(kinds: str | Sequence[str] | None) -> tuple[str, ...]:
    """data.kinds (all, or a list of dialogues.ALL_KINDS with at least one single-picture kind) -> kinds."""
    if kinds is None or kinds == "all":
        return dialogues.ALL_KINDS
    kinds = tuple(k.strip() for k in kinds.split(",")) if isinstance(kinds, str) else tuple(kinds)
    unknown = sorted(set(kinds) - set(dialogues.ALL_KINDS))
    if unknown or not set(kinds) & set(synthetic.KINDS):
        problem = f"unknown {unknown}" if unknown else "no single-picture kind"
        raise UserError(f"data.kinds={list(kinds)}: {problem}; choose all or from {list(dialogues.ALL_KINDS)}, "
                        f"with at least one of {list(synthetic.KINDS)}")
    return kinds


# ---- from a config ----------------------------------------------------------------------------------
def build_examples(data: DataOptions, template: Template, seed: int) -> tuple[Sequence[Example], list[BadRow]]:
    """conf/data/*.yaml (settings.DataOptions) -> (examples, rows skipped before any image is opened)."""
    style = check_style(str(data.style))
    name = str(data.name)
    if name == "synthetic":
        return SyntheticExamples(int(data.size), int(data.seed), style, template, float(data.text_fraction),
                                 int(data.max_turns), float(data.multi_fraction if data.multi_fraction is not None else 0.5),
                                 data.kinds, float(data.minimal_pairs or 0.0)), []
    if data.path in (None, "", "???"):
        raise UserError(f"data={name} needs data.path=/path/to/the/data")
    if name == "cc_sbu_align":
        return load_cc_sbu_align(data.path, style, template, seed)
    if name == "csv":
        return load_csv(data.path, style, template)
    raise UserError(f"data.name={name}: choose synthetic, cc_sbu_align or csv")
