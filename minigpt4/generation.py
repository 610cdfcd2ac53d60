"""Decoding: batched (left padding), streamed, with stop strings and a reusable KV cache.

One loop serves chat (batch 1, cache kept across turns) and evaluation (batches). Rows finish
on EOS or a stop string ("###"); the official answer clean-up lives in conversation.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from minigpt4.conversation import pad_batch
from minigpt4.model import MiniGPT4
from minigpt4.tokenizer import Tokenizer


@dataclass
class GenerationSettings:
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 0.9
    num_beams: int = 1
    max_new_tokens: int = 300
    min_new_tokens: int = 1
    repetition_penalty: float = 1.0

    @classmethod
    def from_cfg(cls, cfg) -> "GenerationSettings":
        values = dict(cfg) if cfg is not None else {}
        return cls(**{k: values[k] for k in cls.__dataclass_fields__ if k in values})

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0


@dataclass
class Generated:
    ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded, cut before the first stop string
    finish_reason: str = "length"  # "eos" | "stop" | "length"


class _StreamState:
    """Per-row decoded text; emits only text that cannot be the start of a stop string."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stops
        self.emitted = 0

    def step(self, ids: list[int]) -> tuple[str, bool, str]:
        """-> (text so far cut at a stop, stopped?, new text safe to show)."""
        text = self.tokenizer.decode(ids)
        cut = min((text.find(s) for s in self.stops if s and s in text), default=-1)
        stopped = cut >= 0
        if stopped:
            text = text[:cut]
            safe = len(text)
        else:
            safe = len(text)
            for s in self.stops:  # hold back a suffix that may grow into a stop string
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        safe = min(safe, len(text) - k)
                        break
            if text.endswith("\ufffd"):  # an incomplete multi-byte character
                safe = min(safe, len(text) - 1)
        delta = text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return text, stopped, delta


def _next_tokens(logits: torch.Tensor, settings: GenerationSettings, generated: torch.Tensor,
                 step: int, eos_id: int, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B,V] (float32) -> token ids [B]."""
    if settings.repetition_penalty != 1.0 and generated.shape[1]:
        scores = logits.gather(1, generated)
        scores = torch.where(scores < 0, scores * settings.repetition_penalty, scores / settings.repetition_penalty)
        logits = logits.scatter(1, generated, scores)
    if step < settings.min_new_tokens and eos_id >= 0:
        logits[:, eos_id] = float("-inf")
    if settings.greedy:
        return logits.argmax(dim=-1)
    logits = logits / settings.temperature
    if settings.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > settings.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.inference_mode()
def generate(
    model: MiniGPT4,
    tokenizer: Tokenizer,
    sequences: list[list[int]],
    image_embeds: torch.Tensor | None,
    settings: GenerationSettings,
    stops: tuple[str, ...] = ("###",),
    on_text: Callable[[int, str], None] | None = None,
    cache: DynamicCache | None = None,
    cache_length: int = 0,
    generator: torch.Generator | None = None,
) -> list[Generated]:
    """Continue each sequence (token ids with IMAGE_TOKEN slots; images in row order).

    `cache`/`cache_length` (batch 1 only): a KV cache that already holds the first
    cache_length positions of the sequence; only the rest is computed. The cache is extended
    in place with the prompt and the generated tokens, so a chat can keep it for the next turn.
    on_text(row, delta) receives streamed text as it becomes final.
    """
    device = model.device
    if cache_length and len(sequences) != 1:
        raise ValueError("a reused cache needs batch size 1")
    batch = pad_batch(sequences, tokenizer.pad_id, side="left")
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    cache = cache if cache is not None else DynamicCache()
    # only the part not in the cache is embedded; images inside the cached part are skipped
    if cache_length:
        from minigpt4.model import IMAGE_TOKEN

        n_cached_images = int((ids[:, :cache_length] == IMAGE_TOKEN).sum()) // max(model.num_image_tokens, 1)
        if image_embeds is not None:
            image_embeds = image_embeds[n_cached_images:]
            image_embeds = image_embeds if len(image_embeds) else None
    embeds = model.embed(ids[:, cache_length:], image_embeds)
    out = model.llm(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions[:, cache_length:],
        past_key_values=cache,
        use_cache=True,
    )
    logits = out.logits[:, -1, :].float()
    bsz = ids.shape[0]
    results = [Generated() for _ in range(bsz)]
    streams = [_StreamState(tokenizer, stops) for _ in range(bsz)]
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    generated = torch.zeros((bsz, 0), dtype=torch.long, device=device)
    next_pos = positions[:, -1:] + 1
    for step in range(settings.max_new_tokens):
        tokens = _next_tokens(logits, settings, generated, step, tokenizer.eos_id, generator)
        tokens = torch.where(done, torch.full_like(tokens, tokenizer.pad_id), tokens)
        generated = torch.cat([generated, tokens[:, None]], dim=1)
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            result = results[row]
            if token == tokenizer.eos_id:
                result.finish_reason = "eos"
                done[row] = True
                continue
            result.ids.append(token)
            text, stopped, delta = streams[row].step(result.ids)
            result.text = text
            if delta and on_text:
                on_text(row, delta)
            if stopped:
                result.finish_reason = "stop"
                done[row] = True
        if bool(done.all()) or step == settings.max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones((bsz, 1))], dim=1)
        out = model.llm(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=next_pos,
            past_key_values=cache,
            use_cache=True,
        )
        next_pos = next_pos + 1
        logits = out.logits[:, -1, :].float()
    for row, result in enumerate(results):
        if on_text:  # flush what was held back (a partial stop string that never completed)
            rest = result.text[streams[row].emitted :]
            if rest:
                on_text(row, rest)
    return results
