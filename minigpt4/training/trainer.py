"""The Lightning Trainer of `python finetune.py`, and what it adds to Lightning's defaults:

- Ctrl-C or SIGTERM stops after the current step and saves last.ckpt there (StopRequest +
  RunCheckpoint); Lightning itself exits at once on Ctrl-C, saving nothing.
- last.ckpt is also written at the final step, not only at multiples of checkpoint_every_n_steps.
- metrics.csv is appended to, so a resumed run keeps the earlier rows (Lightning deletes the file).
- (trainer.* keys that nothing reads are refused when the settings are built: settings.TrainerOptions.)
- Lightning's tips and warnings that do not concern the user are filtered (quiet_lightning).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import signal
import sys
import threading
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities.exceptions import SIGTERMException

from minigpt4.devices import resolve_precision
from minigpt4.settings import FinetuneSettings


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM while training: stop after the current step, which RunCheckpoint
    saves. A second Ctrl-C quits at once, saving nothing more."""

    def __init__(self) -> None:
        self.signal: str | None = None

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal}: stopping after this step and saving a checkpoint "
              "(Ctrl-C again quits without saving)", file=sys.stderr, flush=True)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus last.ckpt at the step a stop was asked and at the final step."""

    def __init__(self, stop: StopRequest, **kwargs):
        super().__init__(**kwargs)
        self.stop = stop

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.strategy.reduce_boolean_decision(self.stop.signal is not None, all=False):
            self.save_this_step(trainer)  # mid-epoch: resume continues within this epoch
            trainer.should_stop = True

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if isinstance(exception, SIGTERMException):  # Lightning's own SIGTERM handling, after a whole step
            self.save_this_step(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        self.save_this_step(trainer)

    def save_this_step(self, trainer) -> None:
        if trainer.global_step and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # Lightning's deletes an existing metrics.csv here
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class AppendingCSVLogger(CSVLogger):
    """CSVLogger that continues an existing metrics.csv: a resumed run keeps the earlier steps."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


# Lightning messages that do not concern a user of finetune.py.
_QUIET_WARNINGS = (
    r".*does not have many workers",  # num_workers is a documented setting; 0 is a valid choice on CPU
    r"GPU available but not used",  # gpu=cpu was chosen
    r".*module\(s\) in eval mode",  # the frozen parts, on purpose (module.py)
    r".*isinstance\(treespec, LeafSpec\)",  # a deprecation inside Lightning
)
_QUIET_ON_RESUME = (
    r"Checkpoint directory .* exists and is not empty",  # the resumed run's own checkpoints
    r"You're resuming from a checkpoint that ended before the epoch ended",  # an interrupted epoch goes on
)


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


@contextlib.contextmanager
def quiet_lightning(resuming: bool = False):
    with warnings.catch_warnings():
        for pattern in _QUIET_WARNINGS + (_QUIET_ON_RESUME if resuming else ()):
            warnings.filterwarnings("ignore", message=pattern)
        rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
        tips = _NoTips()
        rank_zero.addFilter(tips)
        try:
            yield
        finally:
            rank_zero.removeFilter(tips)


def build_trainer(settings: FinetuneSettings, run_dir: Path, devices: list[int] | None,
                  stop: StopRequest) -> pl.Trainer:
    t = settings.trainer
    device = torch.device("cuda") if devices else torch.device("cpu")
    loggers: list = [AppendingCSVLogger(save_dir=str(run_dir), name="", version="")]
    wandb = settings.logger.get("wandb")
    if wandb and wandb.get("enabled"):  # wandb is imported only when enabled
        from pytorch_lightning.loggers import WandbLogger

        loggers.append(WandbLogger(project=wandb["project"], name=wandb.get("name"), save_dir=str(run_dir),
                                   offline=str(wandb.get("mode")) != "online", config=settings.to_dict()))
    every_n_steps = t.checkpoint_every_n_steps
    checkpoint = RunCheckpoint(
        stop, dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=1,
        every_n_train_steps=int(every_n_steps) if every_n_steps else None,
        every_n_epochs=None if every_n_steps else 1,
    )
    callbacks = [checkpoint]
    if t.progress_bar:
        callbacks.append(pl.callbacks.TQDMProgressBar(refresh_rate=int(t.refresh_rate)))
    return pl.Trainer(
        accelerator="gpu" if devices else "cpu",
        devices=devices or 1,
        strategy=str(t.strategy),
        precision=resolve_precision(settings.load.hardware.precision, device).lightning,
        max_epochs=int(t.max_epochs),
        max_steps=int(t.max_steps) if t.max_steps else -1,
        limit_train_batches=int(t.iters_per_epoch) if t.iters_per_epoch else 1.0,
        accumulate_grad_batches=int(t.accumulate_grad_batches),
        gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=int(t.log_every_n_steps),
        max_time=t.max_time,
        default_root_dir=str(run_dir),
        logger=loggers,
        callbacks=callbacks,
        enable_progress_bar=bool(t.progress_bar),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
