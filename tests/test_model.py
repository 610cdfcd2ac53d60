"""The model: image encoding shapes, interleaved embedding, loss, training state."""

from __future__ import annotations

import copy

import pytest
import torch

from minigpt4.errors import UserError
from minigpt4.model import IMAGE_TOKEN, PARTS, MiniGPT4Config, apply_precision


@pytest.fixture()
def model(tiny_loaded):
    return copy.deepcopy(tiny_loaded.model)


def test_architecture_follows_the_config(model):
    assert model.vision_model.post_layernorm.eps == 1e-5  # ln_vision; the blocks keep 1e-6
    assert model.vision_model.encoder.layers[0].layer_norm1.eps == 1e-6
    assert model.query_tokens.shape == (1, 16, 96) and model.num_image_tokens == 16
    assert model.llama_proj.in_features == 96 and model.llama_proj.out_features == model.llm.config.hidden_size
    official = MiniGPT4Config(vision={}, qformer={}, llm={"hidden_size": 4096})
    assert official.num_image_tokens == 32 and official.proj_in_features == 768
    assert official.vision_config().num_hidden_layers == 39 and official.qformer_config().encoder_hidden_size == 1408
    llama2 = MiniGPT4Config(vision={}, qformer=None)
    assert llama2.num_image_tokens == 64 and llama2.proj_in_features == 5632


def test_frozen_parts_stay_in_eval_mode_after_train(model):
    model.train()  # what Lightning does
    assert model.training and model.llama_proj.training
    for name in ("vision_model", "qformer", "llm"):
        part = getattr(model, name)
        assert not any(m.training for m in part.modules()), name
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # the Q-Former has dropout 0.1: in eval mode two passes agree
        assert torch.equal(model.encode_images(pixels), model.encode_images(pixels))


def test_set_trainable(model):
    trainable = lambda: {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable() == {"llama_proj"}
    model.set_trainable(["llama_proj", "qformer", "query_tokens"])
    model.train()
    assert trainable() == {"llama_proj", "qformer", "query_tokens"}
    assert model.qformer.training and not model.vision_model.training and not model.llm.training
    model.set_trainable(["llama_proj"])
    assert trainable() == {"llama_proj"} and not model.qformer.training
    with pytest.raises(UserError, match="unknown trainable part"):
        model.set_trainable(["llama_proj", "visual_encoder"])
    assert set(PARTS) == {"vision_model", "qformer", "query_tokens", "llama_proj", "llm"}


def test_loss_trains_only_the_projection(model):
    model.train()
    n = model.num_image_tokens
    ids = torch.tensor([[1, 7, *[IMAGE_TOKEN] * n, 8, 9, 10, 11], [1, 12, *[IMAGE_TOKEN] * n, 13, 14, 0, 0]])
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    labels[1, -2:] = -100
    mask = (labels != -100) | (ids != 0)
    out = model(ids, attention_mask=mask.long(), pixel_values=torch.randn(2, 3, 64, 64), labels=labels)
    assert out.logits.shape == (2, ids.shape[1], model.llm.config.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"llama_proj"} and model.llama_proj.weight.grad.abs().sum() > 0


def test_embed_places_images_in_order(model):
    n, h = model.num_image_tokens, model.llm.config.hidden_size
    images = torch.stack([torch.full((n, h), float(i + 1)) for i in range(3)])  # [3,n,h]
    ids = torch.tensor([[5, *[IMAGE_TOKEN] * n, 6, *[IMAGE_TOKEN] * n], [*[IMAGE_TOKEN] * n, *range(7, 9 + n)]])
    embeds = model.embed(ids, images)
    assert embeds.shape == (2, 2 + 2 * n, h)
    assert (embeds[0, 1 : 1 + n] == 1).all() and (embeds[0, 2 + n :] == 2).all() and (embeds[1, :n] == 3).all()
    assert torch.equal(embeds[0, 0], model.llm.get_input_embeddings().weight[5])
    with pytest.raises(ValueError, match="image slots"):
        model.embed(ids, images[:2])


def test_image_features_then_project_equals_encode(model):
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        features = model.image_features(pixels)
        assert features.shape == (3, 16, 96)
        assert torch.equal(model.project(features), model.encode_images(pixels))


def test_llama2_variant_merges_runs_of_four_tokens():
    from tiny_models import build_tiny

    model = build_tiny(["model.arch.qformer=null"]).model
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        vit = model.vision_model(pixel_values=pixels).last_hidden_state  # [2,65,W]
        w = vit.shape[-1]
        merged = vit[:, 1:].reshape(2, 16, 4 * w)  # tokens 4k..4k+3 side by side
        assert torch.equal(merged[0, 1, w : 2 * w], vit[0, 1 + 5])
        assert torch.allclose(model.encode_images(pixels), model.llama_proj(merged), atol=1e-6)


def test_apply_precision_keeps_the_official_fp32_parts(model):
    apply_precision(model, torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["llm.model.embed_tokens.weight"] == torch.bfloat16
    assert dtypes["vision_model.encoder.layers.0.self_attn.qkv.weight"] == torch.bfloat16
    assert dtypes["vision_model.encoder.layers.0.layer_norm1.weight"] == torch.float32
    assert dtypes["vision_model.embeddings.class_embedding"] == torch.float32
    assert dtypes["vision_model.post_layernorm.weight"] == torch.float32
    assert {dtypes[n] for n in dtypes if n.startswith(("qformer.", "query_tokens", "llama_proj."))} == {torch.float32}
    apply_precision(model, torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
