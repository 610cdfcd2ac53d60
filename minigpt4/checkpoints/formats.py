"""The one format detector: what a checkpoint path is. The model loader picks its reader by it,
`python -m minigpt4.weights inspect` its report, apply-delta its refusals.

Two questions, answered from names alone (no tensor is read):
    layout(path)       how the path stores tensors: a bundle, a Hugging Face or Meta directory,
                       a safetensors file or a pickle
    tensor_kind(files) which MiniGPT-4 file its tensor names make it: the EVA ViT, the BLIP-2
                       Q-Former, a projection, a whole model, a Lightning training checkpoint
"""

from __future__ import annotations

from pathlib import Path

from minigpt4.checkpoints.bundle import is_bundle
from minigpt4.checkpoints.keys import parts_in
from minigpt4.checkpoints.read import TensorFiles

DIRECTORY_LAYOUTS = ("bundle", "meta_llama", "hf", "dir")
# Top-level keys Lightning writes beside "state_dict" (finetune.py's checkpoints/*.ckpt).
LIGHTNING_KEYS = {"pytorch-lightning_version", "optimizer_states", "lr_schedulers", "loops"}


def layout(path: Path) -> str:
    """missing | bundle (our own format: minigpt4.json) | meta_llama (params.json, consolidated.*.pth)
    | hf (a Hugging Face model directory: config.json) | dir (any other directory) | safetensors | pickle."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if path.is_dir():
        if is_bundle(path):
            return "bundle"
        if (path / "params.json").is_file() or list(path.glob("consolidated.*.pth")):
            return "meta_llama"
        return "hf" if (path / "config.json").is_file() else "dir"
    return "safetensors" if path.suffix == ".safetensors" else "pickle"


def uses_our_names(names) -> bool:
    """This project's key names (a bundle's), rather than the official ones."""
    return any(n.startswith(("llm.", "vision_model.", "qformer.")) for n in names)


def tensor_kind(files: TensorFiles) -> str:
    """lightning | projection | model (more parts than the projection) | eva_vit | blip2 | empty | unknown."""
    names = set(files.names())
    strip = lambda n: n.removeprefix("visual_encoder.")
    if LIGHTNING_KEYS & set(files.extras):
        return "lightning"
    if "llama_proj.weight" in names:
        return "projection" if parts_in(names) == ["projection"] else "model"
    if any(strip(n) == "patch_embed.proj.weight" for n in names) and not any(n.startswith("Qformer.") for n in names):
        return "eva_vit"
    if any(n.startswith("Qformer.bert.") for n in names):
        return "blip2"
    return "unknown" if names else "empty"


def projection_size_name(weight_shape: tuple[int, ...]) -> str:
    """Which official model a llama_proj of this shape belongs to."""
    out_f, in_f = weight_shape
    if in_f == 5632:
        return "LLaMA-2-7B (model=llama2_7b)"
    return {4096: "Vicuna-7B (model=7b)", 5120: "Vicuna-13B (model=13b)"}.get(out_f, f"an LLM of hidden size {out_f}")
