"""`bundle`: every part of a configured model in this project's own format, in the dtype it runs
in, so that `checkpoint=bundle checkpoint.bundle=DIR` loads with no conversion at all.

The official path reads four files in three formats (two pickles, one of them fp16 ViT weights
that are cast, a Llama directory, a trainer checkpoint), renames keys and splits q/v biases on
every start. A bundle is the result of all that, written once (build.save_bundle: safetensors
shards in our names, read straight onto the GPU, plus minigpt4.json and the tokenizer; see
minigpt4/checkpoints/bundle.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from minigpt4.build import LoadedModel, load_model, save_bundle
from minigpt4.checkpoints import GB, check_target
from minigpt4.config import compose, load_spec
from minigpt4.devices import resolve_device
from minigpt4.errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def load_for_conversion(overrides: list[str], dtype: str, allow_random: bool = False) -> LoadedModel:
    """The configured model, loaded as chat would load it but in `dtype` whatever the device
    (fp16 on a CPU is fine: nothing is computed). Refuses random parts unless allowed."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    cfg = compose("chat", overrides)
    lm = load_model(load_spec(cfg), device=resolve_device(cfg.gpu), dtype=DTYPES[dtype])
    if lm.random_parts and not allow_random:
        raise UserError(
            f"{', '.join(lm.random_parts)} would be random (no file given): set the checkpoint.* keys "
            "(e.g. checkpoint=official_7b with MINIGPT4_WEIGHTS) or pass --allow-random"
        )
    return lm


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
    lm = load_for_conversion(overrides, dtype, allow_random)
    check_target(out, sum(t.numel() * t.element_size() for t in lm.model.state_dict().values()), force)
    save_bundle(lm, out, max_shard_bytes=int(max_shard_gb * GB))
    log.info("bundle written to %s; load it with checkpoint=bundle checkpoint.bundle=%s", out, out)
    return out
