"""An experiment for issue 13 (weight-only int8/int4 at batch 1, goals 1.6x/2.5x fp16): the matrix
products of one batch-1 decode step of the 7B, alone: fp16 cuBLAS against quant.py's int8 and
int4 matrix-vector kernels and a candidate defined here (`int4 words`: the int4 bytes read as
int32 words, each nibble masked straight into a float, no per-byte unpacking). A candidate that
wins replaces quant.py's kernel (quant.py's int8/int4 kernels won here on 2026-12-02 against
the integer-to-float conversions and one group a step; docs/BENCHMARKS.md has the figures). Each
of the 32 layers has its own weights (q/k/v and gate/up fused, as the fused step has them), so
every product reads its weight from memory, not from the L2 cache; the 128 products are one CUDA
graph, so Python's launches are not timed; each shape's 32 products are timed alone too.

    python bench/bench_quant_kernels.py            # H200: ~1 min (autotuning each kernel first)
    python bench/bench_quant_kernels.py --decode   # then batch-1 decoding of the 7B with each kernel

--decode: bench_decode.py's batch-1 measurement (132-position prompt, 128 new tokens) of fp16 ours
and of int8/int4 with quant.py's kernels and with the candidate in quant.py's place, each
teacher-forced against the int model's own eager forward (bench_decode's "int8 static vs int8").

Prints and writes $OUT/bench_quant_kernels.json: per kernel the step's products in ms, the
weights' bytes over that time, the largest difference from the torch reference (dequantize,
then multiply) on the first layer's shapes, and the tuned configs.
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

    MAGIC = quant.MAGIC

    @triton.jit
    def _x_quarters(x_ptr, start, keep_g, GROUPS: tl.constexpr, WORDS: tl.constexpr):
        """x[start[g] + 4 i + b] for b = 0..3 -> four [GROUPS, WORDS] fp32 tiles (one contiguous load, split in registers)."""
        x = tl.load(x_ptr + start[:, None] + tl.arange(0, 4 * WORDS)[None, :], mask=keep_g[:, None], other=0.0)
        x = tl.reshape(x.to(tl.float32), (GROUPS, WORDS, 2, 2))
        even, odd = tl.split(x)  # [GROUPS, WORDS, 2]: b = 0/2 and b = 1/3
        x0, x2 = tl.split(even)
        x1, x3 = tl.split(odd)
        return x0, x1, x2, x3

    @triton.jit
    def _nibbles_dot(words, high, x, J: tl.constexpr):
        """sum over the tile of nibble J of each word (q in [0, 15]) times x: the nibble is masked
        into the float 2^23 where it lies (q 2^(4J)), and x is scaled by 2^(-4J) (exact)."""
        if J < 5:
            f = ((words & (15 << (4 * J))) | MAGIC).to(tl.float32, bitcast=True) - 8388608.0
            return f * (x * (1.0 / (1 << (4 * J))))
        else:
            f = ((high & (15 << (4 * J - 12))) | MAGIC).to(tl.float32, bitcast=True) - 8388608.0
            return f * (x * (1.0 / (1 << (4 * J - 12))))

    @triton.jit
    def _int4_gemv_words(x_ptr, w_ptr, s_ptr, l_ptr, r_ptr, o_ptr, N, K,
                         GROUP: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
        """As quant._int4_gemv, reading the bytes as int32 words [N, K/8]: one AND-OR puts a nibble
        into a float (no shift, no per-byte unpacking). Nibble j of word i of a group holds
        k = (j % 2) GROUP/2 + 4 i + j // 2 (byte 4i + j//2, low or high nibble)."""
        HALF: tl.constexpr = GROUP // 2
        WORDS: tl.constexpr = GROUP // 8
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rg = tl.arange(0, GROUPS)
        rw = tl.arange(0, WORDS)
        keep_n = rn < N
        groups = K // GROUP
        acc = tl.zeros((BLOCK_N, GROUPS, WORDS), dtype=tl.float32)
        low_acc = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
        for g0 in range(0, groups, GROUPS):
            g = g0 + rg
            keep_g = g < groups
            words = tl.load(w_ptr + rn[:, None, None] * (K // 8) + (g * WORDS)[None, :, None] + rw[None, None, :],
                            mask=keep_n[:, None, None] & keep_g[None, :, None], other=0)  # [BLOCK_N, GROUPS, WORDS]
            high = words >> 12
            a0, a1, a2, a3 = _x_quarters(x_ptr, g * GROUP, keep_g, GROUPS, WORDS)  # low nibbles' x
            b0, b1, b2, b3 = _x_quarters(x_ptr, g * GROUP + HALF, keep_g, GROUPS, WORDS)  # high nibbles' x
            part = _nibbles_dot(words, high, a0[None], 0) + _nibbles_dot(words, high, b0[None], 1)
            part += _nibbles_dot(words, high, a1[None], 2) + _nibbles_dot(words, high, b1[None], 3)
            part += _nibbles_dot(words, high, a2[None], 4) + _nibbles_dot(words, high, b2[None], 5)
            part += _nibbles_dot(words, high, a3[None], 6) + _nibbles_dot(words, high, b3[None], 7)
            at = rn[:, None] * groups + g[None, :]
            keep = keep_n[:, None] & keep_g[None, :]
            scale = tl.load(s_ptr + at, mask=keep, other=0.0).to(tl.float32)
            low = tl.load(l_ptr + at, mask=keep, other=0.0).to(tl.float32)
            acc += part * scale[:, :, None]
            xsum = tl.sum(a0 + a1 + a2 + a3 + b0 + b1 + b2 + b3, axis=1)  # [GROUPS]
            low_acc += low * xsum[None, :]
        out = tl.sum(tl.sum(acc, axis=2), axis=1) + tl.sum(low_acc, axis=1)
        if HAS_RES:
            out += tl.load(r_ptr + rn, mask=keep_n, other=0.0).to(tl.float32)
        tl.store(o_ptr + rn, out.to(o_ptr.dtype.element_ty), mask=keep_n)

    _int4_gemv_words_tuned = quant._autotune(configs=quant._int4_gemv_configs, key=["N", "K", "GROUP"])(_int4_gemv_words)

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}  # (N, K)
LAYERS = 32


class _Words:
    """Called as quant._int4_gemv_tuned is (kernel[grid](x, q, ...)), passing q's bytes as int32 words."""

    def __getitem__(self, grid):
        return lambda x, q, *args, **kwargs: _int4_gemv_words_tuned[grid](x, q.view(torch.int32), *args, **kwargs)


# the kernels timed: (kind, weights' mode, kernel); quant.py's, then the candidates
KERNELS = (("fp16 cuBLAS", None, None), ("int8", "int8", "_int8_gemv_tuned"), ("int4", "int4", "_int4_gemv_tuned"),
           ("int4 words", "int4", "_Words"))


def kernel_named(name: str):
    return _Words() if name == "_Words" else getattr(quant, name)


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
                         "configs": [str(c) for c in getattr(_int4_gemv_words_tuned if isinstance(kernel, _Words) else kernel,
                                                               "cache", {}).values()]}  # the tuned choice per shape
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
    original = quant._int4_gemv_tuned
    for kind, mode, kernel_name in KERNELS[1:]:
        quant._int4_gemv_tuned = kernel_named(kernel_name) if mode == "int4" else original
        measure(kind, quantized[mode])
        static = {f"{kind} static vs eager": bench.quant_gate_paths(quantized[mode], mode)[f"{mode} static"]}
        gates += run_gate(quantized[mode], static, batches=(1,))
    quant._int4_gemv_tuned = original
    print(table(gates), flush=True)
    return {"tok_s": speed, "gate": [g.row() for g in gates]}


if __name__ == "__main__":
    main()
