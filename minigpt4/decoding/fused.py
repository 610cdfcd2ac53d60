"""The Llama decode step on fused weights: one token per row through the LLM in ~10 kernels a layer.

transformers' Llama forward launches ~50 kernels per layer for one token (each RMSNorm is six
ops, rotary another dozen, a mask is built, q/k/v and gate/up are separate products); inside a
CUDA graph each launch still costs a few microseconds and a trip through memory, which made our
graphed step 1.9 ms slower than the weights' own reading time. Here:
  - q/k/v and gate/up are single wider matrices: the model's own Linear weights become views
    into them when the model is first decoded (no memory is added, every other path still works);
  - the residual adds ride in the matmuls (addmm);
  - attention reads only the slots up to `attend` (the static decoder keeps a graph per length
    bucket), not the whole cache;
  - on CUDA, RMSNorm, rotary + cache write and SiLU*up are one Triton kernel each (kernels.py).
The torch functions below are the reference: the CPU runs them, and the GPU tests hold the
Triton kernels to them. Rounding follows transformers (fp32 norms, fp16 products)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from minigpt4.decoding import kernels
from minigpt4.decoding.quant import QuantLinear, concat

Weight = torch.Tensor | QuantLinear  # [N,K] fp weight, or its int8/int4 form (quant.py)


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    qkv: Weight  # [(nh + 2 nkv) hd, H]
    o: Weight  # [H, nh hd]
    mlp_norm: torch.Tensor  # [H]
    gate_up: Weight  # [2 I, H]
    down: Weight  # [H, I]


def unsupported_reason(llm: LlamaForCausalLM) -> str | None:
    """Why the fused step cannot run this LLM (None: it can). bitsandbytes layers, biases and
    rope variants other than the default go through transformers' own forward; our own int8/int4
    layers (quant.py) run here."""
    cfg = llm.config
    if getattr(cfg, "model_type", "llama") != "llama":
        return f"model_type {cfg.model_type}"
    rope = (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    if (rope.get("rope_type") or rope.get("type") or "default") != "default":
        return "rope scaling"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act}"
    for layer in llm.model.layers:
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            if type(lin) is QuantLinear:
                continue
            if type(lin) is not nn.Linear or lin.bias is not None:
                return f"{type(lin).__name__} layers" if type(lin) is not nn.Linear else "biases"
            if lin.weight.dtype not in (torch.float16, torch.bfloat16, torch.float32) or lin.weight.is_meta:
                return f"weights of {lin.weight.dtype}"
    return None


def _padded_lm_head(llm: LlamaForCausalLM, pad: bool | None = None) -> torch.Tensor:
    """On CUDA, the output embedding [V,H] with zero rows added up to a multiple of 64: Vicuna's
    32,001 rows gave cuBLAS no aligned kernel at batch 32 (0.29 ms for the product). The model's
    own weight becomes the first V rows (a view), so no second copy is kept (a copy was 263 MB).
    pad: None = on CUDA only."""
    head = llm.get_output_embeddings()
    weight, multiple = head.weight, 64
    rows = weight.shape[0]
    if not (weight.is_cuda if pad is None else pad) or rows % multiple == 0:
        return weight
    padded = weight.new_zeros(-(-rows // multiple) * multiple, weight.shape[1])
    padded[:rows] = weight
    tied = llm.get_input_embeddings().weight is weight
    head.weight = nn.Parameter(padded[:rows], requires_grad=False)
    if tied:
        llm.get_input_embeddings().weight = head.weight
    return padded


def _fuse(linears: list[nn.Module]) -> Weight:
    """One [sum(out), in] matrix; each Linear's weight becomes a row block (a view) of it."""
    if all(type(lin) is QuantLinear for lin in linears):
        return concat(linears)
    fused = torch.cat([lin.weight.detach() for lin in linears])
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows
    return fused


class FusedLlama:
    """Fused views of one LlamaForCausalLM's weights, built once per model (FusedLlama.of)."""

    @torch.no_grad()
    def __init__(self, llm: LlamaForCausalLM):
        cfg = llm.config
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.intermediate = cfg.intermediate_size
        self.eps = cfg.rms_norm_eps
        self.vocab = llm.get_output_embeddings().weight.shape[0]
        self.lm_head = _padded_lm_head(llm)  # [V',H], V' >= V
        self.embed = llm.get_input_embeddings().weight  # [V,H]
        self.final_norm = llm.model.norm.weight
        self.layers = []
        for layer in llm.model.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(LayerWeights(
                attn_norm=layer.input_layernorm.weight,
                qkv=_fuse([a.q_proj, a.k_proj, a.v_proj]),
                o=_weight(a.o_proj),
                mlp_norm=layer.post_attention_layernorm.weight,
                gate_up=_fuse([m.gate_proj, m.up_proj]),
                down=_weight(m.down_proj),
            ))
        # rotary tables for every position, computed by the model's own rotary module
        positions = torch.arange(cfg.max_position_embeddings, device=self.embed.device)[None]
        cos, sin = llm.model.rotary_emb(self.embed[:1, None], positions)  # [1,P,hd] each
        self.cos, self.sin = cos[0], sin[0]
        self.use_triton = self.embed.is_cuda and kernels.available()

    @classmethod
    def of(cls, llm: LlamaForCausalLM) -> "FusedLlama":
        """The model's fused weights (fusing them the first time; kept on the model itself)."""
        fused = llm.__dict__.get("_minigpt4_fused")
        if fused is None:
            with torch.inference_mode(False):  # the model's weights become views of these: keep them
                fused = cls(llm)  # usable by autograd (a decoder is made in inference mode)
            llm.__dict__["_minigpt4_fused"] = fused
        return fused

    def step(self, keys: list[torch.Tensor], values: list[torch.Tensor], tokens: torch.Tensor,
             positions: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor, attend: int,
             triton: bool = True) -> torch.Tensor:
        """Feed tokens [B] at positions [B] into cache slots `slot` ([B] long: each row its own)
        of every layer's keys/values [B,nkv,L,hd]; attend to slots [0, attend) where valid [B,L]
        -> logits [B,V].
        triton=False: the torch versions only (for torch.compile, which writes its own kernels)."""
        b = tokens.shape[0]
        triton = triton and self.use_triton
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        norm = kernels.rms_norm if triton else rms_norm
        x = F.embedding(tokens, self.embed)  # [B,H]
        # one additive mask for every layer (a bool mask is converted again by each attention call)
        mask = torch.zeros(valid.shape[0], 1, 1, attend, dtype=x.dtype, device=x.device)
        mask.masked_fill_(~valid[:, None, None, :attend], float("-inf"))  # [B,1,1,attend]
        for i, w in enumerate(self.layers):
            qkv = _linear(norm(x, w.attn_norm, self.eps), w.qkv)  # [B,(nh+2nkv)hd]
            if triton:
                q = kernels.rope_and_cache(qkv, self.cos, self.sin, positions, keys[i], values[i], slot, nh, nkv)
            else:
                q = rope_and_cache(qkv, self.cos, self.sin, positions, keys[i], values[i], slot, nh, nkv)
            attn = F.scaled_dot_product_attention(  # [B,nh,1,hd]
                q.view(b, nh, 1, hd), keys[i][:, :, :attend], values[i][:, :, :attend],
                attn_mask=mask, enable_gqa=nkv != nh)
            x = _linear(attn.reshape(b, nh * hd), w.o, residual=x)
            x = self._mlp(x, w, norm, triton)
        return F.linear(norm(x, self.final_norm, self.eps), self.lm_head)[:, : self.vocab]  # [B,V]

    def prefill(self, keys: list[torch.Tensor], values: list[torch.Tensor], rows: torch.Tensor, x: torch.Tensor,
                starts: torch.Tensor, lengths: torch.Tensor, span: int) -> torch.Tensor:
        """Feed x [R,T,H] (input embeddings, right-padded: row r's first lengths[r] are real) into
        the cache rows `rows` ([R] long) of every layer's keys/values [B,nkv,L,hd], row r after its
        own first starts[r] slots (taken as valid), at positions starts[r].. -> the logits of each
        row's last real position [R,V]. span = max(starts + lengths), what any query sees. Query t
        of row r sees the slots up to starts[r] + t; a padding position writes the row's last
        slot, which no request reaches (as idle rows' steps do).
        A serving engine's admissions: a handful of large products a layer, and the keys and
        values written straight into the rows (no cache of transformers' to copy from); rows
        with different cached prefixes go in one forward. Few operations a layer: an admission of
        one new position a request cost ~30 ms for a 7B on the H200 (2026-12-02), far above
        its arithmetic (row_prefill.py graphs it)."""
        r, t, h = x.shape
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        norm = kernels.rms_norm if self.use_triton else rms_norm
        steps = torch.arange(t, device=x.device)
        positions = starts[:, None] + steps  # [R,T]
        real = steps < lengths[:, None]  # [R,T]
        slots = torch.where(real, positions, keys[0].shape[2] - 1)  # [R,T]
        rotary = torch.where(real, positions, 0)  # (a padding position's rotation does not matter; the last slot may lie past the table)
        cos, sin = self.cos[rotary][:, :, None], self.sin[rotary][:, :, None]  # [R,T,1,hd]
        sees = (torch.arange(span, device=x.device) <= positions[:, :, None])[:, None]  # [R,1,T,S]
        # an additive mask made once (attention turned a boolean one into this in every layer), its
        # rows 8-aligned in memory (else the memory-efficient kernel copies it into such rows each layer)
        aligned = torch.zeros(r, 1, t, -(-span // 8) * 8, dtype=x.dtype, device=x.device)
        bias = aligned[..., :span].masked_fill_(~sees, float("-inf"))  # [R,1,T,S]
        x = x.reshape(r * t, h)
        for i, w in enumerate(self.layers):
            qkv = _linear(norm(x, w.attn_norm, self.eps), w.qkv).view(r, t, nh + 2 * nkv, hd)
            qk = _rotate(qkv[:, :, : nh + nkv], cos, sin)  # [R,T,nh+nkv,hd]: q and k heads in one go
            keys[i][rows[:, None], :, slots] = qk[:, :, nh:]  # [R,T,nkv,hd] into each row's slots
            values[i][rows[:, None], :, slots] = qkv[:, :, nh + nkv :]
            k, v = keys[i][rows, :, :span], values[i][rows, :, :span]  # [R,nkv,S,hd]: cached prefix and new
            attn = F.scaled_dot_product_attention(qk[:, :, :nh].transpose(1, 2), k, v, attn_mask=bias,
                                                  enable_gqa=nkv != nh)  # [R,nh,T,hd]
            x = _linear(attn.transpose(1, 2).reshape(r * t, nh * hd), w.o, residual=x)
            x = self._mlp(x, w, norm, self.use_triton)
        x = x.view(r, t, h)[torch.arange(r, device=x.device), lengths - 1]  # [R,H]
        return F.linear(norm(x, self.final_norm, self.eps), self.lm_head)[:, : self.vocab]  # [R,V]

    def _mlp(self, x: torch.Tensor, w: LayerWeights, norm: Callable, triton: bool) -> torch.Tensor:
        """x [N,H] -> x + down(silu(gate) * up) of the normed x [N,H] (the residual inside the product)."""
        gate_up = _linear(norm(x, w.mlp_norm, self.eps), w.gate_up)  # [N,2I]
        return _linear(kernels.silu_mul(gate_up) if triton else silu_mul(gate_up), w.down, residual=x)


def _weight(linear: nn.Module) -> Weight:
    return linear if type(linear) is QuantLinear else linear.weight


def _linear(x: torch.Tensor, w: Weight, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [B,K] @ w.T (+ residual [B,N], added inside the product: addmm, or the int kernels)."""
    if type(w) is QuantLinear:
        return w(x, residual)
    return F.linear(x, w) if residual is None else torch.addmm(residual, x, w.t())


# ---- the reference versions (CPU, and what the Triton kernels are tested against) -------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: the variance in fp32, the scale applied in the model's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, nh: int, nkv: int) -> torch.Tensor:
    """qkv [B,(nh+2nkv)hd]: rotate q and k at `positions`, write k and v into cache slots
    `slot` ([B], each row its own) -> rotated q [B,nh,hd]."""
    b, hd = qkv.shape[0], keys.shape[-1]
    q, k, v = qkv.view(b, nh + 2 * nkv, hd).split([nh, nkv, nkv], dim=1)
    c, s = cos[positions][:, None], sin[positions][:, None]  # [B,1,hd]
    q, k = _rotate(q, c, s), _rotate(k, c, s)
    rows = torch.arange(b, device=qkv.device)
    keys[rows, :, slot] = k
    values[rows, :, slot] = v
    return q


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [..., hd] (cos/sin broadcast to it), as transformers' Llama applies it."""
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[B,2I] -> silu(gate) * up [B,I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
