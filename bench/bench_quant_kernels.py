"""Where weight-only int8/int4 decoding spends its time (issue 13: goals 1.6x / 2.5x the fp16
tokens/s at batch 1), measured on the 7B's shapes with random weights:

1. a batch-1 step's 128 matrix products alone (one CUDA graph, so Python's launches are not
   timed; each of the 32 layers has its own weights, q/k/v and gate/up fused as the fused step
   has them, so every product reads its weight from memory, not from the L2 cache; each shape's
   32 products timed alone too): fp16 cuBLAS against our int8 and int4 kernels (quant_kernels.py);
   On Hopper int8 also without TMA (quant_kernels.matmul's tma=False, the kernel of older GPUs);
2. the same products on a prefill's rows (--prefill-rows, default 192: a 132-position prompt
   padded to its bucket): fp16 cuBLAS, dequantize + cuBLAS (int4's path for more than 64 rows) and our
   tensor-core kernels (int8's path up to quant.INT8_MAX_ROWS rows: row blocks of 64/128 side by
   side on each weight tile, so it is read once and no fp16 copy is written);
3. --decode: batch-1 decoding (132-position prompt, 128 new tokens, bench_decode.py's
   measurement) of fp16 ours, int8 and int4, with the prefill timed alone, each int model
   teacher-forced against its own eager forward (bench_decode's "int8 static vs int8").

    python bench/bench_quant_kernels.py            # H200: ~1 min (autotuning each kernel first)
    python bench/bench_quant_kernels.py --decode   # and the decoding (~2 min more)

Prints and writes $OUT/bench_quant_kernels.json. The kernels' history (H200, 2026-12-02): an
integer-to-float conversion per weight held int8 to 2.36 TB/s and int4 (one group a step) to
0.95; the float 2^23 trick, wider steps and int4 read as words took them to 3.07 and 1.32
(docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minigpt4.decoding import quant, quant_kernels  # noqa: E402
from minigpt4.decoding.kernels import triton  # noqa: E402

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}  # (N, K)
LAYERS = 32


def kernel_product(lin: quant.QuantLinear | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x [M,K] @ W.T: cuBLAS for an fp16 weight; for an int one our kernels (quant_kernels.matmul) whatever M
    (one row: the matrix-vector kernel; more: the tensor-core kernel, blocks of 64 rows)."""
    return x @ lin.T if isinstance(lin, torch.Tensor) else quant_kernels.matmul(x, lin, None)


def dequantized(lin: quant.QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """QuantLinear's path for more than 64 rows: the fp16 weight, then cuBLAS."""
    return F.linear(x, lin.dequantize())


def kernel_bench_start(script: str) -> Path:
    """A kernel bench's start: exits with one line where there is no GPU or no Triton; seeds
    torch -> the folder for its results ($OUT, else outputs/)."""
    if triton is None or not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA GPU and Triton (the kernels it times run nowhere else)")
    out_dir = Path(os.environ.get("OUT", "outputs"))
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    return out_dir


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


def time_products(label: str, product, layers: list[dict], xs: dict) -> dict:
    """Every layer's products through `product`, checked on layer 0 against the torch reference."""
    error = 0.0
    for name, lin in layers[0].items():  # autotunes outside the graph
        w = lin if isinstance(lin, torch.Tensor) else lin.dequantize_torch()
        error = max(error, (product(lin, xs[name]).float() - xs[name].float() @ w.float().T).abs().max().item())
    total = sum(nbytes(lin) for layer in layers for lin in layer.values())
    ms = graph_ms(lambda: [product(lin, xs[name]) for layer in layers for name, lin in layer.items()])
    shapes = {}
    for name in SHAPES:  # each shape's 32 products alone
        shape_ms = graph_ms(lambda: [product(layer[name], xs[name]) for layer in layers])
        shapes[name] = {"ms": round(shape_ms, 4), "tb_s": round(sum(nbytes(layer[name]) for layer in layers) / shape_ms / 1e9, 3)}
    print(f"{label:28s} {ms:7.3f} ms  {total / 1e9:6.2f} GB  {total / ms / 1e9:5.2f} TB/s  max |error| {error:.4f}  "
          + "  ".join(f"{n} {v['ms']:.3f} ms" for n, v in shapes.items()), flush=True)
    return {"ms": ms, "gb": total / 1e9, "tb_s": total / ms / 1e9, "max_abs_error": error, "shapes": shapes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decode", action="store_true", help="then decode the 7B at batch 1, fp16, int8 and int4")
    ap.add_argument("--prefill-rows", type=int, default=192, help="rows of the prefill-sized products (0: skip)")
    args = ap.parse_args()
    out_dir = kernel_bench_start("bench_quant_kernels.py")
    dev = torch.device("cuda")
    weights = {"fp16": [{name: torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02 for name, (n, k) in SHAPES.items()}
                        for _ in range(LAYERS)]}
    for mode in ("int8", "int4"):
        weights[mode] = [{name: quant.QuantLinear.quantize(w, mode) for name, w in layer.items()} for layer in weights["fp16"]]
    results = {"device": torch.cuda.get_device_name(), "step": {}, "prefill": {}}
    xs = {name: torch.randn(1, k, device=dev, dtype=torch.float16) for name, (n, k) in SHAPES.items()}
    print("a batch-1 step's products", flush=True)
    for mode, layers in weights.items():
        results["step"][mode] = time_products(mode, kernel_product, layers, xs)
    if quant_kernels._tma_fits(weights["int8"][0]["qkv"].qweight):  # Hopper: int8 with and without TMA
        results["step"]["int8 without TMA"] = time_products(
            "int8 without TMA", lambda lin, x: quant_kernels.matmul(x, lin, None, tma=False), weights["int8"], xs)
    if args.prefill_rows:
        rows = args.prefill_rows
        xs = {name: torch.randn(rows, k, device=dev, dtype=torch.float16) for name, (n, k) in SHAPES.items()}
        print(f"a prefill's products ({rows} rows)", flush=True)
        results["prefill"]["fp16 cuBLAS"] = time_products("fp16 cuBLAS", kernel_product, weights["fp16"], xs)
        for mode in ("int8", "int4"):
            for label, product in (("dequantize + cuBLAS", dequantized), ("tensor-core kernel", kernel_product)):
                results["prefill"][f"{mode} {label}"] = time_products(f"{mode} {label}", product, weights[mode], xs)
    del weights
    if args.decode:
        results["decode"] = decode_each_precision()
    (out_dir / "bench_quant_kernels.json").write_text(json.dumps(results, indent=1))


def decode_each_precision() -> dict:
    """Batch-1 tokens/s of fp16 ours, int8 and int4, each prefill alone, and the int models' gate."""
    from bench import bench_decode as bench
    from minigpt4.decoding.gate import run_gate, table

    llm = bench.build_llm(tiny=False)
    models = {"fp16": llm, **{mode: bench.quantized_copy(llm, mode) for mode in ("int8", "int4")}}
    embeds = torch.randn(1, 132, llm.config.hidden_size, device="cuda", dtype=llm.dtype) * 0.02
    mask = torch.ones(1, 132, dtype=torch.long, device="cuda")
    positions = torch.arange(132, device="cuda")[None]
    result, gates = {}, []
    for mode, model in models.items():
        decoder = bench.make_decoder(model, 1, 260, static=True)
        decode = lambda: bench.ours(decoder, embeds, mask, 128)  # noqa: E731
        seconds, _ = bench.timed(decode, llm.device)
        prefill = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            decoder.prefill(embeds, positions, mask)
            torch.cuda.synchronize()
            prefill.append((time.perf_counter() - t0) * 1e3)
        result[mode] = {"tok_s": 128 / seconds, "prefill_ms": sorted(prefill)[2],
                        "steps_ms": (seconds * 1e3 - sorted(prefill)[2]) / 128}
        print(f"decode, batch 1: {mode:5s} {result[mode]['tok_s']:7.1f} tok/s  prefill {result[mode]['prefill_ms']:6.2f} ms  "
              f"a step {result[mode]['steps_ms']:.3f} ms (the rest over 128)", flush=True)
        if mode != "fp16":
            static = {f"{mode} static vs eager": bench.quant_gate_paths(model, mode)[f"{mode} static"]}
            gates += run_gate(model, static, batches=(1,))
    print(table(gates), flush=True)
    return {**result, "gate": [g.row() for g in gates]}


if __name__ == "__main__":
    main()
