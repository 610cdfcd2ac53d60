"""Lazy access to the tensors of a checkpoint file or model directory, one tensor at a time.

Weight tools must not hold a 13B model in memory: names, shapes and dtypes come from file
headers (safetensors) or memory-mapped pickles (torch.load(mmap=True, weights_only=True)), and a
tensor's bytes are read only when `get` asks for it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from minigpt4.checkpoints import load_pickle
from minigpt4.errors import UserError

log = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face model directory, safetensors first (as transformers)."""
    for index, pattern in (("model.safetensors.index.json", "*.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        if (directory / index).is_file():
            names = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
            missing = [n for n in names if not (directory / n).is_file()]
            if missing:
                raise UserError(f"{directory}: {index} names {missing[0]} but that file is missing (incomplete download?)")
            return [directory / n for n in names]
        files = sorted(directory.glob(pattern))
        if files:
            return files
    return []


class TensorFiles:
    """Every tensor of one checkpoint file (.safetensors/.pth/.bin/.ckpt, {"model": ...} or
    {"state_dict": ...} unwrapped) or Hugging Face directory, by name. `extras` lists a pickled
    file's top-level keys besides that wrapper."""

    def __init__(self, path: str | os.PathLike, label: str = "weights"):
        self.path = Path(path)
        self.label = label
        self.info: dict[str, TensorInfo] = {}
        self.extras: list[str] = []
        self.scalars: dict[str, int | float | str] = {}  # a wrapper's plain values (epoch, global_step, ...)
        self._safe: dict[Path, object] = {}  # open safetensors handles
        self._torch: dict[str, torch.Tensor] = {}  # memory-mapped tensors of pickled files
        if not self.path.exists():
            raise UserError(f"{label}={self.path}: no such file or directory")
        files = weight_files(self.path) if self.path.is_dir() else [self.path]
        if not files:
            raise UserError(f"{label}={self.path}: no weight files (*.safetensors, pytorch_model*.bin) in this directory")
        for file in files:
            if file.suffix == ".safetensors":
                self._add_safetensors(file)
            else:
                self._add_torch(file)

    def _add_safetensors(self, file: Path) -> None:
        try:
            handle = safe_open(str(file), framework="pt")
            self._safe[file] = handle
            for name in handle.keys():
                piece = handle.get_slice(name)
                self.info[name] = TensorInfo(tuple(piece.get_shape()), _SAFETENSORS_DTYPES[piece.get_dtype()], file)
        except Exception as err:  # safetensors raises its own error types
            raise UserError(f"{self.label}: {file} is not a readable safetensors file ({str(err)[:160]})") from None

    def _add_torch(self, file: Path) -> None:
        obj = load_pickle(file, f"{self.label}: {file}")
        wrapper = next((w for w in ("model", "state_dict") if isinstance(obj, dict) and isinstance(obj.get(w), dict)), None)
        if wrapper:  # official trainer {"model": ...}; Lightning {"state_dict": ..., "optimizer_states": ...}
            self.extras += [str(k) for k in obj if k != wrapper]
            self.scalars.update({str(k): v for k, v in obj.items() if isinstance(v, (int, float, str))})
            obj = obj[wrapper]
        if not isinstance(obj, dict):
            raise UserError(f"{self.label}: {file} holds a {type(obj).__name__}, not a state dict")
        for name, tensor in obj.items():
            if isinstance(tensor, torch.Tensor):
                self._torch[name] = tensor
                self.info[name] = TensorInfo(tuple(tensor.shape), tensor.dtype, file)

    def __contains__(self, name: str) -> bool:
        return name in self.info

    def __len__(self) -> int:
        return len(self.info)

    def names(self) -> list[str]:
        return list(self.info)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read now (on the CPU)."""
        if name in self._torch:
            return self._torch[name]
        return self._safe[self.info[name].file].get_tensor(name)

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.info.values())


def read_config(directory: Path) -> dict | None:
    """config.json of a Hugging Face directory, or None."""
    file = directory / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{file} is not valid JSON ({err})") from None


DELTA_NORM_LIMIT = 0.25  # mean |model.norm.weight| below this looks like a delta


def looks_like_delta(files: TensorFiles) -> float | None:
    """Mean |model.norm.weight|: a trained LLM's final RMSNorm weights are far from zero (they
    start at 1), a delta's (fine-tuned minus base) are close to zero. A heuristic, not a proof."""
    if "model.norm.weight" not in files:
        return None
    return float(files.get("model.norm.weight").float().abs().mean())
