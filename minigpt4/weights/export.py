"""`export-hf`: a Vicuna MiniGPT-4 as a stock transformers `Blip2ForConditionalGeneration`.

Blip2ForConditionalGeneration is already ViT -> Q-Former -> language_projection -> causal LM;
with a Llama text config it is MiniGPT-4 (Vicuna variants). Names (checkpoints.hf_name): ours
`llama_proj.*` -> `language_projection.*`, `llm.*` -> `language_model.*`, everything else unchanged.

How transformers 5 places the image: forward/generate embed `input_ids`, then overwrite (masked
scatter) the positions whose id is `config.image_token_id` (alias of `image_token_index`) with the
num_query_tokens projected queries, in order. So the prompt carries 32 copies of that id where
MiniGPT-4 has `<ImageHere>` (ids that must be embeddable, hence a real row). Vicuna v0 has a
spare one: row 32000, the [PAD] row FastChat added, which no prompt uses; we take the first row
past the tokenizer's pieces, or append a zero row when there is none. Blip2Processor cannot
build MiniGPT-4 prompts (it always puts the image tokens first, before BOS); build the ids as
`hf_input_ids` does (docs/WEIGHTS.md).

Known difference: transformers builds the ViT's post_layernorm (= MiniGPT-4's ln_vision) with the
blocks' eps, 1e-6; MiniGPT-4 uses 1e-5, and there is no config field for it alone. Set
`model.vision_model.post_layernorm.eps = 1e-5` after loading for exact parity (docs/WEIGHTS.md
gives the measured effect of not doing it).

The LLaMA-2 variant (no Q-Former, merged ViT tokens) has no Blip2 equivalent and is refused.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    BlipImageProcessorPil,
)
from transformers.image_utils import PILImageResampling

from minigpt4.checkpoints import GB, atomic_write, check_target, clone_aliases, hf_name
from minigpt4.errors import UserError
from minigpt4.images import CLIP_MEAN, CLIP_STD
from minigpt4.model import IMAGE_TOKEN
from minigpt4.weights.bundle import load_for_conversion

log = logging.getLogger(__name__)

EXPORT_INFO = "minigpt4_export.json"
_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def hf_input_ids(ids: list[int], image_token_id: int) -> list[int]:
    """Our token ids (IMAGE_TOKEN slots, from conversation.encode_prompt) -> the exported model's."""
    return [image_token_id if i == IMAGE_TOKEN else i for i in ids]


def export_hf(
    overrides: list[str],
    out: str | Path,
    dtype: str = "fp16",
    max_shard_gb: float = 5.0,
    allow_random: bool = False,
    force: bool = False,
) -> Path:
    out = Path(out)
    check_target(out, 0, force)
    from minigpt4.config import compose, to_container

    arch_cfg = to_container(compose("chat", overrides).model.arch)
    if arch_cfg.get("qformer") is None:
        raise UserError(
            "export-hf: the LLaMA-2 variant has no Q-Former (it merges runs of 4 ViT tokens), which "
            "Blip2ForConditionalGeneration cannot express; use `bundle` for it"
        )
    lm = load_for_conversion(overrides, dtype, allow_random)
    model = lm.model
    # tied weights cloned so that save_pretrained writes both names (the export declares no tying)
    state = {hf_name(k): v for k, v in clone_aliases(lm.model.state_dict().items())}
    rows, pieces = model.llm.config.vocab_size, lm.tokenizer.vocab_size
    text_config = model.llm.config.to_dict()
    if rows > pieces:
        image_token_id = pieces  # Vicuna v0: row 32000, FastChat's [PAD] row
    else:  # no spare row: add one (zero embedding, zero logit row) for the image placeholder
        image_token_id = rows
        for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            w = state[key]
            state[key] = torch.cat([w, w.new_zeros(1, w.shape[1])])
        text_config["vocab_size"] = rows + 1
    config = Blip2Config(
        vision_config=model.config.vision_config().to_dict(),
        qformer_config=model.config.qformer_config().to_dict(),
        text_config=text_config,
        num_query_tokens=model.config.num_query_tokens,
        image_token_index=image_token_id,
    )
    with torch.device("meta"):
        hf = Blip2ForConditionalGeneration(config)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:  # a bug here, not a user error: the name map is incomplete
        raise RuntimeError(f"export-hf name map: missing {missing[:3]}, unexpected {unexpected[:3]}")
    size = sum(t.numel() * t.element_size() for t in state.values())
    check_target(out, size, force)
    info = {
        "template": lm.template.name,
        "image_token_id": image_token_id,
        "num_query_tokens": model.config.num_query_tokens,
        "image_size": lm.image_size,
        "ln_vision_eps": model.config.ln_vision_eps,
        "note": "MiniGPT-4 export: put num_query_tokens copies of image_token_id where the prompt has "
        "<ImageHere>; for exact parity set model.vision_model.post_layernorm.eps = ln_vision_eps after loading",
        "sources": lm.sources,
    }
    with atomic_write(out, folder=True) as stage:
        hf.save_pretrained(stage, max_shard_size=int(max_shard_gb * GB))
        _copy_tokenizer(lm, stage)
        BlipImageProcessorPil(  # writes image_processor_type BlipImageProcessor; needs no torchvision
            size={"height": lm.image_size, "width": lm.image_size},
            resample=PILImageResampling.BICUBIC,
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
            do_convert_rgb=True,
        ).save_pretrained(stage)
        (stage / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    log.info("Blip2ForConditionalGeneration written to %s (image_token_id %d)", out, image_token_id)
    return out


def _copy_tokenizer(lm, stage: Path) -> None:
    """tokenizer.model (+ its config files when the LLM directory has them)."""
    shutil.copy2(lm.tokenizer.path, stage / "tokenizer.model")
    for name in _TOKENIZER_FILES:
        source = lm.tokenizer.path.parent / name
        if source.is_file():
            shutil.copy2(source, stage / name)
