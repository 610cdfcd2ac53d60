"""Stage-2 fine-tuning: `run_finetune(cfg)` is what `python finetune.py` runs (see docs/FINETUNE.md).

    load_model(cfg) -> freeze all but cfg.trainable -> data (bad rows skipped, image features
    cached when the image side is frozen) -> Lightning fit (resume from a run dir) -> exports:
        <run>/checkpoints/last.ckpt        Lightning (trainable tensors, optimizer, scheduler, step)
        <run>/projection.pth               official format {"model": {llama_proj.weight, llama_proj.bias}}
        <run>/projection.safetensors       our format (checkpoint.proj= accepts either)
        <run>/model/                       full own-format checkpoint when more than llama_proj trained
        <run>/summary.json                 steps, samples/s, peak memory, skipped rows, held-out accuracy
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from minigpt4 import checkpoints as ck
from minigpt4.build import LoadedModel, load_model
from minigpt4.config import gpu_indices, resolve_device, to_container
from minigpt4.errors import UserError
from minigpt4.model import PARTS
from minigpt4.training.data import FinetuneDataModule
from minigpt4.training.module import IMAGE_SIDE, FinetuneModule

log = logging.getLogger(__name__)


def run_dir_of(cfg: DictConfig) -> Path:
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise UserError("output_dir=null outside a Hydra run: set output_dir=/path/for/the/run")


def resume_checkpoint(resume: str | None) -> str | None:
    """`resume=<run dir>` (or a .ckpt file) -> the Lightning checkpoint to continue from."""
    if not resume:
        return None
    path = Path(resume)
    ckpt = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
    if not ckpt.is_file():
        raise UserError(f"resume={resume}: no {ckpt}; give a finetune run directory that has checkpoints/last.ckpt")
    return str(ckpt)


def trainer_precision(precision: str, device: torch.device) -> str:
    if str(precision) == "auto":
        return "16-mixed" if device.type == "cuda" else "32-true"
    return str(precision)


def prepare_model(cfg: DictConfig, device: torch.device) -> LoadedModel:
    """Load, re-initialise cfg.reinit parts, train cfg.trainable (in fp32: master weights)."""
    lm = load_model(cfg, device=device)
    model = lm.model
    trainable = [str(p) for p in cfg.trainable]
    for part in cfg.get("reinit") or []:
        module = getattr(model, str(part), None)
        if module is None or not hasattr(module, "reset_parameters"):
            raise UserError(f"reinit={part}: only llama_proj can be re-initialised")
        module.reset_parameters()
    model.set_trainable(trainable)
    if "llm" in trainable and getattr(model.llm, "is_quantized", False):
        raise UserError("trainable=[llm] with a quantised LLM: use precision=fp16, bf16 or fp32")
    for name in trainable:
        part = getattr(model, name)
        if isinstance(part, torch.nn.Parameter):
            part.data = part.data.float()
        elif part is not None:
            part.float()
    model.train()
    return lm


def export(lm: LoadedModel, run_dir: Path, cfg: DictConfig) -> dict[str, str]:
    """Projection in both formats; with more than llama_proj trained, a full own-format dir too."""
    model = lm.model
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if k.startswith("llama_proj.")}
    out = {"projection_official": str(ck.save_official_projection(state, run_dir / "projection.pth"))}
    save_file(state, str(run_dir / "projection.safetensors"), metadata={"format": "pt", "minigpt4": "1"})
    out["projection"] = str(run_dir / "projection.safetensors")
    if set(cfg.trainable) - {"llama_proj"}:
        arch = model.config.to_dict()
        if cfg.checkpoint.get("llm"):  # an LLM directory: record its real architecture
            arch["llm"] = model.llm.config.to_diff_dict()
        meta = {"arch": arch, "template": lm.template.name, "image_size": lm.image_size, "name": lm.name,
                "trained_parts": list(cfg.trainable)}
        targets = [run_dir / "model"] + ([Path(cfg.export_dir)] if cfg.get("export_dir") else [])
        for target in targets:
            ck.save_own(model.state_dict(), target, meta)
            shutil.copyfile(lm.tokenizer.path, target / "tokenizer.model")
        out["model"] = ", ".join(str(t) for t in targets)
    return out


def run_finetune(cfg: DictConfig) -> Path:
    """Fine-tune as the config says; return the run directory (see the module docstring)."""
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    unknown = set(cfg.trainable) - set(PARTS)
    if unknown:
        raise UserError(f"trainable: unknown part(s) {sorted(unknown)}; choose from {list(PARTS)}")
    ckpt_path = resume_checkpoint(cfg.get("resume"))
    OmegaConf.save(cfg, run_dir / "finetune_config.yaml", resolve=True)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    devices = gpu_indices(cfg.gpu)
    device = resolve_device(cfg.gpu) if not devices or len(devices) == 1 else torch.device("cpu")
    lm = prepare_model(cfg, device)
    frozen_image_side = all(p in lm.model.frozen for p in IMAGE_SIDE)
    cache = frozen_image_side if str(cfg.cache_features) == "auto" else bool(cfg.cache_features)
    if cache and not frozen_image_side:
        raise UserError("cache_features=true needs vision_model, qformer and query_tokens frozen (not in trainable)")

    start = time.perf_counter()
    data = FinetuneDataModule(cfg, lm.model, lm.tokenizer, lm.template, lm.image_size, cache)
    data.setup("fit")
    prepare_seconds = time.perf_counter() - start
    module = FinetuneModule(lm.model, cfg.trainer)
    trainer = build_trainer(cfg, run_dir, devices)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    fit_seconds = time.perf_counter() - start

    summary = {
        "run_dir": str(run_dir),
        "trainable": list(cfg.trainable),
        "trainable_parameters": sum(p.numel() for p in lm.model.parameters() if p.requires_grad),
        "cache_features": cache,
        "rows": data.n_rows,
        "skipped_rows": [{"row": b.row, "reason": b.reason} for b in data.bad_rows],
        "global_step": int(trainer.global_step),
        "resumed_from": ckpt_path,
        "prepare_seconds": round(prepare_seconds, 2),
        "fit_seconds": round(fit_seconds, 2),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    if trainer.is_global_zero:
        lm.model.eval()
        summary["exports"] = export(lm, run_dir, cfg)
        if int(cfg.heldout.pictures) > 0:
            from minigpt4.training.heldout import heldout_accuracy

            summary["heldout"] = heldout_accuracy(lm, int(cfg.heldout.pictures), int(cfg.heldout.seed))
            log.info("held-out accuracy: %s; 'Hello' -> %r", summary["heldout"]["accuracy"],
                     summary["heldout"]["greeting"])
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("fine-tuning done in %.0fs: %s", fit_seconds, run_dir)
    return run_dir


def build_trainer(cfg: DictConfig, run_dir: Path, devices: list[int] | None) -> pl.Trainer:
    t = cfg.trainer
    device = torch.device("cuda") if devices else torch.device("cpu")
    loggers: list = [pl.loggers.CSVLogger(save_dir=str(run_dir), name="", version="")]
    wandb_cfg = cfg.logger.get("wandb")
    if wandb_cfg and wandb_cfg.get("enabled"):
        from pytorch_lightning.loggers import WandbLogger  # wandb is imported only when enabled

        loggers.append(WandbLogger(project=wandb_cfg.project, name=wandb_cfg.get("name"), save_dir=str(run_dir),
                                   offline=str(wandb_cfg.mode) != "online",
                                   config=to_container(cfg)))
    every_n_steps = t.get("checkpoint_every_n_steps")
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=1,
        every_n_train_steps=int(every_n_steps) if every_n_steps else None,
        every_n_epochs=None if every_n_steps else 1,
    )
    callbacks = [checkpoint]
    if t.progress_bar:
        callbacks.append(pl.callbacks.TQDMProgressBar(refresh_rate=int(t.get("refresh_rate", 10))))
    return pl.Trainer(
        accelerator="gpu" if devices else "cpu",
        devices=devices or 1,
        strategy=str(t.get("strategy", "auto")),
        precision=trainer_precision(t.precision, device),
        max_epochs=int(t.max_epochs),
        limit_train_batches=int(t.iters_per_epoch) if t.iters_per_epoch else 1.0,
        accumulate_grad_batches=int(t.accumulate_grad_batches),
        gradient_clip_val=t.get("gradient_clip_val"),
        log_every_n_steps=int(t.log_every_n_steps),
        max_time=t.get("max_time"),
        default_root_dir=str(run_dir),
        logger=loggers,
        callbacks=callbacks,
        enable_progress_bar=bool(t.progress_bar),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
