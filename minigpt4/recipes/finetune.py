"""Stage-2 fine-tuning: `run(FinetuneSettings)` is what `python finetune.py` runs (see docs/FINETUNE.md).

    load_model(settings.load) -> freeze all but settings.trainable -> data (bad rows skipped, image features
    cached when the image side is frozen) -> Lightning fit (resume= continues a run in its folder)
    -> exports:
        <run>/checkpoints/last.ckpt        Lightning (trainable tensors, optimizer, scheduler, step)
        <run>/projection.pth               official format {"model": {llama_proj.weight, llama_proj.bias}}
        <run>/projection.safetensors       our format (checkpoint.proj= accepts either)
        <run>/model/                       full own-format checkpoint when more than llama_proj trained
        <run>/summary.json                 steps, samples/s, peak memory, skipped rows, held-out accuracy
    Ctrl-C or SIGTERM stops after the current step: checkpoint, projection and summary are saved
    and one line says how to resume. The shipped demo model is replaced only with install_demo=true.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.utilities.exceptions import SIGTERMException

from minigpt4 import checkpoints as ck
from minigpt4.build import LoadedModel, load_model, save_bundle
from minigpt4.config import ASSETS
from minigpt4.devices import gpu_indices, resolve_device
from minigpt4.errors import UserError
from minigpt4.extras import require_logger
from minigpt4.model import PARTS
from minigpt4.settings import FinetuneSettings
from minigpt4.training.data import FinetuneDataModule
from minigpt4.training.module import IMAGE_SIDE, FinetuneModule
from minigpt4.training.trainer import StopRequest, build_trainer, quiet_lightning

log = logging.getLogger(__name__)

SHIPPED_DEMO = ASSETS / "demo"  # what chat.py and evaluate.py load by default; install_demo=true replaces it


def run_dir_of(settings: FinetuneSettings) -> Path:
    """resume=<run dir> continues in that folder; else output_dir (under finetune.py: Hydra's run
    folder when output_dir=null, config.finetune_settings)."""
    if settings.resume and Path(settings.resume).is_dir():
        return Path(settings.resume)
    if settings.output_dir:
        return Path(settings.output_dir)
    raise UserError("output_dir=null outside a Hydra run: set output_dir=/path/for/the/run")


def resume_checkpoint(resume: str | None) -> str | None:
    """`resume=<run dir>` (or a .ckpt file) -> the Lightning checkpoint to continue from."""
    if not resume:
        return None
    path = Path(resume)
    ckpt = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
    if not ckpt.is_file():
        raise UserError(f"resume={resume}: no {ckpt}; give a finetune run directory that has checkpoints/last.ckpt")
    # Lightning loads it weights_only too, but deep inside fit() and with torch's page-long message:
    # read it once here (memory-mapped, trainable parts only) to fail early, in one line.
    saved = ck.load_pickle(ckpt, f"resume={resume}: {ckpt}")
    if not isinstance(saved, dict) or not isinstance(saved.get("state_dict"), dict):
        raise UserError(f"resume={resume}: {ckpt} is not a checkpoint of finetune.py (no state_dict in it)")
    return str(ckpt)


def resume_command(run_dir: Path, command_line: tuple[str, ...] | None) -> str:
    """The command that continues this run: the overrides as typed, with resume= for output_dir=."""
    typed = list(command_line) if command_line is not None else ["..."]
    kept = [o for o in typed if o.lstrip("+~").split("=")[0] not in ("resume", "output_dir")]
    return " ".join(["python finetune.py", *map(shlex.quote, kept), shlex.quote(f"resume={run_dir}")])


def check_settings(settings: FinetuneSettings) -> None:
    """Settings that would fail (or be ignored) later, refused before anything loads (unknown
    trainer keys already were, by FinetuneSettings.from_dict)."""
    unknown = set(settings.trainable) - set(PARTS)
    if unknown:
        raise UserError(f"trainable: unknown part(s) {sorted(unknown)}; choose from {list(PARTS)}")
    require_logger(settings.logger.get("wandb"))
    if settings.heldout.pictures > 0:
        from minigpt4.training.heldout import parse_kinds

        parse_kinds(settings.heldout.kinds)  # a typo fails now, not after training
    if settings.data.name == "synthetic":
        from minigpt4.data.datasets import check_kinds

        check_kinds(settings.data.kinds)
    model_name = settings.load.model.name
    if settings.install_demo and model_name != "tiny":
        raise UserError(f"install_demo=true replaces the shipped demo model (model=tiny), but this run trains "
                        f"model={model_name}: leave install_demo out (the model is in the run folder)")


def prepare_model(settings: FinetuneSettings, device: torch.device) -> LoadedModel:
    """Load, re-initialise settings.reinit parts, train settings.trainable (in fp32: master weights)."""
    lm = load_model(settings.load, device=device)
    model = lm.model
    trainable = list(settings.trainable)
    for part in settings.reinit:
        module = getattr(model, str(part), None)
        if module is None or not hasattr(module, "reset_parameters"):
            raise UserError(f"reinit={part}: only llama_proj can be re-initialised")
        module.reset_parameters()
    if settings.vision_position_std is not None:
        if "vision_model" not in lm.random_parts or "vision_model" not in trainable:
            raise UserError("vision_position_std= re-initialises the ViT's position embeddings: only for a ViT trained "
                            "from scratch (checkpoint=random, vision_model in trainable); leave it null otherwise")
        torch.nn.init.normal_(model.vision_model.embeddings.position_embedding, std=float(settings.vision_position_std))
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


def export(lm: LoadedModel, run_dir: Path, settings: FinetuneSettings, whole_model: bool = True) -> dict[str, str]:
    """Projection in both formats; with more than llama_proj trained (or install_demo=true) the
    whole model as a bundle too (build.save_bundle): <run>/model, export_dir, and with install_demo
    the shipped demo. Every target is written atomically (checkpoints.atomic_write)."""
    state = {k: v.detach().float() for k, v in lm.model.state_dict().items() if k.startswith("llama_proj.")}
    out = {"projection_official": str(ck.save_official_projection(state, run_dir / "projection.pth")),
           "projection": str(ck.save_tensors(state, run_dir / "projection.safetensors"))}
    if whole_model and (set(settings.trainable) - {"llama_proj"} or settings.install_demo):
        targets = [run_dir / "model"] + ([Path(settings.export_dir)] if settings.export_dir else [])
        targets += [SHIPPED_DEMO] if settings.install_demo else []
        for target in targets:
            save_bundle(lm, target, trained_parts=list(settings.trainable))
        out["model"] = ", ".join(str(t) for t in targets)
        if settings.install_demo:
            log.warning("install_demo=true: the shipped demo model %s is now this run's model "
                        "(python chat.py uses it)", SHIPPED_DEMO)
    return out


def run(settings: FinetuneSettings) -> Path:
    """Fine-tune as the settings say; return the run directory (see the module docstring).
    Interrupted (Ctrl-C, SIGTERM), it saves what it has and raises KeyboardInterrupt."""
    check_settings(settings)
    run_dir = run_dir_of(settings)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = resume_checkpoint(settings.resume)
    (run_dir / "finetune_config.yaml").write_text(yaml.safe_dump(settings.to_dict(), sort_keys=False))
    pl.seed_everything(int(settings.seed), workers=True, verbose=False)
    gpu = settings.load.hardware.gpu
    devices = gpu_indices(gpu)
    device = resolve_device(gpu) if not devices or len(devices) == 1 else torch.device("cpu")
    lm = prepare_model(settings, device)
    frozen_image_side = all(p in lm.model.frozen for p in IMAGE_SIDE)
    cache = frozen_image_side if str(settings.cache_features) == "auto" else bool(settings.cache_features)
    if cache and not frozen_image_side:
        raise UserError("cache_features=true needs vision_model, qformer and query_tokens frozen (not in trainable)")

    start = time.perf_counter()
    data = FinetuneDataModule(settings.data, settings.trainer, settings.seed, lm, cache)
    data.setup("fit")
    prepare_seconds = time.perf_counter() - start
    module = FinetuneModule(lm.model, settings.trainer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stop = StopRequest()
    with quiet_lightning(resuming=bool(ckpt_path)), stop.installed():
        trainer = build_trainer(settings, run_dir, devices, stop)
        start = time.perf_counter()
        try:
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
        except SIGTERMException:  # Lightning's own answer to SIGTERM, after RunCheckpoint saved the step
            if stop.signal is None:
                raise
    fit_seconds = time.perf_counter() - start
    if stop.signal and not trainer.global_step:
        log.warning("%s before the first training step: nothing to save", stop.signal)
        raise KeyboardInterrupt

    summary = {
        "run_dir": str(run_dir),
        "trainable": list(settings.trainable),
        "trainable_parameters": sum(p.numel() for p in lm.model.parameters() if p.requires_grad),
        "cache_features": cache,
        "rows": data.n_rows,
        "skipped_rows": [{"row": b.row, "reason": b.reason} for b in data.bad_rows],
        "global_step": int(trainer.global_step),
        "interrupted": stop.signal,
        "resumed_from": ckpt_path,
        "prepare_seconds": round(prepare_seconds, 2),
        "fit_seconds": round(fit_seconds, 2),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    if trainer.is_global_zero:
        lm.model.eval()
        summary["exports"] = export(lm, run_dir, settings, whole_model=not stop.signal)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if settings.heldout.pictures > 0 and not stop.signal:
            from minigpt4.training.heldout import run_heldout

            summary["heldout"] = run_heldout(lm, settings.heldout)
            log.info("held-out accuracy: %s; 'Hello' -> %r", summary["heldout"]["accuracy"],
                     summary["heldout"]["greeting"])
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if stop.signal:
        log.warning("%s at step %d: saved checkpoints/last.ckpt and projection.pth in %s; continue with: %s",
                    stop.signal, trainer.global_step, run_dir, resume_command(run_dir, settings.command_line))
        raise KeyboardInterrupt
    log.info("fine-tuning done in %.0fs: %s", fit_seconds, run_dir)
    return run_dir
