"""Typed settings: one dataclass per config group, so that library code takes plain objects and a
notebook calls it without Hydra (`load_model(LoadSpec(ModelSpec.tiny(), CheckpointSpec()))`).

The YAML files in conf/ hold the defaults a user sees and overrides (the option groups here have
none of their own, so they cannot drift apart); minigpt4/config.py turns a
composed config into these objects once, at the entry point (`config.chat_settings(cfg)`,
`config.evaluate_settings(cfg)`, `config.finetune_settings(cfg)`). Nothing here imports Hydra. The one default both sides need, the context
limit, lives here (MAX_CONTEXT) and the YAML files refer to it (${max_context:}).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

import torch

from minigpt4.errors import UserError
from minigpt4.generation import GenerationSettings

MAX_CONTEXT = 2000  # prompt + max_new_tokens, in tokens, as the official chat (chat.yaml and evaluate.yaml)


def _pick(cls, values: Mapping | None):
    """cls(**the keys of `values` that are fields of cls): a config group -> its dataclass."""
    values = values or {}
    return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


def _checked(cls, values: Mapping | None, section: str):
    """cls(**values) for config group `section`: a key cls lacks (a typo, or Hydra's hint
    `+section.key=...`) is refused, since it would be ignored, and a missing one is named."""
    values = dict(values or {})
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"{section}.{unknown[0]}: no such setting (it would be ignored); "
                        f"the known ones are {section}.{{{','.join(known)}}}")
    missing = [f.name for f in fields(cls) if f.name not in values
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise UserError(f"{section}.{missing[0]}: not set; give it a value ({section}.{missing[0]}=...)")
    return cls(**values)


def as_plain(settings) -> dict:
    """A settings dataclass as plain JSON/YAML-safe data (tuples become lists)."""
    return json.loads(json.dumps(asdict(settings)))


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

    def to_dict(self) -> dict:
        """The composed config's keys (model, checkpoint, gpu, precision, cpu_threads): from_dict's input."""
        return {"model": as_plain(self.model), "checkpoint": as_plain(self.checkpoint), **as_plain(self.hardware)}


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
    admit_wait_ms: float
    graph_admissions: bool = True


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


@dataclass(frozen=True)
class EvaluateSettings:
    """What `python evaluate.py` runs: recipes.evaluate.run(EvaluateSettings, run_dir). A run saves
    to_dict() as its config.yaml; resume= and score_only= read it back with from_dict."""

    load: LoadSpec
    generation: GenerationSettings
    evaluate: EvaluateOptions
    launch: Launch
    benchmark: dict | None  # conf/benchmark/<name>.yaml (Benchmark.from_dict's input); None: evaluate.prompts
    logger: dict  # conf/logger/*.yaml: {"wandb": {...}}
    seed: int
    resume: str | None  # a run directory to continue
    score_only: str | None  # a run directory to re-score
    command_line: tuple[str, ...] | None = None  # the overrides as typed, for messages (None: not a command line)

    @classmethod
    def from_dict(cls, cfg: Mapping) -> EvaluateSettings:
        """conf/evaluate.yaml composed (or a run's config.yaml) as plain data -> EvaluateSettings."""
        return cls(load=LoadSpec.from_dict(cfg), generation=_checked(GenerationSettings, cfg["generation"], "generation"),
                   evaluate=_checked(EvaluateOptions, cfg["evaluate"], "evaluate"),
                   launch=_checked(Launch, cfg["launch"], "launch"), benchmark=cfg.get("benchmark"),
                   logger=dict(cfg["logger"]), seed=cfg["seed"], resume=cfg.get("resume"),
                   score_only=cfg.get("score_only"))

    def to_dict(self) -> dict:
        """The composed config's shape (what from_dict reads): a run's config.yaml, summary.json's config."""
        return {**self.load.to_dict(), "generation": as_plain(self.generation), "evaluate": as_plain(self.evaluate),
                "launch": as_plain(self.launch), "benchmark": self.benchmark, "logger": self.logger,
                "seed": self.seed, "resume": self.resume, "score_only": self.score_only}


@dataclass(frozen=True, kw_only=True)
class LearningRate:
    """trainer.lr.*: linear warm-up warmup_start -> init over warmup_steps, then cosine to min."""

    init: float
    min: float
    warmup_start: float
    warmup_steps: int


@dataclass(frozen=True, kw_only=True)
class TrainerOptions:
    """conf/trainer/stage2.yaml: the optimizer, data loading and Lightning settings of fine-tuning."""

    batch_size: int
    max_epochs: int
    max_steps: int | None
    iters_per_epoch: int | None
    accumulate_grad_batches: int
    lr: LearningRate
    weight_decay: float
    betas: tuple[float, float]
    gradient_clip_val: float | None
    max_target_tokens: int
    num_workers: int
    log_every_n_steps: int
    checkpoint_every_n_steps: int | None
    max_time: str | None
    strategy: str
    progress_bar: bool
    refresh_rate: int

    @classmethod
    def from_dict(cls, values: Mapping) -> TrainerOptions:
        values = dict(values)
        if "lr" in values:
            values["lr"] = _checked(LearningRate, values["lr"], "trainer.lr")
        trainer = _checked(cls, values, "trainer")
        return replace(trainer, betas=tuple(float(b) for b in trainer.betas))


@dataclass(frozen=True, kw_only=True)
class DataOptions:
    """conf/data/*.yaml: which examples (data/datasets.build_examples). path for files; the rest
    for the synthetic pictures (data/synthetic.py)."""

    name: str
    style: str
    path: str | None = None
    size: int | None = None
    seed: int | None = None
    picture_size: int | None = None
    text_fraction: float | None = None
    multi_fraction: float | None = None  # share of conversations with 2-4 pictures (data/dialogues.py)
    max_turns: int | None = None
    kinds: str | tuple[str, ...] | None = None  # the question kinds training asks: all (None), or a list (dialogues.ALL_KINDS)
    minimal_pairs: float | None = None  # share of pictures-together conversations that start from a minimal pair (dialogues.minimal_pair)

    def __post_init__(self):  # a YAML/CLI list arrives as a list: keep it hashable and typed
        if self.kinds is not None and not isinstance(self.kinds, str):
            object.__setattr__(self, "kinds", tuple(str(k) for k in self.kinds))


@dataclass(frozen=True, kw_only=True)
class Heldout:
    """finetune.yaml's heldout.*: held-out synthetic pictures after training (0: skip)."""

    pictures: int
    seed: int
    kinds: str  # all, single, multi or a list such as colour,position,total (training/heldout.py)
    sampled: bool  # also the rate under the official sampling defaults (conf/generation/official.yaml)
    batch_size: int


@dataclass(frozen=True, kw_only=True)
class FinetuneSettings:
    """What `python finetune.py` runs: recipes.finetune.run(FinetuneSettings)."""

    load: LoadSpec
    data: DataOptions
    trainer: TrainerOptions
    heldout: Heldout
    logger: dict  # conf/logger/*.yaml: {"wandb": {...}}
    trainable: tuple[str, ...]
    reinit: tuple[str, ...]
    vision_position_std: float | None  # a from-scratch ViT's position embeddings ~ N(0, std) (docs/FINETUNE.md)
    cache_features: bool | str  # true | false | auto
    seed: int
    resume: str | None  # a run directory (or a .ckpt) to continue
    output_dir: str | None  # where the run goes (the entry point gives Hydra's run folder for null)
    export_dir: str | None
    install_demo: bool
    command_line: tuple[str, ...] | None = None  # the overrides as typed, for the resume hint (None: not a command line)

    @classmethod
    def from_dict(cls, cfg: Mapping) -> FinetuneSettings:
        """conf/finetune.yaml composed, as plain data -> FinetuneSettings."""
        return cls(load=LoadSpec.from_dict(cfg), data=_checked(DataOptions, cfg["data"], "data"),
                   trainer=TrainerOptions.from_dict(cfg["trainer"]), heldout=_checked(Heldout, cfg["heldout"], "heldout"),
                   logger=dict(cfg["logger"]), trainable=tuple(str(p) for p in cfg["trainable"]),
                   reinit=tuple(str(p) for p in cfg.get("reinit") or ()),
                   vision_position_std=cfg.get("vision_position_std"), cache_features=cfg["cache_features"],
                   seed=cfg["seed"], resume=cfg.get("resume"), output_dir=cfg.get("output_dir"),
                   export_dir=cfg.get("export_dir"), install_demo=bool(cfg.get("install_demo")))

    def to_dict(self) -> dict:
        """The composed config's shape: the run's finetune_config.yaml, Weights & Biases' config."""
        plain = as_plain(self)
        plain.pop("command_line")
        return {**self.load.to_dict(), **{k: v for k, v in plain.items() if k != "load"}}
