"""The Lightning module for stage-2 style fine-tuning of MiniGPT4.

Only the parts named trainable get gradients and optimizer state; the rest stays frozen and in
eval mode (MiniGPT4.train keeps them there whatever Lightning calls). Lightning checkpoints hold
only the trainable tensors, so a projection-only 7B run writes megabytes, not 14 GB.
"""

from __future__ import annotations

import math
import time

import pytorch_lightning as pl
import torch

from minigpt4.errors import UserError
from minigpt4.model import MiniGPT4
from minigpt4.settings import TrainerOptions

IMAGE_SIDE = ("vision_model", "qformer", "query_tokens")


def lr_at(step: int, total_steps: int, init: float, min_lr: float, warmup_start: float, warmup_steps: int) -> float:
    """Linear warm-up warmup_start -> init over warmup_steps, then cosine init -> min_lr
    (the official LinearWarmupCosineLRScheduler, with the cosine taken per step)."""
    if step < warmup_steps:
        return warmup_start + (init - warmup_start) * step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (init - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: MiniGPT4, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only; biases, norms and other vectors get none (official)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "bias" in name or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class FinetuneModule(pl.LightningModule):
    def __init__(self, model: MiniGPT4, options: TrainerOptions):
        super().__init__()
        self.model = model
        self.options = options
        self.strict_loading = False  # checkpoints hold only the trainable tensors (checked on load)
        self._last_time: float | None = None

    @property
    def image_side_frozen(self) -> bool:
        return all(part in self.model.frozen for part in IMAGE_SIDE)

    def trainable_keys(self) -> set[str]:
        return {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}

    # ---- the step ---------------------------------------------------------------------------
    def image_embeds(self, batch: dict) -> torch.Tensor | None:
        """Soft tokens [N_images, Q, H] from cached features or from pixels."""
        if "features" in batch:
            return self.model.project(batch["features"]) if len(batch["features"]) else None
        pixels = batch["pixels"]
        if not len(pixels):
            return None
        if self.image_side_frozen:  # no graph through the frozen image side
            with torch.no_grad():
                features = self.model.image_features(pixels)
            return self.model.project(features)
        return self.model.encode_images(pixels)

    def training_step(self, batch: dict | None, batch_idx: int):
        if batch is None:  # every row of this batch was unreadable: nothing to learn from
            return None
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            image_embeds=self.image_embeds(batch),
            labels=batch["labels"],
        )
        n = int(batch["n_samples"])
        self.log("train/loss", out.loss, prog_bar=True, batch_size=n)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=False, batch_size=n)
        now = time.perf_counter()
        if self._last_time is not None:  # throughput of the previous step (data loading included)
            self.log("samples_per_s", n / max(now - self._last_time, 1e-9), prog_bar=True, batch_size=n)
        self._last_time = now
        return out.loss

    def on_train_epoch_start(self) -> None:
        self._last_time = None

    # ---- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self):
        t = self.options
        groups = param_groups(self.model, float(t.weight_decay))
        if not any(g["params"] for g in groups):
            raise UserError("trainable=[]: nothing to train; name at least one part, e.g. trainable=[llama_proj]")
        optimizer = torch.optim.AdamW(groups, lr=float(t.lr.init), betas=tuple(float(b) for b in t.betas))
        total = int(self.trainer.estimated_stepping_batches)
        init = float(t.lr.init)
        schedule = lambda step: lr_at(step, total, init, float(t.lr.min), float(t.lr.warmup_start),
                                      int(t.lr.warmup_steps)) / init
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints: trainable tensors only ---------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["minigpt4_trainable"] = sorted({k.split(".")[1] for k in keep})

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = sorted(self.trainable_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise UserError(
                f"resume: the checkpoint was written with trainable={checkpoint.get('minigpt4_trainable')} "
                f"and lacks {len(missing)} tensors this run trains (e.g. {missing[0]}): use the same trainable="
            )
