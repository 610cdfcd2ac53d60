"""Capturing a decode forward as a CUDA graph, for the static decoder's steps and prefills and
the serving engine's admissions (static.py, row_prefill.py): replaying one graph removes the
Python launches that dominate a batch-1 step of a 7B."""

from __future__ import annotations

from collections.abc import Callable

import torch


def capture_graph(run: Callable[[], torch.Tensor], rewind: Callable[[], None],
                  pool: tuple | None = None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture run() (which writes the cache) as a CUDA graph -> (graph, its output tensor).
    Warm-up runs (allocator, cuBLAS handles, compilation) go on a side stream first; rewind()
    undoes each run's cache writes. Replay with rewind() first, as run() itself was called.
    pool: memory shared with other graphs (torch.cuda.graph_pool_handle()); then read each
    replay's output before replaying another of them."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            rewind()
            run()
    torch.cuda.current_stream().wait_stream(stream)
    rewind()
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads (a server's handlers encoding images) may use the GPU meanwhile
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = run()
    rewind()
    return graph, out
