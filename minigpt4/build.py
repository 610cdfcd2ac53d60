"""Config -> a ready model: architecture, weights from whichever files the checkpoint names,
device and precision. The one loader chat, evaluate and finetune share.

Parts are built on the meta device and receive their tensors by assignment, so no weight that
a file provides is ever randomly initialised first. A part whose checkpoint key is null is
initialised randomly and the model is labelled untrained.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaForCausalLM

from minigpt4 import checkpoints as ck
from minigpt4.conversation import Conversation, Template, get_template
from minigpt4.decoding.quant import MODES as quant_modes
from minigpt4.decoding.quant import quantize_llm
from minigpt4.devices import resolve_precision
from minigpt4.errors import UserError
from minigpt4.extras import require
from minigpt4.images import ImageSource, load_pixels
from minigpt4.model import IMAGE_SIDE, PARTS, MiniGPT4, MiniGPT4Config, apply_precision, cast_own_tensors, official_dtype
from minigpt4.settings import LoadSpec
from minigpt4.tokenizer import Tokenizer

log = logging.getLogger(__name__)

@dataclass
class LoadedModel:
    """A model with everything needed to talk to it."""

    model: MiniGPT4
    tokenizer: Tokenizer
    template: Template
    image_size: int
    device: torch.device
    name: str
    random_parts: list[str] = field(default_factory=list)  # parts left randomly initialised
    load_seconds: float = 0.0
    sources: dict[str, str] = field(default_factory=dict)  # checkpoint.<key> -> the path it loaded

    @property
    def trained(self) -> bool:
        return not self.random_parts

    @property
    def label(self) -> str:
        if not self.random_parts:
            return self.name
        return f"{self.name} (UNTRAINED: random {', '.join(self.random_parts)})"

    def conversation(self) -> Conversation:
        return Conversation(self.template)

    def pixels(self, images: list[ImageSource]) -> torch.Tensor:
        return load_pixels(images, self.image_size)

    def encode_images(self, images: list[ImageSource]) -> torch.Tensor:
        """Paths/PIL images -> soft tokens [N, num_image_tokens, H]."""
        with torch.inference_mode():
            return self.model.encode_images(self.pixels(images))


def load_model(spec: LoadSpec, device: torch.device | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    """Build the model a LoadSpec describes (conf/model, conf/checkpoint; config.load_spec(cfg)
    makes one from a composed config). `dtype` overrides the precision setting for tools that
    convert weights without computing (fp16 on CPU)."""
    start = time.perf_counter()
    threads = _cpu_threads(spec.hardware.cpu_threads)
    device = device or spec.hardware.device()
    if dtype is not None:
        quant = None
    else:
        precision = resolve_precision(spec.hardware.precision, device)
        dtype, quant = precision.dtype, precision.quant
    ckpt = asdict(spec.checkpoint)
    arch_dict = spec.model.arch
    template_name = spec.model.template
    image_size = int(spec.model.image_size)

    bundle_state: dict[str, torch.Tensor] = {}
    bundle_dir = ckpt.get("bundle")
    if bundle_dir:
        bundle_state, info = ck.read_bundle(_existing(bundle_dir, "checkpoint.bundle"), "checkpoint.bundle", device)
        arch_dict = info.arch or arch_dict  # the checkpoint knows its own architecture
        template_name = info.template or template_name
        image_size = int(info.image_size or image_size)
    arch = MiniGPT4Config.from_dict(arch_dict)

    # ---- tokenizer and LLM ----------------------------------------------------------------
    llm_dir = ckpt.get("llm")
    if llm_dir:
        llm_dir = _existing(llm_dir, "checkpoint.llm")
        if not (Path(llm_dir) / "tokenizer.model").is_file():
            raise UserError(f"checkpoint.llm={llm_dir}: no tokenizer.model in it (copy the LLaMA tokenizer.model there)")
        tokenizer = Tokenizer.from_dir(llm_dir)
        # ours quantises layer by layer on its way to the device: the fp16 LLM is never there whole
        llm = _load_llm_dir(llm_dir, dtype, quant if quant in BNB else None,
                            torch.device("cpu") if quant in quant_modes else device)
    else:
        if quant in BNB:
            raise UserError(f"precision={quant} quantises a loaded LLM: set checkpoint.llm=/path/to/llm")
        tok_file = Path(bundle_dir) / "tokenizer.model" if bundle_dir else None
        tokenizer = Tokenizer(tok_file if tok_file and tok_file.is_file() else spec.model.tokenizer)
        if any(k.startswith("llm.") for k in bundle_state):  # the bundle provides every LLM weight
            with torch.device("meta"):
                llm = LlamaForCausalLM(arch.llm_config())
        elif quant in quant_modes:  # random weights, quantised layer by layer on the device
            with torch.device("meta"):
                llm = LlamaForCausalLM._from_config(arch.llm_config(), dtype=dtype)
            quantize_llm(llm, quant, device)
        else:  # random weights, created right on the device and in the compute dtype (7B: seconds)
            with torch.device(device):
                llm = LlamaForCausalLM._from_config(arch.llm_config(), dtype=dtype)
    if tokenizer.vocab_size > llm.config.vocab_size:
        raise UserError(
            f"tokenizer has {tokenizer.vocab_size} pieces but the LLM only {llm.config.vocab_size} rows: "
            "checkpoint.llm and the tokenizer do not belong together"
        )

    with torch.device("meta"):  # the LLM already exists; every other part waits for its tensors
        model = MiniGPT4(arch, llm=llm)

    # ---- weights ----------------------------------------------------------------------------
    sources: dict[str, dict[str, torch.Tensor]] = {}
    if bundle_state:
        sources["bundle"] = bundle_state
    for part in ("vit", "qformer", "proj"):
        if ckpt.get(part):
            sources[part] = _read_part(part, ckpt, arch)
    loaded = _assign(model, sources, ckpt)
    random_parts = _materialize(model, device, dtype, loaded, ckpt)
    if getattr(model.llm.config, "tie_word_embeddings", False):
        model.llm.tie_weights()  # assignment replaced the tied tensor objects
    model.set_trainable(sorted(set(PARTS) - model.frozen))  # re-apply to re-created parameters

    if quant in quant_modes:
        quantize_llm(model.llm, quant, device)
    if getattr(model.llm, "is_quantized", False):  # bitsandbytes weights cannot be moved
        for part in (model.vision_model, model.qformer, model.llama_proj):
            if part is not None:
                part.to(device)
        if model.query_tokens is not None:
            model.query_tokens.data = model.query_tokens.data.to(device)
    else:
        model.to(device)
    apply_precision(model, dtype)  # also brings fp16-stored official files to the official dtypes
    model.eval()
    _set_cpu_threads(threads, model, device)
    name = str(spec.model.name)
    result = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        template=get_template(template_name),
        image_size=image_size,
        device=device,
        name=name,
        random_parts=random_parts,
        load_seconds=time.perf_counter() - start,
        sources={k: v for k, v in ckpt.items() if v},
    )
    log.info("loaded %s on %s in %.1fs", result.label, device, result.load_seconds)
    return result


def save_bundle(
    loaded: LoadedModel, directory: str | Path, max_shard_bytes: int | None = None, trained_parts: list[str] | None = None
) -> Path:
    """The whole model in our own format (safetensors + minigpt4.json + tokenizer.model, see
    checkpoints/bundle.py), which `checkpoint=bundle checkpoint.bundle=DIR` loads with its own
    architecture and template. `python -m minigpt4.weights bundle` and finetune.py's exports write
    theirs with it; `trained_parts` records what a fine-tuning run trained."""
    model = loaded.model
    arch = model.config.to_dict()
    arch["llm"] = ck.llm_arch(model.llm.config)  # the LLM as it is (an LLM directory's), not as configured
    info = ck.BundleInfo(
        name=loaded.name, template=loaded.template.name, image_size=loaded.image_size, arch=arch,
        dtype=str(model.llm.dtype).removeprefix("torch."), sources=loaded.sources,
        # a part trained since it was drawn at random is no longer random
        random_parts=[p for p in loaded.random_parts if p not in (trained_parts or [])], trained_parts=trained_parts,
    )
    return ck.write_bundle(model.state_dict(), directory, info, loaded.tokenizer.path, max_shard_bytes)


# cpu_threads=auto runs models below this size on one CPU thread: on a busy 2-core machine the
# tiny demo (3M parameters) decoded 20x and trained 5x faster on one thread than on torch's
# default two, and one thread still won at 208M (docs/CHAT.md, "CPU threads"). The official
# models (7B and up) keep torch's default, one thread per core.
SMALL_MODEL_PARAMETERS = 1_000_000_000


def _cpu_threads(setting) -> int | None:
    """cpu_threads as configured: a number of threads, or None for auto (checked before loading)."""
    if str(setting).strip().lower() == "auto":
        return None
    if isinstance(setting, int) and not isinstance(setting, bool) and setting >= 1:
        return setting
    raise UserError(f"cpu_threads={setting}: use auto or a number of threads (1 or more)")


def _set_cpu_threads(threads: int | None, model: nn.Module, device: torch.device) -> None:
    """torch's CPU thread count for this process: `threads` if given; for auto, one thread for a
    small model on the CPU unless OMP_NUM_THREADS already chose, else torch's default (one per core).
    Threads beyond the free cores spin against each other: small ops never pay for them."""
    if threads is None:
        if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
            return
        if sum(p.numel() for p in model.parameters()) >= SMALL_MODEL_PARAMETERS:
            return
        threads = 1
    if torch.get_num_threads() != threads:
        log.info("CPU threads: %d (was %d; cpu_threads=N sets it)", threads, torch.get_num_threads())
        torch.set_num_threads(threads)


_VIT_HINT = " (or checkpoint.vit=null: the Hugging Face BLIP-2 directory in checkpoint.qformer holds the ViT too)"


def _is_dir(path: str | None) -> bool:
    return bool(path) and Path(path).is_dir()


def _existing(path: str, key: str, hint: str = "") -> str:
    if not Path(path).exists():
        raise UserError(f"{key}={path}: no such file or directory; set {key}=/path/to/it{hint or ' (or MINIGPT4_WEIGHTS)'}")
    return path


def _read_part(part: str, ckpt: dict, arch: MiniGPT4Config) -> dict[str, torch.Tensor]:
    """What checkpoint.<part> supplies, in our names, read as its layout says (checkpoints.layout):
    an official pickle (renamed), or our names in a safetensors file or a directory (a Hugging
    Face BLIP-2 directory, a bundle, finetune.py's run folder), of which only this part is taken."""
    key = f"checkpoint.{part}"
    path = _existing(ckpt[part], key, _VIT_HINT if part == "vit" and _is_dir(ckpt.get("qformer")) else "")
    where, layout = f"{key}={path}", ck.layout(path)
    if layout == "pickle":
        files = ck.TensorFiles(path, key)
        if ck.tensor_kind(files) == "lightning":
            raise UserError(f"{where} is a finetune.py training checkpoint (resume= continues the run): "
                            "load what the run learnt with checkpoint.proj=RUN/projection.pth")
        return ck.official_to_ours(files.state_dict(), arch.vision_config().num_hidden_layers, where)
    if layout != "safetensors" and not ck.weight_files(Path(path)):
        raise UserError(f"{where}: no {ck.BUNDLE_WEIGHTS} in this directory" if part == "proj"
                        else f"{where}: no BLIP-2 weights (vision_model.*, qformer.*) found in it")
    # a BLIP-2 directory given as checkpoint.qformer supplies its ViT too, unless checkpoint.vit is set
    wanted = {part} | ({"vit"} if part == "qformer" and not ckpt.get("vit") else set())
    state = ck.TensorFiles(path, key).load(lambda k: ck.part_of(k) in wanted)
    if not state:
        raise UserError(f"{where}: holds no {ck.PART_NAMES[part]} weights ({'/'.join(ck.PART_PREFIXES[part])}*)")
    return state


def _load_llm_dir(path: str, dtype: torch.dtype, quant: str | None, device: torch.device) -> LlamaForCausalLM:
    """A Hugging Face Llama directory; straight onto the device when `accelerate` is installed
    (transformers needs it for device_map and for bitsandbytes), else through CPU memory."""
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"checkpoint.llm={path}: not a Hugging Face model directory (no config.json)")
    has_accelerate = importlib.util.find_spec("accelerate") is not None
    kwargs: dict = {"dtype": dtype}
    if quant:
        require(f"precision={quant}", "quant", "bitsandbytes", "accelerate")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if quant == "bnb-int8"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
        )
    if has_accelerate:
        kwargs["device_map"] = {"": str(device)}
    try:
        llm = LlamaForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, RuntimeError, ImportError, KeyError) as err:
        log.debug("loading %s failed", path, exc_info=True)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"checkpoint.llm={path}: cannot load ({first[:200]})") from None
    return llm if has_accelerate else llm.to(device)


BNB = ("bnb-int8", "bnb-nf4")  # precision= values that load the LLM through bitsandbytes


def _assign(model: MiniGPT4, sources: dict[str, dict[str, torch.Tensor]], ckpt: dict) -> set[str]:
    """Assign every source's tensors (later sources win, as the official load order does), then
    check that each part a source touched is complete: a part is all from files or all random."""
    expected = model.state_dict()
    loaded: dict[str, str] = {}  # our key -> the checkpoint setting it came from
    for source, state in sources.items():
        label = f"checkpoint.{source}={ckpt.get(source)}"
        keep = {}
        for key, tensor in state.items():
            want = expected.get(key)
            if want is None:
                if key.startswith("llm.") and "rotary_emb" in key:
                    continue
                if key.startswith(("qformer.", "query_tokens")) and model.qformer is None:
                    raise UserError(f"{label}: a Q-Former, but this model (LLaMA-2 variant) has none: "
                                    "set checkpoint.qformer=null")
                raise UserError(f"{label}: key {key} does not belong to this model (model={_arch_name(model)})")
            if tuple(tensor.shape) != tuple(want.shape):
                if key == "llama_proj.weight":
                    raise UserError(
                        f"{label} holds a projection {list(tensor.shape)} for "
                        f"{ck.projection_size_name(tuple(tensor.shape))}, but this model needs "
                        f"{list(want.shape)}: pick the model= that matches the file, or the file that matches the model"
                    )
                raise UserError(f"{label}: {key} has shape {list(tensor.shape)}, the model needs {list(want.shape)}")
            keep[key] = tensor
            loaded[key] = label
        model.load_state_dict(keep, strict=False, assign=True)
    for owner in ck.PART_NAMES:
        keys = [k for k in expected if ck.part_of(k) == owner]
        got = [k for k in keys if k in loaded]
        if owner == "llm" and ckpt.get("llm"):
            continue  # the directory provided the rest
        if (got or ckpt.get(owner)) and len(got) < len(keys):
            missing = sorted(set(keys) - set(got))
            by = sorted({loaded[k] for k in got}) or [f"checkpoint.{owner}={ckpt.get(owner)}"]
            raise UserError(f"{', '.join(by)} lacks {len(missing)} of the {len(keys)} {ck.PART_NAMES[owner]} "
                            f"weights, e.g. {missing[:3]}")
    return set(loaded)


def _arch_name(model: MiniGPT4) -> str:
    h = model.llm.config.hidden_size
    return f"{'LLaMA-2 variant' if model.qformer is None else 'Q-Former variant'}, LLM hidden size {h}"


def _materialize(model: MiniGPT4, device: torch.device, dtype: torch.dtype, loaded: set[str], ckpt: dict) -> list[str]:
    """Randomly initialise what no file provided; return the names of those parts. Buffers that
    are computed, not stored (rotary inv_freq), are recomputed without making a part 'random'.
    An image-side module goes to its official dtype as soon as it is drawn (apply_precision), so
    a random ViT is never on the device whole in fp32."""
    random_parts = []
    persistent = set(model.state_dict())
    for name, module in model.named_modules():
        if not name:  # the root's only direct parameter, query_tokens, is handled below
            continue
        direct = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        meta = [n for n, t in direct if t.is_meta]
        if not meta:
            continue
        module.to_empty(device=device, recurse=False)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        elif name.startswith("vision_model"):
            model.vision_model._init_weights(module)
        elif name.startswith("qformer"):
            model.qformer._init_weights(module)
        elif name.startswith("llm."):
            model.llm._init_weights(module)
        top = name.split(".")[0]
        if top in IMAGE_SIDE:
            cast_own_tensors(module, official_dtype(top, module, dtype))
        stored = any(f"{name}.{n}" in persistent for n in meta)
        if stored and top not in random_parts and not name.endswith("post_layernorm"):
            random_parts.append(top)
    if model.query_tokens is not None and model.query_tokens.is_meta:
        model.query_tokens = nn.Parameter(torch.empty_like(model.query_tokens, device=device).normal_(0, 0.02))
        random_parts.append("query_tokens")
    if not any(k.startswith("llm.") for k in loaded) and not ckpt.get("llm"):
        random_parts.append("llm")
    order = ["vision_model", "qformer", "query_tokens", "llama_proj", "llm"]
    return sorted(set(random_parts), key=order.index)
