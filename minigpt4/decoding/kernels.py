"""Triton kernels for the fused decode step (fused.py holds the torch versions they must equal).

Each replaces a chain of small elementwise kernels that dominated a batch-1 step once the CUDA
graph had removed Python: RMSNorm (6 kernels -> 1), rotary on q and k plus the cache write
(~14 -> 1), SiLU(gate) * up (2 -> 1). Triton compiles each once per machine (~1 s, then cached
on disk), unlike torch.compile's whole-model compilation (10-30 s per process).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch ships without Triton: the torch versions run
    triton = None


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        keep = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=keep, other=0.0)
        h = x.to(tl.float32)
        var = tl.sum(h * h, axis=0) / n_cols
        h = (h * tl.rsqrt(var + eps)).to(x.dtype)  # as LlamaRMSNorm: back to the model dtype, then
        w = tl.load(w_ptr + cols, mask=keep, other=0.0)
        tl.store(out_ptr + row * n_cols + cols, (w * h).to(x.dtype), mask=keep)  # the weight

    @triton.jit
    def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, q_ptr, k_ptr, v_ptr,
                           n_heads, n_kv, cache_len, HALF: tl.constexpr, BLOCK: tl.constexpr):
        """Program (row b, head h) of the qkv heads: q heads are rotated into q_ptr, k heads are
        rotated into the key cache at the row's slot, v heads are copied into the value cache."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        n_all = n_heads + 2 * n_kv
        d = tl.arange(0, BLOCK)
        keep = d < HALF
        src = qkv_ptr + (b * n_all + h) * 2 * HALF
        x1 = tl.load(src + d, mask=keep)
        x2 = tl.load(src + HALF + d, mask=keep)
        slot = tl.load(slot_ptr + b)
        if h < n_heads + n_kv:
            pos = tl.load(pos_ptr + b)
            c1 = tl.load(cos_ptr + pos * 2 * HALF + d, mask=keep).to(tl.float32)
            c2 = tl.load(cos_ptr + pos * 2 * HALF + HALF + d, mask=keep).to(tl.float32)
            s1 = tl.load(sin_ptr + pos * 2 * HALF + d, mask=keep).to(tl.float32)
            s2 = tl.load(sin_ptr + pos * 2 * HALF + HALF + d, mask=keep).to(tl.float32)
            f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
            y1 = (f1 * c1 - f2 * s1).to(x1.dtype)  # x * cos + rotate_half(x) * sin
            y2 = (f2 * c2 + f1 * s2).to(x1.dtype)
            if h < n_heads:
                dst = q_ptr + (b * n_heads + h) * 2 * HALF
            else:
                dst = k_ptr + ((b * n_kv + h - n_heads) * cache_len + slot) * 2 * HALF
            tl.store(dst + d, y1, mask=keep)
            tl.store(dst + HALF + d, y2, mask=keep)
        else:
            dst = v_ptr + ((b * n_kv + h - n_heads - n_kv) * cache_len + slot) * 2 * HALF
            tl.store(dst + d, x1, mask=keep)
            tl.store(dst + HALF + d, x2, mask=keep)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = cols < n_cols
        g = tl.load(gu_ptr + row * 2 * n_cols + cols, mask=keep, other=0.0)
        u = tl.load(gu_ptr + row * 2 * n_cols + n_cols + cols, mask=keep, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # F.silu rounds to the model dtype, then * up
        tl.store(out_ptr + row * n_cols + cols, (act * u).to(g.dtype), mask=keep)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [B,H] contiguous -> LlamaRMSNorm(x) [B,H]."""
    out = torch.empty_like(x)
    _rms_norm_kernel[(x.shape[0],)](x, weight, out, x.shape[1], eps, BLOCK=triton.next_power_of_2(x.shape[1]),
                                    num_warps=8)
    return out


def rope_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, nh: int, nkv: int) -> torch.Tensor:
    """As fused.rope_and_cache: qkv [B,(nh+2nkv)hd] -> rotated q [B,nh,hd]; k, v into the cache."""
    b, hd = qkv.shape[0], keys.shape[-1]
    q = torch.empty(b, nh, hd, dtype=qkv.dtype, device=qkv.device)
    _rope_cache_kernel[(b, nh + 2 * nkv)](qkv, cos, sin, positions, slot, q, keys, values,
                                          nh, nkv, keys.shape[2], HALF=hd // 2,
                                          BLOCK=triton.next_power_of_2(hd // 2))
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[B,2I] -> silu(gate) * up [B,I]."""
    b, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(b, n, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(b, triton.cdiv(n, block))](gate_up, out, n, BLOCK=block)
    return out
