"""Decoding: batched (left padding), streamed, with stop strings and a reusable KV cache.

One loop serves chat (batch 1, cache kept across turns) and evaluation (batches). Rows finish
on EOS or a stop string ("###"); the official answer clean-up lives in conversation.py.

The loop is decoder.prefill() once, then decoder.step() per token, on any Decoder
(minigpt4/decoding: eager DynamicCache, or static cache + CUDA graphs + fused step). Beam search
(num_beams > 1) goes through transformers' own generate on inputs_embeds, without cache reuse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from minigpt4.conversation import pad_batch
from minigpt4.decoding import Decoder, make_decoder
from minigpt4.errors import UserError
from minigpt4.model import IMAGE_TOKEN, MiniGPT4
from minigpt4.tokenizer import Tokenizer


INDUCTOR_MODES = ("default", "max-autotune-no-cudagraphs")  # not the ones with their own CUDA graphs
COMPILE_PAYS_FROM_TOKENS = 200_000  # generation.compile=auto: compile jobs at least this long


@dataclass
class GenerationSettings:
    """Decoding settings. The defaults are the official demo's decoding (docs/OFFICIAL.md) and the
    one place it is written: conf/generation/official.yaml takes them from here (config.py)."""

    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 50  # 0 = off; the official call leaves transformers' default of 50 in force
    top_p: float = 0.9
    num_beams: int = 1
    max_new_tokens: int = 300
    min_new_tokens: int = 1
    repetition_penalty: float = 1.0
    # Decoding engine: "static" = static KV cache + CUDA graphs + fused step (minigpt4/decoding),
    # "dynamic" = eager transformers DynamicCache. "auto": static on CUDA, dynamic elsewhere.
    cache: str = "auto"
    # torch.compile the static decode step (slower start, faster tokens): true, false, "auto"
    # (only jobs long enough to pay the compilation back: compile_for) or an Inductor mode
    compile: bool | str = False

    def __post_init__(self) -> None:
        """Bad values are one UserError naming the key (before any model loads)."""
        whole = lambda low: (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low)  # noqa: E731
        number = lambda ok: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and ok(v))  # noqa: E731
        checks = {
            "max_new_tokens": (whole(1), "a whole number of 1 or more"),
            "min_new_tokens": (whole(0), "a whole number of 0 or more"),
            "num_beams": (whole(1), "a whole number of 1 or more"),
            "temperature": (number(lambda v: v >= 0), "a number of 0 or more"),
            "top_k": (whole(0), "a whole number of 0 (off) or more"),
            "top_p": (number(lambda v: 0 < v <= 1), "a number above 0 and at most 1"),
            "repetition_penalty": (number(lambda v: v > 0), "a number above 0"),
            "cache": (lambda v: v in ("auto", "static", "dynamic"), "auto, static or dynamic"),
            "compile": (lambda v: isinstance(v, bool) or v in ("auto", *INDUCTOR_MODES),
                        "true, false, auto or an Inductor mode without CUDA graphs: " + ", ".join(INDUCTOR_MODES)),
        }
        for name, (ok, what) in checks.items():
            if not ok(getattr(self, name)):
                raise UserError(f"generation.{name}={getattr(self, name)!r}: use {what}")

    def compile_for(self, expected_tokens: int | None) -> bool | str:
        """The compile choice for a job of about expected_tokens generated tokens (None: open-ended,
        a chat). "auto" compiles only jobs long enough to win back the compilation: on an H200 it
        took ~1.5 min per evaluation run and saved ~0.5 ms per token at batch 8
        (docs/BENCHMARKS.md), so it pays from about COMPILE_PAYS_FROM_TOKENS tokens."""
        if self.compile != "auto":
            return self.compile
        return expected_tokens is not None and expected_tokens >= COMPILE_PAYS_FROM_TOKENS

    def use_static(self, device: torch.device) -> bool:
        return self.cache == "static" or (self.cache == "auto" and device.type == "cuda")

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


class StreamState:
    """Per-row text for streaming and stop strings, decoded incrementally: each step decodes a
    window of the last few tokens, not the whole answer (that was quadratic in its length and,
    at batch 32 x 300 tokens, slower than the GPU). Emits only text that cannot be the start of
    a stop string; finish() gives the exact text of the whole answer."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, tuple(s for s in stops if s)
        self.longest_stop = max(map(len, self.stops), default=1)
        self.text = ""  # decoded so far: whole characters only
        self.emitted = 0  # characters of the text already given out
        self.read = 0  # ids[:read] are in the text
        # Decoding drops the leading space of the first piece: later windows are decoded
        # behind an anchor ("a"), whose text is then cut off.
        self.anchor = tokenizer.encode("a")
        self.anchor_len = len(tokenizer.decode(self.anchor))

    def step(self, ids: list[int]) -> tuple[str, bool, str]:
        """ids: the tokens so far (a continuation of the last call's) ->
        (text so far cut at a stop, stopped?, new text safe to show)."""
        before = len(self.text)
        if not self.text:  # nothing decoded yet: the answer's first piece loses its space
            new = self.tokenizer.decode(ids)
        else:
            new = self.tokenizer.decode(self.anchor + ids[self.read :])[self.anchor_len :]
        if not new.endswith("\ufffd"):  # else: a character still incomplete, wait for its bytes
            self.text += new
            self.read = len(ids)
        # a stop string can only begin in the new text or end in it
        text, stopped = self._cut(self.text, max(0, before - self.longest_stop + 1))
        safe = len(text)
        if not stopped:
            for stop in self.stops:  # hold back a suffix that may grow into a stop string
                for k in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:k]):
                        safe = min(safe, len(text) - k)
                        break
        delta = text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return text, stopped, delta

    def finish(self, ids: list[int]) -> tuple[str, bool]:
        """The whole answer decoded at once, cut before the first stop string -> (text, stopped?)."""
        return self._cut(self.tokenizer.decode(ids))

    def _cut(self, text: str, start: int = 0) -> tuple[str, bool]:
        """text cut before its first stop string found from `start` on -> (text, stopped?)."""
        cuts = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return (text[: min(cuts)], True) if cuts else (text, False)


class HostCopy:
    """Token ids (up to `size`) to the host without waiting for work queued after them (pinned
    buffer + event): the decode loops feed the next step before they read these."""

    def __init__(self, size: int, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.host = torch.empty(size, dtype=torch.long, pin_memory=True)
            self.event = torch.cuda.Event()

    def start(self, tokens: torch.Tensor) -> HostCopy:
        self.tokens = tokens
        if self.cuda:
            self.host[: len(tokens)].copy_(tokens, non_blocking=True)
            self.event.record()
        return self

    def wait(self) -> list[int]:
        if self.cuda:
            self.event.synchronize()
            return self.host[: len(self.tokens)].tolist()
        return self.tokens.tolist()


def next_tokens(logits: torch.Tensor, settings: GenerationSettings, generated: torch.Tensor,
                 step: int, eos_id: int, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B,V] (float32) -> token ids [B]. The filters apply in transformers' order
    (repetition penalty, min length, then temperature, top-k, top-p), each as transformers
    computes it, so a seeded generator samples what transformers' warpers would give."""
    if settings.repetition_penalty != 1.0 and generated.shape[1]:
        scores = logits.gather(1, generated)
        scores = torch.where(scores < 0, scores * settings.repetition_penalty, scores / settings.repetition_penalty)
        logits = logits.scatter(1, generated, scores)
    if step < settings.min_new_tokens and eos_id >= 0:
        logits[:, eos_id] = float("-inf")
    if settings.greedy:
        return logits.argmax(dim=-1)
    logits = sampling_filter(logits, settings.temperature, settings.top_k, settings.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sampling_filter(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k (0 = off), then top-p (the smallest set of most likely tokens
    whose probability reaches top_p; at least one token kept): filtered logits [B,V]."""
    logits = logits / temperature if temperature != 1.0 else logits
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = logits.sort(dim=-1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


@torch.inference_mode()
def generate(
    model: MiniGPT4,
    tokenizer: Tokenizer,
    sequences: list[list[int]],
    image_embeds: torch.Tensor | None,
    settings: GenerationSettings,
    stops: tuple[str, ...] = ("###",),
    on_text: Callable[[int, str], None] | None = None,
    decoder: Decoder | None = None,
    cache_length: int = 0,
    generator: torch.Generator | None = None,
) -> list[Generated]:
    """Continue each sequence (token ids with IMAGE_TOKEN slots; images in row order).

    `decoder`: the caller's Decoder for this batch (make_decoder; None: a new one, used once).
    `cache_length` (batch 1): the decoder already holds the first cache_length positions of
    the sequence; only the rest is computed. The decoder is left holding the prompt and the
    generated tokens it was fed (all of them, or all but the last when the answer ran to
    max_new_tokens or ended at its first token), so a chat can keep it for the next turn;
    decoder.length says how far.
    on_text(row, delta) receives streamed text as it becomes final.
    With settings.num_beams > 1 each row goes through transformers' beam search instead
    (no streaming until the row is done; the cache is left as it was).
    """
    if cache_length and len(sequences) != 1:
        raise ValueError("a reused prefix needs batch size 1")
    if settings.num_beams > 1:
        return _generate_beams(model, tokenizer, sequences, image_embeds, settings, stops, on_text, generator)
    device = model.device
    batch = pad_batch(sequences, tokenizer.pad_id, side="left")
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    if decoder is None:
        decoder = make_decoder(model.llm, ids.shape[0], ids.shape[1] + settings.max_new_tokens,
                               static=settings.use_static(device), compile=settings.compile_for(None))
    # only the part not in the cache is embedded; images inside the cached part are skipped
    if cache_length:
        n_cached_images = int((ids[:, :cache_length] == IMAGE_TOKEN).sum()) // max(model.num_image_tokens, 1)
        if image_embeds is not None:
            image_embeds = image_embeds[n_cached_images:]
            image_embeds = image_embeds if len(image_embeds) else None
    embeds = model.embed(ids[:, cache_length:], image_embeds)
    logits = decoder.prefill(embeds, positions[:, cache_length:], mask[:, cache_length:], start=cache_length).float()
    bsz = ids.shape[0]
    results = [Generated(prefilled=ids.shape[1] - cache_length) for _ in range(bsz)]
    streams = [StreamState(tokenizer, stops) for _ in range(bsz)]
    done = [False] * bsz
    done_rows, n_done = None, 0  # [B] bool on the device, once some row has finished
    generated = torch.zeros((bsz, 0), dtype=torch.long, device=device)
    next_pos = positions[:, -1] + 1  # [B]
    to_host = HostCopy(bsz, device)

    def feed() -> torch.Tensor:  # this step's `tokens` into the cache -> the next logits
        nonlocal next_pos
        out = decoder.step(tokens, next_pos).float()
        next_pos = next_pos + 1
        return out

    for step in range(settings.max_new_tokens):
        tokens = next_tokens(logits, settings, generated, step, tokenizer.eos_id, generator)
        if done_rows is not None:
            tokens = tokens.masked_fill(done_rows, tokenizer.pad_id)
        generated = torch.cat([generated, tokens[:, None]], dim=1)
        to_host.start(tokens)
        last = step == settings.max_new_tokens - 1

        # From the second token on, feed the tokens before reading them on the host: the GPU
        # computes the next step while Python does the bookkeeping below. (When every row
        # stops there, that step was for nothing; the cache then holds the last token too.)
        # The first token is read first, so that it is shown without waiting for a step.
        ahead = step > 0 and not last
        if ahead:
            logits = feed()
        for row, token in enumerate(to_host.wait()):
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
        if all(done) or last:
            break
        if any(done) and sum(done) != n_done:
            done_rows, n_done = torch.tensor(done, device=device), sum(done)
        if not ahead:
            logits = feed()
    for row, result in enumerate(results):
        result.text, _ = streams[row].finish(result.ids)
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
    sampling = dict(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p) if settings.do_sample else {}
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
        # first_token_at stays 0 (unknown): the answer comes whole, and speeds count all its time
        result = Generated(prefilled=len(sequence), n_steps=len(new))
        if tokenizer.eos_id in new:
            new = new[: new.index(tokenizer.eos_id)]
            result.finish_reason = "eos"
        result.ids = [t for t in new if t != tokenizer.pad_id]
        text, stopped = StreamState(tokenizer, stops).finish(result.ids)
        result.text = text
        if stopped:
            result.finish_reason = "stop"
        if on_text and text:
            on_text(row, text)
        results.append(result)
    return results
