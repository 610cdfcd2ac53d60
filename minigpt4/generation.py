"""Decoding: batched (left padding), streamed, with stop strings and a reusable KV cache.

One loop serves chat (batch 1, cache kept across turns) and evaluation (batches). Rows finish
on EOS or a stop string ("###"); the official answer clean-up lives in conversation.py.

The loop is prefill() once, then decode_step() per token: decode_step is the one function a
faster decoder (static cache + CUDA graphs) replaces. Beam search (num_beams > 1) goes through
transformers' own generate on inputs_embeds, without cache reuse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import time

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from minigpt4.conversation import pad_batch
from minigpt4.cuda_decode import StaticDecoder, decoder_for
from minigpt4.model import IMAGE_TOKEN, MiniGPT4
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
    # Decoding engine on CUDA: "static" = static KV cache + one CUDA graph per step
    # (minigpt4/cuda_decode.py), "dynamic" = eager transformers DynamicCache. "auto": static on CUDA.
    cache: str = "auto"
    compile: bool | str = False  # torch.compile the static decode step (slower start, faster tokens)

    def use_static(self, device: torch.device) -> bool:
        return self.cache == "static" or (self.cache == "auto" and device.type == "cuda")

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
    n_steps: int = 0  # tokens sampled, including an EOS or the stop string's tokens
    prefilled: int = 0  # prompt positions computed (the rest came from the reused cache)
    first_token_at: float = 0.0  # time.perf_counter() when the first token was known


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


def prefill(model: MiniGPT4, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
            cache: DynamicCache) -> torch.Tensor:
    """Run the uncached prompt part embeds [B,T,H] into the cache -> last logits [B,V] (float32)."""
    if isinstance(cache, StaticDecoder):
        start = cache.get_seq_length()
        return cache.prefill(embeds, positions, mask[:, start:], start=start).float()
    out = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :].float()


def decode_step(model: MiniGPT4, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                cache: DynamicCache) -> torch.Tensor:
    """One token per row: tokens [B], positions [B,1], mask [B,T] (1 = real token) -> logits [B,V].

    Always pass the mask: with attention_mask=None transformers 5.17 decoded 3.5x slower on an
    H100 (7B, batch 1: 7.4 vs 26.4 tok/s), although it is equally correct."""
    if isinstance(cache, StaticDecoder):
        return cache.step(tokens, positions.view(-1)).float()
    out = model.llm(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                    past_key_values=cache, use_cache=True)
    return out.logits[:, -1, :].float()


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
    in place with the prompt and the generated tokens it was fed (all but the last sampled
    one), so a chat can keep it for the next turn; cache.get_seq_length() says how far.
    on_text(row, delta) receives streamed text as it becomes final.
    With settings.num_beams > 1 each row goes through transformers' beam search instead
    (no streaming until the row is done; the cache is left as it was).
    """
    if cache_length and len(sequences) != 1:
        raise ValueError("a reused cache needs batch size 1")
    if settings.num_beams > 1:
        return _generate_beams(model, tokenizer, sequences, image_embeds, settings, stops, on_text, generator)
    device = model.device
    batch = pad_batch(sequences, tokenizer.pad_id, side="left")
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    if cache is None:
        cache = (
            decoder_for(model.llm, ids.shape[0], ids.shape[1] + settings.max_new_tokens, compile=settings.compile)
            if settings.use_static(device)
            else DynamicCache()
        )
        if isinstance(cache, StaticDecoder):
            cache.crop(0)  # a reused decoder starts empty
    # only the part not in the cache is embedded; images inside the cached part are skipped
    if cache_length:
        n_cached_images = int((ids[:, :cache_length] == IMAGE_TOKEN).sum()) // max(model.num_image_tokens, 1)
        if image_embeds is not None:
            image_embeds = image_embeds[n_cached_images:]
            image_embeds = image_embeds if len(image_embeds) else None
    embeds = model.embed(ids[:, cache_length:], image_embeds)
    logits = prefill(model, embeds, mask, positions[:, cache_length:], cache)
    bsz = ids.shape[0]
    results = [Generated(prefilled=ids.shape[1] - cache_length) for _ in range(bsz)]
    streams = [_StreamState(tokenizer, stops) for _ in range(bsz)]
    done = [False] * bsz  # host-side, so the loop syncs with the GPU once per token (tolist)
    done_rows, n_done = None, 0  # [B] bool on the device, once some row has finished
    generated = torch.zeros((bsz, 0), dtype=torch.long, device=device)
    next_pos = positions[:, -1:] + 1
    for step in range(settings.max_new_tokens):
        tokens = _next_tokens(logits, settings, generated, step, tokenizer.eos_id, generator)
        if done_rows is not None:
            tokens = tokens.masked_fill(done_rows, tokenizer.pad_id)
        generated = torch.cat([generated, tokens[:, None]], dim=1)
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            result = results[row]
            result.n_steps += 1
            if step == 0:
                result.first_token_at = time.perf_counter()
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
        if all(done) or step == settings.max_new_tokens - 1:
            break
        if any(done) and (done_rows is None or sum(done) != n_done):
            done_rows, n_done = torch.tensor(done, device=device), sum(done)
        mask = torch.cat([mask, mask.new_ones((bsz, 1))], dim=1)
        logits = decode_step(model, tokens, mask, next_pos, cache)
        next_pos = next_pos + 1
    for row, result in enumerate(results):
        if on_text:  # flush what was held back (a partial stop string that never completed)
            rest = result.text[streams[row].emitted :]
            if rest:
                on_text(row, rest)
    return results


class _StopStrings(StoppingCriteria):
    """transformers stopping criterion: a row is done once its new text holds a stop string."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = [any(s in self.tokenizer.decode(row) for s in self.stops) for row in input_ids.tolist()]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _generate_beams(model, tokenizer, sequences, image_embeds, settings, stops, on_text, generator):
    """Beam search row by row with transformers' generate on inputs_embeds (the official way)."""
    if settings.do_sample and generator is not None:  # HF samples from the global RNG
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device)))
    sampling = dict(temperature=settings.temperature, top_p=settings.top_p) if settings.do_sample else {}
    results, first_image = [], 0
    for row, sequence in enumerate(sequences):
        ids = torch.tensor([sequence], dtype=torch.long, device=model.device)
        n_images = int((ids == IMAGE_TOKEN).sum()) // max(model.num_image_tokens, 1)
        row_images = image_embeds[first_image : first_image + n_images] if n_images else None
        first_image += n_images
        out = model.llm.generate(
            inputs_embeds=model.embed(ids, row_images),
            attention_mask=torch.ones_like(ids),
            max_new_tokens=settings.max_new_tokens,
            min_new_tokens=settings.min_new_tokens,
            num_beams=settings.num_beams,
            do_sample=settings.do_sample,
            repetition_penalty=settings.repetition_penalty,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
            stopping_criteria=StoppingCriteriaList([_StopStrings(tokenizer, stops)]),
            **sampling,
        )
        new = out[0].tolist()  # with inputs_embeds only, generate returns only the new tokens
        result = Generated(prefilled=len(sequence), first_token_at=time.perf_counter(), n_steps=len(new))
        if tokenizer.eos_id in new:
            new = new[: new.index(tokenizer.eos_id)]
            result.finish_reason = "eos"
        result.ids = [t for t in new if t != tokenizer.pad_id]
        text, stopped, _ = _StreamState(tokenizer, stops).step(result.ids)
        result.text = text
        if stopped:
            result.finish_reason = "stop"
        if on_text and text:
            on_text(row, text)
        results.append(result)
    return results
