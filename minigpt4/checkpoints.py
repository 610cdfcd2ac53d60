"""Checkpoint files <-> this model's state dict: the one key map and the file readers/writers.

Official (LAVIS / MiniGPT-4) names -> ours (transformers' Blip2 classes inside MiniGPT4):
    visual_encoder.* / eva_vit_g.pth keys   -> vision_model.embeddings.*, vision_model.encoder.layers.*
    blocks.i.attn.{q_bias,v_bias}            -> vision_model.encoder.layers.i.self_attn.qkv.bias
                                                = cat(q_bias, zeros, v_bias)
    ln_vision.*                              -> vision_model.post_layernorm.*
    Qformer.bert.embeddings.LayerNorm.*      -> qformer.layernorm.*
    Qformer.bert.encoder.layer.i.*.self.*    -> qformer.encoder.layer.i.*.attention.*
    query_tokens                             -> query_tokens
    llama_proj.*                             -> llama_proj.*
    llama_model.*                            -> llm.*
Our own format is safetensors with our names plus a small JSON config.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minigpt4.errors import UserError

log = logging.getLogger(__name__)

OWN_CONFIG = "minigpt4.json"
OWN_WEIGHTS = "model.safetensors"

_VIT_RULES = [
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.weight", r"encoder.layers.\1.self_attn.qkv.weight"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
]
_QFORMER_RULES = [
    (r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)", r"qformer.layernorm.\1"),
    (
        r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)",
        r"qformer.encoder.layer.\1.\2.attention.\3.\4",
    ),
    (
        r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention|intermediate_query|output_query)\.(.+)",
        r"qformer.encoder.layer.\1.\2.\3",
    ),
    (r"query_tokens", "query_tokens"),
    (r"ln_vision\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    (r"llama_proj\.(weight|bias)", r"llama_proj.\1"),
    (r"llama_model\.(.+)", r"llm.\1"),
]
# Keys the official files hold that MiniGPT-4 does not use: skipped by name, listed at debug level.
_KNOWN_EXTRAS = [
    r"(visual_encoder\.)?norm\..*",  # EVA-CLIP's final norm (MiniGPT-4 keeps 39 of 40 blocks, no norm)
    r"(visual_encoder\.)?(fc_norm|head)\..*",
    r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\..*",
    r"Qformer\.bert\.embeddings\.position_ids",
    r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..*",  # the unused text branch
    r"Qformer\.cls\..*",
    r"(t5_proj|t5_model|opt_proj|opt_model|vision_proj|text_proj|itm_head)\..*",
    r"temp",
    r"llama_model\..*rotary_emb\.inv_freq",
]
_VIT_BIAS = re.compile(r"(?:visual_encoder\.)?blocks\.(\d+)\.attn\.(q_bias|v_bias)")
_VIT_BLOCK = re.compile(r"(?:visual_encoder\.)?blocks\.(\d+)\.")


def _map_key(key: str) -> str | None:
    """Official key -> ours; None when the key is not one we know how to place."""
    vit_key = key[len("visual_encoder.") :] if key.startswith("visual_encoder.") else key
    for pattern, repl in _VIT_RULES:
        if re.fullmatch(pattern, vit_key):
            return "vision_model." + re.sub(pattern, repl, vit_key)
    for pattern, repl in _QFORMER_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def official_to_ours(state: dict[str, torch.Tensor], num_vision_layers: int, source: str) -> dict[str, torch.Tensor]:
    """Rename an official state dict; skip known extras and ViT blocks past num_vision_layers;
    fail on anything unknown (naming up to five keys)."""
    out: dict[str, torch.Tensor] = {}
    biases: dict[int, dict[str, torch.Tensor]] = {}
    skipped, unknown = [], []
    for key, tensor in state.items():
        block = _VIT_BLOCK.match(key)
        if block and int(block.group(1)) >= num_vision_layers:
            skipped.append(key)  # e.g. EVA-CLIP's 40th block
            continue
        bias = _VIT_BIAS.fullmatch(key)
        if bias:
            biases.setdefault(int(bias.group(1)), {})[bias.group(2)] = tensor
            continue
        if any(re.fullmatch(p, key) for p in _KNOWN_EXTRAS):
            skipped.append(key)
            continue
        new = _map_key(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = tensor
    if unknown:
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise UserError(f"{source}: unexpected keys {unknown[:5]}{more}: not an official MiniGPT-4/BLIP-2 file?")
    for i, pair in biases.items():
        if set(pair) != {"q_bias", "v_bias"}:
            raise UserError(f"{source}: block {i} has {sorted(pair)} but needs both q_bias and v_bias")
        q, v = pair["q_bias"], pair["v_bias"]
        out[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(v), v])
    if skipped:
        log.debug("%s: skipped %d keys MiniGPT-4 does not use: %s", source, len(skipped), skipped)
    return out


def ours_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse map (ViT keys without a prefix, as eva_vit_g.pth has them)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias", key)
        if m:
            q, _, v = tensor.chunk(3)
            out[f"blocks.{m.group(1)}.attn.q_bias"] = q
            out[f"blocks.{m.group(1)}.attn.v_bias"] = v
            continue
        new = _unmap_key(key)
        if new is None:
            raise KeyError(f"no official name for {key}")
        out[new] = tensor
    return out


_INVERSE_RULES = [
    (r"vision_model\.embeddings\.class_embedding", "cls_token"),
    (r"vision_model\.embeddings\.position_embedding", "pos_embed"),
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm(1|2)\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.weight", r"blocks.\1.attn.qkv.weight"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"ln_vision.\1"),
    (r"qformer\.layernorm\.(weight|bias)", r"Qformer.bert.embeddings.LayerNorm.\1"),
    (
        r"qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.(query|key|value)\.(weight|bias)",
        r"Qformer.bert.encoder.layer.\1.\2.self.\3.\4",
    ),
    (r"qformer\.encoder\.layer\.(\d+)\.(.+)", r"Qformer.bert.encoder.layer.\1.\2"),
    (r"query_tokens", "query_tokens"),
    (r"llama_proj\.(weight|bias)", r"llama_proj.\1"),
    (r"llm\.(.+)", r"llama_model.\1"),
]


def _unmap_key(key: str) -> str | None:
    for pattern, repl in _INVERSE_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    return None


# ---- reading files ---------------------------------------------------------------------------
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


def read_torch_file(path: str | os.PathLike, key: str) -> dict[str, torch.Tensor]:
    """A .pth checkpoint as a flat state dict (unwrapping {"model": ...}); weights_only=True."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{key}={path}: no such file; set {key}=/path/to/the/file")
    if path.is_dir():
        raise UserError(f"{key}={path} is a directory; it needs a checkpoint file")
    obj = load_pickle(path, f"{key}={path}")
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{key}={path} is not a state dict of tensors")
    return obj


def read_safetensors(path: str | os.PathLike, keep=lambda k: True, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """One file, or a directory of shards (model*.safetensors), reading only the keys kept,
    straight onto `device` (no CPU copy of the whole state for a GPU load)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for k in f.keys():
                    if keep(k):
                        out[k] = f.get_tensor(k)
        except Exception as err:  # safetensors raises its own error types
            raise UserError(f"{file} is not a readable safetensors file ({err})") from None
    return out


def read_hf_blip2(directory: str | os.PathLike, key: str) -> dict[str, torch.Tensor]:
    """Vision model, Q-Former and query tokens from a Hugging Face BLIP-2 directory; the
    language model in it (T5/OPT) is never read."""
    directory = Path(directory)
    wanted = lambda k: k.startswith(("vision_model.", "qformer.")) or k == "query_tokens"
    if list(directory.glob("*.safetensors")):
        state = read_safetensors(directory, wanted)
    else:
        state = {}
        for file in sorted(directory.glob("pytorch_model*.bin")):
            state.update({k: v for k, v in read_torch_file(file, key).items() if wanted(k)})
    if not state:
        raise UserError(f"{key}={directory}: no BLIP-2 weights (vision_model.*, qformer.*) found in it")
    return state


def projection_size_name(weight_shape: tuple[int, ...]) -> str:
    """Which official model a llama_proj of this shape belongs to."""
    out_f, in_f = weight_shape
    if in_f == 5632:
        return "LLaMA-2-7B (model=llama2_7b)"
    return {4096: "Vicuna-7B (model=7b)", 5120: "Vicuna-13B (model=13b)"}.get(out_f, f"an LLM of hidden size {out_f}")


# ---- our own format --------------------------------------------------------------------------
def save_own(
    state: dict[str, torch.Tensor], directory: str | os.PathLike, config: dict, max_shard_bytes: int | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> Path:
    """Write state (our names) + config (+ a copy of `tokenizer` as tokenizer.model) into
    `directory`, atomically (see atomic_write). With max_shard_bytes, large states go into shards
    (only one shard is copied to the CPU at a time)."""
    directory = Path(directory)
    with atomic_write(directory, folder=True) as tmp:
        # one shard (model.safetensors) unless max_shard_bytes asks for more
        save_shards(state.items(), tmp, max_shard_bytes or sys.maxsize, metadata={"format": "pt", "minigpt4": "1"})
        (tmp / OWN_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
    return directory


def clone_aliases(items):
    """(name, tensor) pairs with every tensor whose storage an earlier one shares (tied weights)
    cloned: safetensors and save_pretrained refuse or drop aliases."""
    seen = set()
    for name, tensor in items:
        ptr = (tensor.device, tensor.untyped_storage().data_ptr())
        yield name, (tensor.clone() if ptr in seen else tensor)
        seen.add(ptr)


def save_shards(
    items, directory: str | os.PathLike, max_shard_bytes: int, prefix: str = "model", metadata: dict | None = None
) -> dict[str, str]:
    """Write (name, tensor) pairs, as they come, into safetensors shards of at most max_shard_bytes
    (a bigger tensor gets a shard of its own): `{prefix}.safetensors`, or `{prefix}-00001-of-0000N.safetensors`
    plus `{prefix}.safetensors.index.json` (the Hugging Face layout). Memory holds one shard at a time.
    Returns the weight map (name -> file name)."""
    directory = Path(directory)
    written: list[tuple[Path, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        part = directory / f".{prefix}-part{len(written)}.tmp"
        save_file(pending, str(part), metadata=metadata)
        written.append((part, list(pending)))
        pending.clear()

    for name, tensor in clone_aliases(items):
        nbytes = tensor.numel() * tensor.element_size()
        if pending and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        pending[name] = tensor.detach().contiguous().cpu()
        size += nbytes
        total += nbytes
    if pending or not written:
        flush()
    weight_map = {}
    for i, (part, names) in enumerate(written):
        final = f"{prefix}.safetensors" if len(written) == 1 else f"{prefix}-{i + 1:05d}-of-{len(written):05d}.safetensors"
        part.rename(directory / final)
        weight_map.update({n: final for n in names})
    if len(written) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return weight_map


def is_own_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / OWN_CONFIG).is_file()


def read_own(directory: str | os.PathLike, key: str, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    directory = Path(directory)
    if not is_own_dir(directory):
        raise UserError(f"{key}={directory}: not a minigpt4 checkpoint directory (no {OWN_CONFIG})")
    config = json.loads((directory / OWN_CONFIG).read_text())
    return read_safetensors(directory, device=device), config


def save_official_projection(state: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """{"model": {"llama_proj.weight", "llama_proj.bias"}}: what the official code loads."""
    path = Path(path)
    proj = {k: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith("llama_proj.")}
    with atomic_write(path) as tmp:
        torch.save({"model": proj}, tmp)
    return path


# ---- writing: complete or absent, readable as any file the user writes ----------------------------
@contextlib.contextmanager
def atomic_write(target: str | os.PathLike, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target` (an empty folder with folder=True, else a file name
    to write); when the block succeeds it gets the umask's usual modes and replaces `target`,
    when it fails it is removed. So a crash never leaves half a checkpoint, and the files are not
    owner-only: mkstemp/mkdtemp (and safetensors) create 0600 files in 0700 folders, which other
    users of a shared machine cannot read."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.partial-"
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for path in [tmp, *tmp.rglob("*")]:
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        if folder and target.exists():  # a folder cannot be renamed over a non-empty one
            old = tmp.with_name(tmp.name.replace(".partial-", ".old-"))
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
