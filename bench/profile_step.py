"""Where a decode step's time goes: GPU kernel time by kind against the captured graph's replay.

    python bench/profile_step.py              # 7B shape, random fp16, batch 1 and 32, GPU 0
    python bench/profile_step.py --compile    # the same step through torch.compile (batch 1 only)
    python bench/profile_step.py --quant int8 # the same step on weight-only int8 (or int4) weights
    python bench/profile_step.py --tiny       # CPU smoke test of the script

A step of a 7B at batch 1 must read every weight once (13.5 GB in fp16), so its floor is
weights / memory bandwidth. The profiler times each kernel of an eager step; the matmul kernels'
total says how close cuBLAS's matrix-vector products come to the bandwidth, and the replayed
graph's time minus the kernels' total is the idle time between kernels that a graph still has.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_decode import build_llm  # noqa: E402
from minigpt4.decoding import StaticDecoder  # noqa: E402

KINDS = (("matmul", ("gemm", "gemv", "cutlass", "sm90", "splitk", "mm_")), ("attention", ("fmha", "flash", "attention", "sdpa", "efficient")))


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, keys in KINDS if any(k in name for k in keys)), "other")


@torch.inference_mode()
def profile_step(llm, batch: int, prompt: int, compile: bool, device: torch.device, fused: bool = True) -> dict:
    dec = StaticDecoder(llm, batch, prompt + 64, compile=compile, use_fused=fused)
    embeds = torch.randn(batch, prompt, llm.config.hidden_size, device=device, dtype=llm.dtype) * 0.02
    ones = torch.ones(batch, prompt, dtype=torch.long, device=device)
    dec.prefill(embeds, (ones.cumsum(1) - 1), ones)
    tokens, pos = torch.ones(batch, dtype=torch.long, device=device), torch.full((batch,), prompt, device=device)
    start = dec.length
    dec.valid[:, start] = True
    dec.tokens.copy_(tokens)
    dec.positions.copy_(pos)
    dec.slot.fill_(start)
    forward = lambda: dec._run_step(dec.max_len, batch)  # noqa: E731
    for _ in range(3):  # warm-up (and compilation)
        forward()
        dec._rewind(start)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    steps = 5
    with profile(activities=activities) as prof:
        for _ in range(steps):
            forward()
            dec._rewind(start)
        if device.type == "cuda":
            torch.cuda.synchronize()
    by_kind, n_kernels = defaultdict(float), 0
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", 0) if device.type == "cuda" else 0
        if device.type == "cuda" and event.device_type == torch.autograd.DeviceType.CUDA and us > 0:
            by_kind[kind_of(event.key)] += us / steps / 1e3
            n_kernels += event.count
    result = {"batch": batch, "compile": compile, "fused": fused, "kernels_per_step": n_kernels // steps,
              "kernel_ms": {k: round(v, 3) for k, v in sorted(by_kind.items())},
              "kernel_total_ms": round(sum(by_kind.values()), 3)}
    if device.type == "cuda":  # the step as decoding runs it: a captured graph, replayed
        dec.step(tokens, pos)
        dec._rewind(start)
        torch.cuda.synchronize()
        t0, n = time.perf_counter(), 50
        graph = next(iter(dec.step_graphs.values()))[0]
        for _ in range(n):
            graph.replay()
        torch.cuda.synchronize()
        replay = (time.perf_counter() - t0) / n * 1e3
        weight_bytes = (sum(t.numel() * t.element_size() for t in [*llm.parameters(), *llm.buffers()])  # int weights are buffers
                        - llm.get_input_embeddings().weight.nbytes)
        result.update(graph_replay_ms=round(replay, 3), idle_in_graph_ms=round(replay - result["kernel_total_ms"], 3),
                      weight_gb=round(weight_bytes / 1e9, 2),
                      matmul_tb_s=round(weight_bytes / (by_kind["matmul"] / 1e3) / 1e12, 2) if by_kind["matmul"] else None,
                      step_tb_s=round(weight_bytes / (replay / 1e3) / 1e12, 2), tok_s=round(batch * 1e3 / replay, 1))
    top = sorted(((e.device_time_total / steps / 1e3, e.count // steps, e.key[:90]) for e in prof.key_averages()
                  if device.type == "cuda" and e.device_type == torch.autograd.DeviceType.CUDA), reverse=True)[:8]
    result["top_kernels"] = [f"{ms:.3f} ms x{count} {name}" for ms, count, name in top]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 32 (1 with --compile)")
    ap.add_argument("--prompt", type=int, default=132)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--unfused", action="store_true", help="transformers' forward as the step (the old path)")
    ap.add_argument("--quant", choices=("int8", "int4"), help="weight-only int8/int4 weights (quant.py's kernels)")
    args = ap.parse_args()
    llm = build_llm(args.tiny)
    if args.quant:
        from minigpt4.decoding.quant import quantize_llm

        llm = quantize_llm(llm, args.quant)
    device = llm.device
    results = []
    for batch in args.batches or ([1] if args.compile else [1, 32]):
        results.append(profile_step(llm, batch, args.prompt, args.compile, device, fused=not args.unfused))
        print(json.dumps(results[-1], indent=1), flush=True)
    if os.environ.get("OUT"):
        name = f"profile_step{'_compile' if args.compile else ''}{'_unfused' if args.unfused else ''}{'_' + args.quant if args.quant else ''}.json"
        Path(os.environ["OUT"], name).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
