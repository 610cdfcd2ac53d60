"""A chat with MiniGPT-4: turns, images encoded once, and a KV cache kept across turns.

Why this module exists: the official demo re-encodes every image and re-computes the whole
history on every turn. A ChatSession encodes each image once, when it is added, and keeps the
conversation's KV cache: before each answer the new prompt's token sequence is compared with
the sequence already in the cache (image slots compared by image identity, not by their
placeholder id), the cache is cropped back to the longest common prefix, and only the rest is
prefilled. Prompts come from conversation.py only; decoding from generation.py.

    session = ChatSession(loaded, GenerationSettings())
    session.add_images(["cat.png"])            # validated and encoded now, attached to the next question
    reply = session.ask("What is this?", on_text=print)
    reply.text, reply.tokens_per_s, reply.first_token_s
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from minigpt4.build import LoadedModel
from minigpt4.conversation import (
    ASSISTANT,
    Conversation,
    clean_answer,
    encode_prompt,
    load_conversation,
)
from minigpt4.decoding import Decoder, cache_keys, make_decoder, reusable_prefix
from minigpt4.errors import UserError
from minigpt4.generation import GenerationSettings, generate
from minigpt4.settings import MAX_CONTEXT, ChatSettings

_uids = itertools.count()


@dataclass(eq=False)
class ChatImage:
    """One image in a conversation: where it came from and its soft tokens, computed once.

    Conversation.images holds these; str() is the file path (what Conversation.to_json writes)."""

    source: str | Image.Image
    embeds: torch.Tensor  # [num_image_tokens, H]
    uid: int  # identity in the KV-cache key sequence

    def __str__(self) -> str:
        return self.source if isinstance(self.source, str) else f"<image {self.uid}>"


@dataclass
class Reply:
    """One answer and how it was produced."""

    text: str  # the answer, cleaned as the official code does (conversation.clean_answer)
    n_tokens: int  # tokens sampled (including the stop string or EOS)
    seconds: float  # whole turn: prompt building, prefill and decoding
    tokens_per_s: float  # decode speed: tokens after the first / time after the first
    first_token_s: float  # from the call to the first token (prefill included)
    dropped_turns: int  # oldest turns dropped to fit chat.max_context
    finish_reason: str  # "stop" (###) | "eos" | "length"
    prefilled: int = 0  # prompt positions computed this turn
    reused: int = 0  # prompt positions taken from the KV cache of earlier turns
    peak_memory_gb: float | None = None  # peak GPU memory during the turn (CUDA only)

    def summary(self) -> str:
        """One line for stderr, e.g. '[12 tokens, 41.3 tok/s, first token 0.05 s, ...]'."""
        parts = [
            f"{self.n_tokens} tokens",
            f"{self.tokens_per_s:.1f} tok/s",
            f"first token {self.first_token_s:.3f} s",
            f"prompt {self.prefilled} new + {self.reused} cached",
        ]
        if self.peak_memory_gb is not None:
            parts.append(f"peak GPU {self.peak_memory_gb:.2f} GiB")
        if self.finish_reason == "length":
            parts.append("cut at max_new_tokens")
        return "[" + ", ".join(parts) + "]"


@dataclass
class Turn:
    """The input of the next answer, prepared without answering (ChatSession.prepare): for
    front-ends that decode elsewhere, such as the web page through the serving engine."""

    conversation: Conversation  # the session's conversation with the question (or without the last answer)
    ids: list[int]  # the prompt's token ids, IMAGE_TOKEN slots for the images
    image_embeds: torch.Tensor | None  # [N,num_image_tokens,H]: the soft tokens of the images, in order
    settings: GenerationSettings  # max_new_tokens lowered to what fits chat.max_context
    dropped_turns: int  # oldest turns dropped to fit


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class ChatSession:
    """A conversation with one loaded model (batch 1).

    ChatSession(loaded, settings, max_context=MAX_CONTEXT, system=None, system_text_only=None, reuse_cache=True, seed=None)
      settings     GenerationSettings for every answer (ask/regenerate may pass others)
      max_context  prompt + max_new_tokens stay within this many positions; the oldest whole
                   turns are dropped to fit (said once per conversation through `notify`)
      system       replaces the template's system text (with images; without too, unless
                   system_text_only is given)
      system_text_only  replaces the system text of a conversation that holds no image
      reuse_cache  keep the KV cache across turns (False: recompute everything, as officially)
      seed         seeds the sampling generator (None: random)
      notify       where notices go (default: stderr)
    """

    def __init__(
        self,
        loaded: LoadedModel,
        settings: GenerationSettings,
        max_context: int = MAX_CONTEXT,
        system: str | None = None,
        system_text_only: str | None = None,
        reuse_cache: bool = True,
        seed: int | None = None,
        notify: Callable[[str], None] = _stderr,
    ):
        self.loaded = loaded
        self.settings = settings
        self.max_context = int(max_context)
        self.template = loaded.template.with_overrides(system=system, system_text_only=system_text_only or system)
        self.reuse_cache = reuse_cache
        self.notify = notify
        self.generator = torch.Generator(device=loaded.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))
        self._decoder: Decoder | None = None  # this conversation's KV cache (kept across /reset)
        self.reset()

    @classmethod
    def from_settings(cls, settings: ChatSettings, loaded: LoadedModel, **kwargs) -> ChatSession:
        """A session configured as conf/chat.yaml says (chat.*, generation.*, seed)."""
        chat = settings.chat
        return cls(loaded, settings.generation, max_context=chat.max_context, system=chat.system,
                   system_text_only=chat.system_text_only, reuse_cache=chat.reuse_cache, seed=settings.seed, **kwargs)

    # ---- conversation state ----------------------------------------------------------------
    def reset(self) -> None:
        """Start a new conversation (images and cached positions are forgotten; a static decoder
        and its captured graphs stay for the next conversation)."""
        self.conversation: Conversation = Conversation(self.template)
        self._cache_keys: list[Any] = []  # one key per cached position (token id or (image uid, slot))
        self._told_overflow = False

    def add_images(self, images: list[str | os.PathLike | Image.Image]) -> None:
        """Validate and encode images now; they join the conversation before the next question.
        A bad image raises a one-line UserError and none of them is added."""
        if not images:
            return
        sources = [str(i) if isinstance(i, (str, os.PathLike)) else i for i in images]
        embeds = self.loaded.encode_images(sources)  # [N,num_image_tokens,H]; raises UserError
        for source, soft in zip(sources, embeds):
            self.conversation.add_image(ChatImage(source, soft, next(_uids)))

    def ask(
        self,
        text: str,
        on_text: Callable[[str], None] | None = None,
        settings: GenerationSettings | None = None,
    ) -> Reply:
        """Answer `text` (after any images just added). on_text receives the answer as it streams.
        On an error the conversation is left as it was."""
        return self._answer(self._next_conversation(text), on_text, settings or self.settings)

    def regenerate(
        self, on_text: Callable[[str], None] | None = None, settings: GenerationSettings | None = None
    ) -> Reply:
        """Drop the last answer and answer the last question again."""
        return self._answer(self._next_conversation(None), on_text, settings or self.settings)

    def prepare(self, text: str | None, settings: GenerationSettings | None = None) -> Turn:
        """The next answer's input, as ask(text) (or, with text=None, regenerate()) would build
        it, without answering: the oldest turns dropped to fit max_context, the images' soft
        tokens in order. This session's own decoder is not used (none is created). The session
        is unchanged until keep(turn, answer)."""
        conv = self._next_conversation(text)
        settings = settings or self.settings
        ids, dropped, max_new = self._fit(conv, settings)
        embeds = torch.stack([image.embeds for image in conv.images]) if conv.images else None
        return Turn(conv, ids, embeds, replace(settings, max_new_tokens=max_new), dropped)

    def keep(self, turn: Turn, answer: str) -> None:
        """Record the answer to a prepared turn (cleaned with conversation.clean_answer)."""
        turn.conversation.add_answer(answer)
        self.conversation = turn.conversation

    def _next_conversation(self, text: str | None) -> Conversation:
        """A copy of the conversation with `text` asked, or for None without the last answer."""
        conv = self.conversation.copy()
        if text is None:
            if not conv.messages or conv.messages[-1][0] != ASSISTANT:
                raise UserError("nothing to regenerate: ask a question first")
            conv.messages.pop()
            return conv
        text = text.strip()
        if not text:
            raise UserError("empty message: type a question")
        conv.ask(text)
        return conv

    def history(self) -> list[dict[str, Any]]:
        """Messages for display: [{role: 'user'|'assistant', text, images: [path or PIL image]}].
        Consecutive user messages (images, then the question) form one entry."""
        out: list[dict[str, Any]] = []
        for message in self.conversation.messages:
            name = "assistant" if message.role == ASSISTANT else "user"
            shown = [image.source for image in message.images]
            plain = message.text
            if out and name == "user" and out[-1]["role"] == "user":
                out[-1]["images"] += shown
                out[-1]["text"] = " ".join(t for t in (out[-1]["text"], plain) if t)
            else:
                out.append({"role": name, "text": plain, "images": shown})
        return out

    # ---- persistence -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the conversation as JSON (Conversation.to_json) with absolute image paths, so
        that it loads from any folder. Images that were given as PIL objects are written as PNG
        files next to it (<name>_images/)."""
        path = Path(path)
        data = self.conversation.to_json()
        for i, image in enumerate(self.conversation.images):
            if isinstance(image.source, str):
                data["images"][i] = str(Path(image.source).resolve())
            else:
                folder = path.parent / f"{path.stem}_images"
                folder.mkdir(parents=True, exist_ok=True)
                image.source.save(folder / f"{i}.png")
                data["images"][i] = str(folder / f"{i}.png")
        try:
            path.write_text(json.dumps(data, indent=2))
        except OSError as err:
            raise UserError(f"cannot save the conversation to {path}: {err.strerror or err}") from None

    def load(self, path: str | os.PathLike) -> None:
        """Replace the conversation by a saved one; its images are read and encoded again."""
        conv = load_conversation(path, self.template)
        base = Path(path).parent
        sources = [p if Path(p).exists() or Path(p).is_absolute() else str(base / p) for p in conv.images]
        try:
            embeds = self.loaded.encode_images(sources) if sources else []
        except UserError as err:  # say which file named the missing or bad image
            raise UserError(f"conversation file {path}: {err}") from None
        conv.images = [ChatImage(s, e, next(_uids)) for s, e in zip(sources, embeds)]
        self.reset()
        self.conversation = conv

    # ---- answering -------------------------------------------------------------------------
    def _fit(self, conv: Conversation, settings: GenerationSettings) -> tuple[list[int], int, int]:
        """Drop the oldest whole turns until prompt + max_new_tokens <= max_context.
        -> (prompt ids, turns dropped, max_new_tokens that fits)."""
        encode, n_slots = self.loaded.tokenizer.encode, self.loaded.model.num_image_tokens
        dropped = 0
        while True:
            ids = encode_prompt(encode, conv.prompt(), n_slots)
            if len(ids) + settings.max_new_tokens <= self.max_context or not conv.drop_oldest_turn():
                break
            dropped += 1
        room = self.max_context - len(ids)
        if room < 1:
            raise UserError(
                f"message too long: the prompt is {len(ids)} tokens and chat.max_context={self.max_context}; "
                "shorten it (or its images) or raise chat.max_context"
            )
        max_new = min(settings.max_new_tokens, room)
        if (dropped or max_new < settings.max_new_tokens) and not self._told_overflow:
            self._told_overflow = True
            what = (f"dropped the oldest {dropped} turn(s) with their images" if dropped else
                    f"the answer is limited to {max_new} new tokens")
            self.notify(f"note: the conversation outgrew chat.max_context={self.max_context} tokens: {what} "
                        "(this happens from now on without notice)")
        return ids, dropped, max_new

    def _new_decoder(self) -> Decoder:
        """An empty decoder sized for max_context (on CUDA a static cache and CUDA graphs, which
        are kept for the next conversation). Each session owns its decoder: sessions of the web
        page must not share cache slots."""
        return make_decoder(self.loaded.model.llm, 1, self.max_context + 1, static=self.settings.use_static(self.loaded.device),
                            compile=self.settings.compile_for(None), reuse=self._decoder, grow=True)

    def _reusable(self, keys: list[Any]) -> int:
        """Crop the cache to the longest common prefix with `keys` (leaving >= 1 position to
        compute, never ending inside an image) and return its length."""
        if not self.reuse_cache or self._decoder is None:
            self._decoder, self._cache_keys = self._new_decoder(), []
            return 0
        n = reusable_prefix(self._cache_keys, keys)
        if n == 0:
            self._decoder = self._new_decoder()
        else:
            self._decoder.crop(n)
        self._cache_keys = self._cache_keys[:n]
        return n

    def _answer(self, conv: Conversation, on_text, settings: GenerationSettings) -> Reply:
        start = time.perf_counter()
        device = self.loaded.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ids, dropped, max_new = self._fit(conv, settings)
        keys = cache_keys(ids, [image.uid for image in conv.images], self.loaded.model.num_image_tokens)
        reused = self._reusable(keys)
        embeds = torch.stack([image.embeds for image in conv.images]) if conv.images else None

        shown: list[str] = []

        def stream(_row: int, delta: str) -> None:
            if not shown:  # the official clean-up strips the answer's leading space
                delta = delta.lstrip()
            if delta and on_text is not None:
                shown.append(delta)
                on_text(delta)

        try:
            result = generate(
                self.loaded.model, self.loaded.tokenizer, [ids], embeds,
                replace(settings, max_new_tokens=max_new), stops=self.template.stop,
                on_text=stream, decoder=self._decoder, cache_length=reused, generator=self.generator,
            )[0]
        except BaseException:  # interrupted mid-answer: the cache no longer matches its keys
            self._cache_keys = []
            raise
        sampled = result.ids + ([self.loaded.tokenizer.eos_id] if result.finish_reason == "eos" else [])
        self._cache_keys = (keys + sampled)[: self._decoder.length]
        answer = clean_answer(result.text, self.template)
        conv.add_answer(answer)
        self.conversation = conv

        end = time.perf_counter()
        first = result.first_token_at or end
        decode_s = end - first
        tokens_per_s = (result.n_steps - 1) / decode_s if result.n_steps > 1 and decode_s > 0 else result.n_steps / max(end - start, 1e-9)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return Reply(answer, result.n_steps, end - start, tokens_per_s, first - start, dropped,
                     result.finish_reason, result.prefilled, reused, peak)
