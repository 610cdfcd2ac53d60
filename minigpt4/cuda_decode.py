"""Fast decoding on CUDA: a static KV cache and one captured CUDA graph per decode step.

Eager decoding of a 7B Llama spends most of each token launching ~600 small kernels from
Python; replaying a captured graph removes that overhead, so batch-1 decoding approaches the
memory-bandwidth limit (weights read once per token).

The cache has fixed slots [B, heads, max_len, head_dim]. `valid[b, s]` says whether slot s of
row b holds a real token; the attention mask of every step is exactly `valid`, so left padding
(eval batches) and rewinding to a shared prefix (chat turns) are just edits of `valid` and of
the write position. The graph reads `tokens`, `positions` and `valid` from fixed addresses.
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM, StaticCache


class StaticDecoder:
    def __init__(self, llm: LlamaForCausalLM, batch_size: int, max_len: int, compile: bool | str = False):
        device = llm.get_input_embeddings().weight.device
        self.llm, self.batch_size, self.max_len = llm, batch_size, max_len
        self.cache = StaticCache(config=llm.config, max_cache_len=max_len)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # [B,L]
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # [B,1]
        self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # [B,1]
        self.length = 0  # slots written so far (mirrors the cache layers' write position)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # [B,V], written by the graph
        # torch.compile fuses the ~30 small elementwise kernels per layer (norms, rotary, SiLU)
        # that otherwise dominate a batch-1 step even inside a graph.
        # compile=True uses Inductor's default mode; a string names another mode, e.g.
        # "max-autotune-no-cudagraphs" (we capture the graph ourselves).
        mode = compile if isinstance(compile, str) else None
        self._step_forward = torch.compile(self._forward, dynamic=False, mode=mode) if compile else self._forward

    # the two DynamicCache methods chat's prefix reuse calls, so either cache serves a session
    def get_seq_length(self) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        """Keep the first max_length slots (negative: drop that many from the end)."""
        keep = self.length + max_length if max_length < 0 else min(max_length, self.length)
        self._rewind(keep)
        self.valid[:, keep:] = False

    def _rewind(self, n: int) -> None:
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.fill_(n)
        self.length = n

    def _forward(self, **kwargs) -> torch.Tensor:
        out = self.llm(past_key_values=self.cache, use_cache=True, logits_to_keep=1, **kwargs)
        return out.logits[:, -1, :]  # [B,V]

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor, pad_mask: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Write embeds [B,T,H] into slots start..start+T-1 (slots from `start` on are discarded:
        a chat turn rewinds to the prefix it shares with the cache). -> last logits [B,V]."""
        b, t, _ = embeds.shape
        if start + t > self.max_len:
            raise ValueError(f"{start + t} positions do not fit the static cache of {self.max_len}")
        self._rewind(start)
        self.valid[:, start:] = False
        self.valid[:, start : start + t] = pad_mask.bool()
        slots = torch.arange(self.max_len, device=embeds.device)
        query_slots = torch.arange(start, start + t, device=embeds.device)
        mask = self.valid[:, None, None, :] & (slots[None, None, None, :] <= query_slots[None, None, :, None])
        logits = self._forward(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        self.length = start + t
        return logits

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (tokens [B], positions [B]) -> logits [B,V] (a view: copy to keep)."""
        if self.length >= self.max_len:
            raise ValueError(f"the static cache of {self.max_len} positions is full")
        self.valid[:, self.length] = True
        self.tokens.copy_(tokens.view(-1, 1))
        self.positions.copy_(positions.view(-1, 1))
        if self.valid.device.type != "cuda":  # CPU: same cache logic, eager (used by the tests)
            logits = self._forward(input_ids=self.tokens, attention_mask=self.valid[:, None, None, :],
                                   position_ids=self.positions)
            self.length += 1
            return logits
        if self.graph is None:
            self._capture()
        self.graph.replay()
        self.length += 1
        return self.logits

    def _capture(self) -> None:
        mask = self.valid[:, None, None, :]  # a view: the graph sees later edits of `valid`
        start = self.length
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up runs (allocator, cuBLAS handles) off the capture
            for _ in range(3):
                self._rewind(start)
                self._step_forward(input_ids=self.tokens, attention_mask=mask, position_ids=self.positions)
        torch.cuda.current_stream().wait_stream(stream)
        self._rewind(start)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step_forward(input_ids=self.tokens, attention_mask=mask, position_ids=self.positions)
        self._rewind(start)


_DECODERS: dict[tuple, StaticDecoder] = {}


def decoder_for(llm: LlamaForCausalLM, batch_size: int, needed_len: int, bucket: int = 32,
                compile: bool | str = False) -> StaticDecoder:
    """A decoder (and its captured graph) reused across calls with the same batch size and
    length bucket; the bucket keeps attention from reading many empty slots."""
    max_len = -(-needed_len // bucket) * bucket
    key = (id(llm), batch_size, max_len, compile)
    if key not in _DECODERS:
        if len(_DECODERS) >= 4:  # bound the memory held by caches and graphs
            _DECODERS.pop(next(iter(_DECODERS)))
            torch.cuda.empty_cache()
        _DECODERS[key] = StaticDecoder(llm, batch_size, max_len, compile=compile)
    return _DECODERS[key]
