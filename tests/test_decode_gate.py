"""The correctness gate (minigpt4/decoding/gate.py): every decode path a user can select,
teacher-forced against one eager forward. On the CPU with a small random Llama; on the GPU
(-m gpu, run by bench/gpu_checks.sh) on the 7B shape, where the tiny model proves nothing."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minigpt4.decoding import DynamicDecoder, StaticDecoder, make_decoder
from minigpt4.decoding.gate import run_gate, run_rows_gate, table, with_row_prefill_graphs

SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=512, max_position_embeddings=512,
             initializer_range=0.2)  # sharp attention: position errors change the argmax


def small_llm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL)).eval()


def cpu_paths(llm):
    return {
        "dynamic": lambda b, n: DynamicDecoder(llm, b),
        "static fused": lambda b, n: make_decoder(llm, b, n, static=True),
        "static transformers step": lambda b, n: StaticDecoder(llm, b, n, use_fused=False),
        "static, padded prefill": lambda b, n: _padded(StaticDecoder(llm, b, n)),
        "static growing": lambda b, n: _padded(StaticDecoder(llm, b, n, start_len=n - 4)),  # chat's, during the steps
    }


def _padded(decoder: StaticDecoder) -> StaticDecoder:
    decoder.pad_prefill = True  # the CUDA batch-1 prefill path, here eager
    return decoder


def test_every_cpu_path_passes_the_gate():
    llm = small_llm()
    results = run_gate(llm, cpu_paths(llm), batches=(1, 3), new_tokens=8)
    print(table(results))
    assert {r.scenario for r in results} == {"batch1", "batch3", "batch1_left_padded", "chat3_regenerate"}
    assert all(r.agreement == 1.0 and r.max_logit_diff < 1e-3 for r in results), table(results)


@pytest.mark.parametrize("graphed", [False, True])
def test_the_serving_engines_rows_pass_the_gate(graphed):
    """Requests prefilled together into rows out of order, each decoding at its own length, and
    two second turns prefilled together onto their cached rows (different prefixes): each
    request's answer logits are its own eager forward's."""
    llm = small_llm()
    make = lambda b, n: StaticDecoder(llm, b, n)  # noqa: E731
    result = run_rows_gate(llm, "engine rows", with_row_prefill_graphs(make) if graphed else make, new_tokens=8)
    print(table([result]))
    assert result.positions == 6 * 8 and result.agreement == 1.0 and result.max_logit_diff < 1e-3, table([result])


class _ShiftedPositions(DynamicDecoder):
    """The bug of 2026-12-01 in miniature: a prefill whose position ids are off."""

    def prefill(self, embeds, positions, pad_mask, start=0):
        return super().prefill(embeds, positions + 7, pad_mask, start)


def test_the_gate_catches_wrong_positions():
    llm = small_llm()
    results = run_gate(llm, {"shifted": lambda b, n: _ShiftedPositions(llm, b)}, batches=(1,), new_tokens=8)
    assert all(not r.ok() for r in results), table(results)


# ---- the 7B shape on the GPU --------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm_7b():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from bench.bench_decode import build_llm

    return build_llm(tiny=False)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["dynamic", "static", "static compile", "static max-autotune-no-cudagraphs"])
def test_7b_paths_pass_the_gate(llm_7b, path):
    from bench.bench_decode import gate_paths

    results = run_gate(llm_7b, {path: gate_paths(llm_7b)[path]})
    print(table(results))
    assert all(r.ok() for r in results), table(results)


@pytest.mark.gpu
@pytest.mark.parametrize("graphed", [False, True])
def test_7b_engine_rows_pass_the_gate(llm_7b, graphed):
    make = lambda b, n: StaticDecoder(llm_7b, b, n)  # noqa: E731
    result = run_rows_gate(llm_7b, "engine rows", with_row_prefill_graphs(make) if graphed else make)
    print(table([result]))
    assert result.ok(), table([result])


@pytest.mark.gpu
def test_triton_kernels_equal_the_torch_reference():
    """Each Triton kernel of the fused step against its torch version, fp16, on random data."""
    from minigpt4.decoding import fused, kernels

    if not kernels.available():
        pytest.skip("no Triton")
    torch.manual_seed(1)
    dev, f16 = "cuda", torch.float16
    x, w = torch.randn(5, 4096, device=dev, dtype=f16), torch.randn(4096, device=dev, dtype=f16)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), fused.rms_norm(x, w, 1e-6), rtol=2e-3, atol=2e-3)
    gu = torch.randn(5, 2 * 11008, device=dev, dtype=f16) * 3
    torch.testing.assert_close(kernels.silu_mul(gu), fused.silu_mul(gu), rtol=2e-3, atol=2e-3)
    nh, nkv, hd, length = 32, 8, 128, 300
    qkv = torch.randn(5, (nh + 2 * nkv) * hd, device=dev, dtype=f16)
    angles = torch.rand(2048, hd // 2, device=dev) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(f16), torch.cat([angles.sin()] * 2, -1).to(f16)
    positions, slot = torch.randint(0, 2048, (5,), device=dev), torch.tensor([123, 7, 299, 0, 5], device=dev)
    caches = [(torch.randn(5, nkv, length, hd, device=dev, dtype=f16),) * 1 for _ in range(2)]
    k1, v1 = caches[0][0].clone(), caches[1][0].clone()
    k2, v2 = k1.clone(), v1.clone()
    q1 = kernels.rope_and_cache(qkv, cos, sin, positions, k1, v1, slot, nh, nkv)
    q2 = fused.rope_and_cache(qkv, cos, sin, positions, k2, v2, slot, nh, nkv)
    torch.testing.assert_close(q1, q2, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(k1, k2, rtol=2e-3, atol=2e-3)
    assert torch.equal(v1, v2)
