"""The one checkpoint reader: any weight file or directory as named tensors, read lazily.

Names, shapes and dtypes come from file headers (safetensors) or memory-mapped pickles
(torch.load(mmap=True, weights_only=True)); a tensor's bytes are read only when asked for. So the
weight tools stream a 13B model one tensor at a time, and the model loader reads only the keys
it keeps, straight onto its device (safe_open(device=...)): no CPU copy of a GPU load.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from minigpt4.errors import UserError

log = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
# The wrappers a pickled state dict comes in: the official trainer's {"model": ...}, Lightning's
# {"state_dict": ..., "optimizer_states": ...}.
WRAPPERS = ("model", "state_dict")

# torch names the global a refused pickle asks for ("Unsupported global: GLOBAL posix.system was
# not an allowed global ...", "... GLOBAL posix.system whose module posix is blocked.").
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")


def load_pickle(path: Path, label: str) -> object:
    """The one torch.load of the project: weights_only=True, memory-mapped where the file allows
    it (zip format). Any failure is one line starting with `label`: torch's own message is a
    page of advice to load the file unsafely, cut mid-sentence it told the user nothing."""
    try:
        with warnings.catch_warnings():  # a plain pickle's "Detected pickle protocol 4" adds nothing
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # the unpickler fails in many ways (IndexError, KeyError, ...) on non-checkpoints
        log.debug("reading %s as a PyTorch checkpoint failed", path, exc_info=True)
        refused = _REFUSED_GLOBAL.search(str(err))
        if refused:
            raise UserError(
                f"{label} is refused: loading it would run code (it asks for the global {refused.group(1)}); "
                "only weight files (dicts of tensors) are accepted; re-save a trusted file's state dict"
            ) from None
        if str(err).startswith("Weights only load failed") and err.__context__ is not None:
            err = err.__context__  # the unpickler's own reason, without torch's advice around it
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{label} is not a PyTorch checkpoint ({first[:160]})") from None


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face model directory or a bundle, safetensors first (as
    transformers): the files an index names, else every *.safetensors, else pytorch_model*.bin."""
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


def read_config(directory: Path) -> dict | None:
    """config.json of a Hugging Face directory, or None."""
    file = directory / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{file} is not valid JSON ({err})") from None


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class TensorFiles:
    """Every tensor of one checkpoint file (.safetensors, or a pickle: .pth/.bin/.ckpt, one of
    WRAPPERS unwrapped) or directory (weight_files), by name. `label` is the setting that named
    the path (checkpoint.proj, --delta): messages say `label=path`. `extras` lists a pickle's
    top-level keys besides the wrapper, `scalars` their plain values (epoch, global_step, ...),
    `non_tensors` the state's entries that are no tensor."""

    def __init__(self, path: str | os.PathLike, label: str = "", device: str | torch.device = "cpu"):
        self.path = Path(path)
        self.label = label
        self.device = str(device)
        self.info: dict[str, TensorInfo] = {}
        self.extras: list[str] = []
        self.scalars: dict[str, int | float | str] = {}
        self.non_tensors: list[str] = []
        self._safe: dict[Path, object] = {}  # open safetensors handles
        self._torch: dict[str, torch.Tensor] = {}  # memory-mapped tensors of pickled files
        if not self.path.exists():
            raise UserError(f"{self.where(self.path)}: no such file or directory")
        files = weight_files(self.path) if self.path.is_dir() else [self.path]
        if not files:
            raise UserError(f"{self.where(self.path)}: no weight files (*.safetensors, pytorch_model*.bin) in this directory")
        for file in files:
            if file.suffix == ".safetensors":
                self._add_safetensors(file)
            else:
                self._add_torch(file)

    def where(self, file: Path) -> str:
        """How messages name `file`: label=path, then the file's name inside a directory."""
        name = f"{self.label}={self.path}" if self.label else str(self.path)
        return name if file == self.path else f"{name}: {file.name}"

    def _add_safetensors(self, file: Path) -> None:
        try:
            handle = safe_open(str(file), framework="pt", device=self.device)
            self._safe[file] = handle
            for name in handle.keys():  # noqa: SIM118 - a safe_open handle is no dict
                piece = handle.get_slice(name)
                self.info[name] = TensorInfo(tuple(piece.get_shape()), _SAFETENSORS_DTYPES[piece.get_dtype()], file)
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise UserError(f"{self.where(file)} is not a readable safetensors file ({str(err)[:160]})") from None

    def _add_torch(self, file: Path) -> None:
        obj = load_pickle(file, self.where(file))
        wrapper = next((w for w in WRAPPERS if isinstance(obj, dict) and isinstance(obj.get(w), dict)), None)
        if wrapper:
            self.extras += [str(k) for k in obj if k != wrapper]
            self.scalars.update({str(k): v for k, v in obj.items() if isinstance(v, (int, float, str))})
            obj = obj[wrapper]
        if not isinstance(obj, dict):
            raise UserError(f"{self.where(file)} holds a {type(obj).__name__}, not a state dict of tensors")
        for name, tensor in obj.items():
            if isinstance(tensor, torch.Tensor):
                self._torch[name] = tensor
                self.info[name] = TensorInfo(tuple(tensor.shape), tensor.dtype, file)
            else:
                self.non_tensors.append(str(name))

    def __contains__(self, name: str) -> bool:
        return name in self.info

    def __len__(self) -> int:
        return len(self.info)

    def names(self) -> list[str]:
        return list(self.info)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read now (safetensors: onto the device; pickles: memory-mapped on the CPU)."""
        if name in self._torch:
            return self._torch[name]
        file = self.info[name].file
        try:
            return self._safe[file].get_tensor(name)
        except Exception as err:  # noqa: BLE001 - a truncated file fails here, not in its header
            raise UserError(f"{self.where(file)} is not a readable safetensors file ({str(err)[:160]})") from None

    def load(self, keep: Callable[[str], bool] = lambda name: True) -> dict[str, torch.Tensor]:
        """The tensors whose names `keep` accepts, read now."""
        return {name: self.get(name) for name in self.info if keep(name)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, refusing a file that also holds other values (it is no state dict)."""
        if self.non_tensors or not self.info:
            raise UserError(f"{self.where(self.path)} is not a state dict of tensors"
                            + (f" ({self.non_tensors[0]} is not a tensor)" if self.non_tensors else " (it holds none)"))
        return self.load()

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.info.values())
