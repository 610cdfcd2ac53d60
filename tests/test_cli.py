"""The three entry scripts as a user types them: free text on the command line, one-line errors
for overrides Hydra cannot take, a project --help, and no folders for runs that keep nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from minigpt4.config import ROOT, compose, evaluate_settings
from minigpt4.recipes.evaluate import run as run_evaluation
from test_evaluate import FAST, write_csv

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start(script: str, *args: str, cwd: Path = ROOT) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=cwd, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


def test_free_text_arrives_as_typed_and_bad_overrides_are_one_line():
    prompt = "Hi, what's this? (a \"${x}\" test!) \\"
    procs = [start("chat.py", f"chat.prompt={prompt}", "chat.system=Be brief!", "--cfg", "job", "--resolve"),
             start("chat.py", "gpu=a!"), start("evaluate.py", "model=8b"), start("finetune.py", "trainable=[llm,")]
    (rc, out, err), *bad = [finish(p) for p in procs]
    assert rc == 0, err
    chat = yaml.safe_load(out)["chat"]  # printed resolved: ${x} is text, not an interpolation
    assert chat["prompt"] == prompt and chat["system"] == "Be brief!"
    expected = ["error: gpu=a!: Hydra cannot read this value; quote it: \"gpu='a!'\"",
                "error: model=8b: no such option; choose model=13b|7b|llama2_7b|tiny",
                "error: trainable=[llm,: Hydra cannot read this value; quote each item that holds special "
                "characters: \"trainable=[plain,'an (odd) one!']\""]
    for (rc, out, err), line in zip(bad, expected):
        assert (rc, out, err) == (2, "", line + "\n")


def test_help_is_the_projects():
    """--help: usage lines, the main keys, where the docs are; not Hydra's dump of every group."""
    procs = {name: start(f"{name}.py", "--help") for name in ("chat", "evaluate", "finetune")}
    outs = {}
    for name, proc in procs.items():
        rc, outs[name], err = finish(proc)
        out = outs[name]
        assert rc == 0 and err == "", err
        assert out.startswith(f"python {name}.py [KEY=VALUE ...]: ") and "Main keys" in out
        assert "Configuration groups" not in out and "hydra/" not in out  # Hydra's generic dump
        assert f"Hydra's own options: python {name}.py --hydra-help" in out
        for doc in out.split("Docs: ")[1].splitlines()[0].split(", "):
            assert Path(doc).is_file(), doc
    for command in ("/image PATH", "/reset", "/save FILE", "/load FILE", "/help", "/quit"):
        assert command in outs["chat"]
    assert "chat.prompt=TEXT" in outs["chat"] and "resume=RUN" in outs["evaluate"] and "data=" in outs["finetune"]


@pytest.mark.slow
def test_one_shot_chat_leaves_no_files(tmp_path):
    rc, out, err = finish(start("chat.py", "gpu=cpu", "chat.prompt=Hello!", "generation=greedy",
                                "generation.max_new_tokens=4", cwd=tmp_path))
    assert rc == 0, err
    assert out.strip() and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no outputs/chat/DATE/TIME/{chat.log,.hydra}


@pytest.mark.slow
def test_resume_and_score_only_log_into_their_run_and_create_no_folder(tmp_path):
    prompts = write_csv(tmp_path / "p.csv", ["id", "prompt", "reference"], [["1", "Hello", "hi"], ["2", "Two?", "2"]])
    run_dir = run_evaluation(evaluate_settings(compose("evaluate", [*FAST, f"evaluate.prompts=[{prompts}]",
                                                                    "generation.max_new_tokens=2"])),
                             tmp_path / "run")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for args in (["score_only=../run", "evaluate.metrics=[contains]"],
                 ["resume=../run", "gpu=cpu", "evaluate.progress=false"]):
        rc, out, err = finish(start("evaluate.py", *args, cwd=cwd))
        assert rc == 0, err
        assert out.strip().endswith("results: ../run")
    assert list(cwd.iterdir()) == []  # no outputs/evaluate/DATE/TIME with only .hydra and a log
    assert not (run_dir / ".hydra").exists()  # the run's files are not overwritten either
    log = (run_dir / "evaluate.log").read_text()
    assert "resuming ../run" in log and log.count("results in ../run") == 2
    assert len(log.splitlines()) == len(set(log.splitlines()))  # each line once


@pytest.mark.slow
def test_finetune_resume_and_output_dir_create_no_other_folder(tmp_path):
    """finetune.py output_dir=DIR, then resume=DIR: everything (Hydra's log too) goes to DIR."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    common = ["gpu=cpu", "data.size=24", "trainer.batch_size=4", "trainer.num_workers=0", "heldout.pictures=0"]
    rc, _, err = finish(start("finetune.py", *common, "trainer.max_steps=2", "output_dir=../run", cwd=cwd))
    assert rc == 0, err
    rc, _, err = finish(start("finetune.py", *common, "trainer.max_steps=3", "resume=../run", cwd=cwd))
    assert rc == 0, err
    assert list(cwd.iterdir()) == []  # no outputs/finetune/DATE/TIME with only .hydra and a log
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / ".hydra" / "overrides.yaml").is_file()
    assert "output_dir=../run" in (run / ".hydra" / "overrides.yaml").read_text()  # the first run's, kept
    assert (run / "finetune.log").stat().st_size > 0
