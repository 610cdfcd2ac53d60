"""Writers of checkpoint files in the official layouts, at any size, from a MiniGPT4 in memory.

Tests use them to check that what the official code would load, we load identically. Every
writer produces exactly the structure docs/OFFICIAL.md describes for the real file, including
the keys MiniGPT-4 must skip (EVA-CLIP's 40th block and final norm, BLIP-2's text branch and T5
projection, trainer state in the MiniGPT-4 file).

    source = official_source(model)            # a copy whose weights survive the official layout
    overrides = write_official_set(source, tmp) # checkpoint.* overrides for compose()
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from minigpt4.config import ASSETS
from minigpt4.model import MiniGPT4

TINY_TOKENIZER = ASSETS / "tiny_tokenizer.model"


# ---- the inverse of checkpoints.official_to_ours ---------------------------------------------------
def ours_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse map (ViT keys without a prefix, as eva_vit_g.pth has them)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias", key)
        if m:
            q, _, v = tensor.chunk(3)
            out[f"blocks.{m.group(1)}.attn.q_bias"] = q
            out[f"blocks.{m.group(1)}.attn.v_bias"] = v
            continue
        new = _unmap_key(key)
        if new is None:
            raise KeyError(f"no official name for {key}")
        out[new] = tensor
    return out


_INVERSE_RULES = [
    (r"vision_model\.embeddings\.class_embedding", "cls_token"),
    (r"vision_model\.embeddings\.position_embedding", "pos_embed"),
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm(1|2)\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.weight", r"blocks.\1.attn.qkv.weight"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"ln_vision.\1"),
    (r"qformer\.layernorm\.(weight|bias)", r"Qformer.bert.embeddings.LayerNorm.\1"),
    (
        r"qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.(query|key|value)\.(weight|bias)",
        r"Qformer.bert.encoder.layer.\1.\2.self.\3.\4",
    ),
    (r"qformer\.encoder\.layer\.(\d+)\.(.+)", r"Qformer.bert.encoder.layer.\1.\2"),
    (r"query_tokens", "query_tokens"),
    (r"llama_proj\.(weight|bias)", r"llama_proj.\1"),
    (r"llm\.(.+)", r"llama_model.\1"),
]


def _unmap_key(key: str) -> str | None:
    for pattern, repl in _INVERSE_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def official_source(model: MiniGPT4, vit_fp16: bool = False) -> MiniGPT4:
    """A copy of `model` in eval mode that official files can represent exactly: the EVA ViT has
    no k bias (its qkv bias is cat(q_bias, 0, v_bias)); with vit_fp16 the ViT's weights are
    rounded to fp16 (what an fp16-stored eva_vit_g.pth holds); the LLaMA-2 variant's ln_vision
    has its initial values (no file provides it)."""
    source = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        for layer in source.vision_model.encoder.layers:
            bias = layer.self_attn.qkv.bias
            hidden = bias.shape[0] // 3
            bias[hidden : 2 * hidden] = 0
        if vit_fp16:
            for name, p in source.vision_model.named_parameters():
                if not name.startswith("post_layernorm."):
                    p.copy_(p.half().float())
        if source.qformer is None:
            source.vision_model.post_layernorm.reset_parameters()
    return source


def _ours(model: MiniGPT4, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(prefixes)}


def write_eva_vit(model: MiniGPT4, path: Path, dtype: torch.dtype = torch.float32, extras: bool = True) -> Path:
    """eva_vit_g.pth: a raw state dict without prefix (q_bias/v_bias split), plus EVA-CLIP's
    extra last block `blocks.{N}.*` and final `norm.*`, which MiniGPT-4 must skip."""
    vit = {k: v for k, v in _ours(model, ("vision_model.",)).items() if not k.startswith("vision_model.post_layernorm.")}
    state = ours_to_official(vit)
    if extras:
        n = model.config.vision_config().num_hidden_layers
        for key in [k for k in state if k.startswith("blocks.0.")]:
            state[key.replace("blocks.0.", f"blocks.{n}.", 1)] = torch.randn_like(state[key])
        width = model.config.vision_config().hidden_size
        state["norm.weight"], state["norm.bias"] = torch.ones(width), torch.zeros(width)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, path)
    return path


def write_blip2(model: MiniGPT4, path: Path, extras: bool = True, drop: tuple[str, ...] = ()) -> Path:
    """blip2_pretrained_flant5xxl.pth: {"model": {Qformer.bert.*, query_tokens, ln_vision.*}} plus the
    keys MiniGPT-4 ignores (T5 projection, the Q-Former's text branch, position_ids)."""
    ours = _ours(model, ("qformer.", "query_tokens", "vision_model.post_layernorm."))
    state = {k: v for k, v in ours_to_official(ours).items() if k not in drop}
    if extras:
        qcfg = model.config.qformer_config()
        h, ffn = qcfg.hidden_size, qcfg.intermediate_size
        state["Qformer.bert.embeddings.position_ids"] = torch.arange(512, dtype=torch.int64)[None]
        state["Qformer.bert.embeddings.word_embeddings.weight"] = torch.zeros(1, 1).expand(30523, h)  # stride 0: tiny file
        state["Qformer.bert.embeddings.position_embeddings.weight"] = torch.randn(512, h)
        for i in range(qcfg.num_hidden_layers):
            pre = f"Qformer.bert.encoder.layer.{i}."
            state[pre + "intermediate.dense.weight"] = torch.randn(ffn, h)
            state[pre + "intermediate.dense.bias"] = torch.randn(ffn)
            state[pre + "output.dense.weight"] = torch.randn(h, ffn)
            state[pre + "output.dense.bias"] = torch.randn(h)
            state[pre + "output.LayerNorm.weight"] = torch.ones(h)
            state[pre + "output.LayerNorm.bias"] = torch.zeros(h)
        state["Qformer.cls.predictions.bias"] = torch.zeros(30523)
        state["Qformer.cls.predictions.transform.dense.weight"] = torch.randn(h, h)
        state["t5_proj.weight"] = torch.randn(16, h)
        state["t5_proj.bias"] = torch.randn(16)
    torch.save({"model": state}, path)
    return path


def write_minigpt4(model: MiniGPT4, path: Path, trainer_state: bool = True) -> Path:
    """The MiniGPT-4 checkpoint as the official trainer writes it: llama_proj plus buffers it does
    not drop, and optimizer/scaler/config/epoch beside "model"."""
    state = ours_to_official(_ours(model, ("llama_proj.",)))
    obj: dict = {"model": state}
    if trainer_state:
        state["Qformer.bert.embeddings.position_ids"] = torch.arange(512, dtype=torch.int64)[None]
        head_dim = model.llm.config.hidden_size // model.llm.config.num_attention_heads
        state["llama_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(head_dim // 2)
        w, b = state["llama_proj.weight"], state["llama_proj.bias"]
        obj["optimizer"] = {
            "state": {0: {"step": torch.tensor(1000.0), "exp_avg": torch.zeros_like(w), "exp_avg_sq": torch.zeros_like(w)},
                      1: {"step": torch.tensor(1000.0), "exp_avg": torch.zeros_like(b), "exp_avg_sq": torch.zeros_like(b)}},
            "param_groups": [{"lr": 3e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05,
                              "amsgrad": False, "params": [0, 1]}],
        }
        obj["config"] = {"model": {"arch": "mini_gpt4", "max_txt_len": 160}, "run": {"init_lr": 3e-5}}
        obj["scaler"] = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 0}
        obj["epoch"] = 3
    torch.save(obj, path)
    return path


def write_llama_dir(model: MiniGPT4, directory: Path, tokenizer: Path = TINY_TOKENIZER) -> Path:
    """A Hugging Face Llama directory (safetensors + config.json) with its tokenizer.model."""
    model.llm.save_pretrained(directory)
    shutil.copy(tokenizer, Path(directory) / "tokenizer.model")
    return Path(directory)


def write_hf_blip2_dir(model: MiniGPT4, directory: Path) -> Path:
    """A Hugging Face BLIP-2 directory (Blip2ForConditionalGeneration layout, safetensors): the
    vision model (post_layernorm = ln_vision), Q-Former and query tokens under our very names,
    plus a language model and projection that MiniGPT-4 never reads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = _ours(model, ("vision_model.", "qformer.", "query_tokens"))
    state["language_projection.weight"] = torch.randn(8, model.config.qformer_config().hidden_size)
    state["language_projection.bias"] = torch.randn(8)
    state["language_model.shared.weight"] = torch.randn(32, 8)
    state["language_model.encoder.block.0.layer.0.SelfAttention.q.weight"] = torch.randn(8, 8)
    names = sorted(state)
    half = len(names) // 2  # two shards, as the hub's large checkpoints are
    for i, part in enumerate((names[:half], names[half:])):
        save_file({k: state[k].contiguous() for k in part}, str(directory / f"model-0000{i + 1}-of-00002.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": "blip-2", "num_query_tokens": model.config.num_query_tokens}))
    return directory


def write_official_set(model: MiniGPT4, directory: Path, vit_dtype: torch.dtype = torch.float32) -> list[str]:
    """All four official inputs for `model` in `directory`; returns the checkpoint overrides."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    overrides = [
        "checkpoint=random",
        f"checkpoint.vit={write_eva_vit(model, directory / 'eva_vit_g.pth', vit_dtype)}",
        f"checkpoint.llm={write_llama_dir(model, directory / 'llm')}",
        f"checkpoint.proj={write_minigpt4(model, directory / 'pretrained_minigpt4.pth')}",
    ]
    if model.qformer is not None:
        overrides.append(f"checkpoint.qformer={write_blip2(model, directory / 'blip2_pretrained_flant5xxl.pth')}")
    return overrides
