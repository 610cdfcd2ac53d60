"""The 7B shape on a GPU with random fp16 weights: build, encode a batch, forward with labels,
a short greedy generation; records load time and peak memory.

    python -m pytest tests/test_gpu_foundation.py -q -s -m gpu      # prints the numbers
    OUT=/some/dir python -m pytest tests/test_gpu_foundation.py -q -s -m gpu   # + $OUT/foundation_7b.json
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu


def measure_7b(overrides: tuple[str, ...] = ()) -> dict:
    from minigpt4.build import load_model
    from minigpt4.config import compose, load_spec
    from minigpt4.conversation import encode_example, encode_prompt, pad_batch
    from minigpt4.generation import GenerationSettings, generate

    torch.manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loaded = load_model(load_spec(compose("chat", ["model=7b", "checkpoint=random", "gpu=0", *overrides])))
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    model, tok = loaded.model, loaded.tokenizer
    assert model.llm.dtype == torch.float16 and model.llama_proj.weight.shape == (4096, 768)
    assert model.device.type == "cuda" and loaded.random_parts  # labelled untrained
    after_load = torch.cuda.memory_allocated()

    def timed(fn):
        """(result, [seconds of a first call, seconds of a second call]): the first includes CUDA warm-up."""
        seconds = []
        for _ in range(2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            result = fn()
            torch.cuda.synchronize()
            seconds.append(round(time.perf_counter() - t, 3))
        return result, seconds

    pixels = torch.randn(4, 3, 224, 224)
    with torch.inference_mode():
        soft, encode_s = timed(lambda: model.encode_images(pixels))
    assert soft.shape == (4, 32, 4096) and soft.dtype == torch.float16 and torch.isfinite(soft).all()

    conv = loaded.conversation()
    conv.add_image(0)
    conv.ask("Describe this image.")
    prompt = conv.prompt()
    examples = [encode_example(tok.encode, prompt, f"A picture number {i}.", model.num_image_tokens) for i in range(4)]
    batch = pad_batch([ids for ids, _ in examples], tok.pad_id, labels=[lab for _, lab in examples])
    with torch.inference_mode():
        out, forward_s = timed(lambda: model(**batch, image_embeds=soft))
    assert torch.isfinite(out.loss), out.loss

    ids = encode_prompt(tok.encode, prompt, model.num_image_tokens)
    settings = GenerationSettings(do_sample=False, max_new_tokens=8, min_new_tokens=8)
    generated, generate_s = timed(lambda: generate(model, tok, [ids], soft[:1], settings, stops=()))
    assert len(generated[0].ids) == 8

    return {
        "command": "python -m pytest tests/test_gpu_foundation.py -q -s -m gpu",
        "config": "model=7b checkpoint=random gpu=0 " + " ".join(overrides),
        "device": torch.cuda.get_device_name(0),
        "load_s": round(load_s, 2),
        "memory_after_load_gib": round(after_load / 2**30, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "encode_4_images_s_cold_warm": encode_s,
        "forward_batch_4_s_cold_warm": forward_s,
        "prompt_tokens": len(ids),
        "generate_8_tokens_s_cold_warm": generate_s,
        "loss": round(float(out.loss), 3),
    }


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def test_7b_random_fp16_build_encode_forward_generate(cuda):
    numbers = measure_7b()
    print("\n" + json.dumps(numbers, indent=2))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "foundation_7b.json").write_text(json.dumps(numbers, indent=2))
    assert numbers["peak_memory_gib"] < 40  # 7B fp16 is ~13.5 GB of LLM + ~2 GB image side


@pytest.mark.slow
def test_7b_official_files_load_fast_and_exactly(cuda, tmp_path):
    """Writes the four official files of a random 7B-shaped model (~16 GB, fp16 LLM) and loads
    them back through checkpoint.*: same soft tokens and logits, and how long loading takes."""
    from official_files import write_blip2, write_eva_vit, write_llama_dir, write_minigpt4

    from minigpt4.build import load_model
    from minigpt4.config import compose, load_spec

    torch.manual_seed(0)
    source = load_model(load_spec(compose("chat", ["model=7b", "checkpoint=random", "gpu=0"]))).model
    with torch.no_grad():  # EVA has no k bias: zero it so that the official layout holds the model exactly
        for layer in source.vision_model.encoder.layers:
            layer.self_attn.qkv.bias[1408:2816] = 0
    start = time.perf_counter()
    files = [f"checkpoint.vit={write_eva_vit(source, tmp_path / 'eva_vit_g.pth')}",
             f"checkpoint.qformer={write_blip2(source, tmp_path / 'blip2_pretrained_flant5xxl.pth')}",
             f"checkpoint.llm={write_llama_dir(source, tmp_path / 'vicuna-7b-v0')}",
             f"checkpoint.proj={write_minigpt4(source, tmp_path / 'prerained_minigpt4_7b.pth')}"]
    write_s = time.perf_counter() - start
    torch.cuda.synchronize()
    start = time.perf_counter()
    loaded = load_model(load_spec(compose("chat", ["model=7b", "gpu=0", *files])))
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    assert loaded.trained and loaded.model.llm.dtype == torch.float16
    pixels = torch.randn(2, 3, 224, 224)
    ids = torch.tensor([[1, 5, 6, *[-200] * 32, 7, 8]], device="cuda")
    with torch.inference_mode():
        a, b = source.encode_images(pixels), loaded.model.encode_images(pixels)
        la, lb = source(ids, image_embeds=a[:1]).logits, loaded.model(ids, image_embeds=b[:1]).logits
    numbers = {"write_official_files_s": round(write_s, 1), "load_official_files_s": round(load_s, 1),
               "soft_max_abs_diff": float((a - b).abs().max()), "logits_max_abs_diff": float((la - lb).abs().max())}
    print("\n" + json.dumps(numbers, indent=2))
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "foundation_7b_files.json").write_text(json.dumps(numbers, indent=2))
    assert torch.equal(a, b) and torch.equal(la, lb), numbers
