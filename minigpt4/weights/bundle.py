"""`bundle`: every part of a configured model in this project's own format, in the dtype it runs
in, so that `checkpoint=bundle checkpoint.bundle=DIR` loads with no conversion at all.

The official path reads four files in three formats (two pickles, one of them fp16 ViT weights
that are cast, a Llama directory, a trainer checkpoint), renames keys and splits q/v biases on
every start. A bundle is the result of all that, written once: safetensors shards in our names,
read straight onto the GPU (safe_open(device=...)), plus minigpt4.json (architecture, template,
where the weights came from) and the tokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from minigpt4 import checkpoints as ck
from minigpt4.build import LoadedModel, load_model
from minigpt4.config import compose, resolve_device, to_container
from minigpt4.errors import UserError
from minigpt4.weights.output import GB, check_target

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# LlamaConfig fields that describe a file or a run, not the architecture.
_NOT_ARCH = ("transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path", "model_type", "quantization_config")


def load_for_conversion(overrides: list[str], dtype: str, allow_random: bool = False) -> tuple[LoadedModel, DictConfig]:
    """The configured model, loaded as chat would load it but in `dtype` whatever the device
    (fp16 on a CPU is fine: nothing is computed). Refuses random parts unless allowed."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    cfg = compose("chat", overrides)
    lm = load_model(cfg, device=resolve_device(cfg.gpu), dtype=DTYPES[dtype])
    if lm.random_parts and not allow_random:
        raise UserError(
            f"{', '.join(lm.random_parts)} would be random (no file given): set the checkpoint.* keys "
            "(e.g. checkpoint=official_7b with MINIGPT4_WEIGHTS) or pass --allow-random"
        )
    return lm, cfg


def llm_arch(config) -> dict:
    """A LlamaConfig as the kwargs that rebuild it (what minigpt4.json's arch.llm holds)."""
    return {k: v for k, v in config.to_diff_dict().items() if k not in _NOT_ARCH}


def bundle(
    overrides: list[str],
    out: str | Path,
    dtype: str = "fp16",
    max_shard_gb: float = 4.0,
    allow_random: bool = False,
    force: bool = False,
) -> Path:
    """Load the model that `overrides` configure and write it as a bundle directory."""
    out = Path(out)
    check_target(out, 0, force)  # fail fast, before minutes of loading
    lm, cfg = load_for_conversion(overrides, dtype, allow_random)
    state = lm.model.state_dict()  # save_own clones tied tensors
    check_target(out, sum(t.numel() * t.element_size() for t in state.values()), force)
    arch = lm.model.config.to_dict()
    arch["llm"] = llm_arch(lm.model.llm.config)  # the directory's config, not the model yaml's
    meta = {
        "format": 1,
        "name": str(cfg.model.name),
        "template": str(cfg.model.template),
        "image_size": lm.image_size,
        "arch": arch,
        "dtype": dtype,
        "sources": {k: v for k, v in to_container(cfg.checkpoint).items() if v},
        "random_parts": lm.random_parts,
    }
    ck.save_own(state, out, meta, max_shard_bytes=int(max_shard_gb * GB), tokenizer=lm.tokenizer.path)
    log.info("bundle written to %s; load it with checkpoint=bundle checkpoint.bundle=%s", out, out)
    return out
