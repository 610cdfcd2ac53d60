"""Config -> a ready model: architecture, weights from whichever files the checkpoint names,
device and precision. The one loader chat, evaluate and finetune share.

Parts are built on the meta device and receive their tensors by assignment, so no weight that
a file provides is ever randomly initialised first. A part whose checkpoint key is null is
initialised randomly and the model is labelled untrained.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from transformers import LlamaForCausalLM

from minigpt4 import checkpoints as ck
from minigpt4.config import resolve_device, resolve_precision, to_container
from minigpt4.conversation import Conversation, Template, get_template
from minigpt4.errors import UserError
from minigpt4.images import ImageSource, load_pixels
from minigpt4.model import PARTS, MiniGPT4, MiniGPT4Config, apply_precision
from minigpt4.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Which checkpoint key supplies which of our keys (by prefix).
_OWNER = {
    "vit": ("vision_model.",),
    "qformer": ("qformer.", "query_tokens", "vision_model.post_layernorm."),
    "llm": ("llm.",),
    "proj": ("llama_proj.",),
}


def _owner(key: str) -> str:
    if key.startswith("vision_model.post_layernorm."):
        return "qformer"
    for owner, prefixes in _OWNER.items():
        if key.startswith(prefixes):
            return owner
    raise KeyError(key)


@dataclass
class LoadedModel:
    """A model with everything needed to talk to it."""

    model: MiniGPT4
    tokenizer: Tokenizer
    template: Template
    image_size: int
    device: torch.device
    name: str
    random_parts: list[str] = field(default_factory=list)  # parts left randomly initialised
    load_seconds: float = 0.0

    @property
    def trained(self) -> bool:
        return not self.random_parts

    @property
    def label(self) -> str:
        if not self.random_parts:
            return self.name
        return f"{self.name} (UNTRAINED: random {', '.join(self.random_parts)})"

    def conversation(self) -> Conversation:
        return Conversation(self.template)

    def pixels(self, images: list[ImageSource]) -> torch.Tensor:
        return load_pixels(images, self.image_size)

    def encode_images(self, images: list[ImageSource]) -> torch.Tensor:
        """Paths/PIL images -> soft tokens [N, num_image_tokens, H]."""
        with torch.inference_mode():
            return self.model.encode_images(self.pixels(images))


def load_model(cfg: DictConfig, device: torch.device | None = None) -> LoadedModel:
    """Build the model a composed config describes (see conf/model and conf/checkpoint)."""
    start = time.perf_counter()
    device = device or resolve_device(cfg.gpu)
    dtype, quant = resolve_precision(cfg.precision, device)
    ckpt = {k: (str(v) if v is not None else None) for k, v in to_container(cfg.checkpoint).items()}
    arch_dict = to_container(cfg.model.arch)
    template_name = cfg.model.template
    image_size = int(cfg.model.image_size)

    bundle_state: dict[str, torch.Tensor] = {}
    bundle_dir = ckpt.get("bundle")
    if bundle_dir:
        bundle_state, meta = ck.read_own(_existing(bundle_dir, "checkpoint.bundle"), "checkpoint.bundle")
        arch_dict = meta.get("arch", arch_dict)  # the checkpoint knows its own architecture
        template_name = meta.get("template", template_name)
        image_size = int(meta.get("image_size", image_size))
    arch = MiniGPT4Config.from_dict(arch_dict)

    # ---- tokenizer and LLM ----------------------------------------------------------------
    llm_dir = ckpt.get("llm")
    if llm_dir:
        llm_dir = _existing(llm_dir, "checkpoint.llm")
        tokenizer = Tokenizer.from_dir(llm_dir)
        llm = _load_llm_dir(llm_dir, dtype, quant, device)
    else:
        if quant:
            raise UserError(f"precision={quant} quantises a loaded LLM: set checkpoint.llm=/path/to/llm")
        tok_file = Path(bundle_dir) / "tokenizer.model" if bundle_dir else None
        tokenizer = Tokenizer(tok_file if tok_file and tok_file.is_file() else cfg.model.tokenizer)
        with torch.device("meta" if any(k.startswith("llm.") for k in bundle_state) else device):
            llm = LlamaForCausalLM(arch.llm_config())
    if tokenizer.vocab_size > llm.config.vocab_size:
        raise UserError(
            f"tokenizer has {tokenizer.vocab_size} pieces but the LLM only {llm.config.vocab_size} rows: "
            "checkpoint.llm and the tokenizer do not belong together"
        )

    with torch.device("meta"):  # the LLM already exists; every other part waits for its tensors
        model = MiniGPT4(arch, llm=llm)

    # ---- weights ----------------------------------------------------------------------------
    sources: dict[str, dict[str, torch.Tensor]] = {}
    if bundle_state:
        sources["bundle"] = bundle_state
    if ckpt.get("vit"):
        sources["vit"] = _read_official(ckpt["vit"], "checkpoint.vit", arch)
    if ckpt.get("qformer"):
        path = _existing(ckpt["qformer"], "checkpoint.qformer")
        sources["qformer"] = (
            ck.read_hf_blip2(path, "checkpoint.qformer")
            if Path(path).is_dir()
            else _read_official(path, "checkpoint.qformer", arch)
        )
    if ckpt.get("proj"):
        path = _existing(ckpt["proj"], "checkpoint.proj")
        if Path(path).is_dir() or str(path).endswith(".safetensors"):
            sources["proj"] = ck.read_safetensors(path if str(path).endswith(".safetensors") else Path(path) / ck.OWN_WEIGHTS)
        else:
            sources["proj"] = _read_official(path, "checkpoint.proj", arch)
    loaded = _assign(model, sources, ckpt)
    random_parts = _materialize(model, device, loaded, ckpt)
    model.set_trainable(sorted(set(PARTS) - model.frozen))  # re-apply to re-created parameters

    if getattr(model.llm, "is_quantized", False):  # bitsandbytes weights cannot be moved
        for part in (model.vision_model, model.qformer, model.llama_proj):
            if part is not None:
                part.to(device)
        if model.query_tokens is not None:
            model.query_tokens.data = model.query_tokens.data.to(device)
    else:
        model.to(device)
    for part in (model.vision_model, model.qformer, model.llama_proj):
        if part is not None:
            part.float()
    if model.query_tokens is not None:
        model.query_tokens.data = model.query_tokens.data.float()
    apply_precision(model, dtype)
    model.eval()
    name = str(cfg.model.name)
    result = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        template=get_template(template_name),
        image_size=image_size,
        device=device,
        name=name,
        random_parts=random_parts,
        load_seconds=time.perf_counter() - start,
    )
    log.info("loaded %s on %s in %.1fs", result.label, device, result.load_seconds)
    return result


def _existing(path: str, key: str) -> str:
    if not Path(path).exists():
        raise UserError(f"{key}={path}: no such file or directory; set {key}=/path/to/it (or MINIGPT4_WEIGHTS)")
    return path


def _read_official(path: str, key: str, arch: MiniGPT4Config) -> dict[str, torch.Tensor]:
    state = ck.read_torch_file(_existing(path, key), key)
    return ck.official_to_ours(state, arch.vision_config().num_hidden_layers, f"{key}={path}")


def _load_llm_dir(path: str, dtype: torch.dtype, quant: str | None, device: torch.device) -> LlamaForCausalLM:
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"checkpoint.llm={path}: not a Hugging Face model directory (no config.json)")
    kwargs = {"dtype": dtype, "device_map": {"": str(device)}}
    if quant:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if quant == "int8"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
        )
    try:
        return LlamaForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"checkpoint.llm={path}: cannot load ({str(err).splitlines()[0][:200]})") from None


def _assign(model: MiniGPT4, sources: dict[str, dict[str, torch.Tensor]], ckpt: dict) -> set[str]:
    """Assign every source's tensors (later sources win, as the official load order does)."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("llm.")}
    llm_expected = model.llm.state_dict() if any(k.startswith("llm.") for s in sources.values() for k in s) else {}
    loaded: set[str] = set()
    for source, state in sources.items():
        label = f"checkpoint.{source}={ckpt.get(source)}"
        for key, tensor in state.items():
            if key.startswith("llm.") and key[4:] in llm_expected:
                want = llm_expected[key[4:]]
            elif key in expected:
                want = expected[key]
            elif key.startswith("llm.") and "rotary_emb" in key:
                continue
            else:
                raise UserError(f"{label}: key {key} does not belong to model ({sorted(expected)[:3]}...)")
            if tuple(tensor.shape) != tuple(want.shape):
                if key == "llama_proj.weight":
                    raise UserError(
                        f"{label} holds a projection {list(tensor.shape)} for "
                        f"{ck.projection_size_name(tuple(tensor.shape))}, but this model needs "
                        f"{list(want.shape)}: pick the model= that matches the file, or the file that matches the model"
                    )
                raise UserError(f"{label}: {key} has shape {list(tensor.shape)}, the model needs {list(want.shape)}")
            loaded.add(key)
        model.load_state_dict({k: v for k, v in state.items() if k in expected or k.startswith("llm.")},
                              strict=False, assign=True)
    for source in ("vit", "qformer", "proj"):
        if ckpt.get(source):
            missing = sorted(k for k in expected if _owner(k) == source and k not in loaded)
            if source == "qformer" and model.qformer is None:
                missing = []
            if missing:
                raise UserError(f"checkpoint.{source}={ckpt[source]} lacks {len(missing)} keys, e.g. {missing[:3]}")
    return loaded


def _materialize(model: MiniGPT4, device: torch.device, loaded: set[str], ckpt: dict) -> list[str]:
    """Randomly initialise what no file provided; return the names of those parts."""
    random_parts = []
    for name, module in model.named_modules():
        if not name:  # the root's only direct parameter, query_tokens, is handled below
            continue
        direct = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if not any(t.is_meta for _, t in direct):
            continue
        module.to_empty(device=device, recurse=False)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        elif name.startswith("vision_model"):
            model.vision_model._init_weights(module)
        elif name.startswith("qformer"):
            model.qformer._init_weights(module)
        top = name.split(".")[0]
        if top not in random_parts and not name.endswith("post_layernorm"):
            random_parts.append(top)
    if model.query_tokens is not None and model.query_tokens.is_meta:
        model.query_tokens = nn.Parameter(torch.empty_like(model.query_tokens, device=device).normal_(0, 0.02))
        random_parts.append("query_tokens")
    if not any(k.startswith("llm.") for k in loaded) and not ckpt.get("llm"):
        random_parts.append("llm")
    order = ["vision_model", "qformer", "query_tokens", "llama_proj", "llm"]
    return sorted(set(random_parts), key=order.index)
