"""This project's own format, a bundle: one directory holding
    model.safetensors         every tensor in our names (or model-0000i-of-0000N.safetensors + index)
    minigpt4.json             BundleInfo: architecture, template, image size, where it came from
    tokenizer.model           the LLM's tokenizer
`checkpoint=bundle checkpoint.bundle=DIR` loads it with its own architecture and template, with no
renaming, splitting or casting: the fast way to load a model. One writer (write_bundle) serves
build.save_bundle, `python -m minigpt4.weights bundle` and finetune.py's exports.

minigpt4.json's "format" is its schema version:
    2  written by write_bundle (all fields below; a reader of format 2 ignores fields it does not know)
    1  "format": 1 (the bundle command before version 2) or no "format" at all (finetune.py and
       save_bundle before version 2, e.g. the shipped minigpt4/assets/demo): the same fields, fewer of
       them; every one is optional (a missing arch, template or image size is the model config's)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from minigpt4.checkpoints.read import TensorFiles
from minigpt4.checkpoints.write import SAFETENSORS_METADATA, atomic_write, save_shards
from minigpt4.errors import UserError

BUNDLE_JSON = "minigpt4.json"
BUNDLE_WEIGHTS = "model.safetensors"  # one shard; more are model-0000i-of-0000N.safetensors
BUNDLE_FORMAT = 2
# LlamaConfig fields that describe a file or a run, not the architecture.
_NOT_ARCH = ("transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path", "model_type", "quantization_config")


@dataclass
class BundleInfo:
    """minigpt4.json."""

    name: str | None = None  # the model config's name (tiny, 7b, ...)
    template: str | None = None  # conversation template
    image_size: int | None = None
    arch: dict | None = None  # MiniGPT4Config.to_dict(), arch.llm = the LLM's own config (llm_arch)
    dtype: str | None = None  # the LLM's dtype as written (float16, ...)
    sources: dict[str, str] = field(default_factory=dict)  # the checkpoint.* files it was made from
    random_parts: list[str] = field(default_factory=list)  # parts no file provided (random weights)
    trained_parts: list[str] | None = None  # finetune.py: the parts the run trained
    format: int = BUNDLE_FORMAT

    @classmethod
    def from_json(cls, meta: dict, where: str) -> BundleInfo:
        version = meta.get("format", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise UserError(f"{where}: {BUNDLE_JSON} has \"format\": {json.dumps(version)}, not a format number (1, 2, ...)")
        if version > BUNDLE_FORMAT:
            raise UserError(f"{where}: {BUNDLE_JSON} is format {version}, newer than this minigpt4 reads "
                            f"(up to {BUNDLE_FORMAT}): update minigpt4")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in meta.items() if k in known} | {"format": version})

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, indent=2, sort_keys=True)


def llm_arch(config) -> dict:
    """A LlamaConfig as the kwargs that rebuild it (what minigpt4.json's arch.llm holds)."""
    return {k: v for k, v in config.to_diff_dict().items() if k not in _NOT_ARCH}


def is_bundle(path: str | os.PathLike) -> bool:
    return (Path(path) / BUNDLE_JSON).is_file()


def write_bundle(
    state: dict[str, torch.Tensor], directory: str | os.PathLike, info: BundleInfo,
    tokenizer: str | os.PathLike | None = None, max_shard_bytes: int | None = None,
) -> Path:
    """Write state (our names) + minigpt4.json (+ a copy of `tokenizer` as tokenizer.model) into
    `directory`, atomically. With max_shard_bytes, large states go into shards (only one shard
    is copied to the CPU at a time); tied tensors are written under each name."""
    directory = Path(directory)
    with atomic_write(directory, folder=True) as tmp:
        save_shards(state.items(), tmp, max_shard_bytes or sys.maxsize, metadata=SAFETENSORS_METADATA)
        (tmp / BUNDLE_JSON).write_text(replace(info, format=BUNDLE_FORMAT).to_json())
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
    return directory


def read_bundle_info(directory: str | os.PathLike, key: str) -> BundleInfo:
    """minigpt4.json of a bundle (any format up to BUNDLE_FORMAT); `key` is the setting that named it."""
    directory = Path(directory)
    where = f"{key}={directory}"
    if not is_bundle(directory):
        raise UserError(f"{where}: not a minigpt4 checkpoint directory (no {BUNDLE_JSON})")
    try:
        meta = json.loads((directory / BUNDLE_JSON).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{where}: {BUNDLE_JSON} is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{where}: {BUNDLE_JSON} holds a {type(meta).__name__}, not an object")
    return BundleInfo.from_json(meta, where)


def read_bundle(
    directory: str | os.PathLike, key: str, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], BundleInfo]:
    """A bundle's tensors, read straight onto `device`, and its minigpt4.json."""
    info = read_bundle_info(directory, key)
    return TensorFiles(directory, key, device).load(), info
