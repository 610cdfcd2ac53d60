"""The one place prompts are built: templates, turns, images, token segments and labels.

Chat, evaluation and fine-tuning all build their model inputs here, so an inference prompt
and a training example of the same turns tokenize identically.

Official Vicuna v0 prompt (v1 code, 2023-05-01), for one image and one question:
    Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I
    provide it to you. Please answer my questions.###Human: <Img><ImageHere></Img> Describe this
    image.###Assistant:
The prompt is split on <ImageHere>; each text segment is tokenized on its own, BOS only on the
first; each image contributes num_image_tokens soft tokens (IMAGE_TOKEN slots) between them.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from minigpt4.errors import UserError
from minigpt4.model import IMAGE_TOKEN

IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_MESSAGE = "<Img><ImageHere></Img>"
USER, ASSISTANT = 0, 1

OFFICIAL_SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. "
    "You will be able to see the image once I provide it to you. Please answer my questions."
)
TEXT_ONLY_SYSTEM = "A chat between a curious human and an artificial intelligence assistant. Please answer my questions."

# Stage-2 fine-tuning prompts (official alignment recipe): wrapped as STAGE2_WRAP, target + "###".
STAGE2_WRAP = "###Human: {} ###Assistant: "
STAGE2_INSTRUCTIONS = (
    "<Img><ImageHere></Img> Describe this image in detail.",
    "<Img><ImageHere></Img> Take a look at this image and describe what you notice.",
    "<Img><ImageHere></Img> Please provide a detailed description of the picture.",
    "<Img><ImageHere></Img> Could you describe the contents of this image for me?",
)


@dataclass(frozen=True)
class Template:
    """How turns become a prompt string (the official Conversation with SINGLE separators)."""

    name: str
    roles: tuple[str, str]  # prefixes, e.g. ("Human: ", "Assistant: ")
    sep: str  # after each finished message
    system: str = OFFICIAL_SYSTEM
    system_text_only: str | None = TEXT_ONLY_SYSTEM  # used while no image is in the conversation
    strip_open_role: bool = False  # v1 ends the prompt "###Assistant:" (no trailing space)
    stop: tuple[str, ...] = ("###",)
    answer_prefix: str = "Assistant:"  # the official clean-up keeps the text after the last one

    def with_overrides(self, **kwargs) -> "Template":
        fields = {k: v for k, v in kwargs.items() if v is not None}
        return Template(**{**self.__dict__, **fields})


TEMPLATES = {
    # canonical v1 code (commit 22d8888): "Role: message###", open turn "Assistant:"
    "vicuna_v0": Template("vicuna_v0", ("Human: ", "Assistant: "), "###", strip_open_role=True),
    # later code (2023-08 onwards): identical but the open turn keeps its trailing space
    "vicuna_v0_later": Template("vicuna_v0_later", ("Human: ", "Assistant: "), "###"),
    "llama2": Template("llama2", ("<s>[INST] ", " [/INST] "), ""),
}


def get_template(name: str, **overrides) -> Template:
    if name not in TEMPLATES:
        raise UserError(f"unknown template {name!r}: choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name].with_overrides(**overrides)


@dataclass
class Conversation:
    """Messages in the official form (an image is a user message "<Img><ImageHere></Img>", a
    question right after it is appended with a space) plus the images in prompt order."""

    template: Template
    messages: list[list[Any]] = field(default_factory=list)  # [role, text]
    images: list[Any] = field(default_factory=list)  # whatever identifies an image (path, tensor)

    # ---- building -------------------------------------------------------------------------
    def add_image(self, image: Any) -> None:
        self.images.append(image)
        self.messages.append([USER, IMAGE_MESSAGE])

    def ask(self, text: str) -> None:
        if IMAGE_PLACEHOLDER in text:  # it would split the prompt into an image slot with no image
            raise UserError(f"a message may not contain {IMAGE_PLACEHOLDER}: attach images instead (/image PATH)")
        last = self.messages[-1] if self.messages else None
        if last is not None and last[0] == USER and last[1].endswith("</Img>"):
            last[1] = " ".join([last[1], text])
        else:
            self.messages.append([USER, text])

    def add_answer(self, text: str) -> None:
        self.messages.append([ASSISTANT, text])

    def copy(self) -> "Conversation":
        return Conversation(self.template, copy.deepcopy(self.messages), list(self.images))

    # ---- rendering ------------------------------------------------------------------------
    def system(self) -> str:
        if not self.images and self.template.system_text_only is not None:
            return self.template.system_text_only
        return self.template.system

    def prompt(self, open_answer: bool = True) -> str:
        """The prompt string; with open_answer it ends with the assistant role, ready to generate."""
        t = self.template
        out = self.system() + t.sep
        for role, text in self.messages:
            out += t.roles[role] + text + t.sep
        if open_answer:
            out += t.roles[ASSISTANT].rstrip() if t.strip_open_role else t.roles[ASSISTANT]
        return out

    # ---- context limit --------------------------------------------------------------------
    def turn_starts(self) -> list[int]:
        """Message indices where a turn (user messages + the answer to them) begins."""
        starts = []
        for i, (role, _) in enumerate(self.messages):
            if role == USER and (i == 0 or self.messages[i - 1][0] == ASSISTANT):
                starts.append(i)
        return starts

    def drop_oldest_turn(self) -> bool:
        """Remove the oldest whole turn with its images; False when only the current turn is left."""
        starts = self.turn_starts()
        if len(starts) < 2:
            return False
        cut = starts[1]
        n_images = sum(text.count(IMAGE_PLACEHOLDER) for _, text in self.messages[:cut])
        del self.messages[:cut]
        del self.images[:n_images]
        return True

    # ---- persistence ----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "template": self.template.name,
            "messages": [{"role": ["user", "assistant"][r], "text": t} for r, t in self.messages],
            "images": [str(i) for i in self.images],
        }

    @classmethod
    def from_json(cls, data: Any, template: Template, source: str = "conversation file") -> "Conversation":
        """The inverse of to_json. A file may have been edited by hand (or be hostile), so every
        way it can be wrong is one UserError naming `source` and the problem."""

        def bad(what: str) -> UserError:
            return UserError(f"{source}: not a saved conversation ({what})")

        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise bad('expected a JSON object with a "messages" list, as /save writes')
        messages: list[list[Any]] = []
        for n, m in enumerate(data["messages"], 1):
            if not isinstance(m, dict) or not isinstance(m.get("text"), str):
                raise bad(f'message {n} is not {{"role": ..., "text": "..."}}')
            if m.get("role") not in ("user", "assistant"):
                raise bad(f"message {n} has role {m.get('role')!r:.40}; roles are 'user' and 'assistant'")
            role = USER if m["role"] == "user" else ASSISTANT
            if role == ASSISTANT and not messages:
                raise bad("message 1 is an assistant message; a conversation starts with a user message")
            if role == ASSISTANT and messages[-1][0] == ASSISTANT:
                raise bad(f"messages {n - 1} and {n} are both assistant messages; each answer follows a user message")
            if role == ASSISTANT and IMAGE_PLACEHOLDER in m["text"]:
                raise bad(f"message {n} is an assistant message holding an image ({IMAGE_PLACEHOLDER})")
            messages.append([role, m["text"]])
        images = data.get("images", [])
        if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
            raise bad('"images" is not a list of file paths')
        placeholders = sum(t.count(IMAGE_PLACEHOLDER) for _, t in messages)
        if placeholders != len(images):
            raise bad(f"the messages hold {placeholders} image(s) ({IMAGE_PLACEHOLDER}) but \"images\" lists {len(images)}")
        return cls(template, messages, images)


def load_conversation(path: str | Path, template: Template) -> Conversation:
    """A conversation saved by /save (ChatSession.save); a bad file is a one-line UserError."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"conversation file {path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at "
                        f"offset {err.start}); give a JSON file written by /save") from None
    except RecursionError:
        raise UserError(f"conversation file {path}: not a saved conversation (JSON nested too deeply)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"conversation file {path}: cannot read ({err})") from None
    return Conversation.from_json(data, template, f"conversation file {path}")


def build_prompt(template: Template, prompt: str, n_images: int, images_first: bool = True) -> Conversation:
    """A one-question conversation from a prompt that may hold <image> markers (evaluation CSVs).

    With markers each marker becomes an image message in place; without them all images come
    first, as in the official prompts."""
    conv = Conversation(template)
    parts = prompt.split("<image>")
    if len(parts) == 1:
        for i in range(n_images):
            conv.add_image(i)
        conv.ask(prompt.strip())
        return conv
    if len(parts) - 1 != n_images:
        raise UserError(f"prompt has {len(parts) - 1} <image> markers but {n_images} images")
    for i, text in enumerate(parts):
        if text.strip():
            conv.ask(text.strip())
        if i < n_images:
            conv.add_image(i)
    return conv


# ---- token sequences ------------------------------------------------------------------------
Encoder = Callable[..., list[int]]  # Tokenizer.encode(text, bos=...)


def encode_prompt(encode: Encoder, prompt: str, num_image_tokens: int, bos: bool = True) -> list[int]:
    """Prompt string -> ids, each <ImageHere> replaced by num_image_tokens IMAGE_TOKEN slots."""
    ids: list[int] = []
    for i, segment in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
        if i:
            ids.extend([IMAGE_TOKEN] * num_image_tokens)
        ids.extend(encode(segment, bos=bos and i == 0))
    return ids


def encode_example(
    encode: Encoder,
    prompt: str,
    target: str,
    num_image_tokens: int,
    end: str = "###",
    max_target_tokens: int = 160,
) -> tuple[list[int], list[int]]:
    """(ids, labels) for teacher forcing: the target (+ end marker, truncated) is its own segment;
    labels are -100 on BOS, prompt and image positions."""
    prompt_ids = encode_prompt(encode, prompt, num_image_tokens)
    target_ids = encode(target + end, bos=False)[:max_target_tokens]
    return prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids


def pad_batch(
    sequences: list[list[int]], pad_id: int, side: str = "right", labels: list[list[int]] | None = None
) -> dict[str, torch.Tensor]:
    """Pad to one length: input_ids, attention_mask (and labels, -100 on padding)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    lab = torch.full((len(sequences), width), -100, dtype=torch.long) if labels is not None else None
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
        if lab is not None:
            lab[row, span] = torch.tensor(labels[row], dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if lab is not None:
        out["labels"] = lab
    return out


def clean_answer(text: str, template: Template) -> str:
    """The official clean-up: cut at the stop string, keep the text after the last role marker."""
    for stop in template.stop:
        text = text.split(stop)[0]
    if template.answer_prefix:
        text = text.split(template.answer_prefix)[-1]
    return text.strip()
