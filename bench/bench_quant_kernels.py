"""An experiment for issue 13 (int8/int4 at batch 1 are 1.18x/0.89x fp16, goals 1.6x/2.5x): the
matrix products of one batch-1 decode step of the 7B, alone: fp16 cuBLAS against our int8 and
int4 matrix-vector kernels (minigpt4/decoding/quant.py, which convert each weight with an
integer-to-float instruction) and against candidates defined here (`fast`: the float 2^23
trick, and int4's scale and low applied per group after the products; `wide`: int4 `fast` over
several groups a step). A candidate that wins
replaces quant.py's kernel. Each of the 32 layers has its own weights (q/k/v and gate/up fused,
as the fused step has them), so every product reads its weight from memory, not from the L2 cache; the 128
products are one CUDA graph, so Python's launches are not timed.

    python bench/bench_quant_kernels.py            # H200: ~1 min (autotuning each kernel first)
    python bench/bench_quant_kernels.py --decode   # then batch-1 decoding of the 7B with each kernel

--decode: bench_decode.py's batch-1 measurement (132-position prompt, 128 new tokens) of fp16 ours
and of int8/int4 with quant.py's kernels, then with the candidates put in their place, each
teacher-forced against the int model's own eager forward (bench_decode's "int8 static vs int8").

Prints and writes $OUT/bench_quant_kernels.json: per kernel the step's products in ms, the
weights' bytes over that time, and the largest difference from the torch reference (dequantize,
then multiply) on the first layer's shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minigpt4.decoding import quant  # noqa: E402
from minigpt4.decoding.kernels import triton  # noqa: E402

if triton is not None:
    import triton.language as tl

    # The matrix-vector kernels below turn int8/int4 into fp32 without a conversion instruction:
    # Hopper converts an integer to a float at 1/8 of its FMA rate, which may be what caps quant.py's
    # kernels at ~2.2 TB/s. An integer v in [0, 255] put into the low bits of the float 2^23 (bits
    # 0x4B000000) reads as 2^23 + v exactly; one subtraction leaves v. Integer ops run at half the
    # FMA rate, floats at the full rate.
    MAGIC = tl.constexpr(0x4B000000)  # the float 2^23 = 8388608.0

    @triton.jit
    def _int8_gemv_fast(x_ptr, q_ptr, s_ptr, r_ptr, o_ptr, N, K,
                        HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """As _int8_gemv: q + 128 (in [0, 255]) becomes the float 2^23 + q + 128, less 2^23 + 128."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        keep_n = rn < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = tl.load(q_ptr + rn[:, None] * K + (k0 + rk)[None, :], mask=keep_n[:, None], other=0)
            f = (w.to(tl.int32) + (MAGIC + 128)).to(tl.float32, bitcast=True) - 8388736.0
            x = tl.load(x_ptr + k0 + rk).to(tl.float32)
            acc += f * x[None, :]
        out = tl.sum(acc, axis=1) * tl.load(s_ptr + rn, mask=keep_n, other=0.0).to(tl.float32)
        if HAS_RES:
            out += tl.load(r_ptr + rn, mask=keep_n, other=0.0).to(tl.float32)
        tl.store(o_ptr + rn, out.to(o_ptr.dtype.element_ty), mask=keep_n)

    @triton.jit
    def _int4_gemv_fast(x_ptr, q_ptr, s_ptr, l_ptr, r_ptr, o_ptr, N, K,
                        GROUP: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr):
        """As _int4_gemv, with the scale and low applied per group after the products:
        sum_k (q s + l) x = s sum_k q x + l sum_k x."""
        HALF: tl.constexpr = GROUP // 2
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rh = tl.arange(0, HALF)
        keep_n = rn < N
        groups = K // GROUP
        acc = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
        low_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for g in range(groups):
            byte = tl.load(q_ptr + rn[:, None] * (K // 2) + (g * HALF + rh)[None, :], mask=keep_n[:, None], other=0)
            byte = byte.to(tl.int32)
            q_lo = ((byte & 15) | MAGIC).to(tl.float32, bitcast=True) - 8388608.0
            q_hi = ((byte >> 4) | MAGIC).to(tl.float32, bitcast=True) - 8388608.0
            x_lo = tl.load(x_ptr + g * GROUP + rh).to(tl.float32)
            x_hi = tl.load(x_ptr + g * GROUP + HALF + rh).to(tl.float32)
            scale = tl.load(s_ptr + rn * groups + g, mask=keep_n, other=0.0).to(tl.float32)
            low = tl.load(l_ptr + rn * groups + g, mask=keep_n, other=0.0).to(tl.float32)
            acc += (q_lo * x_lo[None, :] + q_hi * x_hi[None, :]) * scale[:, None]
            low_acc += low * tl.sum(x_lo + x_hi, axis=0)
        out = tl.sum(acc, axis=1) + low_acc
        if HAS_RES:
            out += tl.load(r_ptr + rn, mask=keep_n, other=0.0).to(tl.float32)
        tl.store(o_ptr + rn, out.to(o_ptr.dtype.element_ty), mask=keep_n)

    @triton.jit
    def _int4_gemv_wide(x_ptr, q_ptr, s_ptr, l_ptr, r_ptr, o_ptr, N, K,
                        GROUP: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
        """As _int4_gemv_fast, GROUPS groups a step (a [BLOCK_N, GROUPS, GROUP/2] tile of bytes):
        one group a step reads only BLOCK_N x 64 bytes between waits, too few to keep the memory busy."""
        HALF: tl.constexpr = GROUP // 2
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rg = tl.arange(0, GROUPS)
        rh = tl.arange(0, HALF)
        keep_n = rn < N
        groups = K // GROUP
        acc = tl.zeros((BLOCK_N, GROUPS, HALF), dtype=tl.float32)
        low_acc = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
        for g0 in range(0, groups, GROUPS):
            g = g0 + rg  # [GROUPS]
            keep_g = g < groups
            byte = tl.load(q_ptr + rn[:, None, None] * (K // 2) + (g * HALF)[None, :, None] + rh[None, None, :],
                           mask=keep_n[:, None, None] & keep_g[None, :, None], other=0).to(tl.int32)
            q_lo = ((byte & 15) | MAGIC).to(tl.float32, bitcast=True) - 8388608.0
            q_hi = ((byte >> 4) | MAGIC).to(tl.float32, bitcast=True) - 8388608.0
            x_lo = tl.load(x_ptr + (g * GROUP)[:, None] + rh[None, :], mask=keep_g[:, None], other=0.0).to(tl.float32)
            x_hi = tl.load(x_ptr + (g * GROUP + HALF)[:, None] + rh[None, :], mask=keep_g[:, None], other=0.0).to(tl.float32)
            sg = rn[:, None] * groups + g[None, :]
            keep_sg = keep_n[:, None] & keep_g[None, :]
            scale = tl.load(s_ptr + sg, mask=keep_sg, other=0.0).to(tl.float32)  # [BLOCK_N, GROUPS]
            low = tl.load(l_ptr + sg, mask=keep_sg, other=0.0).to(tl.float32)
            acc += (q_lo * x_lo[None, :, :] + q_hi * x_hi[None, :, :]) * scale[:, :, None]
            low_acc += low * tl.sum(x_lo + x_hi, axis=1)[None, :]
        out = tl.sum(tl.sum(acc, axis=2), axis=1) + tl.sum(low_acc, axis=1)
        if HAS_RES:
            out += tl.load(r_ptr + rn, mask=keep_n, other=0.0).to(tl.float32)
        tl.store(o_ptr + rn, out.to(o_ptr.dtype.element_ty), mask=keep_n)

    _int4_wide_configs = [triton.Config({"BLOCK_N": n, "GROUPS": groups}, num_warps=warps, num_stages=2)
                          for n in (4, 8, 16, 32) for groups in (2, 4, 8) for warps in (2, 4, 8)]
    _int4_gemv_wide_tuned = quant._autotune(configs=_int4_wide_configs, key=["N", "K", "GROUP"])(_int4_gemv_wide)

    # tuned over the same configs as quant.py's kernels
    _int8_gemv_fast_tuned = quant._autotune(configs=quant._gemv_configs, key=["N", "K"],
                                            prune_configs_by={"early_config_prune": quant._fits_k})(_int8_gemv_fast)
    _int4_gemv_fast_tuned = quant._autotune(configs=quant._int4_gemv_configs, key=["N", "K", "GROUP"])(_int4_gemv_fast)

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}  # (N, K)
LAYERS = 32


# the kernels timed: (kind, weights' mode, kernel); quant.py's first, then the candidates
KERNELS = (("fp16 cuBLAS", None, None), ("int8 (convert)", "int8", "_int8_gemv_tuned"),
           ("int8 fast", "int8", "_int8_gemv_fast_tuned"), ("int4 (convert)", "int4", "_int4_gemv_tuned"),
           ("int4 fast", "int4", "_int4_gemv_fast_tuned"), ("int4 wide", "int4", "_int4_gemv_wide_tuned"))


def kernel_named(name: str):
    return getattr(quant, name) if hasattr(quant, name) else globals()[name]


def launch(kernel, lin: quant.QuantLinear | torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> None:
    """out [1,N] = x [1,K] @ W.T through one kernel (None: cuBLAS; no residual)."""
    if kernel is None:
        torch.matmul(x, lin.T, out=out)
        return
    n, k = lin.out_features, lin.in_features
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    if lin.bits == 8:
        kernel[grid](x, lin.qweight, lin.scale, out, out, n, k, HAS_RES=False)
    else:
        kernel[grid](x, lin.qweight, lin.scale, lin.low, out, out, n, k, GROUP=lin.group, HAS_RES=False)


def graph_ms(fn, repeats: int = 20) -> float:
    """The time of one replay of fn() captured as a CUDA graph."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def nbytes(lin) -> int:
    if isinstance(lin, torch.Tensor):
        return lin.numel() * lin.element_size()
    return lin.qweight.numel() + 2 * lin.scale.numel() + (0 if lin.low is None else 2 * lin.low.numel())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decode", action="store_true", help="then decode the 7B at batch 1 with each kernel")
    args = ap.parse_args()
    if triton is None or not torch.cuda.is_available():
        sys.exit("bench_quant_kernels.py needs a CUDA GPU and Triton (the kernels it times run nowhere else)")
    out_dir = Path(os.environ.get("OUT", "outputs"))
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    dev = torch.device("cuda")
    fp16 = [{name: torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02 for name, (n, k) in SHAPES.items()}
            for _ in range(LAYERS)]
    weights = {None: fp16}
    for mode in ("int8", "int4"):
        weights[mode] = [{name: quant.QuantLinear.quantize(w, mode) for name, w in layer.items()} for layer in fp16]
    xs = {name: torch.randn(1, k, device=dev, dtype=torch.float16) for name, (n, k) in SHAPES.items()}
    outs = {name: torch.empty(1, n, device=dev, dtype=torch.float16) for name, (n, k) in SHAPES.items()}
    results = {}
    for kind, mode, kernel_name in KERNELS:
        layers, kernel = weights[mode], kernel_name and kernel_named(kernel_name)
        error = 0.0
        for name, lin in layers[0].items():  # autotune (outside the graph) and check against the reference
            launch(kernel, lin, xs[name], outs[name])
            w = lin if mode is None else lin.dequantize()
            error = max(error, (outs[name].float() - xs[name].float() @ w.float().T).abs().max().item())
        total = sum(nbytes(lin) for layer in layers for lin in layer.values())
        ms = graph_ms(lambda: [launch(kernel, lin, xs[name], outs[name]) for layer in layers for name, lin in layer.items()])
        shapes = {}
        for name in SHAPES:  # each shape's 32 products alone
            shape_ms = graph_ms(lambda: [launch(kernel, layer[name], xs[name], outs[name]) for layer in layers])
            shape_bytes = sum(nbytes(layer[name]) for layer in layers)
            shapes[name] = {"ms": round(shape_ms, 4), "tb_s": round(shape_bytes / shape_ms / 1e9, 3)}
        results[kind] = {"ms": ms, "gb": total / 1e9, "tb_s": total / ms / 1e9, "max_abs_error": error, "shapes": shapes,
                         "configs": [str(c) for c in getattr(kernel, "cache", {}).values()]}  # the tuned choice per shape
        print(f"{kind:16s} {ms:7.3f} ms  {total / 1e9:6.2f} GB  {total / ms / 1e9:5.2f} TB/s  max |error| {error:.4f}  "
              + "  ".join(f"{n} {v['ms']:.3f} ms {v['tb_s']:.2f} TB/s" for n, v in shapes.items()), flush=True)
    del weights, fp16
    results["device"] = torch.cuda.get_device_name()
    if args.decode:
        results["decode"] = decode_with_each_kernel()
    (out_dir / "bench_quant_kernels.json").write_text(json.dumps(results, indent=1))


def decode_with_each_kernel() -> dict:
    """Batch-1 tokens/s of fp16 ours and int8/int4 with quant.py's kernels, then with each candidate
    in quant.py's place, each candidate teacher-forced against its model's own eager forward."""
    from bench import bench_decode as bench
    from minigpt4.decoding.gate import run_gate, table

    llm = bench.build_llm(tiny=False)
    quantized = {mode: bench.quantized_copy(llm, mode) for mode in ("int8", "int4")}
    embeds = torch.randn(1, 132, llm.config.hidden_size, device="cuda", dtype=llm.dtype) * 0.02
    mask = torch.ones(1, 132, dtype=torch.long, device="cuda")
    speed = {}

    def measure(name, model):
        decode = bench.speed_paths(model, 1, 132, 128)["static"]  # one decoder, kept across repeats
        seconds, _ = bench.timed(lambda: decode(embeds, mask), llm.device)
        speed[name] = 128 / seconds
        print(f"decode, batch 1: {name:20s} {speed[name]:7.1f} tok/s", flush=True)

    measure("fp16", llm)
    gates = []
    originals = {"int8": quant._int8_gemv_tuned, "int4": quant._int4_gemv_tuned}
    for kind, mode, kernel_name in KERNELS[1:]:
        slot = "_int8_gemv_tuned" if mode == "int8" else "_int4_gemv_tuned"
        setattr(quant, slot, originals[mode] if "convert" in kind else globals()[kernel_name])
        measure(kind, quantized[mode])
        if "convert" not in kind:
            static = {f"{kind} static vs eager": bench.quant_gate_paths(quantized[mode], mode)[f"{mode} static"]}
            gates += run_gate(quantized[mode], static, batches=(1,))
        setattr(quant, slot, originals[mode])
    print(table(gates), flush=True)
    return {"tok_s": speed, "gate": [g.row() for g in gates]}


if __name__ == "__main__":
    main()
