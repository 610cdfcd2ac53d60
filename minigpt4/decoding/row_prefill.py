"""A serving engine's admissions as replayed CUDA graphs.

An admission prefills a few prompts into their cache rows while every other row waits. When the
new parts are short (a returning conversation, a prompt mostly cached), the forward should be
bound by launching its ~1,100 operations from Python, not by the GPU: on the H200 (2026-12-02)
an admission of one new position a request cost ~30 ms, where the arithmetic takes about one
(bench/profile_admission.py splits host and GPU time). Padded to buckets (rows and new positions to
powers of two, at least 4 new, the attended span to a power of two of at least 256 slots), each bucket's
forward through the fused weights (FusedLlama.prefill) is captured once and replayed. Padding
rows repeat the first row with no real position: they only write that row's last slot, which
no request reaches. Larger admissions are compute-bound and stay eager.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minigpt4.decoding.fused import FusedLlama
from minigpt4.decoding.graphs import capture_graph

GRAPH_POSITIONS = 512  # rows x new positions (bucketed) up to this are graphed
LEAST_NEW = 4  # new positions are padded to a power of two at least this (32 rows x 16 would be ~10 ms of arithmetic for 32 real positions)
LEAST_SPAN = 256  # attended slots likewise


def bucket(n: int, least: int) -> int:
    return max(least, 1 << max(0, n - 1).bit_length())


class RowPrefillGraphs:
    """prefill_rows' fused forward over fixed buffers, one CUDA graph per (rows, new, span)
    bucket; eager on the CPU (where tests check the padding itself)."""

    def __init__(self, model: FusedLlama, keys: list[torch.Tensor], values: list[torch.Tensor], max_len: int,
                 capture: Callable[..., tuple] = capture_graph):  # capture: tests fake it on the CPU
        self.model, self.keys, self.values, self.max_len, self.capture = model, keys, values, max_len, capture
        self.cuda = keys[0].is_cuda
        self.inputs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (rows, new) -> (x, meta)
        self.graphs: dict[tuple[int, int, int], tuple] = {}  # (rows, new, span) -> (graph, its logits)
        # one memory pool for all: a replay's logits are read (copied) before the next replay
        self.pool = torch.cuda.graph_pool_handle() if self.cuda else None

    def fits(self, rows: int, new: int) -> bool:
        return bucket(rows, 1) * bucket(new, LEAST_NEW) <= GRAPH_POSITIONS

    def __call__(self, rows: list[int], embeds: torch.Tensor, starts: list[int], lengths: list[int],
                 span: int) -> torch.Tensor:
        """As FusedLlama.prefill (embeds [R,T,H] right-padded, each row after its own start;
        span = max(starts + lengths) < max_len) -> logits [R,V] (a view into the graphs' shared
        memory: copy it before the next call)."""
        r, t, _ = embeds.shape
        rb, tb, sb = bucket(r, 1), bucket(t, LEAST_NEW), min(bucket(span, LEAST_SPAN), self.max_len)
        x, meta = self._buffers(rb, tb)
        x[:r, :t] = embeds  # the rest holds finite stale inputs: padding positions, never valid
        pad = rb - r
        meta.copy_(torch.tensor([rows + rows[:1] * pad, starts + [0] * pad, lengths + [0] * pad]))
        return self._run(rb, tb, sb)[:r]

    def capture_all(self, longest_span: int) -> int:
        """Capture now every bucket's graph for spans up to longest_span (before any row holds a
        prompt: the captures write row 0's last slot only) -> graphs captured."""
        if not self.cuda:
            return 0
        before = len(self.graphs)
        spans = sorted({min(bucket(s, LEAST_SPAN), self.max_len) for s in range(1, min(longest_span, self.max_len) + 1)})
        for rb in (1 << k for k in range(0, GRAPH_POSITIONS.bit_length())):
            for tb in (1 << k for k in range(LEAST_NEW.bit_length() - 1, GRAPH_POSITIONS.bit_length())):
                if rb * tb > GRAPH_POSITIONS or rb > self.keys[0].shape[0]:
                    continue
                _, meta = self._buffers(rb, tb)
                meta.zero_()  # row 0, no real position
                for sb in spans:
                    self._run(rb, tb, sb)
        return len(self.graphs) - before

    def _buffers(self, rb: int, tb: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (rb, tb) not in self.inputs:
            embed, device = self.model.embed, self.keys[0].device  # [V,H]: the inputs' width and dtype
            self.inputs[rb, tb] = (torch.zeros(rb, tb, embed.shape[1], dtype=embed.dtype, device=device),
                                   torch.zeros(3, rb, dtype=torch.long, device=device))  # rows, starts, lengths
        return self.inputs[rb, tb]

    def _run(self, rb: int, tb: int, sb: int) -> torch.Tensor:
        x, meta = self.inputs[rb, tb]
        run = lambda: self.model.prefill(self.keys, self.values, meta[0], x, meta[1], meta[2], sb)  # noqa: E731
        if not self.cuda:
            return run()
        if (rb, tb, sb) not in self.graphs:  # its writes are the admission's own: replaying them again is harmless
            self.graphs[rb, tb, sb] = self.capture(run, lambda: None, self.pool)
        graph, logits = self.graphs[rb, tb, sb]
        graph.replay()
        return logits
