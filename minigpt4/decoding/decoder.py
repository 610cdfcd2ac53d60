"""One decoder interface for every caller (chat sessions, evaluation batches, benchmarks).

A Decoder holds the KV cache of a batch of sequences and feeds the LLM: prefill() a prompt (or
the part of it after a cached prefix), step() one token per row, crop() back to a prefix.
Two implementations: DynamicDecoder (transformers' DynamicCache, eager: the CPU default) and
StaticDecoder (static.py: fixed cache, CUDA graphs, fused step: the GPU default).
make_decoder() is the one place that picks between them and sizes static caches; the caller
owns what it gets, and hands it back to make_decoder to reuse it.
"""

from __future__ import annotations

from typing import Any, Hashable, Protocol

import torch
from transformers import DynamicCache, LlamaForCausalLM

from minigpt4.decoding.static import StaticDecoder
from minigpt4.model import IMAGE_TOKEN

CACHE_BUCKET = 256  # static caches are sized in multiples of this, so that a decoder is reused
# A growable cache's first size: an image, a question and an answer of up to the default 300 new
# tokens fit (the 7B: 0.25 GiB, against 1 GiB for chat's 2,048 slots).
GROWABLE_START = 512


class Decoder(Protocol):
    batch_size: int
    length: int  # positions cached (every row has the same number of slots; padding is masked)

    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor, pad_mask: torch.Tensor,
                start: int = 0) -> torch.Tensor:
        """Cache embeds [B,T,H] (positions [B,T]; pad_mask [B,T], 1 = real) after the first
        `start` cached positions (the rest is dropped) -> logits of the last position [B,V]."""

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Cache one token per row (tokens [B], positions [B]) -> logits [B,V]; valid until the
        next call (copy to keep)."""

    def crop(self, n: int) -> None:
        """Keep the first n cached positions."""


class DynamicDecoder:
    """transformers' DynamicCache, eager (CPU, and cache=dynamic on a GPU)."""

    def __init__(self, llm: LlamaForCausalLM, batch_size: int):
        self.llm, self.batch_size = llm, batch_size
        self.cache = DynamicCache()
        self.mask: torch.Tensor | None = None  # [B,length], 1 = real token

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def crop(self, n: int) -> None:
        if n < self.length:
            self.cache.crop(n - self.length)  # a negative count: drop that many from the end
        if self.mask is not None:
            self.mask = self.mask[:, :n]

    def prefill(self, embeds, positions, pad_mask, start=0):
        self.crop(start)
        self.mask = pad_mask if start == 0 else torch.cat([self.mask, pad_mask.to(self.mask.dtype)], dim=1)
        out = self.llm(inputs_embeds=embeds, attention_mask=self.mask, position_ids=positions,
                       past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def step(self, tokens, positions):
        # Always pass the mask: with attention_mask=None transformers 5.17 decoded 3.5x slower
        # on an H100 (7B, batch 1: 7.4 vs 26.4 tok/s), although it is equally correct.
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.batch_size, 1))], dim=1)
        out = self.llm(input_ids=tokens.view(-1, 1), attention_mask=self.mask, position_ids=positions.view(-1, 1),
                       past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1, :]


def cache_keys(ids: list[int], image_keys: list[Hashable], num_image_tokens: int) -> list[Any]:
    """One key per prompt position: the token id, or (image key, slot) for an image's soft
    tokens, so that a cache holding another image at the same place never matches."""
    keys: list[Any] = []
    image = 0  # image positions seen so far
    for token in ids:
        if token == IMAGE_TOKEN:
            keys.append((image_keys[image // num_image_tokens], image % num_image_tokens))
            image += 1
        else:
            keys.append(token)
    return keys


def reusable_prefix(cached: list[Any], keys: list[Any]) -> int:
    """How many leading positions of `keys` a cache holding `cached` can keep: their common
    prefix, leaving at least one position to compute and never ending inside an image."""
    limit = max(0, min(len(cached), len(keys) - 1))
    if cached[:limit] == keys[:limit]:  # all of it (one comparison in C: a serving engine asks for every free row)
        n = limit
    else:
        n = 0
        for a, b in zip(cached, keys[:limit]):
            if a != b:
                break
            n += 1
    while n and isinstance(keys[n - 1], tuple) and isinstance(keys[n], tuple) and keys[n][1] > 0:
        n -= 1  # back to the start of an image that is only partly cached
    return n


def make_decoder(llm: LlamaForCausalLM, batch_size: int, needed_len: int, static: bool,
                 compile: bool | str = False, reuse: Decoder | None = None, grow: bool = False) -> Decoder:
    """A decoder for batch_size sequences of up to needed_len positions, empty. `reuse` (the
    caller's previous decoder) is returned, emptied, when it fits: a static decoder keeps its
    captured graphs, and since a step attends only to the slots in use, a larger cache than
    needed costs memory but no time. grow: needed_len is a ceiling that most uses stay far
    below (chat's max_context): a static cache starts at GROWABLE_START slots and grows to it
    when a conversation needs more."""
    if not static:
        return DynamicDecoder(llm, batch_size)
    if (isinstance(reuse, StaticDecoder) and reuse.llm is llm and reuse.batch_size == batch_size
            and reuse.limit >= needed_len and reuse.requested_compile == compile):
        reuse.crop(0)
        return reuse
    max_len = -(-needed_len // CACHE_BUCKET) * CACHE_BUCKET
    max_len = min(max_len, max(needed_len, llm.config.max_position_embeddings))
    return StaticDecoder(llm, batch_size, max_len, compile=compile, start_len=GROWABLE_START if grow else None)
