"""evaluate.py as users run it: the command line, kill -9 then resume, two processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_evaluate import FAST, picture, read_predictions, write_csv

from minigpt4.config import ROOT, compose, evaluate_settings
from minigpt4.evaluation import store
from minigpt4.recipes.evaluate import run as run_evaluation

pytestmark = pytest.mark.slow


def evaluate_cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def kill_9_after(proc: subprocess.Popen, run_dir: Path, rows: int = 3) -> None:
    """SIGKILL the evaluate.py that this test started once `rows` rows are saved."""
    jsonl, deadline = run_dir / "predictions.jsonl", time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if jsonl.is_file() and jsonl.read_text().count("\n") >= rows:
            os.kill(proc.pid, signal.SIGKILL)  # the process this test started
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def test_a_bad_csv_is_one_line_on_stderr_and_exit_2_before_any_model_loads(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,prompt\n1,a\n1,b\n")
    proc = evaluate_cli("gpu=cpu", f"evaluate.prompts=[{bad}]", f"hydra.run.dir={tmp_path / 'run'}")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip() == f"error: {bad}:3: id '1' repeats the id of line 2; ids must be unique"
    assert "loaded" not in out + err and not (tmp_path / "run" / "predictions.jsonl").exists()


def test_kill_9_mid_run_then_resume_loses_and_duplicates_no_row(tmp_path):
    rows = [[f"q{i}", f"Question number {i}?" + " pad" * (i % 5), "answer"] for i in range(30)]
    prompts = write_csv(tmp_path / "many.csv", ["id", "prompt", "reference"], rows)
    run_dir = tmp_path / "run"
    common = [f"evaluate.prompts=[{prompts}]", "generation.max_new_tokens=8", "evaluate.progress=false"]
    kill_9_after(evaluate_cli(*FAST, *common, "evaluate.batch_size=1", f"hydra.run.dir={run_dir}"), run_dir)
    done = len(store.collect(run_dir))
    assert 3 <= done < 30
    resumed = run_evaluation(evaluate_settings(compose("evaluate", [*FAST, f"resume={run_dir}", "evaluate.batch_size=8"])), tmp_path / "x")
    keys = [json.loads(line)["key"] for line in (resumed / "predictions.jsonl").read_text().splitlines()]
    assert keys == [f"many.csv#q{i}" for i in range(30)]  # every row once, in prompt order
    fresh = run_evaluation(evaluate_settings(compose("evaluate", [*FAST, *common])), tmp_path / "fresh")
    assert read_predictions(resumed) == read_predictions(fresh)


def test_two_processes_shard_rows_and_merge_to_the_one_process_output(tmp_path):
    """Lightning Fabric with two CPU processes (gloo): each answers its share of the rows into
    its own file, rank 0 merges; the result equals one process's."""
    red, blue = picture(tmp_path / "red.png"), picture(tmp_path / "blue.png", (20, 40, 220))
    rows = [[f"r{i}", f"What colour is shape {i}?", [red, blue][i % 2] if i % 3 else "", "red"] for i in range(11)]
    rows.append(["bad", "What is it?", "missing.png", "red"])
    prompts = write_csv(tmp_path / "set.csv", ["id", "prompt", "image", "reference"], rows)
    common = [*FAST, f"evaluate.prompts=[{prompts}]", "generation.max_new_tokens=5", "evaluate.batch_size=2"]
    one = run_evaluation(evaluate_settings(compose("evaluate", common)), tmp_path / "one")
    two = run_evaluation(evaluate_settings(compose("evaluate", [*common, "launch.accelerator=cpu", "launch.devices=2",
                                              "launch.strategy=ddp_spawn"])), tmp_path / "two")
    assert read_predictions(two) == read_predictions(one)
    assert (two / "predictions.jsonl").read_text() == (one / "predictions.jsonl").read_text()
    assert not (two / "shards").exists()  # merged and removed
    summary = json.loads((two / "summary.json").read_text())
    assert summary["throughput"]["processes"] == 2 and summary["counts"]["rows"] == 12
    assert summary["metrics"] == json.loads((one / "summary.json").read_text())["metrics"]
