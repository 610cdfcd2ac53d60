"""Optional dependencies (pyproject.toml's extras): a setting that needs one which is not
installed fails in one line naming the extra to install, before any work starts, instead of an
ImportError traceback at the end of a run."""

from __future__ import annotations

import importlib.util

from minigpt4.errors import UserError


def require(setting: str, extra: str, *modules: str) -> None:
    """Raise a one-line UserError if any of `modules` is missing: `setting` needs `extra`."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"{setting} needs {' and '.join(missing)}: pip install -e '.[{extra}]'")


def require_logger(wandb: dict | None) -> None:
    """logger=wandb (conf/logger/wandb.yaml, its `logger.wandb` block) needs the wandb extra."""
    if wandb and wandb.get("enabled"):
        require("logger=wandb", "wandb", "wandb")
