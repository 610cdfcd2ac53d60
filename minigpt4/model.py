"""MiniGPT-4: a frozen BLIP-2 image encoder, one linear projection and a Llama language model.

    pixels [B,3,S,S] --vision_model--> [B,P+1,Hv] (ln_vision = post_layernorm, fp32, eps 1e-5)
      Vicuna variant:  --qformer(query_tokens [1,Q,Hq])--> [B,Q,Hq] --llama_proj--> [B,Q,H]
      LLaMA-2 variant: drop class token, concat runs of 4 tokens [B,P/4,4*Hv] --llama_proj--> [B,P/4,H]
    token ids [B,T] with IMAGE_TOKEN slots --embed--> [B,T,H] --llm--> logits [B,T,V]

The network classes are transformers' own (Blip2VisionModel, Blip2QFormerModel,
LlamaForCausalLM); official key names are mapped onto them in checkpoints/keys.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import (
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionConfig,
    Blip2VisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)

# Placeholder id for one soft image token inside a token-id tensor; never a real vocabulary id.
IMAGE_TOKEN = -200
PARTS = ("vision_model", "qformer", "query_tokens", "llama_proj", "llm")
IMAGE_SIDE = ("vision_model", "qformer", "llama_proj")  # the modules apply_precision keeps at official dtypes


@dataclass
class MiniGPT4Config:
    """Architecture. `qformer=None` selects the LLaMA-2 variant (ViT tokens merged in runs)."""

    vision: dict[str, Any] = field(default_factory=dict)  # Blip2VisionConfig kwargs
    qformer: dict[str, Any] | None = field(default_factory=dict)  # Blip2QFormerConfig kwargs
    num_query_tokens: int = 32
    merge_tokens: int = 4  # LLaMA-2 variant only
    ln_vision_eps: float = 1e-5
    llm: dict[str, Any] = field(default_factory=dict)  # LlamaConfig kwargs (used without an LLM directory)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MiniGPT4Config":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def vision_config(self) -> Blip2VisionConfig:
        return Blip2VisionConfig(**self.vision)

    def qformer_config(self) -> Blip2QFormerConfig | None:
        if self.qformer is None:
            return None
        kwargs = dict(self.qformer)
        kwargs.setdefault("encoder_hidden_size", self.vision_config().hidden_size)
        return Blip2QFormerConfig(**kwargs)

    def llm_config(self) -> LlamaConfig:
        return LlamaConfig(**self.llm)

    @property
    def proj_in_features(self) -> int:
        if self.qformer is None:
            return self.vision_config().hidden_size * self.merge_tokens
        return self.qformer_config().hidden_size

    @property
    def num_image_tokens(self) -> int:
        """Soft tokens per image in the LLM sequence (32 for Vicuna, 64 for LLaMA-2)."""
        if self.qformer is not None:
            return self.num_query_tokens
        v = self.vision_config()
        return (v.image_size // v.patch_size) ** 2 // self.merge_tokens


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype, as the official ln_vision is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = nn.functional.layer_norm(
                x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
            )
        return out.to(x.dtype)


class MiniGPT4(nn.Module):
    def __init__(self, config: MiniGPT4Config, llm: LlamaForCausalLM | None = None):
        super().__init__()
        self.config = config
        vcfg = config.vision_config()
        self.vision_model = Blip2VisionModel(vcfg)
        # ln_vision is Blip2's post_layernorm, but with the official eps and fp32 arithmetic.
        self.vision_model.post_layernorm = FP32LayerNorm(vcfg.hidden_size, eps=config.ln_vision_eps)
        qcfg = config.qformer_config()
        if qcfg is not None:
            self.qformer = Blip2QFormerModel(qcfg)
            self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qcfg.hidden_size))
        else:
            self.qformer = None
            self.query_tokens = None
        self.llm = llm if llm is not None else LlamaForCausalLM(config.llm_config())
        self.llama_proj = nn.Linear(config.proj_in_features, self.llm.config.hidden_size)
        self.frozen: set[str] = {"vision_model", "qformer", "query_tokens", "llm"}
        self.set_trainable(["llama_proj"])

    # ---- training state -------------------------------------------------------------------
    def set_trainable(self, parts: list[str]) -> None:
        """Train only `parts` (names from PARTS); everything else is frozen and stays in eval mode."""
        unknown = set(parts) - set(PARTS)
        if unknown:
            from minigpt4.errors import UserError

            raise UserError(f"unknown trainable part(s) {sorted(unknown)}: choose from {list(PARTS)}")
        self.frozen = set(PARTS) - set(parts)
        for name in PARTS:
            value = getattr(self, name)
            if value is None:
                continue
            params = [value] if isinstance(value, nn.Parameter) else list(value.parameters())
            for p in params:
                p.requires_grad_(name not in self.frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "MiniGPT4":
        super().train(mode)
        for name in self.frozen:  # Lightning calls train() on everything: frozen parts stay in eval
            module = getattr(self, name)
            if isinstance(module, nn.Module):
                module.eval()
        return self

    # ---- the one path: images -> soft tokens -> embeddings -> LLM -------------------------
    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    @property
    def device(self) -> torch.device:
        return self.llama_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B,3,S,S] -> soft tokens [B, num_image_tokens, H] in the LLM's dtype."""
        return self.project(self.image_features(pixels))

    def _autocast(self):
        device = self.device
        autocast = device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16)
        return torch.autocast(device_type=device.type, dtype=self.dtype, enabled=autocast)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B,3,S,S] -> the frozen image side's output, before llama_proj: [B,N,proj_in].
        Fine-tuning caches these when the ViT and Q-Former are frozen."""
        device = self.device
        pixels = pixels.to(device)
        with self._autocast():
            vision_dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
            image = self.vision_model(pixel_values=pixels.to(vision_dtype)).last_hidden_state  # [B,P+1,Hv]
            if self.qformer is not None:
                queries = self.query_tokens.expand(image.shape[0], -1, -1)  # [B,Q,Hq]
                mask = torch.ones(image.shape[:-1], dtype=torch.long, device=device)
                tokens = self.qformer(
                    query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=mask
                ).last_hidden_state  # [B,Q,Hq]
            else:
                patches = image[:, 1:, :]  # drop the class token: [B,P,Hv]
                b, p, h = patches.shape
                tokens = patches.reshape(b, p // self.config.merge_tokens, h * self.config.merge_tokens)
        return tokens

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """image_features [B,N,proj_in] -> soft tokens [B,N,H] in the LLM's dtype."""
        with self._autocast():
            soft = self.llama_proj(features.to(self.device, self.llama_proj.weight.dtype))  # [B,N,H]
        return soft.to(self.dtype)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B,T] with IMAGE_TOKEN slots + image_embeds [N,num_image_tokens,H] -> [B,T,H].

        Slots are filled in row-major order: the images of row 0 first, in order, then row 1...
        """
        is_image = input_ids == IMAGE_TOKEN
        embeds = self.llm.get_input_embeddings()(input_ids.clamp(min=0))
        n_slots = int(is_image.sum())
        n_given = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if n_slots != n_given:
            raise ValueError(f"{n_slots} image slots in the input but {n_given} image tokens given")
        if n_slots:
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **llm_kwargs,
    ):
        """Teacher-forced pass. Give pixel_values [N,3,S,S] or precomputed image_embeds."""
        if image_embeds is None and pixel_values is not None and len(pixel_values):
            image_embeds = self.encode_images(pixel_values)
        inputs_embeds = self.embed(input_ids.to(self.device), image_embeds)
        return self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=None if attention_mask is None else attention_mask.to(self.device),
            labels=None if labels is None else labels.to(self.device),
            **llm_kwargs,
        )


def apply_precision(model: MiniGPT4, dtype: torch.dtype) -> MiniGPT4:
    """Official inference precision: LLM in `dtype`; ViT Linear/Conv weights in `dtype` with its
    LayerNorms and position/class embeddings in fp32; Q-Former, queries and projection in fp32.
    Half-precision parts then run under autocast on the GPU (see image_features). A quantised
    LLM (bitsandbytes) is left as it was loaded. Each tensor is cast on its own: the whole ViT in
    fp32 on its way to fp16 (3.7 GiB for EVA ViT-g) was the peak of loading an int8 7B."""
    if not getattr(model.llm, "is_quantized", False):
        model.llm.to(dtype)
    for part in IMAGE_SIDE:
        module = getattr(model, part)
        for child in module.modules() if module is not None else ():
            cast_own_tensors(child, official_dtype(part, child, dtype))
    if model.query_tokens is not None:
        model.query_tokens.data = model.query_tokens.data.float()
    return model



def official_dtype(part: str, module: nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The dtype the official code runs `module`'s own tensors in (part: one of IMAGE_SIDE)."""
    return dtype if part == "vision_model" and isinstance(module, (nn.Linear, nn.Conv2d)) else torch.float32


def cast_own_tensors(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast module's own floating parameters and buffers (not its children's) to dtype."""
    for param in module.parameters(recurse=False):
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    for name, buffer in module.named_buffers(recurse=False):
        if buffer.is_floating_point() and buffer.dtype != dtype:
            module._buffers[name] = buffer.to(dtype)
