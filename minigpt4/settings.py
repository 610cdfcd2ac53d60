"""Typed settings: one dataclass per config group, so that library code takes plain objects and a
notebook calls it without Hydra (`load_model(LoadSpec(ModelSpec.tiny(), CheckpointSpec()))`).

The YAML files in conf/ hold the defaults a user sees and overrides (the option groups here have
none of their own, so they cannot drift apart); minigpt4/config.py turns a
composed config into these objects once, at the entry point (`config.chat_settings(cfg)` and its
siblings). Nothing here imports Hydra. The one default both sides need, the context
limit, lives here (MAX_CONTEXT) and the YAML files refer to it (${max_context:}).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from minigpt4.errors import UserError
from minigpt4.generation import GenerationSettings

MAX_CONTEXT = 2000  # prompt + max_new_tokens, in tokens, as the official chat (chat.yaml and evaluate.yaml)


def _pick(cls, values: Mapping | None):
    """cls(**the keys of `values` that are fields of cls): a config group -> its dataclass."""
    values = values or {}
    return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


@dataclass(frozen=True)
class ModelSpec:
    """conf/model/<name>.yaml: the architecture and its prompt template."""

    name: str
    template: str
    image_size: int
    tokenizer: str  # used when no checkpoint brings its own tokenizer.model
    arch: dict = field(default_factory=dict)  # MiniGPT4Config.from_dict's input

    @classmethod
    def from_dict(cls, values: Mapping) -> ModelSpec:
        return _pick(cls, values)


@dataclass(frozen=True)
class CheckpointSpec:
    """conf/checkpoint/*.yaml: the files each part is read from (None: that part stays random)."""

    bundle: str | None = None  # this project's own format (a directory with minigpt4.json + safetensors)
    vit: str | None = None
    qformer: str | None = None
    llm: str | None = None
    proj: str | None = None

    @classmethod
    def from_dict(cls, values: Mapping | None) -> CheckpointSpec:
        values = values or {}
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"checkpoint.{min(unknown)}: no such key; use checkpoint.bundle, .vit, .qformer, .llm or .proj")
        return cls(**{k: (str(v) if v is not None else None) for k, v in values.items()})

    def files(self) -> dict[str, str]:
        """key -> path for the parts that come from a file."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}


@dataclass(frozen=True)
class Hardware:
    """base.yaml's gpu, precision and cpu_threads: where the model runs and in what dtype."""

    gpu: Any = "auto"  # auto | cpu | 0 | [0,1]
    precision: str = "auto"  # auto | fp32 | fp16 | bf16 | int8 | int4 | bnb-int8 | bnb-nf4
    cpu_threads: Any = "auto"

    def device(self) -> torch.device:
        from minigpt4.devices import resolve_device

        return resolve_device(self.gpu)


@dataclass(frozen=True)
class LoadSpec:
    """Everything build.load_model needs: which model, which files, which hardware."""

    model: ModelSpec
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    hardware: Hardware = field(default_factory=Hardware)

    @classmethod
    def from_dict(cls, cfg: Mapping) -> LoadSpec:
        """A composed config (or its plain-dict form) -> a LoadSpec; the one place that reads
        these keys."""
        return cls(ModelSpec.from_dict(cfg["model"]), CheckpointSpec.from_dict(cfg.get("checkpoint")),
                   _pick(Hardware, cfg))


@dataclass(frozen=True, kw_only=True)
class ChatOptions:
    """chat.yaml's chat.*: the session's settings."""

    prompt: str | None
    images: Any
    system: str | None
    system_text_only: str | None
    max_context: int = MAX_CONTEXT
    reuse_cache: bool

    def image_list(self) -> list[str]:
        """chat.images as a list (chat.images=a.png works too)."""
        images = self.images or []
        return [str(images)] if isinstance(images, str) else [str(i) for i in images]


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    """chat.yaml's serve.*: the serving engine behind ui=web and ui=api."""

    slots: int | None
    max_queue: int


@dataclass(frozen=True)
class ChatSettings:
    """What `python chat.py` runs: recipes.chat.run(ChatSettings)."""

    load: LoadSpec
    generation: GenerationSettings
    chat: ChatOptions
    serve: ServeOptions
    ui: dict  # conf/ui/<name>.yaml: name plus the front-end's own keys
    seed: int | None = None


@dataclass(frozen=True, kw_only=True)
class EvaluateOptions:
    """evaluate.yaml's evaluate.*."""

    prompts: Any
    metrics: Any
    batch_size: int
    max_context: int = MAX_CONTEXT
    progress: bool
    retry_failed: bool
    engine: bool
    fail_on_error: bool

    def __post_init__(self) -> None:
        for key in ("batch_size", "max_context"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"evaluate.{key}={value}: use a whole number of 1 or more")


@dataclass(frozen=True, kw_only=True)
class Launch:
    """evaluate.yaml's launch.*: several processes through Lightning Fabric (null: from gpu=)."""

    accelerator: str | None
    devices: Any
    strategy: str
    num_nodes: int
