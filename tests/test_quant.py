"""Weight-only int8/int4 (minigpt4/decoding/quant.py): the formats, the layer, the decode paths
on quantized weights, and `precision=int8|int4` end to end. On the GPU (-m gpu) the Triton
kernels are held to the torch reference on the 7B shapes."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minigpt4.decoding import DynamicDecoder, make_decoder
from minigpt4.decoding.gate import run_gate, table
from minigpt4.decoding.quant import QuantLinear, concat, quantize_llm, quantized_mode


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_dequantized_weights_are_within_half_a_step(mode):
    torch.manual_seed(0)
    w = torch.randn(48, 256) * 0.02
    w[3, 7] = 0.5  # an outlier widens only its own row's (int8) or group's (int4) step
    q = QuantLinear.quantize(w, mode)
    err = (q.dequantize() - w).abs()
    if mode == "int8":
        step = w.abs().amax(1, keepdim=True) / 127  # [N,1]
    else:
        g = w.view(48, 2, 128)
        step = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(128, dim=1)  # [N,K]
    assert (err <= step / 2 + 1e-6).all()
    assert err[0].max() < step[3].max() / 4  # row 0 did not pay for row 3's outlier
    assert q.qweight.nbytes == (48 * 256 if mode == "int8" else 48 * 128)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_forward_is_the_product_with_the_dequantized_weight(mode):
    torch.manual_seed(1)
    q = QuantLinear.quantize(torch.randn(40, 192), mode)  # 192: int4 groups of 64
    assert q.group == (64 if mode == "int4" else 192)
    x, res = torch.randn(3, 5, 192), torch.randn(3, 5, 40)
    torch.testing.assert_close(q(x), x @ q.dequantize().T)
    torch.testing.assert_close(q(x, res), x @ q.dequantize().T + res)


def test_fused_rows_are_views_of_one_matrix():
    torch.manual_seed(2)
    parts = [QuantLinear.quantize(torch.randn(n, 128), "int4") for n in (32, 16, 16)]
    x = torch.randn(2, 128)
    before = [p(x) for p in parts]
    fused = concat(parts)
    torch.testing.assert_close(fused(x), torch.cat(before, -1))
    for p, out in zip(parts, before):
        assert p.qweight.untyped_storage().data_ptr() == fused.qweight.untyped_storage().data_ptr()
        torch.testing.assert_close(p(x), out)


def small_llm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=512, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def test_every_decode_path_on_int8_weights_passes_the_gate_against_the_fp_model():
    """The fused static step and the dynamic loop on int8 weights, teacher-forced against the
    unquantized model's eager forward (int8's rounding must not change the argmax)."""
    reference = small_llm()
    llm = quantize_llm(small_llm(), "int8")
    assert quantized_mode(llm) == "int8"
    paths = {"int8 static": lambda b, n: make_decoder(llm, b, n, static=True),
             "int8 dynamic": lambda b, n: DynamicDecoder(llm, b)}
    results = run_gate(llm, paths, batches=(1, 3), new_tokens=8, reference_llm=reference)
    assert all(r.ok() for r in results), table(results)


def test_int4_decode_paths_equal_the_int4_model_s_own_forward():
    """int4 changes the model more than int8 (its agreement with fp16 is measured on the 7B by
    bench/bench_decode.py --quant): every path must still compute the int4 model exactly."""
    llm = quantize_llm(small_llm(), "int4")
    paths = {"int4 static": lambda b, n: make_decoder(llm, b, n, static=True),
             "int4 dynamic": lambda b, n: DynamicDecoder(llm, b)}
    results = run_gate(llm, paths, batches=(1, 3), new_tokens=8)
    assert all(r.agreement == 1.0 for r in results), table(results)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compile_is_off_on_int_weights_and_the_decoder_still_computes_the_quantized_model(mode):
    """generation.compile on int8/int4 weights: compiled, QuantLinear's torch form dequantises a whole
    weight per product (int8 98 tokens/s against 267 with the Triton kernels, H200 2026-12-02), so
    the decoder runs without compile, at any batch, and computes the quantized model."""
    llm = quantize_llm(small_llm(), mode)
    assert make_decoder(llm, 1, 16, static=True, compile=True).compile is False
    assert make_decoder(llm, 3, 16, static=True, compile=True).compile is False
    paths = {f"{mode} static, compile asked": lambda b, n: make_decoder(llm, b, n, static=True, compile=True)}
    results = run_gate(llm, paths, batches=(1,), new_tokens=8)
    assert all(r.agreement == 1.0 and r.max_logit_diff < 1e-3 for r in results), table(results)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_precision_quantizes_the_demo_model(mode):
    from tiny_models import build_tiny

    from minigpt4.training.heldout import heldout_accuracy

    loaded = build_tiny([f"precision={mode}", "checkpoint=demo"])
    layer = loaded.model.llm.model.layers[0]
    assert type(layer.mlp.down_proj) is QuantLinear and type(layer.self_attn.q_proj) is QuantLinear
    assert loaded.model.llm.lm_head.weight.dtype == torch.float32  # lm_head and embeddings stay
    result = heldout_accuracy(loaded, pictures=12, seed=1000, kinds=("colour", "count"))
    assert result["accuracy"]["all"] >= (0.9 if mode == "int8" else 0.75), result


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_int_weights_agree_with_the_fp_demo_model_teacher_forced_on_its_answers(mode):
    """The issue's "agreement with fp16 >= 0.9", on trained weights: the demo model's own greedy
    answers to held-out pictures, teacher-forced through its int8/int4 copy, the argmax compared
    at every answer position. (On the 7B's random weights no rounding keeps the argmax: their
    logits are flat, and int8 agrees 0.6-0.75 there, int4 0.0; docs/BENCHMARKS.md.)"""
    from tiny_models import build_tiny

    from minigpt4.conversation import encode_prompt
    from minigpt4.data.dialogues import heldout_dialogues, to_conversation
    from minigpt4.data.synthetic import make_picture
    from minigpt4.generation import generate
    from minigpt4.training.heldout import GREEDY

    fp, q = build_tiny(["checkpoint=demo"]), build_tiny([f"precision={mode}", "checkpoint=demo"])
    dialogues = [d for kind in ("colour", "shape", "count") for d in heldout_dialogues(kind, 20, 1000)]
    convs = [to_conversation(d, fp.template, [], upto=0) for d in dialogues]  # one picture, one question each
    prompts = [encode_prompt(fp.tokenizer.encode, c.prompt(), fp.model.num_image_tokens) for c in convs]
    same = total = 0
    with torch.inference_mode():
        embeds = fp.encode_images([make_picture(c.images[0]) for c in convs])  # [N,32,H]: the image side is not quantized
        answers = generate(fp.model, fp.tokenizer, prompts, embeds, GREEDY, stops=fp.template.stop)
        for prompt, answer, image in zip(prompts, answers, embeds):
            ids = torch.tensor([prompt + answer.ids])
            predicting = slice(len(prompt) - 1, ids.shape[1] - 1)  # the positions that predict the answer
            want = fp.model(ids, image_embeds=image[None]).logits[0, predicting].argmax(-1)
            got = q.model(ids, image_embeds=image[None]).logits[0, predicting].argmax(-1)
            same += int((want == got).sum())
            total += len(want)
    assert total >= 100 and same / total >= 0.9, f"{mode}: {same}/{total} = {same / total:.3f}"


# ---- GPU --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_triton_kernels_equal_the_torch_reference_on_7b_shapes(mode):
    from minigpt4.decoding import kernels

    if not kernels.available():
        pytest.skip("no Triton")
    torch.manual_seed(3)
    shapes = [(4096, 11008), (100, 4096)]  # the down projection's K; a row count no block divides
    if mode == "int8":
        shapes.append((64, 4104))  # a K whose rows TMA cannot address: the kernel without TMA
    for n, k in shapes:
        q = QuantLinear.quantize(torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02, mode)
        assert torch.equal(q.dequantize(), q.dequantize_torch())  # the prefill's Triton dequantization, bit for bit
        q16 = QuantLinear.quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, mode)
        assert torch.equal(q16.dequantize(), q16.dequantize_torch())  # bf16 too (round to nearest)
        # one row: the matrix-vector kernel (TMA on Hopper); 5: the tensor-core kernel; 100 and 300:
        # a prefill (int8: the tensor-core kernel on row blocks of 64/128; int4: dequantize + cuBLAS)
        for weights, dtype in ((q, torch.float16), (q16, torch.bfloat16)):
            expected_w = weights.dequantize_torch().float()
            for m in (1, 5, 100, 300):
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                res = torch.randn(m, n, device="cuda", dtype=dtype)
                expected = (x.float() @ expected_w.T + res.float())
                got = weights(x, res).float()
                tol = 2e-2 if dtype == torch.float16 else 1e-1  # bf16 outputs round to 8 bits
                torch.testing.assert_close(got, expected, rtol=1e-2, atol=tol, msg=f"{mode} {dtype} {m}x{k} @ {n}x{k}")


def test_an_llm_directory_is_quantized_on_its_way_to_the_device(tiny_loaded, tmp_path):
    """precision=int8 with checkpoint.llm=DIR: the LLM is read into CPU memory and each layer is
    quantized as it moves (here the device is the CPU too); the answers stay the fp32 model's."""
    from official_files import write_llama_dir

    from minigpt4.build import load_model
    from minigpt4.config import compose, load_spec

    llm = write_llama_dir(tiny_loaded.model, tmp_path / "llm")
    loaded = load_model(load_spec(compose("chat", ["gpu=cpu", "precision=int8", "checkpoint=random", f"checkpoint.llm={llm}"])))
    assert quantized_mode(loaded.model.llm) == "int8"
    assert type(loaded.model.llm.model.layers[-1].mlp.up_proj) is QuantLinear
    with torch.inference_mode():
        ids = torch.tensor([[1, 5, 6, 7, 8]])
        ref, out = tiny_loaded.model.llm(ids).logits, loaded.model.llm(ids).logits
    assert (ref.argmax(-1) == out.argmax(-1)).float().mean() >= 0.8
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.05)
