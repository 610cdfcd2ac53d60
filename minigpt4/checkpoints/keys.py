"""The one key map: tensor names in the official, Hugging Face and our own layouts, and which
part of MiniGPT-4 each belongs to.

Official (LAVIS / MiniGPT-4) names -> ours (transformers' Blip2 classes inside MiniGPT4):
    visual_encoder.* / eva_vit_g.pth keys   -> vision_model.embeddings.*, vision_model.encoder.layers.*
    blocks.i.attn.{q_bias,v_bias}            -> vision_model.encoder.layers.i.self_attn.qkv.bias
                                                = cat(q_bias, zeros, v_bias)
    ln_vision.*                              -> vision_model.post_layernorm.*
    Qformer.bert.embeddings.LayerNorm.*      -> qformer.layernorm.*
    Qformer.bert.encoder.layer.i.*.self.*    -> qformer.encoder.layer.i.*.attention.*
    query_tokens                             -> query_tokens
    llama_proj.*                             -> llama_proj.*
    llama_model.*                            -> llm.*
Hugging Face Blip2ForConditionalGeneration names are ours, except language_projection.* (our
llama_proj.*) and language_model.* (our llm.*): see hf_name. Bundles use our names.
(The inverse of official_to_ours, used to write official-layout test files, is in tests/official_files.py.)
"""

from __future__ import annotations

import logging
import re

import torch

from minigpt4.errors import UserError

log = logging.getLogger(__name__)

_VIT_RULES = [
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.weight", r"encoder.layers.\1.self_attn.qkv.weight"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
]
_QFORMER_RULES = [
    (r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)", r"qformer.layernorm.\1"),
    (
        r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)",
        r"qformer.encoder.layer.\1.\2.attention.\3.\4",
    ),
    (
        r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention|intermediate_query|output_query)\.(.+)",
        r"qformer.encoder.layer.\1.\2.\3",
    ),
    (r"query_tokens", "query_tokens"),
    (r"ln_vision\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    (r"llama_proj\.(weight|bias)", r"llama_proj.\1"),
    (r"llama_model\.(.+)", r"llm.\1"),
]
# Keys the official files hold that MiniGPT-4 does not use: skipped by name, listed at debug level.
KNOWN_EXTRAS = [
    r"(visual_encoder\.)?norm\..*",  # EVA-CLIP's final norm (MiniGPT-4 keeps 39 of 40 blocks, no norm)
    r"(visual_encoder\.)?(fc_norm|head)\..*",
    r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\..*",
    r"Qformer\.bert\.embeddings\.position_ids",
    r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..*",  # the unused text branch
    r"Qformer\.cls\..*",
    r"(t5_proj|t5_model|opt_proj|opt_model|vision_proj|text_proj|itm_head)\..*",
    r"temp",
    r"llama_model\..*rotary_emb\.inv_freq",
]


def is_known_extra(key: str) -> bool:
    """An official key that MiniGPT-4 does not use (skipped on loading, listed by inspect)."""
    return any(re.fullmatch(p, key) for p in KNOWN_EXTRAS)


_VIT_BIAS = re.compile(r"(?:visual_encoder\.)?blocks\.(\d+)\.attn\.(q_bias|v_bias)")
_VIT_BLOCK = re.compile(r"(?:visual_encoder\.)?blocks\.(\d+)\.")


def _map_key(key: str) -> str | None:
    """Official key -> ours; None when the key is not one we know how to place."""
    vit_key = key.removeprefix("visual_encoder.")
    for pattern, repl in _VIT_RULES:
        if re.fullmatch(pattern, vit_key):
            return "vision_model." + re.sub(pattern, repl, vit_key)
    for pattern, repl in _QFORMER_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def official_to_ours(state: dict[str, torch.Tensor], num_vision_layers: int, source: str) -> dict[str, torch.Tensor]:
    """Rename an official state dict; skip known extras and ViT blocks past num_vision_layers;
    fail on anything unknown (naming up to five keys)."""
    out: dict[str, torch.Tensor] = {}
    biases: dict[int, dict[str, torch.Tensor]] = {}
    skipped, unknown = [], []
    for key, tensor in state.items():
        block = _VIT_BLOCK.match(key)
        if block and int(block.group(1)) >= num_vision_layers:
            skipped.append(key)  # e.g. EVA-CLIP's 40th block
            continue
        bias = _VIT_BIAS.fullmatch(key)
        if bias:
            biases.setdefault(int(bias.group(1)), {})[bias.group(2)] = tensor
            continue
        if is_known_extra(key):
            skipped.append(key)
            continue
        new = _map_key(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = tensor
    if unknown:
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise UserError(f"{source}: unexpected keys {unknown[:5]}{more}: not an official MiniGPT-4/BLIP-2 file?")
    for i, pair in biases.items():
        if set(pair) != {"q_bias", "v_bias"}:
            raise UserError(f"{source}: block {i} has {sorted(pair)} but needs both q_bias and v_bias")
        q, v = pair["q_bias"], pair["v_bias"]
        out[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(v), v])
    if skipped:
        log.debug("%s: skipped %d keys MiniGPT-4 does not use: %s", source, len(skipped), skipped)
    return out


def hf_name(key: str) -> str:
    """Our key -> Blip2ForConditionalGeneration's (export-hf; a BLIP-2 directory is read as is)."""
    if key.startswith("llama_proj."):
        return "language_projection." + key[len("llama_proj.") :]
    if key.startswith("llm."):
        return "language_model." + key[len("llm.") :]
    return key


# ---- parts: which file supplies which tensor ---------------------------------------------------
PART_NAMES = {"vit": "ViT", "qformer": "Q-Former", "proj": "projection", "llm": "LLM"}  # checkpoint.<part>
# Our prefixes first (what checkpoint.<part> supplies: ln_vision comes with the Q-Former file),
# then the official ones. Buffers that files carry but nobody loads belong to no part.
PART_PREFIXES = {
    "vit": ("vision_model.embeddings.", "vision_model.encoder."),
    "qformer": ("qformer.", "query_tokens", "vision_model.post_layernorm."),
    "proj": ("llama_proj.",),
    "llm": ("llm.",),
}
_OFFICIAL_PREFIXES = {
    "vit": ("visual_encoder.", "blocks.", "patch_embed.", "cls_token", "pos_embed"),
    "qformer": ("Qformer.bert.encoder.", "Qformer.bert.embeddings.LayerNorm."),
    "proj": (),
    "llm": ("llama_model.",),
}


def part_of(key: str) -> str | None:
    """Which checkpoint.<part> supplies this key (our or official name); None for other keys."""
    for part, prefixes in PART_PREFIXES.items():
        if key.startswith(prefixes + _OFFICIAL_PREFIXES[part]):
            return part
    return None


def parts_in(names) -> list[str]:
    """Display names of the parts whose weights `names` hold, in pipeline order."""
    found = {part_of(n) for n in names if not n.endswith(("inv_freq", "position_ids"))}
    return [PART_NAMES[part] for part in PART_NAMES if part in found]
