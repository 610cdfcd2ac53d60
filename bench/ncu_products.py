"""Nsight Compute's view of a batch-1 step's matrix products (issue 13): each of the 7B's four
shapes once in fp16 (cuBLAS), int8 and int4 (quant_kernels.py), inside the NVTX range "profile"
after a warm-up that autotunes the Triton kernels outside it.

    ncu --clock-control none --nvtx --nvtx-include "profile/" --set full python bench/ncu_products.py
    bash bench/gpu_checks.sh ncu    # the same, its text in $OUT/details.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_quant_kernels import SHAPES, kernel_product  # noqa: E402
from minigpt4.decoding import quant  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    weights = {name: torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02 for name, (n, k) in SHAPES.items()}
    modes = {"fp16": weights}
    for mode in ("int8", "int4"):
        modes[mode] = {name: quant.QuantLinear.quantize(w, mode) for name, w in weights.items()}
    xs = {name: torch.randn(1, k, device=dev, dtype=torch.float16) for name, (n, k) in SHAPES.items()}
    for layers in modes.values():  # autotune and warm up outside the profiled range
        for name, lin in layers.items():
            for _ in range(3):
                kernel_product(lin, xs[name])
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("profile")
    for mode, layers in modes.items():
        for name, lin in layers.items():
            kernel_product(lin, xs[name])
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()


if __name__ == "__main__":
    main()
