"""Evaluation when things go wrong around it: a full or read-only disk, a second process on the
same run folder, and runs in which rows failed."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest

from minigpt4.cli import RunDirCheck
from minigpt4.config import compose, evaluate_settings
from minigpt4.errors import UserError, exit_on_user_error
from minigpt4.evaluation import store
from minigpt4.recipes.evaluate import run as run_evaluation
from test_evaluate import FAST, cfg_for, picture, prompt_set, read_predictions, write_csv  # noqa: F401

FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
READ_ONLY = OSError(errno.EROFS, os.strerror(errno.EROFS))


def raising(err: OSError):
    def fail(*args, **kwargs):
        raise err

    return fail


def leftovers(run_dir: Path) -> list[str]:
    """What a failed write must not leave behind."""
    return sorted(p.name for p in run_dir.rglob("*") if ".partial-" in p.name or p.name.endswith(".tmp")
                  or p.name == store.LOCK)


def whole_lines(path: Path) -> int:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "a half-written line was left behind"
    return data.count(b"\n")


# ---- a full or read-only disk ----------------------------------------------------------------------
def test_disk_full_mid_run_is_one_line_keeps_finished_rows_and_resume_completes(prompt_set, tmp_path, monkeypatch):
    real_fsync, calls = os.fsync, []

    def fsync(fd):  # the 4th row finds the disk full, half of its line already written
        if os.readlink(f"/proc/self/fd/{fd}").endswith("predictions.jsonl"):
            calls.append(fd)
        if len(calls) == 4:
            os.write(fd, b'{"key": "half a li')
            raise FULL
        real_fsync(fd)

    monkeypatch.setattr(store.os, "fsync", fsync)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as err:
        run_evaluation(cfg_for(prompt_set, "evaluate.batch_size=1"), run_dir)
    message = str(err.value)
    assert f"cannot write {run_dir / 'predictions.jsonl'}: no space left on device" in message
    assert f"resume={run_dir}" in message and "\n" not in message
    assert whole_lines(run_dir / "predictions.jsonl") == 3 and leftovers(run_dir) == []
    monkeypatch.setattr(store.os, "fsync", real_fsync)  # space was freed
    run_evaluation(evaluate_settings(compose("evaluate", [*FAST, f"resume={run_dir}"])), tmp_path / "unused")
    fresh = run_evaluation(cfg_for(prompt_set), tmp_path / "fresh")
    assert read_predictions(run_dir) == read_predictions(fresh)


@pytest.mark.parametrize("target", ["config.yaml", "predictions.jsonl", "predictions.csv", "summary.json",
                                    "metrics_by_category.png"])
def test_a_file_that_cannot_be_replaced_is_one_line_and_leaves_no_temporary_file(prompt_set, tmp_path, monkeypatch, target):
    """Every whole-file write goes through a temporary file + rename; on a read-only or full disk
    the temporary file goes away and the rows already saved stay."""
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == target:
            raise READ_ONLY
        real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", replace)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match=f"cannot write {run_dir / target}: read-only file system; "):
        run_evaluation(cfg_for(prompt_set), run_dir)
    assert leftovers(run_dir) == []
    if target != "config.yaml":  # written after every row was answered
        assert len(store.collect(run_dir)) == 8


def test_a_log_file_that_cannot_be_opened_on_resume_is_one_line(prompt_set, tmp_path, monkeypatch):
    import logging

    run_dir = run_evaluation(cfg_for(prompt_set), tmp_path / "run")

    monkeypatch.setattr(logging.FileHandler, "__init__", raising(READ_ONLY))
    with pytest.raises(UserError, match=f"cannot write {run_dir / 'evaluate.log'}: read-only file system"):
        run_evaluation(evaluate_settings(compose("evaluate", [*FAST, f"resume={run_dir}"])), tmp_path / "unused")


def test_hydra_run_dir_on_a_read_only_or_full_disk_is_one_line_and_no_empty_folder(tmp_path, monkeypatch, capsys):
    """Hydra makes the run folder before evaluate.py runs: conf/evaluate.yaml's callback checks
    it first, with the config Hydra hands it (the default folder needs ${hydra:...} resolved)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from minigpt4.config import CONF_DIR

    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)  # restored afterwards

    def start(*overrides: str) -> str | None:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose("evaluate", list(overrides), return_hydra_config=True)
        assert cfg.hydra.callbacks.run_dir_check._target_ == "minigpt4.cli.RunDirCheck"
        try:
            RunDirCheck().on_run_start(cfg)
        except SystemExit as exit:
            assert exit.code == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "Traceback" not in err
            return err
        return None

    (tmp_path / "a_file").write_text("")
    assert f"cannot write {tmp_path / 'a_file' / 'run'}: not a directory;" in start(
        f"hydra.run.dir={tmp_path / 'a_file' / 'run'}")
    with monkeypatch.context() as m:
        m.setattr(Path, "write_bytes", raising(FULL))
        m.chdir(tmp_path)
        err = start()  # the default folder: outputs/evaluate/DATE/TIME
        assert err.startswith(f"error: cannot write {tmp_path / 'outputs' / 'evaluate'}/")
        assert err.endswith(": no space left on device; make room, or choose a writable folder with hydra.run.dir=DIR\n")
        assert not (tmp_path / "outputs").exists()  # the folders it made are gone again
        # resume= and score_only= keep Hydra out of their run folder: nothing to check
        assert start(f"resume={tmp_path}") is None and start(f"score_only={tmp_path}") is None
    assert start(f"hydra.run.dir={tmp_path / 'ok'}") is None
    assert (tmp_path / "ok").is_dir() and not any((tmp_path / "ok").iterdir())


# ---- one run folder, one writer ---------------------------------------------------------------------
def test_a_run_folder_being_written_is_refused_with_the_writers_pid(prompt_set, tmp_path, monkeypatch):
    import minigpt4.build

    run_dir = run_evaluation(cfg_for(prompt_set), tmp_path / "run")
    monkeypatch.setattr(minigpt4.build, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    refused = f"run {run_dir} is being written by another process (pid {os.getpid()}); wait for it to finish"
    with store.run_lock(run_dir):  # flock is per open file: a second open conflicts even in this process
        assert (run_dir / store.LOCK).read_text() == f"{os.getpid()}\n"
        for args in ([*FAST, f"resume={run_dir}"], [*FAST, f"score_only={run_dir}"]):
            with pytest.raises(UserError, match="^" + re.escape(refused)):
                run_evaluation(evaluate_settings(compose("evaluate", args)), tmp_path / "unused")
        with pytest.raises(UserError, match="^" + re.escape(refused)):
            run_evaluation(cfg_for(prompt_set), run_dir)  # a new run given the same folder
    assert not (run_dir / store.LOCK).exists()  # released and removed


def test_other_ranks_of_a_run_and_a_lock_left_by_kill_9_do_not_block(prompt_set, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / store.LOCK).write_text("999999\n")  # its writer was killed: the OS released its flock
    run_evaluation(cfg_for(prompt_set), run_dir)
    assert not (run_dir / store.LOCK).exists()
    # a rank > 0 started by Lightning (or torchrun) while rank 0 holds the lock takes no lock
    with store.run_lock(run_dir):
        monkeypatch.setenv("LOCAL_RANK", "1")
        run_evaluation(evaluate_settings(compose("evaluate", [*FAST, f"resume={run_dir}"])), tmp_path / "unused")


# ---- runs in which rows failed ---------------------------------------------------------------------
def test_failed_rows_are_counted_with_the_first_errors_and_fail_on_error_exits_1(tmp_path, caplog, capsys):
    red = picture(tmp_path / "red.png")
    rows = [["ok", "What colour?", red, "red"]] + [[f"m{i}", "What colour?", f"gone{i}.png", "red"] for i in range(7)]
    prompts = write_csv(tmp_path / "set.csv", ["id", "prompt", "image", "reference"], rows)
    run_dir = run_evaluation(cfg_for(prompts), tmp_path / "run")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name.endswith("report")]
    assert warnings[0].startswith("7 of 8 rows failed") and warnings[0].endswith("the first 5:")
    assert len(warnings) == 6 and warnings[1].startswith("  set.csv#m0: ") and "gone0.png" in warnings[1]
    assert all("\n" not in w for w in warnings)

    def evaluate(*args: str) -> int:
        with pytest.raises(SystemExit) as exit:
            exit_on_user_error(lambda: run_evaluation(evaluate_settings(compose("evaluate", list(args))), tmp_path / "x"))()
        return exit.value.code

    for how in (f"resume={run_dir}", f"score_only={run_dir}"):
        assert evaluate(*FAST, how, "evaluate.fail_on_error=true") == 1
        assert capsys.readouterr().err == (f"error: 7 of 8 rows failed (evaluate.fail_on_error=true); "
                                           f"their errors are in {run_dir / 'predictions.csv'}\n")
    assert json.loads((run_dir / "summary.json").read_text())["counts"]["failed"] == 7  # report still written
    good = write_csv(tmp_path / "good.csv", ["prompt"], [["Hello"]])
    assert run_evaluation(cfg_for(good, "evaluate.fail_on_error=true"), tmp_path / "good").is_dir()
