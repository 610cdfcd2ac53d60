"""The Triton kernels of weight-only int8/int4 (quant.py holds the formats, QuantLinear and the
torch reference these must equal; the GPU tests hold them to it).

- matmul: one row (a batch-1 decode step) through a matrix-vector kernel that converts without
  the integer-to-float instruction (int8 on Hopper: its weight tiles brought in by TMA); 2-64
  rows (int8: up to 512) through tensor-core kernels (tl.dot), the weight dequantized tile by
  tile in registers.
- dequantize: the whole fp weight in one pass, for longer prefills (cuBLAS multiplies it).
Each kernel is autotuned once per shape on a machine, at the first step (the warm-up before
graph capture); bench/bench_quant_kernels.py times them.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from minigpt4.decoding.kernels import triton

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # no Triton, or an older one: the int8 matrix-vector kernel loads without TMA
    TensorDescriptor = None

QuantLinear = nn.Module  # quant.QuantLinear (which imports this module): its qweight, scale, low, bits, group


def matmul(x: torch.Tensor, w: QuantLinear, residual: torch.Tensor | None, tma: bool = True) -> torch.Tensor:
    """x [M,K] @ dequant(w).T (+ residual [M,N]) -> [M,N] in x's dtype. QuantLinear.forward sends
    int8 up to INT8_MAX_ROWS rows, int4 up to KERNEL_MAX_ROWS; more are tiled into row blocks
    (int8 64/128, int4 64: how bench_quant_kernels times prefills). tma=False: int8's one row
    without TMA, as on GPUs before Hopper (bench_quant_kernels compares the two)."""
    m, k = x.shape
    x = x.contiguous()
    out = torch.empty(m, w.out_features, dtype=x.dtype, device=x.device)
    res = out if residual is None else residual.contiguous()
    if m == 1:  # one row (chat's decode step): a matrix-vector product, no tensor cores
        grid = lambda meta: (triton.cdiv(w.out_features, meta["BLOCK_N"]),)  # noqa: E731
        if w.bits == 8 and tma and _tma_fits(w.qweight):
            desc = TensorDescriptor(w.qweight, list(w.qweight.shape), [k, 1], list(TMA_BOX))
            _int8_gemv_tma_tuned[grid](x, desc, w.scale, res, out, w.out_features, k, HAS_RES=residual is not None)
        elif w.bits == 8:
            _int8_gemv_tuned[grid](x, w.qweight, w.scale, res, out, w.out_features, k, HAS_RES=residual is not None)
        else:
            _int4_gemv_tuned[grid](x, w.qweight.view(torch.int32), w.scale, w.low, res, out, w.out_features, k, GROUP=w.group,
                                   HAS_RES=residual is not None)
        return out
    if w.bits == 8:  # row blocks are the grid's fast axis: one weight tile read once for all of them
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(w.out_features, meta["BLOCK_N"]))  # noqa: E731
        fp16 = x.dtype == torch.float16
        if m > 64:  # a prefill: row blocks of 64/128, tuned
            _int8_rows_tuned[grid](x, w.qweight, w.scale, res, out, m, w.out_features, k, HAS_RES=residual is not None,
                                   FP16=fp16)
        else:
            _int8_tuned[grid](x, w.qweight, w.scale, res, out, m, w.out_features, k, HAS_RES=residual is not None,
                              FP16=fp16, BLOCK_M=_block_m(m))
        return out
    grid = lambda meta: (triton.cdiv(w.out_features, meta["BLOCK_N"]), triton.cdiv(m, _block_m(m)))  # noqa: E731
    _int4_tuned[grid](x, w.qweight, w.scale, w.low, res, out, m, w.out_features, k,
                      GROUP=w.group, HAS_RES=residual is not None, BLOCK_M=_block_m(m))
    return out


def _block_m(m: int) -> int:
    return min(64, max(16, triton.next_power_of_2(m)))  # tl.dot needs 16 rows at least


TMA_BOX = (16, 256)  # the int8 matrix-vector kernel's tile under TMA: rows, bytes of K


def _tma_fits(q: torch.Tensor) -> bool:
    """Hopper or newer, a Triton with host tensor descriptors, and a weight TMA can address
    (16-byte aligned base and rows, at least one box wide)."""
    return (TensorDescriptor is not None and _has_tma(q.device.index) and q.data_ptr() % 16 == 0
            and q.shape[1] % 16 == 0 and q.shape[1] >= TMA_BOX[1])


@functools.cache
def _has_tma(device_index: int | None) -> bool:
    """Asked once per GPU, not on every product of a decode step."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def dequantize(w: QuantLinear) -> torch.Tensor:
    """w's fp weight [N,K] through the Triton kernels below (equal to w.dequantize_torch(), bit for bit)."""
    n, k = w.out_features, w.in_features
    out = torch.empty(n, k, dtype=w.dtype, device=w.qweight.device)
    if w.bits == 8:
        _dequantize_int8[(n, triton.cdiv(k, 1024))](w.qweight, w.scale, out, k, BLOCK=1024)
    else:
        groups = k // w.group
        _dequantize_int4[(n, triton.cdiv(groups, 16))](w.qweight, w.scale, w.low, out, k, GROUP=w.group, GROUPS=16)
    return out


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _store_tile(acc, r_ptr, o_ptr, rm, rn, keep_m, keep_n, N, HAS_RES: tl.constexpr):
        """out[rm, rn] = acc (+ residual[rm, rn]) in the output's dtype: the tensor-core kernels' end."""
        out_offsets = rm[:, None] * N + rn[None, :]
        keep = keep_m[:, None] & keep_n[None, :]
        if HAS_RES:
            acc += tl.load(r_ptr + out_offsets, mask=keep, other=0.0).to(tl.float32)
        tl.store(o_ptr + out_offsets, acc.to(o_ptr.dtype.element_ty), mask=keep)

    @triton.jit
    def _int8_kernel(x_ptr, q_ptr, s_ptr, r_ptr, o_ptr, M, N, K,
                     HAS_RES: tl.constexpr, FP16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        """Program (m, n): out[m-block, n-block] = x @ (q[n-block] * scale).T (+ residual). The row
        blocks are the grid's fast axis, so those of one weight tile run side by side and the tile
        comes from DRAM once. For fp16 x (FP16), q + 128 goes into the low bits of the fp16 1024 (0x6400),
        which reads as 1024 + q + 128 (no integer-to-float instruction)."""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        keep_n = rn < N
        keep_m = rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            keep_k = k0 + rk < K
            w = tl.load(q_ptr + rn[None, :] * K + (k0 + rk)[:, None], mask=keep_n[None, :] & keep_k[:, None], other=0)  # [BK,BN]
            x = tl.load(x_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=keep_m[:, None] & keep_k[None, :], other=0.0)
            if FP16:
                wf = (w.to(tl.int16) + (0x6400 + 128)).to(tl.float16, bitcast=True) - 1152.0
            else:
                wf = w.to(x.dtype)
            acc += tl.dot(x, wf)
        scale = tl.load(s_ptr + rn, mask=keep_n, other=0.0).to(tl.float32)
        acc = acc * scale[None, :]
        _store_tile(acc, r_ptr, o_ptr, rm, rn, keep_m, keep_n, N, HAS_RES)

    @triton.jit
    def _int4_kernel(x_ptr, q_ptr, s_ptr, l_ptr, r_ptr, o_ptr, M, N, K,
                     GROUP: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program (n, m): out[m-block, n-block] = x @ dequant(q[n-block]).T (+ residual), one group
        of K a step: its bytes' low nibbles are the group's first half, high nibbles its second."""
        HALF: tl.constexpr = GROUP // 2
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rh = tl.arange(0, HALF)
        keep_n = rn < N
        keep_m = rm < M
        groups = K // GROUP
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(groups):
            byte = tl.load(q_ptr + rn[None, :] * (K // 2) + (g * HALF + rh)[:, None], mask=keep_n[None, :], other=0)
            scale = tl.load(s_ptr + rn * groups + g, mask=keep_n, other=0.0).to(tl.float32)[None, :]
            low = tl.load(l_ptr + rn * groups + g, mask=keep_n, other=0.0).to(tl.float32)[None, :]
            x_lo = tl.load(x_ptr + rm[:, None] * K + (g * GROUP + rh)[None, :], mask=keep_m[:, None], other=0.0)
            x_hi = tl.load(x_ptr + rm[:, None] * K + (g * GROUP + HALF + rh)[None, :], mask=keep_m[:, None], other=0.0)
            w_lo = ((byte & 15).to(tl.float32) * scale + low).to(x_lo.dtype)  # [HALF,BN]
            w_hi = ((byte >> 4).to(tl.float32) * scale + low).to(x_lo.dtype)
            acc += tl.dot(x_lo, w_lo)
            acc += tl.dot(x_hi, w_hi)
        _store_tile(acc, r_ptr, o_ptr, rm, rn, keep_m, keep_n, N, HAS_RES)

    # The matrix-vector kernels turn int8/int4 into fp32 without the integer-to-float instruction,
    # which Hopper runs at 1/8 of its FMA rate: an integer v in [0, 2^23) put into the low bits of
    # the float 2^23 (bits 0x4B000000) reads as 2^23 + v exactly, and one float subtraction leaves
    # v. The 7B's batch-1 products on the H200 (2026-12-02): int8 2.36 -> 3.07 TB/s, int4 0.95 ->
    # 1.34 (with several groups a step and the words below; bench/bench_quant_kernels.py).
    MAGIC = tl.constexpr(0x4B000000)

    @triton.jit
    def _int8_times(w, x):
        """int8 tile w [BN,BK] times x [BK] (fp32), element by element: q + 128 (in [0, 255])
        becomes the float 2^23 + q + 128, less 2^23 + 128."""
        f = (w.to(tl.int32) + (MAGIC + 128)).to(tl.float32, bitcast=True) - 8388736.0
        return f * x[None, :]

    @triton.jit
    def _store_rows(acc, s_ptr, r_ptr, o_ptr, rn, keep_n, HAS_RES: tl.constexpr):
        """out[rn] = row sums of acc [BN,BK] * scale (+ residual): the int8 matrix-vector kernels' end."""
        out = tl.sum(acc, axis=1) * tl.load(s_ptr + rn, mask=keep_n, other=0.0).to(tl.float32)
        if HAS_RES:
            out += tl.load(r_ptr + rn, mask=keep_n, other=0.0).to(tl.float32)
        tl.store(o_ptr + rn, out.to(o_ptr.dtype.element_ty), mask=keep_n)

    @triton.jit
    def _int8_gemv(x_ptr, q_ptr, s_ptr, r_ptr, o_ptr, N, K,
                   HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        """Program n: out[n-block] = (q[n-block] @ x) * scale (+ residual), x one row [K]. A K that
        BLOCK_K does not divide (the 7B's down projection, 11,008) masks its last block."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        keep_n = rn < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                w = tl.load(q_ptr + rn[:, None] * K + (k0 + rk)[None, :], mask=keep_n[:, None], other=0)
                x = tl.load(x_ptr + k0 + rk).to(tl.float32)
            else:
                keep_k = k0 + rk < K
                w = tl.load(q_ptr + rn[:, None] * K + (k0 + rk)[None, :], mask=keep_n[:, None] & keep_k[None, :], other=0)
                x = tl.load(x_ptr + k0 + rk, mask=keep_k, other=0.0).to(tl.float32)
            acc += _int8_times(w, x)
        _store_rows(acc, s_ptr, r_ptr, o_ptr, rn, keep_n, HAS_RES)

    @triton.jit
    def _int8_gemv_tma(x_ptr, q_desc, s_ptr, r_ptr, o_ptr, N, K,
                       HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
        """_int8_gemv with the weight tiles brought in by TMA, STAGES of them in flight (Hopper).
        Nsight Compute found _int8_gemv waiting on its loads (half of its cycles between
        instructions), with 3 warps a scheduler; cuBLAS's fp16 products keep a TMA pipeline full.
        TMA fills the last block past K with zeros."""
        n0 = tl.program_id(0) * BLOCK_N
        rn = n0 + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        keep_n = rn < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            w = q_desc.load([n0, k0])
            x = tl.load(x_ptr + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
            acc += _int8_times(w, x)
        _store_rows(acc, s_ptr, r_ptr, o_ptr, rn, keep_n, HAS_RES)

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
    def _int4_gemv(x_ptr, w_ptr, s_ptr, l_ptr, r_ptr, o_ptr, N, K,
                         GROUP: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
        """Program n: out[n-block] = dequant(q[n-block]) @ x (+ residual), GROUPS groups of K a step
        (one group a step read too few bytes between waits). q's bytes come as int32 words
        [N, K/8]: one AND-OR puts a nibble into a float, no per-byte unpacking. Nibble j of word i
        of a group holds k = (j % 2) GROUP/2 + 4 i + j // 2 (byte 4i + j//2, low or high nibble).
        Scale and low are applied per group after the products: sum_k (q s + l) x = s sum_k q x + l sum_k x."""
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

    @triton.jit
    def _dequantize_int8(q_ptr, s_ptr, o_ptr, K, BLOCK: tl.constexpr):
        """Program (n, block): out[n, block] = q[n, block] * scale[n]."""
        n = tl.program_id(0).to(tl.int64)
        rk = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = rk < K
        q = tl.load(q_ptr + n * K + rk, mask=keep, other=0)
        scale = tl.load(s_ptr + n).to(tl.float32)
        tl.store(o_ptr + n * K + rk, (q.to(tl.float32) * scale).to(o_ptr.dtype.element_ty), mask=keep)

    @triton.jit
    def _dequantize_int4(q_ptr, s_ptr, l_ptr, o_ptr, K, GROUP: tl.constexpr, GROUPS: tl.constexpr):
        """Program (n, block): GROUPS groups of row n: out = q * scale + low, the low nibbles the
        first half of each group, the high nibbles its second."""
        HALF: tl.constexpr = GROUP // 2
        n = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)  # [GROUPS]
        rh = tl.arange(0, HALF)
        groups = K // GROUP
        keep_g = g < groups
        byte = tl.load(q_ptr + n * (K // 2) + (g * HALF)[:, None] + rh[None, :], mask=keep_g[:, None], other=0)
        scale = tl.load(s_ptr + n * groups + g, mask=keep_g, other=0.0).to(tl.float32)[:, None]
        low = tl.load(l_ptr + n * groups + g, mask=keep_g, other=0.0).to(tl.float32)[:, None]
        out = o_ptr + n * K + (g * GROUP)[:, None] + rh[None, :]  # [GROUPS, HALF]
        tl.store(out, ((byte & 15).to(tl.float32) * scale + low).to(o_ptr.dtype.element_ty), mask=keep_g[:, None])
        tl.store(out + HALF, ((byte >> 4).to(tl.float32) * scale + low).to(o_ptr.dtype.element_ty), mask=keep_g[:, None])

    def _configs(block_ks: tuple[int, ...]) -> list:
        return [triton.Config({"BLOCK_N": n, **({"BLOCK_K": bk} if bk else {})}, num_warps=warps, num_stages=stages)
                for n, warps in ((16, 2), (32, 4), (64, 4), (128, 8)) for bk in block_ks for stages in (3, 5)]

    def _fits_k(configs, named_args, **_):
        return [c for c in configs if named_args["K"] % c.kwargs["BLOCK_K"] == 0] or [
            triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=3)]

    def _autotune(**kwargs):
        """Tuned once per key on the machine, at the first step (the warm-up before graph capture);
        the choices are kept on disk where this Triton can (cache_results)."""
        try:
            return triton.autotune(**kwargs, cache_results=True)
        except TypeError:  # an older Triton
            return triton.autotune(**kwargs)

    _int8_tuned = _autotune(configs=_configs((64, 128, 256)), key=["N", "K", "BLOCK_M"],
                            prune_configs_by={"early_config_prune": _fits_k})(_int8_kernel)
    _gemv_configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": bk}, num_warps=warps, num_stages=3)
                     for n in (4, 8, 16, 32) for bk in (256, 512, 1024) for warps in (4, 8)]
    _even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
    _int8_gemv_tuned = _autotune(configs=_gemv_configs, key=["N", "K"])(_even_k(_int8_gemv))

    # The descriptor's box is fixed, so the tuner varies only warps and stages: a config with a
    # pre_hook (to set the box) is tuned again in every process, since Triton cannot keep it on
    # disk. A sweep of 36 configs on the 7B's products (H200, 2026-12-02) put 16 rows a program,
    # blocks of 256 and 2 warps at or near the top on every shape.
    _int8_gemv_tma_tuned = _autotune(configs=[
        triton.Config({"BLOCK_N": TMA_BOX[0], "BLOCK_K": TMA_BOX[1], "STAGES": stages}, num_warps=warps)
        for warps in (2, 4) for stages in (3, 4, 6)], key=["N", "K"])(_int8_gemv_tma)
    # prefill rows (more than 64): the best of a 32-config sweep on the 7B's shapes at 192 rows
    _int8_rows_tuned = _autotune(configs=[
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
        for bm, bn, bk, warps, stages in ((128, 64, 64, 4, 3), (128, 64, 128, 8, 4), (64, 128, 64, 4, 3))],
        key=["N", "K"])(_int8_kernel)
    _int4_gemv_configs = [triton.Config({"BLOCK_N": n, "GROUPS": groups}, num_warps=warps, num_stages=2)
                          for n in (4, 8, 16, 32) for groups in (2, 4, 8) for warps in (2, 4, 8)]
    _int4_gemv_tuned = _autotune(configs=_int4_gemv_configs, key=["N", "K", "GROUP"])(_int4_gemv)
    _int4_tuned = _autotune(configs=_configs((None,)), key=["N", "K", "BLOCK_M", "GROUP"])(_int4_kernel)
