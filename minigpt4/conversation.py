"""The one place prompts are built: templates, turns, images, token segments and labels.

Chat, evaluation and fine-tuning all build their model inputs here, so an inference prompt
and a training example of the same turns tokenize identically. A Conversation holds typed
parts (TextPart, ImagePart with whatever identifies the image); render_message is the one place
they become text, when the prompt is built, so nothing asks "is this an image?" of a string.

Official Vicuna v0 prompt (v1 code, 2023-05-01), for one image and one question:
    Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I
    provide it to you. Please answer my questions.###Human: <Img><ImageHere></Img> Describe this
    image.###Assistant:
The prompt is split on <ImageHere>; each text segment is tokenized on its own, BOS only on the
first; each image contributes num_image_tokens soft tokens (IMAGE_TOKEN slots) between them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from minigpt4.errors import UserError
from minigpt4.model import IMAGE_TOKEN

IMAGE_PLACEHOLDER = "<ImageHere>"  # where an image's soft tokens go: encode_prompt splits on it
IMAGE_MESSAGE = f"<Img>{IMAGE_PLACEHOLDER}</Img>"  # how an image is written in a message
IMAGE_MARKER = "<image>"  # how prompt files (evaluation and fine-tuning CSVs) place a row's images
USER, ASSISTANT = 0, 1

OFFICIAL_SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. "
    "You will be able to see the image once I provide it to you. Please answer my questions."
)
TEXT_ONLY_SYSTEM = "A chat between a curious human and an artificial intelligence assistant. Please answer my questions."

# Stage-2 fine-tuning prompts (official alignment recipe): one image, then one of these
# instructions, wrapped as STAGE2_WRAP (Conversation.stage2_prompt); target + "###".
STAGE2_WRAP = "###Human: {} ###Assistant: "
STAGE2_INSTRUCTIONS = (
    "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
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

    def with_overrides(self, **kwargs) -> Template:
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


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    image: Any  # whatever identifies the image to its user: a path, an index, an encoded ChatImage


Part = TextPart | ImagePart


class Message(NamedTuple):
    """One message as typed parts; it becomes text only in render_message. A user message is
    text, an image, or an image and the question asked right after it (the official form)."""

    role: int  # USER or ASSISTANT
    parts: tuple[Part, ...]

    @property
    def images(self) -> list[Any]:
        return [p.image for p in self.parts if isinstance(p, ImagePart)]

    @property
    def text(self) -> str:
        """The message's words without its images (what a chat window shows)."""
        return " ".join(p.text for p in self.parts if isinstance(p, TextPart)).strip()


def render_message(message: Message) -> str:
    """The official text of a message: each image is IMAGE_MESSAGE, parts joined by a space."""
    return " ".join(IMAGE_MESSAGE if isinstance(p, ImagePart) else p.text for p in message.parts)


def parse_message(role: int, text: str, images: Sequence[Any] = ()) -> Message:
    """The inverse of render_message (for saved conversations); each IMAGE_MESSAGE takes the
    next of `images` (None once they run out). A text render_message would not write raises ValueError."""
    segments = text.split(IMAGE_MESSAGE)
    handles = iter(images)
    parts: list[Part] = []
    for i, segment in enumerate(segments):
        if i:
            parts.append(ImagePart(next(handles, None)))
            segment = segment.removeprefix(" ")
        if i < len(segments) - 1:
            segment = segment.removesuffix(" ")
        if segment or len(segments) == 1:
            parts.append(TextPart(segment))
    message = Message(role, tuple(parts))
    if render_message(message) != text or any(IMAGE_PLACEHOLDER in p.text for p in parts if isinstance(p, TextPart)):
        raise ValueError(f"an image is written {IMAGE_MESSAGE}, separated from the text by one space")
    return message


@dataclass
class Conversation:
    """Messages as typed parts, rendered to the official prompt only by prompt(): an image is a
    user message of its own, a question right after it joins that message."""

    template: Template
    messages: list[Message] = field(default_factory=list)

    # ---- building -------------------------------------------------------------------------
    def add_image(self, image: Any) -> None:
        self.messages.append(Message(USER, (ImagePart(image),)))

    def ask(self, text: str) -> None:
        if IMAGE_PLACEHOLDER in text:  # it would split the prompt into an image slot with no image
            raise UserError(f"a message may not contain {IMAGE_PLACEHOLDER}: attach images instead (/image PATH)")
        last = self.messages[-1] if self.messages else None
        if last is not None and last.role == USER and isinstance(last.parts[-1], ImagePart):
            self.messages[-1] = Message(USER, (*last.parts, TextPart(text)))
        else:
            self.messages.append(Message(USER, (TextPart(text),)))

    def add_answer(self, text: str) -> None:
        self.messages.append(Message(ASSISTANT, (TextPart(text),)))

    def copy(self) -> Conversation:
        return Conversation(self.template, list(self.messages))  # messages are immutable

    @property
    def images(self) -> list[Any]:
        """Every image, in prompt order."""
        return [image for m in self.messages for image in m.images]

    @images.setter
    def images(self, handles: Sequence[Any]) -> None:
        """Give the images new handles, in order (e.g. the encoded images of a loaded file's paths)."""
        if len(handles) != len(self.images):
            raise ValueError(f"{len(handles)} images for {len(self.images)} image slots")
        replace = iter(handles)
        self.messages = [Message(m.role, tuple(ImagePart(next(replace)) if isinstance(p, ImagePart) else p
                                               for p in m.parts)) for m in self.messages]

    # ---- rendering ------------------------------------------------------------------------
    def system(self) -> str:
        if not self.images and self.template.system_text_only is not None:
            return self.template.system_text_only
        return self.template.system

    def prompt(self, open_answer: bool = True) -> str:
        """The prompt string; with open_answer it ends with the assistant role, ready to generate."""
        t = self.template
        out = self.system() + t.sep
        for message in self.messages:
            out += t.roles[message.role] + render_message(message) + t.sep
        if open_answer:
            out += t.roles[ASSISTANT].rstrip() if t.strip_open_role else t.roles[ASSISTANT]
        return out

    def stage2_prompt(self) -> str:
        """The official stage-2 alignment prompt: the user messages joined by a space, wrapped as
        STAGE2_WRAP (no system text, no roles)."""
        return STAGE2_WRAP.format(" ".join(render_message(m) for m in self.messages if m.role == USER))

    # ---- context limit --------------------------------------------------------------------
    def turn_starts(self) -> list[int]:
        """Message indices where a turn (user messages + the answer to them) begins."""
        starts = []
        for i, (role, _) in enumerate(self.messages):
            if role == USER and (i == 0 or self.messages[i - 1].role == ASSISTANT):
                starts.append(i)
        return starts

    def drop_oldest_turn(self) -> bool:
        """Remove the oldest whole turn with its images; False when only the current turn is left."""
        starts = self.turn_starts()
        if len(starts) < 2:
            return False
        del self.messages[:starts[1]]
        return True

    # ---- persistence ----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "template": self.template.name,
            "messages": [{"role": ["user", "assistant"][m.role], "text": render_message(m)} for m in self.messages],
            "images": [str(i) for i in self.images],
        }

    @classmethod
    def from_json(cls, data: Any, template: Template, source: str = "conversation file") -> Conversation:
        """The inverse of to_json. A file may have been edited by hand (or be hostile), so every
        way it can be wrong is one UserError naming `source` and the problem."""

        def bad(what: str) -> UserError:
            return UserError(f"{source}: not a saved conversation ({what})")

        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise bad('expected a JSON object with a "messages" list, as /save writes')
        messages: list[Message] = []
        for n, m in enumerate(data["messages"], 1):
            if not isinstance(m, dict) or not isinstance(m.get("text"), str):
                raise bad(f'message {n} is not {{"role": ..., "text": "..."}}')
            if m.get("role") not in ("user", "assistant"):
                raise bad(f"message {n} has role {m.get('role')!r:.40}; roles are 'user' and 'assistant'")
            role = USER if m["role"] == "user" else ASSISTANT
            if role == ASSISTANT and not messages:
                raise bad("message 1 is an assistant message; a conversation starts with a user message")
            if role == ASSISTANT and messages[-1].role == ASSISTANT:
                raise bad(f"messages {n - 1} and {n} are both assistant messages; each answer follows a user message")
            if role == ASSISTANT and IMAGE_PLACEHOLDER in m["text"]:
                raise bad(f"message {n} is an assistant message holding an image ({IMAGE_PLACEHOLDER})")
            try:
                messages.append(parse_message(role, m["text"]) if role == USER else Message(role, (TextPart(m["text"]),)))
            except ValueError as err:
                raise bad(f"message {n}: {err}") from None
        images = data.get("images", [])
        if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
            raise bad('"images" is not a list of file paths')
        conv = cls(template, messages)
        if len(conv.images) != len(images):
            raise bad(f"the messages hold {len(conv.images)} image(s) ({IMAGE_PLACEHOLDER}) but \"images\" lists {len(images)}")
        conv.images = images
        return conv


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


def build_prompt(template: Template, prompt: str, images: Sequence[Any]) -> Conversation:
    """A one-question conversation from a prompt file's row, whose text may place the row's
    images with IMAGE_MARKER: each marker becomes an image message in place; without markers
    all images come first, as in the official prompts."""
    conv = Conversation(template)
    texts = prompt.split(IMAGE_MARKER)
    if len(texts) == 1:
        for image in images:
            conv.add_image(image)
        conv.ask(prompt.strip())
        return conv
    if len(texts) - 1 != len(images):
        raise UserError(f"prompt has {len(texts) - 1} {IMAGE_MARKER} markers but {len(images)} images")
    for i, text in enumerate(texts):
        if text.strip():
            conv.ask(text.strip())
        if i < len(images):
            conv.add_image(images[i])
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


def encode_dialogue(
    encode: Encoder,
    conv: Conversation,
    num_image_tokens: int,
    end: str = "###",
    max_target_tokens: int = 160,
) -> tuple[list[int], list[int]]:
    """(ids, labels) that train EVERY assistant message of `conv`, each in the context chat gives
    it: the prompt chat sends at that turn (the conversation so far, Conversation.prompt), then
    the answer + end marker as encode_example encodes a target. Chat re-tokenises the history at
    each turn; where that changes tokens already in the sequence (the system text switches when
    the first image arrives), the answers before that point are left untrained, so every trained
    token sits exactly where chat would generate it."""
    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(conv.messages):
        if message.role != ASSISTANT:
            continue
        prompt_ids = encode_prompt(encode, Conversation(conv.template, conv.messages[:i]).prompt(), num_image_tokens)
        kept = labels if prompt_ids[: len(ids)] == ids else []
        labels = kept + [-100] * (len(prompt_ids) - len(kept))
        answer_ids = encode(message.text + end, bos=False)[:max_target_tokens]
        ids, labels = prompt_ids + answer_ids, labels + answer_ids
    if not ids:
        raise ValueError("encode_dialogue: the conversation has no assistant message to train")
    return ids, labels


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
