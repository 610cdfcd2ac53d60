"""Weight-only int8 and int4 quantization of the LLM's linear layers (`precision=int8|int4`).

A batch-1 decode step reads every weight once, so its time is the weights' bytes over the
memory bandwidth: int8 weights read half of fp16's bytes, int4 a quarter. The products stay in
fp16: each weight tile is dequantized in registers inside the matrix kernel (Triton,
quant_kernels.py), so the full fp16 weight never exists in memory. Prefill-sized products are
compute-bound: int8 up to INT8_MAX_ROWS rows still goes through its tensor-core kernel (each
weight tile read once for all row blocks); int4 beyond 64 rows, and int8 beyond 512, dequantize
to fp16 (one Triton pass on CUDA, a layer's weight at a time) and cuBLAS multiplies.

Formats (per output row n, so fusing q/k/v or gate/up is concatenating rows):
  int8: q [N,K] int8, w = q * scale[n]            (symmetric, scale = absmax / 127)
  int4: q [N,K/2] uint8, two values a byte,
        w = q * scale[n,g] + low[n,g]             (asymmetric, groups of GROUP along K)
        Byte j of group g holds k = g*GROUP + j in its low nibble and k = g*GROUP + GROUP/2 + j
        in its high nibble, so a kernel unpacks a group into two contiguous halves.
The torch functions are the reference and the CPU path; the GPU tests hold the kernels to them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minigpt4.decoding import quant_kernels
from minigpt4.decoding.kernels import triton

MODES = ("int8", "int4")
KERNEL_MAX_ROWS = 64  # int4 with more rows (prefills): dequantize + cuBLAS
INT8_MAX_ROWS = 512  # int8 up to this many: its tensor-core kernel (9.3 ms against 10.2 for a 192-row prefill, H200)


def _group_size(k: int, largest: int = 128) -> int:
    for group in (128, 64, 32):
        if group <= largest and k % group == 0:
            return group
    raise ValueError(f"int4 needs an input width divisible by 32 (got {k})")


class QuantLinear(nn.Module):
    """A bias-free Linear with int8 or int4 weights; forward(x) = x @ dequant(W).T in x's dtype."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None, bits: int,
                 in_features: int):
        super().__init__()
        self.bits, self.in_features, self.out_features = bits, in_features, qweight.shape[0]
        self.group = in_features // scale.shape[1] if bits == 4 else in_features
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("low", low)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype products are computed in: the model's (model.to(dtype) converts the scales)."""
        return self.scale.dtype

    @classmethod
    @torch.no_grad()
    def quantize(cls, weight: torch.Tensor, mode: str, group: int = 128) -> "QuantLinear":
        """weight [N,K] (any float dtype, any device) -> its quantized replacement on that device.
        int4: `group` values of K share a scale (the largest of 128/64/32 <= group dividing K)."""
        w = weight.detach().float()
        n, k = w.shape
        if mode == "int8":
            scale = (w.abs().amax(1) / 127).clamp(min=1e-8)  # [N]
            q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            return cls(q, scale.to(weight.dtype), None, 8, k)
        if mode != "int4":
            raise ValueError(f"quantization mode {mode!r}: choose one of {MODES}")
        group = _group_size(k, group)
        g = w.view(n, k // group, group)
        lo, hi = g.amin(-1), g.amax(-1)  # [N,G]
        scale = ((hi - lo) / 15).clamp(min=1e-8).to(weight.dtype)
        low = lo.to(weight.dtype)
        q = torch.round((g - low.float()[..., None]) / scale.float()[..., None]).clamp(0, 15).to(torch.uint8)
        half = group // 2
        packed = q[..., :half] | (q[..., half:] << 4)  # [N,G,group/2]
        return cls(packed.reshape(n, k // 2).contiguous(), scale, low, 4, k)

    def dequantize(self) -> torch.Tensor:
        """-> the fp weight [N,K] in self.dtype (what the kernels multiply by, tile by tile), each
        value computed in fp32 and rounded once. A prefill of more than 64 rows multiplies by it:
        on CUDA a Triton kernel writes it in one pass (torch's mixed-dtype ops took 23 ms for the
        7B's int8 weights on the H200, 2026-12-02; bandwidth allows ~5)."""
        if self.qweight.is_cuda and triton is not None and not torch.compiler.is_compiling():
            return quant_kernels.dequantize(self)
        return self.dequantize_torch()

    def dequantize_torch(self) -> torch.Tensor:
        """dequantize() in torch operations: the reference (and the CPU's path)."""
        if self.bits == 8:
            return self.qweight * self.scale[:, None]
        n, groups = self.out_features, self.in_features // self.group
        packed = self.qweight.view(n, groups, self.group // 2)
        q = torch.cat([packed & 15, packed >> 4], dim=-1)  # [N,G,group] uint8
        return torch.addcmul(self.low[..., None], q, self.scale[..., None]).view(n, self.in_features)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] -> [..., N]; residual (same shape as the output) is added in fp32 when given."""
        rows = x.reshape(-1, self.in_features)
        res = None if residual is None else residual.reshape(-1, self.out_features)
        kernel_rows = INT8_MAX_ROWS if self.bits == 8 else KERNEL_MAX_ROWS
        if rows.is_cuda and triton is not None and rows.shape[0] <= kernel_rows and not torch.compiler.is_compiling():
            out = quant_kernels.matmul(rows, self, res)
        else:  # many rows (a prefill; the gate's eager reference), the CPU, and under torch.compile
            out = F.linear(rows, self.dequantize().to(rows.dtype))
            out = out if res is None else out + res
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}" + (
            f", group={self.group}" if self.bits == 4 else "")


def concat(parts: list[QuantLinear]) -> QuantLinear:
    """One QuantLinear of the parts' rows stacked (q/k/v, gate/up); each part's buffers become
    views into it, so no memory is added."""
    first = parts[0]
    fused = QuantLinear(torch.cat([p.qweight for p in parts]), torch.cat([p.scale for p in parts]),
                        None if first.low is None else torch.cat([p.low for p in parts]),
                        first.bits, first.in_features)
    start = 0
    for p in parts:
        rows = slice(start, start + p.out_features)
        p.qweight, p.scale = fused.qweight[rows], fused.scale[rows]
        p.low = None if fused.low is None else fused.low[rows]
        start += p.out_features
    return fused


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@torch.no_grad()
def quantize_llm(llm: nn.Module, mode: str, device: torch.device | str | None = None, group: int = 128) -> nn.Module:
    """Replace every attention and MLP Linear of a Llama by its QuantLinear, layer by layer:
    each layer is moved to `device` (when given) only to be quantized there, so a model loaded on
    the CPU reaches the GPU without its fp16 copy ever being there whole. A layer still on the
    meta device (random weights) is initialised there first, as transformers initialises it.
    Embeddings, norms and lm_head stay in the model's dtype (lm_head: the logits themselves;
    bitsandbytes keeps it too); the caller moves or materialises them."""
    for layer in llm.model.layers:
        if device is not None and any(p.is_meta for p in layer.parameters()):
            layer.to_empty(device=device)
            for module in layer.modules():
                llm._init_weights(module)
        for block in (layer.self_attn, layer.mlp):
            for name in LINEAR_NAMES:
                lin = getattr(block, name, None)
                if isinstance(lin, nn.Linear):
                    if lin.bias is not None:
                        raise ValueError(f"precision={mode}: the LLM's {name} has a bias (not supported)")
                    weight = lin.weight if device is None else lin.weight.to(device)
                    setattr(block, name, QuantLinear.quantize(weight, mode, group))
                    del weight
        if device is not None:
            layer.to(device)
    llm.config.minigpt4_quantization = mode
    return llm


def quantized_mode(llm: nn.Module) -> str | None:
    """'int8' / 'int4' when quantize_llm ran on this LLM, else None."""
    return getattr(llm.config, "minigpt4_quantization", None)
