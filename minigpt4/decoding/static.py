"""The static decoder: a fixed-size KV cache, and on CUDA one captured graph per decode-step
length bucket (and number of rows stepped: a serving engine steps only the rows in use) and per
batch-1 prefill length bucket.

Eager decoding of a 7B Llama spends most of each token launching kernels from Python; replaying
a captured graph removes that, so batch-1 decoding approaches the memory-bandwidth limit
(weights read once per token). The step itself is fused.FusedLlama's (~10 kernels a layer), or
transformers' forward for LLMs it does not cover (bitsandbytes layers).

The cache has fixed slots [B, heads, max_len, head_dim]. `valid[b, s]` says whether slot s of
row b holds a real token: left padding (evaluation batches) and rewinding to a shared prefix
(chat turns) are edits of `valid` and of the write position. Graphs read `tokens`, `positions`,
`slot` and `valid` from fixed addresses. A step attends only to slots below its length bucket
(ATTEND_BUCKET), so a large cache (chat's 2,000 positions) costs no attention time until used;
chat's starts at 512 slots and grows once to its ceiling (memory, not time: the graphs are
captured again).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import torch
from transformers import DynamicCache, LlamaForCausalLM, StaticCache

from minigpt4.decoding import fused
from minigpt4.decoding.graphs import capture_graph
from minigpt4.decoding.quant import quantized_mode
from minigpt4.decoding.row_prefill import RowPrefillGraphs

log = logging.getLogger(__name__)

PREFILL_BUCKET = 64  # batch-1 prefills are padded to a multiple of this (one CUDA graph each)
MAX_PADDED_PREFILL = 512  # longer prefills are compute-bound: eager launching costs little more
# A decode step attends to the slots below a multiple of this (a graph each): at batch 32 each
# slot read for nothing costs ~17 MB of a 7B's KV cache per step.
ATTEND_BUCKET = 64


class StaticDecoder:
    """Decoder protocol (decoder.py) over a static cache. All state lives in inference tensors
    (allocated up front in inference mode): every method that touches it runs under
    torch.inference_mode()."""

    @torch.inference_mode()
    def __init__(self, llm: LlamaForCausalLM, batch_size: int, max_len: int, compile: bool | str = False,
                 use_fused: bool | None = None, start_len: int | None = None):
        """max_len: the most positions a row may hold. start_len (< max_len): allocate only that
        many slots and grow to max_len when prefill() or step() needs more (chat: a 7B's
        2,048-slot cache is 1 GiB that short conversations never use)."""
        device = llm.get_input_embeddings().weight.device
        config = llm.config
        self.requested_compile = compile
        if compile and quantized_mode(llm):
            # compiled, QuantLinear takes its torch form: a whole dequantised fp16 weight written,
            # then multiplied (5 bytes moved a weight against fp16's 2): int8 decoded 98 tokens/s
            # compiled against 267 with its Triton kernels (H200, 2026-12-02, docs/BENCHMARKS.md)
            log.info("generation.compile is off for precision=%s: its Triton int kernels decode faster than "
                     "a compiled step", quantized_mode(llm))
            compile = False
        self.llm, self.batch_size, self.compile = llm, batch_size, compile
        self.limit = max_len  # what the cache may grow to; max_len: the slots it has now
        self.max_len = min(start_len or max_len, max_len)
        self.cache = self._new_cache(self.max_len)
        self.valid = torch.zeros(batch_size, self.max_len, dtype=torch.bool, device=device)  # [B,L]
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]
        self.slot = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B] the slot each row writes
        self.length = 0  # slots written so far
        self.cuda = device.type == "cuda"
        reason = fused.unsupported_reason(llm)
        if use_fused is None:
            use_fused = reason is None
            if reason is not None:
                log.info("static decoder: transformers' forward for each step (%s)", reason)
        # the step's function and what it runs on: the fused weights, or the LLM itself
        self.use_fused = use_fused
        self._forward, self._model = (_fused_forward, fused.FusedLlama.of(llm)) if use_fused else (_hf_forward, llm)
        self._uncompiled = self._forward
        if compile:
            self._forward = _compiled(self._forward, compile)
        self.step_graphs: dict[tuple[int, int], tuple] = {}  # (attend bucket, rows) -> (graph, its logits [rows,V])
        # Batch-1 prefills (chat turns) padded to a bucket: on CUDA each bucket's forward is a
        # captured graph (eager, the ~1,400 kernel launches of a 7B forward take ~20 ms).
        # Tests switch it on for the CPU to check the padding itself.
        self.pad_prefill = self.cuda
        self.prefill_inputs: dict[int, dict] = {}  # bucket -> fixed input buffers
        self.prefill_graphs: dict[int, tuple] = {}  # bucket -> (graph, its logits)
        self.row_prefill_graphs: RowPrefillGraphs | None = None  # a serving engine's admissions, graphed (use_row_prefill_graphs)

    def _new_cache(self, length: int) -> StaticCache:
        config = self.llm.config
        cache = StaticCache(config=config, max_cache_len=length)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        cache.early_initialization(self.batch_size, config.num_key_value_heads, head_dim, self.llm.dtype,
                                   self.llm.get_input_embeddings().weight.device)
        return cache

    def _make_room(self, needed: int) -> None:
        """Grow the cache to self.limit (at once: one copy, one set of graphs to capture again)
        when `needed` slots exceed what it has; more than the limit is the caller's error."""
        if needed <= self.max_len:
            return
        if needed > self.limit:
            raise ValueError(f"{needed} positions do not fit the static cache of {self.limit}")
        # every graph and buffer made for the old cache points into it
        self.step_graphs.clear()
        self.prefill_graphs.clear()
        self.prefill_inputs.clear()
        self.row_prefill_graphs = None
        old, old_len = self.cache, self.max_len
        self.cache = self._new_cache(self.limit)
        for new_layer, old_layer in zip(self.cache.layers, old.layers):
            new_layer.keys[:, :, :old_len] = old_layer.keys
            new_layer.values[:, :, :old_len] = old_layer.values
            old_layer.keys = old_layer.values = None  # freed layer by layer: the old cache is never there whole beside the new
        valid = torch.zeros(self.batch_size, self.limit, dtype=torch.bool, device=self.valid.device)
        valid[:, :old_len] = self.valid
        self.valid, self.max_len = valid, self.limit
        self._rewind(self.length)

    @torch.inference_mode()
    def crop(self, n: int) -> None:
        """Keep the first n cached positions."""
        self._rewind(min(n, self.length))
        self.valid[:, self.length :] = False

    def _rewind(self, n: int) -> None:
        for layer in self.cache.layers:  # transformers' forward writes at this position
            layer.cumulative_length.fill_(n)
        self.length = n

    # ---- prefill ----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor, pad_mask: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Write embeds [B,T,H] (positions [B,T], pad_mask [B,T] 1 = real) into slots
        start..start+T-1; slots from `start` on are discarded. -> last logits [B,V]."""
        b, t, _ = embeds.shape
        bucket = -(-t // PREFILL_BUCKET) * PREFILL_BUCKET
        padded = self.pad_prefill and b == 1 and bucket <= MAX_PADDED_PREFILL and start + bucket <= self.limit
        self._make_room(start + (bucket if padded else t))
        self.crop(start)
        self.valid[:, start : start + t] = pad_mask.bool()
        if padded:
            logits = self._prefill_padded(embeds, positions, start, t, bucket)
        else:
            logits = _hf_prefill(self.llm, self.cache, torch.tensor([t - 1], device=embeds.device),
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
        """Batch 1, T given positions followed by bucket-T padding ones, from fixed buffers: on
        CUDA a graph per bucket, captured once. The T given positions keep their own position
        ids (a left-padded row starts at 0 after its padding); the padding ones continue after
        the last, see the real ones (so their keys and values are finite: a NaN in a masked
        slot would still poison attention), are never marked valid, and are overwritten by the
        tokens decoded next."""
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
        inputs["position_ids"][:, :t] = positions
        inputs["position_ids"][:, t:] = positions[:, -1:] + torch.arange(1, bucket - t + 1, device=device)
        inputs["attention_mask"].copy_(self._prefill_mask(start, bucket))
        inputs["last"].fill_(t - 1)
        run = lambda: _hf_prefill(self.llm, self.cache, **inputs)  # noqa: E731
        self._rewind(start)
        if not self.cuda:
            return run()
        if bucket not in self.prefill_graphs:
            self.prefill_graphs[bucket] = capture_graph(run, lambda: self._rewind(start))
        graph, logits = self.prefill_graphs[bucket]
        graph.replay()
        return logits

    # ---- decode steps -----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (tokens [B], positions [B]) -> logits [B,V] (a view: copy to keep)."""
        if self.length >= self.limit:
            raise ValueError(f"the static cache of {self.limit} positions is full")
        self._make_room(self.length + 1)
        self.valid[:, self.length] = True
        self.tokens.copy_(tokens.view(-1))
        self.positions.copy_(positions.view(-1))
        self.slot.fill_(self.length)
        logits = self._replay(self.length + 1)
        self.length += 1
        return logits

    # ---- rows at their own lengths (the serving engine's continuous batching) -----------------
    @torch.inference_mode()
    def prefill_row(self, row: int, embeds: torch.Tensor, positions: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Cache embeds [1,T,H] (positions [1,T]) in row `row` after its first `start` slots (the
        rest of the row is dropped), leaving the other rows as they are -> last logits [1,V]."""
        return self.prefill_rows([row], embeds, [embeds.shape[1]], start)

    @torch.inference_mode()
    def prefill_rows(self, rows: list[int], embeds: torch.Tensor, lengths: list[int],
                     start: int | list[int] = 0) -> torch.Tensor:
        """Cache R new prompts at once, each after the first start[r] slots of its own row (one
        start for all, or one per row; the rest of each row is dropped; other rows stay as they
        are): embeds [R,T,H] right-padded, row r's first lengths[r] positions real, at positions
        start[r].. -> each row's last logits [R,V]. One eager forward through the fused weights,
        which writes the keys and values straight into the rows' slots. Without the fused step
        (one start for all): transformers' forward through a DynamicCache holding the rows'
        common-length prefixes, whose keys and values are copied."""
        r, t = embeds.shape[:2]
        starts = [start] * r if isinstance(start, int) else list(start)
        span = max(s + n for s, n in zip(starts, lengths))  # slots any row holds afterwards
        if span > self.max_len:
            raise ValueError(f"{span} positions do not fit the static cache of {self.max_len}")
        device = embeds.device
        index, starts_t, lengths_t = torch.tensor([rows, starts, lengths], device=device)  # [R] each, one copy
        self.valid[index] = torch.arange(self.max_len, device=device) < (starts_t + lengths_t)[:, None]
        if self.use_fused:  # a padding position writes its row's last slot, which must then be free
            if span == self.max_len and min(lengths) < t:
                raise ValueError(f"{span} positions and padding do not fit the static cache of {self.max_len} "
                                 "(padding writes the last slot)")
            graphs = self.row_prefill_graphs  # (they pad every admission)
            if graphs is not None and graphs.fits(r, t) and span < self.max_len:
                return graphs(rows, embeds, starts, lengths, span)
            return self._model.prefill(*self._keys_values(), index, embeds, starts_t, lengths_t, span)
        if len(set(starts)) > 1:
            raise ValueError("rows with different cached prefixes need the fused prefill")
        start = starts[0]
        if start + t > self.max_len:
            raise ValueError(f"{start + t} positions do not fit the static cache of {self.max_len}")
        prefix = DynamicCache()
        if start:
            for i, layer in enumerate(self.cache.layers):
                prefix.update(layer.keys[index, :, :start], layer.values[index, :, :start], i)
        positions = torch.arange(start, start + t, device=device).expand(r, t)
        hidden = self.llm.model(inputs_embeds=embeds, position_ids=positions,
                                attention_mask=self.valid[index, : start + t].long(),
                                past_key_values=prefix, use_cache=True).last_hidden_state  # [R,T,H]
        for i, layer in enumerate(self.cache.layers):
            layer.keys[index, :, start : start + t] = prefix.layers[i].keys[:, :, start : start + t]
            layer.values[index, :, start : start + t] = prefix.layers[i].values[:, :, start : start + t]
        last = hidden[torch.arange(r, device=device), lengths_t - 1]  # [R,H]
        return self.llm.get_output_embeddings()(last)

    @torch.inference_mode()
    def use_row_prefill_graphs(self, capture_span: int = 0) -> int:
        """From now on prefill_rows pads short admissions to buckets and, on CUDA, replays a
        graph per bucket (row_prefill.py); with capture_span, capture now those for spans up to
        it (before any row holds a prompt) -> graphs captured. The fused step only."""
        if not self.use_fused:
            return 0
        self.row_prefill_graphs = RowPrefillGraphs(self._model, *self._keys_values(), self.max_len)
        return self.row_prefill_graphs.capture_all(capture_span) if capture_span else 0

    def _keys_values(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every layer's keys and values [B,nkv,L,hd], as the fused forwards take them."""
        return [layer.keys for layer in self.cache.layers], [layer.values for layer in self.cache.layers]

    @torch.inference_mode()
    def step_rows(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, longest: int) -> torch.Tensor:
        """One token per row, each row at its own length, for the first R = len(tokens) rows
        (rows R.. are left alone: a serving engine steps only as many rows as are in use, its
        active rows kept low; R from a few sizes, as each is a graph): row b writes slot slots[b]
        ([R] long) and attends to its valid slots; `longest` = the largest slot + 1 -> logits [R,V]
        (a view). Rows at different lengths need the fused step (each row's own write slot);
        transformers' step writes where the layers' position says, so it serves one row."""
        rows = tokens.shape[0]
        if not self.use_fused:
            if self.batch_size != 1:
                raise ValueError("rows at different lengths need the fused step")
            self._rewind(longest - 1)  # the one row's write position
        self.tokens[:rows].copy_(tokens)
        self.positions[:rows].copy_(positions)
        self.slot[:rows].copy_(slots)
        self.valid[:rows].scatter_(1, self.slot[:rows, None], True)  # not index_put_: it waits for the GPU
        return self._replay(longest, rows)

    def capture_steps(self, row_counts: list[int], longest: int) -> int:
        """Capture now the graphs of step_rows for these row counts at every attention length
        up to `longest`, so that no request of a serving engine waits for a capture (~50 ms each
        for a 7B) -> graphs captured. CUDA and the fused step only; call it before any row holds
        a prompt: the captures write into every row's last slot, which no request reaches."""
        if not (self.cuda and self.use_fused) or self.compile:
            return 0
        with torch.inference_mode():
            self.tokens.zero_()
            self.positions.zero_()
            self.slot.fill_(self.max_len - 1)
            before = len(self.step_graphs)
            for rows in row_counts:
                for attend in range(ATTEND_BUCKET, min(longest, self.max_len) + 1, ATTEND_BUCKET):
                    self._replay(attend, rows)
        return len(self.step_graphs) - before

    def _replay(self, longest: int, rows: int | None = None) -> torch.Tensor:
        """The step of the first `rows` rows (all: None) that attends to the slots below `longest`,
        rounded up to ATTEND_BUCKET (the whole cache for transformers' step and a compiled one):
        a graph replay on CUDA, one graph per (attention length, rows), captured on first use."""
        rows = rows or self.batch_size
        attend = self.max_len
        if self.use_fused and not self.compile:
            attend = min(self.max_len, -(-longest // ATTEND_BUCKET) * ATTEND_BUCKET)
        if not self.cuda:  # CPU: the same cache logic, eager (used by the tests)
            return self._run_step(attend, rows)
        if (attend, rows) not in self.step_graphs:
            self.step_graphs[attend, rows] = self._capture_step(attend, rows)
        graph, logits = self.step_graphs[attend, rows]
        graph.replay()
        return logits

    def _run_step(self, attend: int, rows: int) -> torch.Tensor:
        inputs = self.tokens, self.positions, self.slot, self.valid
        if rows != self.batch_size:  # a serving engine's rows in use (the fused step only)
            inputs = tuple(t[:rows] for t in inputs)
        return self._forward(self._model, self.cache, *inputs, attend)

    def _capture_step(self, attend: int, rows: int) -> tuple:
        start = self.length
        rewind = lambda: self._rewind(start)  # noqa: E731 - transformers' step advances the layers
        try:
            return capture_graph(lambda: self._run_step(attend, rows), rewind)
        except Exception as err:  # noqa: BLE001 - torch.compile failing on this machine
            if not self.compile:
                raise
            log.warning("generation.compile=%s failed here (%s: %s); decoding without it", self.compile,
                        type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
            self.compile = False
            self._forward = self._uncompiled
            return capture_graph(lambda: self._run_step(attend, rows), rewind)


def _fused_forward(model: fused.FusedLlama, cache: StaticCache, tokens: torch.Tensor, positions: torch.Tensor,
                   slot: torch.Tensor, valid: torch.Tensor, attend: int, triton: bool = True) -> torch.Tensor:
    """One step on the fused weights for the cache's first B = len(tokens) rows -> logits [B,V]."""
    rows = tokens.shape[0]
    keys, values = [layer.keys[:rows] for layer in cache.layers], [layer.values[:rows] for layer in cache.layers]
    return model.step(keys, values, tokens, positions, slot, valid, attend, triton=triton)


def _hf_forward(llm: LlamaForCausalLM, cache: StaticCache, tokens: torch.Tensor, positions: torch.Tensor,
                slot: torch.Tensor, valid: torch.Tensor, attend: int) -> torch.Tensor:  # noqa: ARG001
    """One step through transformers' forward (it reads the whole cache, and advances the
    layers' write position itself) -> logits [B,V]."""
    out = llm(input_ids=tokens[:, None], attention_mask=valid[:, None, None, :], position_ids=positions[:, None],
              past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :]


_COMPILED: dict[tuple, Callable] = {}


def _compiled(forward: Callable, mode: bool | str) -> Callable:
    """`forward` through torch.compile, one per process and mode, shared by every decoder (chat
    sessions, web tabs, evaluation batches). dynamic=None: the first shape compiles static; a
    second batch size compiles once more with it symbolic. The fused step is compiled from its
    torch ops (Inductor writes its own kernels in place of ours). True = Inductor's default
    mode; a string names another, e.g. "max-autotune-no-cudagraphs" (we capture the graphs)."""
    key = (forward, mode)
    if key not in _COMPILED:
        target = functools.partial(forward, triton=False) if forward is _fused_forward else forward
        _COMPILED[key] = torch.compile(target, dynamic=None, mode=None if mode is True else mode)
    return _COMPILED[key]


def _hf_prefill(llm: LlamaForCausalLM, cache: StaticCache, last: torch.Tensor, **kwargs) -> torch.Tensor:
    """A forward through the static cache -> logits of position `last` ([1] long) [B,V]."""
    hidden = llm.model(past_key_values=cache, use_cache=True, **kwargs).last_hidden_state  # [B,T,H]
    return llm.get_output_embeddings()(hidden.index_select(1, last))[:, -1, :]
