"""Hydra/OmegaConf glue: config composition for scripts and notebooks, devices and precision."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from minigpt4.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
ASSETS = Path(__file__).resolve().parent / "assets"

if not OmegaConf.has_resolver("asset"):
    OmegaConf.register_new_resolver("asset", lambda name: str(ASSETS / name))


def compose(config_name: str = "chat", overrides: list[str] | None = None) -> DictConfig:
    """The config an entry point would see for these command-line overrides (no run directory)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(f"config: {str(err).splitlines()[0]}") from None


def resolve_device(gpu) -> torch.device:
    """`gpu` as typed on the command line -> the device this process uses.

    auto: the first GPU if there is one, else the CPU; cpu; 0 / cuda:1; [0,1] (first of a list:
    the others are Lightning's business)."""
    if isinstance(gpu, (list, tuple, ListConfig)):
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
    if isinstance(gpu, (list, tuple, ListConfig)):
        return [int(resolve_device(g).index) for g in gpu] if resolve_device(gpu).type == "cuda" else None
    device = resolve_device(gpu)
    return [device.index] if device.type == "cuda" else None


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype, str | None]:
    """(compute dtype, quantisation 'int8'/'int4' or None)."""
    p = str(precision).lower()
    if p == "auto":
        return (torch.float16 if device.type == "cuda" else torch.float32), None
    if p in _DTYPES:
        if device.type == "cpu" and p == "fp16":
            raise UserError("precision=fp16 needs a GPU (fp16 matmuls are not supported on CPU): use fp32 or bf16")
        return _DTYPES[p], None
    if p in ("int8", "int4"):
        return (torch.float16 if device.type == "cuda" else torch.float32), p
    raise UserError(f"precision={precision}: choose auto, fp32, fp16, bf16, int8 or int4")


def to_container(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if cfg is not None else {}
