"""Fast decoding on CUDA: a static KV cache and one captured CUDA graph per decode step (and,
for batch-1 prefills such as chat turns, one per prefill length bucket).

Eager decoding of a 7B Llama spends most of each token launching ~600 small kernels from
Python; replaying a captured graph removes that overhead, so batch-1 decoding approaches the
memory-bandwidth limit (weights read once per token).

The cache has fixed slots [B, heads, max_len, head_dim]. `valid[b, s]` says whether slot s of
row b holds a real token; the attention mask of every step is exactly `valid`, so left padding
(eval batches) and rewinding to a shared prefix (chat turns) are just edits of `valid` and of
the write position. The graph reads `tokens`, `positions` and `valid` from fixed addresses.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from transformers import LlamaForCausalLM, StaticCache

log = logging.getLogger(__name__)


class StaticDecoder:
    """All state lives in inference tensors (the cache is allocated up front, in inference mode,
    on CPU as on CUDA): every method that touches it runs under torch.inference_mode()."""

    @torch.inference_mode()
    def __init__(self, llm: LlamaForCausalLM, batch_size: int, max_len: int, compile: bool | str = False):
        device = llm.get_input_embeddings().weight.device
        config = llm.config
        self.llm, self.batch_size, self.max_len = llm, batch_size, max_len
        self.cache = StaticCache(config=config, max_cache_len=max_len)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache.early_initialization(batch_size, config.num_key_value_heads, head_dim, llm.dtype, device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # [B,L]
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # [B,1]
        self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # [B,1]
        self.length = 0  # slots written so far (mirrors the cache layers' write position)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # [B,V], written by the graph
        # Batch-1 prefills (chat turns) padded to a bucket: on CUDA each bucket's forward is a
        # captured graph (eager, the ~1,400 kernel launches of a 7B forward take ~20 ms).
        # Tests switch it on for the CPU to check the padding itself.
        self.pad_prefill = device.type == "cuda"
        self.prefill_inputs: dict[int, dict] = {}  # bucket -> fixed input buffers
        self.prefill_graphs: dict[int, tuple] = {}  # bucket -> (graph, its logits)
        self._step_forward = _compiled_step(compile) if compile else _llm_step

    # the two DynamicCache methods chat's prefix reuse calls, so either cache serves a session
    def get_seq_length(self) -> int:
        return self.length

    @torch.inference_mode()
    def crop(self, max_length: int) -> None:
        """Keep the first max_length slots (negative: drop that many from the end)."""
        keep = self.length + max_length if max_length < 0 else min(max_length, self.length)
        self._rewind(keep)
        self.valid[:, keep:] = False

    def _rewind(self, n: int) -> None:
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(n)
        self.length = n

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
        bucket = -(-t // PREFILL_BUCKET) * PREFILL_BUCKET
        if self.pad_prefill and b == 1 and bucket <= MAX_PADDED_PREFILL and start + bucket <= self.max_len:
            logits = self._prefill_padded(embeds, positions, start, t, bucket)
        else:
            logits = _llm_prefill(self.llm, self.cache, torch.tensor([t - 1], device=embeds.device),
                                  inputs_embeds=embeds, attention_mask=self._prefill_mask(start, t),
                                  position_ids=positions)
        self._rewind(start + t)
        return logits

    def _prefill_mask(self, start: int, t: int) -> torch.Tensor:
        """[B,1,t,L]: query i (slot start+i) sees the valid slots up to its own."""
        slots = torch.arange(self.max_len, device=self.valid.device)
        query_slots = torch.arange(start, start + t, device=self.valid.device)
        return self.valid[:, None, None, :] & (slots[None, None, None, :] <= query_slots[None, None, :, None])

    def _prefill_padded(self, embeds: torch.Tensor, positions: torch.Tensor, start: int, t: int,
                        bucket: int) -> torch.Tensor:
        """Batch 1, T real positions followed by bucket-T padding ones, from fixed buffers: on
        CUDA a graph per bucket, captured once. Padding positions see the real ones (so their
        keys and values are finite: a NaN in a masked slot would still poison attention), are
        never marked valid, and are overwritten by the tokens decoded next."""
        device = embeds.device
        if bucket not in self.prefill_inputs:
            self.prefill_inputs[bucket] = dict(
                inputs_embeds=torch.zeros(1, bucket, embeds.shape[-1], dtype=embeds.dtype, device=device),
                position_ids=torch.zeros(1, bucket, dtype=torch.long, device=device),
                attention_mask=torch.zeros(1, 1, bucket, self.max_len, dtype=torch.bool, device=device),
                last=torch.zeros(1, dtype=torch.long, device=device))
        inputs = self.prefill_inputs[bucket]
        inputs["inputs_embeds"][:, :t] = embeds
        inputs["inputs_embeds"][:, t:] = 0
        inputs["position_ids"].copy_(torch.arange(bucket, device=device) + positions[0, 0])
        inputs["attention_mask"].copy_(self._prefill_mask(start, bucket))
        inputs["last"].fill_(t - 1)
        run = lambda: _llm_prefill(self.llm, self.cache, **inputs)  # noqa: E731
        self._rewind(start)
        if device.type != "cuda":
            return run()
        if bucket not in self.prefill_graphs:
            self.prefill_graphs[bucket] = _capture_graph(run, lambda: self._rewind(start))
        graph, logits = self.prefill_graphs[bucket]
        graph.replay()
        return logits

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (tokens [B], positions [B]) -> logits [B,V] (a view: copy to keep)."""
        if self.length >= self.max_len:
            raise ValueError(f"the static cache of {self.max_len} positions is full")
        self.valid[:, self.length] = True
        self.tokens.copy_(tokens.view(-1, 1))
        self.positions.copy_(positions.view(-1, 1))
        # the mask is a view: a captured graph sees later edits of `valid`
        run = lambda: self._step_forward(self.llm, self.cache, input_ids=self.tokens,  # noqa: E731
                                         attention_mask=self.valid[:, None, None, :], position_ids=self.positions)
        if self.valid.device.type != "cuda":  # CPU: same cache logic, eager (used by the tests)
            logits = run()
        else:
            if self.graph is None:
                start = self.length
                try:
                    self.graph, self.logits = _capture_graph(run, lambda: self._rewind(start))
                except Exception as err:  # noqa: BLE001 - torch.compile failing on this machine
                    if self._step_forward is _llm_step:
                        raise
                    log.warning("generation.compile=true failed here (%s: %s); decoding without it",
                                type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
                    self._step_forward = _llm_step
                    self.graph, self.logits = _capture_graph(run, lambda: self._rewind(start))
            self.graph.replay()
            logits = self.logits
        self.length += 1
        return logits


PREFILL_BUCKET = 64  # batch-1 prefills are padded to a multiple of this (one CUDA graph each)
MAX_PADDED_PREFILL = 512  # longer prefills are compute-bound: eager launching costs little more


def _capture_graph(run: Callable[[], torch.Tensor], rewind: Callable[[], None]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture run() (which writes the cache) as a CUDA graph -> (graph, its output tensor).
    Warm-up runs (allocator, cuBLAS handles, compilation) go on a side stream first; rewind()
    undoes each run's cache writes. Replay with rewind() first, as run() itself was called."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            rewind()
            run()
    torch.cuda.current_stream().wait_stream(stream)
    rewind()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    rewind()
    return graph, out


def _llm_step(llm: LlamaForCausalLM, cache: StaticCache, **kwargs) -> torch.Tensor:
    """One forward through the static cache -> logits of the last position [B,V]."""
    out = llm(past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs)
    return out.logits[:, -1, :]


def _llm_prefill(llm: LlamaForCausalLM, cache: StaticCache, last: torch.Tensor, **kwargs) -> torch.Tensor:
    """A forward through the static cache -> logits of position `last` ([1] long) [B,V]."""
    hidden = llm.model(past_key_values=cache, use_cache=True, **kwargs).last_hidden_state  # [B,T,H]
    return llm.get_output_embeddings()(hidden.index_select(1, last))[:, -1, :]


_COMPILED: dict[bool | str, Callable] = {}


def _compiled_step(mode: bool | str) -> Callable:
    """_llm_step through torch.compile, one per process and mode, shared by every decoder (chat
    sessions, web tabs, evaluation batches). dynamic=None: the first shape compiles static; a
    second cache length or batch size compiles once more with that size symbolic, so an
    evaluation's length buckets do not each compile.

    Inductor fuses the ~30 small elementwise kernels per layer (norms, rotary, SiLU) that otherwise
    dominate a batch-1 step even inside a graph. True = Inductor's default mode; a string names
    another, e.g. "max-autotune-no-cudagraphs" (we capture the CUDA graph ourselves)."""
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(_llm_step, dynamic=None, mode=None if mode is True else mode)
    return _COMPILED[mode]


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
