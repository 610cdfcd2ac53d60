"""`inspect`: say what a weight file or directory is, from names and shapes (no tensor is read
except one small norm vector for the delta heuristic), and whether it fits a model config.

Users' most common weight problems (docs/OFFICIAL.md): an LLM of the wrong size or Vicuna
version for the projection, a delta used as a model, the 13B projection with the 7B model, and
files that are no model part at all (a tokenizer, a fine-tuning run's Lightning checkpoint).
Every finding below is derived from names and shapes; where they cannot tell (LLaMA-1 vs Vicuna
v1.1), it says so.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minigpt4 import checkpoints as ck
from minigpt4.checkpoints import TensorFiles, read_config
from minigpt4.errors import UserError
from minigpt4.tokenizer import sentencepiece_pieces
from minigpt4.weights.delta import DELTA_NORM_LIMIT, looks_like_delta

LLAMA_SIZES = {(4096, 32): "7B", (5120, 40): "13B", (6656, 60): "33B", (8192, 80): "65B/70B"}


@dataclass
class Report:
    path: Path
    kind: str  # eva_vit | blip2 | projection | model | lightning | tokenizer | llama | hf_blip2 | own | meta_llama | unknown
    title: str
    notes: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    model: str | None = None
    problems: list[str] = field(default_factory=list)  # with a model: why it does not fit
    warnings: list[str] = field(default_factory=list)  # with a model: fits, but...

    @property
    def fits(self) -> bool | None:
        return None if self.model is None else not self.problems

    def text(self) -> str:
        lines = [f"{self.path}: {self.title}"] + [f"  - {n}" for n in self.notes]
        if self.keys:
            lines += ["  keys (shape, dtype; {i} = numbered copies):"] + [f"    {k}" for k in self.keys]
        if self.model is not None:
            verdict = "FITS" if self.fits else "DOES NOT FIT"
            lines.append(f"  model={self.model}: {verdict}" + (" (with warnings)" if self.fits and self.warnings else ""))
            lines += [f"    ! {p}" for p in self.problems] + [f"    ~ {w}" for w in self.warnings]
        return "\n".join(lines)


def inspect_path(path: str | Path, model: str | None = None, overrides: list[str] | None = None,
                 key_limit: int = 40) -> Report:
    """What `path` is; with `model`, whether it fits that model config. `key_limit` caps the key summary."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    files = None
    if path.is_dir():
        report = _inspect_dir(path)
        if report.kind not in ("meta_llama", "unknown"):
            files = TensorFiles(path)
    else:
        try:
            files = TensorFiles(path)
        except UserError:
            pieces = sentencepiece_pieces(path)  # no weights: perhaps a tokenizer.model
            if pieces is None:
                raise
            report = _tokenizer_report(path, pieces)
        else:
            report = _inspect_file(path, files)
    if files is not None:
        report.keys = key_summary(files, key_limit)
    if model is not None:
        _check_fit(report, files, model, overrides or [])
    return report


# ---- what is it --------------------------------------------------------------------------------
def _inspect_file(path: Path, files: TensorFiles) -> Report:
    kind = ck.tensor_kind(files)
    reports = {"lightning": _lightning_report, "model": _model_report, "projection": _projection_report,
               "eva_vit": _eva_report, "blip2": _blip2_report}
    if kind in reports:
        return reports[kind](path, files)
    if kind == "empty":
        return Report(path, "unknown", "a PyTorch file without tensors (none at the top level, under \"model\" or "
                      "under \"state_dict\"): not a weight file")
    return Report(path, "unknown", f"{len(files)} tensors in no layout MiniGPT-4 uses")


def _projection_report(path: Path, files: TensorFiles) -> Report:
    shape = files.info["llama_proj.weight"].shape
    r = Report(path, "projection", f"MiniGPT-4 projection llama_proj {list(shape)}: for {ck.projection_size_name(shape)}")
    other = sorted(n for n in files.names() if not n.startswith("llama_proj."))
    if other:
        r.notes.append(f"{len(other)} other tensors the loader skips (e.g. {other[0]})")
    if files.extras:
        r.notes.append(f"trainer state beside the weights: {', '.join(files.extras)} (ignored)")
    return r


def _model_report(path: Path, files: TensorFiles) -> Report:
    """A file with the projection and other parts: a whole (or partial) model, not a projection."""
    parts, shape = ck.parts_in(files.names()), files.info["llama_proj.weight"].shape
    own = ck.uses_our_names(files.names())
    r = Report(path, "model", f"MiniGPT-4 model weights ({', '.join(parts)}), not a projection alone; "
                              f"llama_proj {list(shape)}: for {ck.projection_size_name(shape)}")
    if own and ck.is_bundle(path.parent):
        r.notes.append(f"the weights file of the bundle {path.parent}: load the whole model with "
                       f"checkpoint=bundle checkpoint.bundle={path.parent}")
    elif own:
        r.notes.append(f"in this project's key names, without the {ck.BUNDLE_JSON} and tokenizer.model beside it that "
                       "make a bundle (python -m minigpt4.weights bundle writes complete ones)")
    else:
        r.notes.append("in the official key names (visual_encoder.*, Qformer.*, llama_model.*): a whole model saved "
                       "as one state dict")
    if own and path.suffix == ".safetensors":
        r.notes.append(f"checkpoint.proj={path} would use only its llama_proj.* weights")
    return r


def _lightning_report(path: Path, files: TensorFiles) -> Report:
    """finetune.py's checkpoints/*.ckpt: for resuming a run, not for loading a model."""
    step, epoch = files.scalars.get("global_step", "?"), files.scalars.get("epoch", "?")
    parts = ck.parts_in(n.removeprefix("model.") for n in files.names())
    r = Report(path, "lightning", f"PyTorch Lightning checkpoint of a fine-tuning run (step {step}, epoch {epoch}): "
                                  f"{len(files)} trained tensors ({', '.join(parts) or 'none'}) with the optimizer "
                                  "and scheduler state")
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    r.notes.append(f"continue the run with: python finetune.py resume={run_dir or path} (same settings, more "
                   "steps: e.g. trainer.max_epochs=N)")
    exports = [run_dir / name for name in ("projection.pth", "projection.safetensors")] if run_dir else []
    done = next((e for e in exports if e.is_file()), None)
    if done:
        r.notes.append(f"to chat or evaluate with what it learnt, use the run's export: checkpoint.proj={done}")
    else:
        r.notes.append("chat and evaluate do not read it: finetune.py writes projection.pth (checkpoint.proj=) "
                       "and projection.safetensors into the run folder when the run ends")
    return r


def _tokenizer_report(path: Path, pieces: int) -> Report:
    r = Report(path, "tokenizer", f"sentencepiece tokenizer, {pieces} pieces: no weights")
    if pieces == 32000:
        r.notes.append("LLaMA's tokenizer (32000 pieces), the one every official MiniGPT-4 model uses")
    r.notes.append("MiniGPT-4 reads it as tokenizer.model inside the LLM directory (checkpoint.llm) or a bundle, "
                   "not as a checkpoint.* file")
    return r


def _eva_report(path: Path, files: TensorFiles) -> Report:
    info = {n.removeprefix("visual_encoder."): i for n, i in files.info.items()}
    blocks = 1 + max(int(m.group(1)) for n in info if (m := re.match(r"blocks\.(\d+)\.", n)))
    pos = info["pos_embed"].shape if "pos_embed" in info else None
    width = info["patch_embed.proj.weight"].shape[0]
    patch = info["patch_embed.proj.weight"].shape[-1]
    mlp = info["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in info else "?"
    dtype = str(info["patch_embed.proj.weight"].dtype).replace("torch.", "")
    r = Report(path, "eva_vit", f"EVA ViT: {blocks} blocks, width {width}, patch {patch}, MLP {mlp}, {dtype}")
    if pos:
        r.notes.append(f"position embedding {list(pos)}: {pos[1] - 1} patches + class token")
    if blocks == 40:
        r.notes.append("block 39 is EVA-CLIP-g's last block: MiniGPT-4 uses blocks 0-38 and ignores it")
    if "norm.weight" in info:
        r.notes.append("norm.* is EVA-CLIP's final norm: MiniGPT-4 ignores it (ln_vision comes from the BLIP-2 file)")
    if width == 1408 and blocks in (39, 40):
        r.notes.append("this is the eva_vit_g.pth every MiniGPT-4 variant uses (checkpoint.vit)")
    return r


def _blip2_report(path: Path, files: TensorFiles) -> Report:
    names = files.names()
    layers = 1 + max(int(m.group(1)) for n in names if (m := re.match(r"Qformer\.bert\.encoder\.layer\.(\d+)\.", n)))
    ln = files.info.get("Qformer.bert.embeddings.LayerNorm.weight")
    hidden = ln.shape[0] if ln else "?"
    cross = sorted({int(m.group(1)) for n in names if (m := re.match(r"Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.", n))})
    r = Report(path, "blip2", f"BLIP-2 Q-Former: {layers} layers, hidden {hidden}, cross-attention in layers {cross}")
    if "query_tokens" in files.info:
        r.notes.append(f"query_tokens {list(files.info['query_tokens'].shape)}")
    if "ln_vision.weight" in files.info:
        r.notes.append(f"ln_vision {list(files.info['ln_vision.weight'].shape)} (the ViT's output norm)")
    extras = [n for n in names if ck.is_known_extra(n)]
    groups = sorted({_extra_group(n) for n in extras})
    if extras:
        r.notes.append(f"{len(extras)} tensors MiniGPT-4 ignores (text branch, T5 projection, ...): {', '.join(groups[:6])}")
    if any(n.startswith("visual_encoder.") for n in names):
        r.notes.append("it also holds visual_encoder.* (a ViT)")
    if path.name.startswith("blip2_pretrained"):
        r.notes.append("this is checkpoint.qformer of the Vicuna variants (model=7b, model=13b)")
    return r


def _extra_group(name: str) -> str:
    if name.startswith("Qformer."):
        return "position_ids buffer" if name.endswith("position_ids") else "Q-Former text branch"
    return name.split(".")[0] + ".*"


def _inspect_dir(path: Path) -> Report:
    layout = ck.layout(path)
    if layout == "bundle":
        info = ck.read_bundle_info(path, "inspect")
        r = Report(path, "own", f"minigpt4 own format (bundle, format {info.format}): model {info.name or '?'}, "
                                f"template {info.template or '?'}")
        if info.sources:
            r.notes.append("made from " + ", ".join(f"{k}={v}" for k, v in info.sources.items() if v))
        r.notes.append(f"load it with: checkpoint=bundle checkpoint.bundle={path}")
        return r
    if layout == "meta_llama":
        return Report(path, "meta_llama", "original Meta LLaMA checkpoint (params.json + consolidated.*.pth)", [
            ("convert it with transformers' convert_llama_weights_to_hf.py --input_dir DIR --model_size 7B "
             "--llama_version 1 --output_dir OUT (from the transformers source: docs/WEIGHTS.md step 2)")])
    if layout != "hf":
        return Report(path, "unknown", "a directory without config.json or minigpt4.json: not a model directory")
    config = read_config(path)
    kind = str(config.get("model_type", "")).lower()
    if kind == "llama":
        return _llama_report(path, config)
    if kind in ("blip-2", "blip_2"):
        text = (config.get("text_config") or {}).get("model_type", "?")
        r = Report(path, "hf_blip2", f"Hugging Face BLIP-2 directory (language model: {text})")
        r.notes.append("its vision_model.* (ViT + ln_vision), qformer.* and query_tokens can serve as "
                       "checkpoint.qformer (and checkpoint.vit)")
        if text == "llama":
            r.notes.append("a Llama language model: probably written by `python -m minigpt4.weights export-hf`")
        return r
    return Report(path, "unknown", f"Hugging Face directory of model_type={kind or '?'}: MiniGPT-4 uses none")


def _llama_report(path: Path, config: dict) -> Report:
    files = TensorFiles(path)
    hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    size = LLAMA_SIZES.get((hidden, layers), f"hidden {hidden}, {layers} layers")
    embed = files.info.get("model.embed_tokens.weight")
    rows = embed.shape[0] if embed else config.get("vocab_size")
    params = sum(math.prod(i.shape) for n, i in files.info.items() if not n.endswith("inv_freq"))
    dtype = str(embed.dtype).replace("torch.", "") if embed else "?"
    count = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    r = Report(path, "llama", f"Llama {size} ({count} parameters, {dtype}), {rows} embedding rows")
    pieces = sentencepiece_pieces(path / "tokenizer.model")
    if pieces is None:
        r.notes.append("no tokenizer.model: chat and evaluate need it (copy it from LLaMA or the delta)")
    else:
        r.notes.append(f"tokenizer.model: {pieces} pieces")
    max_pos, eps = config.get("max_position_embeddings"), config.get("rms_norm_eps")
    r.notes.append(f"max_position_embeddings {max_pos}, rms_norm_eps {eps}")
    r.notes.append("version guess: " + _version_guess(rows, pieces, max_pos, eps))
    norm = looks_like_delta(files)
    if norm is not None and norm < DELTA_NORM_LIMIT:
        r.title += " - looks like a DELTA"
        r.notes.append(f"mean |model.norm.weight| = {norm:.3f} (a usable LLM's is near 1 or more): this is a delta, "
                       "not a model; apply it: python -m minigpt4.weights apply-delta --base LLAMA --delta THIS --target OUT")
    return r


def _version_guess(rows, pieces, max_pos, eps) -> str:
    """Honest heuristics: shapes separate LLaMA-2 from LLaMA-1 and v0 from the rest, nothing more."""
    if max_pos == 4096 and rows == 32000:
        return ("LLaMA-2 family (max_position_embeddings 4096): Llama-2-7b-chat-hf for model=llama2_7b; "
                "the base and chat models, or Vicuna v1.5, cannot be told apart by shapes")
    if rows == 32001 and (pieces in (None, 32000)):
        return ("Vicuna v0 (32001 rows: FastChat 0.1.x added a [PAD] row to LLaMA's 32000), what model=7b/13b "
                "need; a v0 delta has the same shapes (see the norm check)")
    if rows == 32000:
        return ("LLaMA-1 or Vicuna v1.1 (both have 32000 rows; shapes cannot tell them apart): MiniGPT-4's "
                "released projections were trained with Vicuna v0")
    return f"no known LLaMA/Vicuna release has {rows} rows with max_position_embeddings {max_pos}"


# ---- key summary --------------------------------------------------------------------------------
def key_summary(files: TensorFiles, limit: int = 40) -> list[str]:
    """Names with layer numbers folded into {i}: one line per pattern, first shape and dtype."""
    groups: dict[str, list] = {}
    for name, info in files.info.items():
        pattern = re.sub(r"\.\d+\.", ".{i}.", name)
        if pattern not in groups:
            groups[pattern] = [0, info]
        groups[pattern][0] += 1
    lines = [
        f"{p}{f' x{n}' if n > 1 else ''}  {list(i.shape)} {str(i.dtype).replace('torch.', '')}"
        for p, (n, i) in groups.items()
    ]
    if len(lines) > limit:
        lines = lines[:limit] + [f"... {len(lines) - limit} more patterns ({len(files)} tensors)"]
    return lines


# ---- does it fit a model config --------------------------------------------------------------
def _check_fit(r: Report, files: TensorFiles | None, model: str, overrides: list[str]) -> None:
    from minigpt4.config import compose, to_container
    from minigpt4.model import MiniGPT4, MiniGPT4Config

    r.model = model
    cfg = compose("chat", [f"model={model}", *overrides])
    arch = MiniGPT4Config.from_dict(to_container(cfg.model.arch))
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MiniGPT4(arch).state_dict().items()}
    meta = lambda: {n: torch.empty(i.shape, dtype=i.dtype, device="meta") for n, i in files.info.items()}
    layers = arch.vision_config().num_hidden_layers
    if r.kind in ("eva_vit", "blip2", "projection"):
        try:
            ours = ck.official_to_ours(meta(), layers, str(r.path))
        except UserError as err:
            r.problems.append(str(err))
            return
        part = {"eva_vit": "vit", "blip2": "qformer", "projection": "proj"}[r.kind]
        if part == "qformer" and arch.qformer is None:
            r.problems.append(f"model={model} (LLaMA-2 variant) has no Q-Former: set checkpoint.qformer=null")
            return
        _compare(r, {k: tuple(v.shape) for k, v in ours.items()}, expected, [k for k in expected if ck.part_of(k) == part])
        blocks = {int(m.group(1)) for n in files.info if (m := re.match(r"(?:visual_encoder\.)?blocks\.(\d+)\.", n))}
        if part == "vit" and blocks and max(blocks) >= layers:
            extra = f"block {layers}" if max(blocks) == layers else f"blocks {layers}-{max(blocks)}"
            r.warnings.append(f"{extra} (and any final norm) beyond model={model}'s "
                              f"{layers} blocks: skipped, as the official strict=False load skips them")
    elif r.kind == "hf_blip2":
        wanted = {n: i.shape for n, i in files.info.items() if n.startswith(("vision_model.", "qformer.")) or n == "query_tokens"}
        if arch.qformer is None:
            wanted = {k: v for k, v in wanted.items() if k.startswith("vision_model.")}
        _compare(r, wanted, expected, [k for k in expected if k.startswith(("vision_model.", "qformer.", "query_tokens"))])
    elif r.kind == "own":
        _compare(r, {n: i.shape for n, i in files.info.items()}, expected, list(expected), vocab_ok=True)
    elif r.kind == "model":
        try:
            got = {n: i.shape for n, i in files.info.items()} if ck.uses_our_names(files.names()) \
                else {k: v.shape for k, v in ck.official_to_ours(meta(), layers, str(r.path)).items()}
        except UserError as err:
            r.problems.append(str(err))
            return
        _compare(r, got, expected, [k for k in expected if k.split(".")[0] in {n.split(".")[0] for n in got}],
                 vocab_ok=True)
    elif r.kind == "lightning":  # resume checks the trained tensors against the model: the same check here
        _compare(r, {n.removeprefix("model."): i.shape for n, i in files.info.items()}, expected, [])
    elif r.kind == "tokenizer":
        rows = to_container(cfg.model.arch)["llm"]["vocab_size"]
        pieces = sentencepiece_pieces(r.path)
        if pieces > rows:
            r.problems.append(f"{pieces} pieces, but model={model}'s LLM has only {rows} embedding rows")
        elif pieces < rows - 1:
            r.warnings.append(f"{pieces} pieces for model={model}'s {rows} embedding rows: another model's tokenizer?")
    elif r.kind == "llama":
        _llm_fit(r, files, to_container(cfg.model.arch).get("llm", {}), str(cfg.model.template), model)
    else:
        r.problems.append("this path is not one of MiniGPT-4's inputs")


def _compare(r: Report, got: dict, expected: dict, needed: list[str], vocab_ok: bool = False) -> None:
    for key, shape in got.items():
        if key.endswith("inv_freq"):
            continue
        if key not in expected:
            r.problems.append(f"{key} does not exist in model={r.model}")
        elif tuple(shape) != expected[key]:
            if key == "llama_proj.weight":
                r.problems.append(f"llama_proj is {list(shape)}, for {ck.projection_size_name(tuple(shape))}; "
                                  f"model={r.model} needs {list(expected[key])}")
            elif vocab_ok and key in ("llm.model.embed_tokens.weight", "llm.lm_head.weight") and shape[1:] == expected[key][1:]:
                continue  # a bundle's LLM brings its own vocabulary size
            else:
                r.problems.append(f"{key} is {list(shape)}, model={r.model} needs {list(expected[key])}")
        if len(r.problems) >= 5:
            return
    missing = [k for k in needed if k not in got]
    if missing:
        r.problems.append(f"{len(missing)} tensors of model={r.model} are missing, e.g. {missing[0]}")


def _llm_fit(r: Report, files: TensorFiles, want: dict, template: str, model: str) -> None:
    config = read_config(r.path) or {}
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size"):
        if key in want and config.get(key) != want[key]:
            size = LLAMA_SIZES.get((config.get("hidden_size"), config.get("num_hidden_layers")))
            r.problems.append(f"{key} is {config.get(key)}{f' (LLaMA {size})' if size else ''}, model={model} needs {want[key]}")
    embed = files.info.get("model.embed_tokens.weight")
    rows = embed.shape[0] if embed else config.get("vocab_size")
    if "vocab_size" in want and rows != want["vocab_size"]:
        if template.startswith("vicuna") and want["vocab_size"] == 32001:
            r.warnings.append(f"{rows} embedding rows: model={model} was trained with Vicuna v0 ({want['vocab_size']} rows); "
                              "LLaMA or Vicuna v1.1 load but answer poorly")
        else:
            r.warnings.append(f"{rows} embedding rows, model={model} expects {want['vocab_size']}")
    norm = looks_like_delta(files)
    if norm is not None and norm < DELTA_NORM_LIMIT:
        r.problems.append("this is a delta, not a usable LLM: run apply-delta first")
    if not (r.path / "tokenizer.model").is_file():
        r.problems.append("no tokenizer.model in the directory")

