"""Vicuna v0 = LLaMA + delta, as FastChat 0.1.10's `python -m fastchat.model.apply_delta` did it,
but one tensor at a time (13B fits in a few GB of RAM) and checked before anything is written.

What FastChat 0.1.10 did (fastchat/model/apply_delta.py of the fschat 0.1.10 wheel):
  1. load base and delta with torch_dtype=float16;
  2. add a "[PAD]" token to the BASE tokenizer (32000 -> 32001), `resize_token_embeddings`, and
     set the new row of embed_tokens and of lm_head to 0;
  3. for every tensor of the base: `param += delta[name]` (fp16 addition);
  4. save the base (its config, vocab_size now 32001) and the DELTA's tokenizer.
So the extra row of the target is exactly the delta's row, every other row is base + delta.
Here: base rows are zero-padded up to the delta's rows (only +1 or +0 is accepted), both sides
are cast to fp16 and added with the same torch op; rotary inv_freq buffers are not written
(transformers computes them; in the delta they are zero, make_delta subtracted equal buffers).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from minigpt4.checkpoints import (
    GB,
    TensorFiles,
    atomic_write,
    check_target,
    layout,
    read_config,
    save_shards,
)
from minigpt4.errors import UserError

log = logging.getLogger(__name__)

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")  # rows = vocabulary entries
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json")


DELTA_NORM_LIMIT = 0.25  # mean |model.norm.weight| below this looks like a delta


def looks_like_delta(files: TensorFiles) -> float | None:
    """Mean |model.norm.weight|: a trained LLM's final RMSNorm weights are far from zero (they
    start at 1), a delta's (fine-tuned minus base) are close to zero. A heuristic, not a proof."""
    if "model.norm.weight" not in files:
        return None
    return float(files.get("model.norm.weight").float().abs().mean())


def _skip(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq")


def _llama_dir(path: Path, role: str) -> TensorFiles:
    """A Hugging Face Llama directory, or a one-line reason why not."""
    if not path.is_dir():
        raise UserError(f"--{role} {path}: no such directory")
    if layout(path) == "meta_llama":
        raise UserError(
            f"--{role} {path} is an original Meta LLaMA checkpoint (consolidated.*.pth): convert it first with "
            "transformers' convert_llama_weights_to_hf.py --model_size 7B --llama_version 1 (from the transformers "
            "source; the pip wheel lacks it: docs/WEIGHTS.md step 2)"
        )
    config = read_config(path)
    if config is None:
        raise UserError(f"--{role} {path}: not a Hugging Face model directory (no config.json)")
    kind = str(config.get("model_type", "")).lower()
    if kind != "llama":
        raise UserError(f"--{role} {path}: config.json says model_type={kind or '?'}, a Llama model is needed")
    return TensorFiles(path, f"--{role}")


def check_pair(base: TensorFiles, delta: TensorFiles, check_kind: bool = True) -> dict[str, tuple[int, ...]]:
    """Every check that can fail, before anything is written. Returns name -> target shape.
    check_kind=False skips only the base-or-delta heuristic (looks_like_delta)."""
    names = [n for n in base.names() if not _skip(n)]
    missing = [n for n in names if n not in delta]
    if missing:
        raise UserError(
            f"the delta has no tensor {missing[0]} that the base has ({len(missing)} such): "
            "the base is a bigger or different model than the delta was made for"
        )
    extra = [n for n in delta.names() if n not in base and not _skip(n)]
    if extra:
        raise UserError(
            f"the base has no tensor {extra[0]} that the delta has ({len(extra)} such): "
            "the base is a smaller or different model than the delta was made for (LLaMA-7B delta needs LLaMA-7B)"
        )
    shapes = {}
    for name in names:
        b, d = base.info[name].shape, delta.info[name].shape
        if name in VOCAB_TENSORS and len(b) == 2 and b[1] == d[1] and d[0] - b[0] in (0, 1):
            shapes[name] = d  # FastChat 0.1.10: base resized by the [PAD] row (zeros), then + delta
        elif b != d:
            hint = (
                f"a {'smaller' if b[-1] < d[-1] else 'bigger'} model than the delta's"
                if len(b) == len(d) == 2 and b[-1] != d[-1]
                else "a different vocabulary or model than the delta's"
            )
            raise UserError(f"base tensor {name} is {list(b)} but the delta's is {list(d)}: the base is {hint}")
        else:
            shapes[name] = b
        for files, role in ((base, "base"), (delta, "delta")):
            if not files.info[name].dtype.is_floating_point:
                raise UserError(f"{role} tensor {name} is {files.info[name].dtype}, not floating point")
    if not check_kind:
        return shapes
    base_norm, delta_norm = looks_like_delta(base), looks_like_delta(delta)
    if base_norm is not None and base_norm < DELTA_NORM_LIMIT:
        raise UserError(
            f"--base {base.path}: model.norm.weight has mean |w| {base_norm:.3f}, which looks like a delta, "
            "not LLaMA (a trained LLM's is near 1 or more); pass the original LLaMA as --base"
        )
    if delta_norm is not None and delta_norm >= DELTA_NORM_LIMIT:
        raise UserError(
            f"--delta {delta.path}: model.norm.weight has mean |w| {delta_norm:.3f}, which looks like full "
            "weights (already merged?), not a delta (a delta's is near 0)"
        )
    return shapes


def apply_delta(
    base_dir: str | os.PathLike,
    delta_dir: str | os.PathLike,
    target_dir: str | os.PathLike,
    max_shard_bytes: int = 2 * GB,
    force: bool = False,
    check_kind: bool = True,
    progress: bool = True,
) -> Path:
    """Write target = base + delta (fp16, sharded safetensors) with the delta's tokenizer."""
    base_dir, delta_dir, target = Path(base_dir), Path(delta_dir), Path(target_dir)
    if base_dir.resolve() == delta_dir.resolve():
        raise UserError("--base and --delta are the same directory")
    base, delta = _llama_dir(base_dir, "base"), _llama_dir(delta_dir, "delta")
    if not (delta_dir / "tokenizer.model").is_file():
        raise UserError(f"--delta {delta_dir}: no tokenizer.model (the target takes the delta's tokenizer)")
    shapes = check_pair(base, delta, check_kind)
    out_bytes = sum(2 * math.prod(s) for s in shapes.values())
    check_target(target, out_bytes, force, "--target")

    with atomic_write(target, folder=True) as tmp:
        bar = tqdm(total=len(shapes), desc="Applying delta", unit="tensor", disable=not progress)

        def merged():
            for name, shape in shapes.items():
                b = base.get(name).to(torch.float16)
                d = delta.get(name).to(torch.float16)
                if b.shape[0] < shape[0]:  # the [PAD] row FastChat added to the base, zero
                    b = torch.cat([b, b.new_zeros(shape[0] - b.shape[0], *b.shape[1:])])
                bar.update()
                yield name, b + d

        save_shards(merged(), tmp, max_shard_bytes, metadata={"format": "pt"})
        bar.close()
        _write_config(base_dir, tmp, vocab_rows=shapes["model.embed_tokens.weight"][0])
        for name in TOKENIZER_FILES:
            if (delta_dir / name).is_file():
                shutil.copy2(delta_dir / name, tmp / name)
        generation = base_dir / "generation_config.json"
        if not generation.is_file():
            generation = delta_dir / "generation_config.json"
        if generation.is_file():
            shutil.copy2(generation, tmp / generation.name)
    log.info("wrote %s (%d tensors, %.2f GB)", target, len(shapes), out_bytes / GB)
    return target


def _write_config(base_dir: Path, out: Path, vocab_rows: int) -> None:
    """The base's config.json, as FastChat's base.save_pretrained wrote it: vocab_size after the
    resize, fp16."""
    config = read_config(base_dir)
    config["vocab_size"] = vocab_rows
    config.pop("dtype", None)
    config["torch_dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
