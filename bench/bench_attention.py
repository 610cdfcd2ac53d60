"""The attention of a decode step: fused.py's SDPA call against a Triton split-K
("flash-decoding") kernel, on the 7B's shapes (32 heads, 32 kv heads, head_dim 128, fp16).

Why: on the H200, FusedLlama.step's attention costs 0.26 ms a step at batch 1 (8 us a layer for
~200 cached slots: cuDNN's flash kernel runs one CTA per head, so 32 CTAs on 132 SMs and it is
latency bound) and ~1.2 ms a step at batch 32 (it reads the KV cache at ~2.7 TB/s of the 4.8
available). Splitting each head's slots over several programs, then combining their partial
softmaxes, should bring batch 1 to ~2-3 us a layer and batch 32 near the bandwidth.

For each batch and attend (the slots read; the static decoder keeps a graph per attend bucket),
32 layers' attention is captured in one CUDA graph (each layer its own cache, so the 50 MB L2
holds none of it) and timed: (a) the SDPA call as FusedLlama.step makes it, with its mask built
once as the step does, (b) decode_attention below, at the split count split_plan picks and at
the --splits counts too. Reported: ms for the 32 layers, KV bytes read / time, and the kernel's
max |difference| against SDPA over rows that have a valid slot.

    python bench/bench_attention.py     # H200: ~1 min
    python bench/bench_attention.py --batches 1 32 --attends 256 2048 --splits 1 4 16

Prints a table and writes $OUT/bench_attention.json. On the H200 (2026-12-02, docs/BENCHMARKS.md)
the kernel won only at batch 1 with ~256 slots (0.08 ms a step) and lost at batch 8 and 32,
where cuDNN reads the cache at up to 4.4 TB/s: SDPA stays in FusedLlama.step.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_quant_kernels import graph_ms, kernel_bench_start  # noqa: E402
from minigpt4.decoding.kernels import triton  # noqa: E402

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 32, 32, 32, 128  # the 7B
SMS = 132  # H200; decode_attention asks the device when it has one


@functools.cache
def _sm_count() -> int:
    """The device's SMs, asked once (split_plan runs at every launch)."""
    return torch.cuda.get_device_properties().multi_processor_count if torch.cuda.is_available() else SMS


def split_plan(programs: int, attend: int, block_s: int, splits: int | None = None) -> tuple[int, int]:
    """(splits, chunk): each of `programs` (row, head) pairs' attend slots cut into `splits`
    chunks of whole BLOCK_S blocks. By default enough splits for ~4 programs an SM (batch 1:
    a program per one or two blocks; batch 32 has 1024 (row, head) pairs already: one split)."""
    blocks = -(-attend // block_s)
    want = max(1, min(splits or -(-4 * _sm_count() // programs), blocks))
    chunk_blocks = -(-blocks // want)
    return -(-blocks // chunk_blocks), chunk_blocks * block_s


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, out_ptr, acc_ptr, m_ptr, den_ptr,
                      n_heads, group, attend, chunk, n_splits, stride_kb, stride_kh, stride_ks,
                      stride_vb, stride_vh, stride_vs, stride_valid, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, DIRECT: tl.constexpr):
        """Program (row b * n_heads + head h, split): the online softmax of q over slots
        [split * chunk, +chunk) of [0, attend) of kv head h // group, in fp32 and base 2 (q is
        scaled by log2(e) / sqrt(hd)). Invalid slots are not read and weigh 0. Writes acc
        (unnormalised), max m and sum den to the workspace, or (DIRECT: one split) acc / den."""
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = (bh // n_heads).to(tl.int64)  # 64-bit offsets into a large cache
        kvh = (bh % n_heads) // group
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + bh * HEAD_DIM + d).to(tl.float32) * qk_scale  # [hd]
        k_row = k_ptr + b * stride_kb + kvh * stride_kh
        v_row = v_ptr + b * stride_vb + kvh * stride_vh
        m = tl.full([], float("-inf"), tl.float32)  # running max
        den = tl.full([], 0.0, tl.float32)  # running sum of exp2(s - m)
        acc = tl.zeros([HEAD_DIM], tl.float32)  # running sum of exp2(s - m) * v
        lo = split * chunk
        hi = tl.minimum(lo + chunk, attend)
        for start in range(lo, hi, BLOCK_S):
            slots = start + tl.arange(0, BLOCK_S)  # [S]
            inside = slots < hi
            keep = inside & (tl.load(valid_ptr + b * stride_valid + slots, mask=inside, other=0) != 0)
            k = tl.load(k_row + slots[:, None] * stride_ks + d[None, :], mask=keep[:, None], other=0.0)  # [S,hd]
            v = tl.load(v_row + slots[:, None] * stride_vs + d[None, :], mask=keep[:, None], other=0.0)  # with k
            s = tl.where(keep, tl.sum(k.to(tl.float32) * q[None, :], axis=1), float("-inf"))  # [S]
            m_new = tl.maximum(m, tl.max(s, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: no -inf - -inf
            alpha = tl.exp2(m - m_safe)
            p = tl.exp2(s - m_safe)  # [S], 0 where masked
            den = den * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            m = m_new
        if DIRECT:
            out = acc / tl.where(den > 0, den, 1.0)  # no valid slot: acc = 0, out 0
            tl.store(out_ptr + bh * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))
        else:
            part = bh * n_splits + split
            tl.store(acc_ptr + part * HEAD_DIM + d, acc)
            tl.store(m_ptr + part, m)
            tl.store(den_ptr + part, den)

    @triton.jit
    def _combine_kernel(acc_ptr, m_ptr, den_ptr, out_ptr, n_splits, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
        """Program (b * n_heads + h): the splits' partials rescaled to their common max and summed.
        A split with no valid slot has m = -inf, den = 0 and weighs 0; a row with none gives 0."""
        bh = tl.program_id(0)
        sp = tl.arange(0, SPLITS)  # [P] >= n_splits
        d = tl.arange(0, HEAD_DIM)
        inside = sp < n_splits
        m = tl.load(m_ptr + bh * n_splits + sp, mask=inside, other=float("-inf"))  # [P]
        den = tl.load(den_ptr + bh * n_splits + sp, mask=inside, other=0.0)
        acc = tl.load(acc_ptr + (bh * n_splits + sp[:, None]) * HEAD_DIM + d[None, :], mask=inside[:, None], other=0.0)
        m_all = tl.max(m, axis=0)
        w = tl.exp2(m - tl.where(m_all == float("-inf"), 0.0, m_all))  # [P]
        total = tl.sum(w * den, axis=0)
        out = tl.sum(w[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)  # [hd]
        tl.store(out_ptr + bh * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))

    def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
                         attend: int, splits: int | None = None, block_s: int = 64) -> torch.Tensor:
        """q [B,nh,hd] contiguous, keys/values [B,nkv,L,hd] (L >= attend), valid [B,L] bool ->
        [B,nh,1,hd], as reference() but 0 (not NaN) for a row without a valid slot. Graph
        capturable: the grid and workspace depend on (B, nh, attend) only."""
        b, nh, hd = q.shape
        nkv = keys.shape[1]
        assert q.is_contiguous() and keys.stride(3) == 1 and values.stride(3) == 1 and hd & (hd - 1) == 0
        n_splits, chunk = split_plan(b * nh, attend, block_s, splits)
        out = torch.empty(b, nh, 1, hd, dtype=q.dtype, device=q.device)
        acc = torch.empty(b * nh, n_splits, hd, dtype=torch.float32, device=q.device)  # workspace
        m = torch.empty(b * nh, n_splits, dtype=torch.float32, device=q.device)
        den = torch.empty_like(m)
        _split_kernel[(b * nh, n_splits)](
            q, keys, values, valid.view(torch.uint8), out, acc, m, den, nh, nh // nkv, attend, chunk, n_splits,
            keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
            valid.stride(0), math.log2(math.e) / math.sqrt(hd),
            HEAD_DIM=hd, BLOCK_S=block_s, DIRECT=n_splits == 1, num_warps=4, num_stages=3)
        if n_splits > 1:
            _combine_kernel[(b * nh,)](acc, m, den, out, n_splits, HEAD_DIM=hd,
                                       SPLITS=triton.next_power_of_2(n_splits), num_warps=4)
        return out


def step_mask(valid: torch.Tensor, attend: int, dtype: torch.dtype) -> torch.Tensor:
    """FusedLlama.step's additive mask [B,1,1,attend], made once a step for every layer."""
    mask = torch.zeros(valid.shape[0], 1, 1, attend, dtype=dtype, device=valid.device)
    mask.masked_fill_(~valid[:, None, None, :attend], float("-inf"))
    return mask


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """FusedLlama.step's attention: q [B,nh,hd], keys/values [B,nkv,L,hd] -> [B,nh,1,hd] (a row
    without a valid slot: NaN from the GPU's kernels, 0 from the CPU's math path in torch 2.13)."""
    b, nh, hd = q.shape
    attend, nkv = mask.shape[-1], keys.shape[1]
    return F.scaled_dot_product_attention(q.view(b, nh, 1, hd), keys[:, :, :attend], values[:, :, :attend],
                                          attn_mask=mask, enable_gqa=nkv != nh)


def measure(batch: int, attend: int, sweep: list[int], block_s: int) -> dict | None:
    """One (batch, attend): SDPA and the kernel over 32 layers' caches, or None if they don't fit."""
    length = attend + 64  # a static cache is longer than what a step attends to
    cache_bytes = 2 * LAYERS * batch * KV_HEADS * length * HEAD_DIM * 2
    if cache_bytes > 0.6 * torch.cuda.mem_get_info()[0]:
        print(f"batch {batch:2d} attend {attend:5d}: skipped, {cache_bytes / 2**30:.1f} GiB of cache", flush=True)
        return None
    dev, fp16 = torch.device("cuda"), torch.float16
    keys = [torch.randn(batch, KV_HEADS, length, HEAD_DIM, device=dev, dtype=fp16) for _ in range(LAYERS)]
    values = [torch.randn(batch, KV_HEADS, length, HEAD_DIM, device=dev, dtype=fp16) for _ in range(LAYERS)]
    qs = [torch.randn(batch, HEADS, HEAD_DIM, device=dev, dtype=fp16) for _ in range(LAYERS)]
    valid = torch.zeros(batch, length, dtype=torch.bool, device=dev)  # [B,L]
    valid[:, : attend - 7] = True
    valid[-1, :5] = False  # the last row left-padded
    rows = valid[:, :attend].any(1)  # rows with a valid slot (all of them here)
    read = 2 * LAYERS * batch * KV_HEADS * attend * HEAD_DIM * 2  # bytes of K and V the 32 layers read
    mask = step_mask(valid, attend, fp16)
    refs = [reference(q, k, v, mask) for q, k, v in zip(qs, keys, values)]  # eager first: cuDNN plans

    def sdpa_step():  # as FusedLlama.step: the mask once, then each layer's SDPA
        m = step_mask(valid, attend, fp16)
        return [reference(q, k, v, m) for q, k, v in zip(qs, keys, values)]

    def kernel_step(n_splits: int):
        return [decode_attention(q, k, v, valid, attend, n_splits, block_s) for q, k, v in zip(qs, keys, values)]

    ms = graph_ms(sdpa_step)
    result = {"batch": batch, "attend": attend, "kv_gb": read / 1e9, "sdpa": {"ms": ms, "tb_s": read / ms / 1e9}}
    print(f"batch {batch:2d} attend {attend:5d} {'sdpa':14s} {ms:7.3f} ms {1e3 * ms / LAYERS:7.2f} us/layer "
          f"{read / ms / 1e9:5.2f} TB/s", flush=True)
    result["triton"] = []
    for splits in [None, *sweep]:  # split_plan's choice first
        n_splits = split_plan(batch * HEADS, attend, block_s, splits)[0]
        if n_splits in [r["splits"] for r in result["triton"]]:
            continue  # capped at the blocks of a row: already timed
        outs = kernel_step(n_splits)  # compiles here, outside the graph
        error = max((out[rows] - ref[rows]).abs().max().item() for out, ref in zip(outs, refs))
        ms = graph_ms(functools.partial(kernel_step, n_splits))
        label = f"triton {n_splits:2d} split{'s' if n_splits > 1 else ' '}" + ("*" if splits is None else " ")
        print(f"batch {batch:2d} attend {attend:5d} {label:14s} {ms:7.3f} ms {1e3 * ms / LAYERS:7.2f} us/layer "
              f"{read / ms / 1e9:5.2f} TB/s  max |diff| {error:.2e}  x{result['sdpa']['ms'] / ms:.2f}", flush=True)
        result["triton"].append({"splits": n_splits, "heuristic": splits is None, "ms": ms, "tb_s": read / ms / 1e9,
                                 "max_abs_diff": error})
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--attends", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--splits", type=int, nargs="*", default=[1, 2, 4, 8, 16],
                    help="split counts to time besides split_plan's (capped at the blocks of a row)")
    ap.add_argument("--block-s", type=int, default=64, help="slots a loop step of the kernel reads")
    args = ap.parse_args()
    out_dir = kernel_bench_start("bench_attention.py")
    print(f"{LAYERS} layers' decode attention, {HEADS} heads, {KV_HEADS} kv heads, head_dim {HEAD_DIM}, fp16; "
          "* = split_plan's choice, xN = SDPA's time / the kernel's", flush=True)
    results = {"device": torch.cuda.get_device_name(), "layers": LAYERS, "block_s": args.block_s, "runs": []}
    for batch in args.batches:
        for attend in args.attends:
            result = measure(batch, attend, args.splits, args.block_s)
            if result is not None:
                results["runs"].append(result)
            torch.cuda.empty_cache()  # the caches and graphs of this run
    (out_dir / "bench_attention.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
