"""What chat.py, evaluate.py and finetune.py share: the command line as a user types it, with
Hydra behind it. Free-text keys (chat.prompt=...) are taken exactly as typed, an override Hydra
cannot take is one line with the fix before Hydra sees it, and a UserError is one line too."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from minigpt4.config import CONF_DIR, as_typed, check_syntax, compose
from minigpt4.errors import exit_on_user_error


def run(config_name: str, task: Callable[[DictConfig], object]) -> None:
    """Run `task` under Hydra on conf/<config_name>.yaml and the command line (exit 2 and one
    line on stderr for a bad override or any UserError)."""
    import hydra

    exit_on_user_error(_check_overrides)(config_name, sys.argv[1:])
    sys.argv[1:] = [as_typed(arg) for arg in sys.argv[1:]]  # what Hydra reads
    main = hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    main(exit_on_user_error(task))()  # Hydra names the job (and chat.log etc.) after task's file


def _check_overrides(config_name: str, argv: list[str]) -> None:
    """Compose once before Hydra does, so that a bad override is our one line rather than Hydra's
    message and its HYDRA_FULL_ERROR advice (with --multirun, whose sweeps do not compose: the
    syntax only). Hydra's own parser splits flags from overrides; its errors stay Hydra's."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    if args.config_path or args.config_dir or args.config_name or args.experimental_rerun:
        return  # another config than ours: Hydra's business
    if args.multirun:
        check_syntax([as_typed(o) for o in args.overrides], config_name)
    else:
        compose(config_name, args.overrides)  # takes free text as typed, too


class RunDirCheck(Callback):
    """Hydra callback (conf/evaluate.yaml): Hydra creates the run folder and writes into it
    before evaluate.py starts, so a read-only or full disk would end in its traceback. Checked
    first here, it is one line and exit 2, and no empty folder is left behind."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)  # for ${hydra:job.config_name}, as Hydra does next
        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir"))).absolute()
        if run_dir.is_dir() and OmegaConf.select(config, "hydra.output_subdir") is None:
            return  # Hydra writes nothing there (resume= and score_only= check their own run folder)
        created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write_test"
            probe.write_bytes(b"ok\n")
            probe.unlink()
        except OSError as err:
            for folder in created:  # deepest first
                with contextlib.suppress(OSError):
                    folder.rmdir()
            print(f"error: cannot write {run_dir}: {(err.strerror or str(err)).lower()}; make room, or choose "
                  "a writable folder with hydra.run.dir=DIR", file=sys.stderr)
            sys.exit(2)
