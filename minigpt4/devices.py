"""Devices and precision: `gpu=` and `precision=` as a user types them -> what this process uses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minigpt4.errors import UserError


def _is_list(gpu) -> bool:
    """gpu=[0,1] (a list, or the config's ListConfig)."""
    return isinstance(gpu, Sequence) and not isinstance(gpu, str)


def resolve_device(gpu) -> torch.device:
    """`gpu` as typed on the command line -> the device this process uses.

    auto: the first GPU if there is one, else the CPU; cpu; 0 / cuda:1; [0,1] (first of a list:
    the others are Lightning's business)."""
    if _is_list(gpu):
        if not len(gpu):
            raise UserError("gpu=[]: give at least one GPU index, or gpu=cpu")
        gpu = gpu[0]
    text = str(gpu).strip().lower()
    if text in ("auto", "none", ""):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    index = text.removeprefix("cuda:")
    if not index.isdigit():
        raise UserError(f"gpu={gpu}: use gpu=cpu, gpu=auto, gpu=0 or gpu=[0,1]")
    if not torch.cuda.is_available():
        raise UserError(f"gpu={gpu} but no CUDA GPU is visible to this process: use gpu=cpu")
    if int(index) >= torch.cuda.device_count():
        raise UserError(f"gpu={gpu} but only {torch.cuda.device_count()} GPU(s) are visible")
    return torch.device(f"cuda:{index}")


def gpu_indices(gpu) -> list[int] | None:
    """Lightning's `devices` for a gpu setting (None = CPU)."""
    if _is_list(gpu):
        return [int(resolve_device(g).index) for g in gpu] if resolve_device(gpu).type == "cuda" else None
    device = resolve_device(gpu)
    return [device.index] if device.type == "cuda" else None


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """What `precision=` means on one device: the dtype weights are loaded and computed in, our
    or bitsandbytes' quantisation, and Lightning's precision when fine-tuning."""

    dtype: torch.dtype
    quant: str | None  # 'int8'/'int4' (ours: decoding/quant.py) | 'bnb-int8'/'bnb-nf4' | None
    lightning: str  # Lightning's Trainer(precision=...): 16-mixed, bf16-mixed or 32-true


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """The one precision setting, resolved: auto = fp16 on a GPU (16-mixed when training), fp32 on
    the CPU; fp16/bf16/fp32 as named (trainable parts keep fp32 master weights and Lightning
    autocasts); int8/int4/bnb-*: the LLM quantised, computing in auto's dtype."""
    p = str(precision).lower()
    gpu = device.type == "cuda"
    if p in ("auto", "int8", "int4", "bnb-int8", "bnb-nf4"):
        dtype, quant = (torch.float16 if gpu else torch.float32), (None if p == "auto" else p)
    elif p in _DTYPES:
        if not gpu and p == "fp16":
            raise UserError("precision=fp16 needs a GPU (fp16 matmuls are not supported on CPU): use fp32 or bf16")
        dtype, quant = _DTYPES[p], None
    else:
        raise UserError(f"precision={precision}: choose auto, fp32, fp16, bf16, int8, int4, bnb-int8 or bnb-nf4")
    lightning = {torch.float16: "16-mixed", torch.bfloat16: "bf16-mixed"}.get(dtype, "32-true")
    return Precision(dtype, quant, lightning)
