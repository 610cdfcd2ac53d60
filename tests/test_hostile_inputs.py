"""What a newcomer or a hostile input hits: bytes that are not UTF-8 on stdin or in a saved
conversation, a hand-edited conversation file, a directory given as an image, a pickle that would
run code. Each is one clear line (UserError) and the chat goes on."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt4.chat import ChatSession
from minigpt4.config import compose, load_spec
from minigpt4.errors import UserError
from minigpt4.generation import GenerationSettings
from minigpt4.images import load_image
from minigpt4.frontends.terminal import run_terminal

ROOT = Path(__file__).resolve().parents[1]
GREEDY = GenerationSettings(do_sample=False, max_new_tokens=4)
LATIN1 = b"caf\xe9 \xff\xfe hello\nWhat colour is it?\n/quit\n"  # the example


# ---- stdin that is not UTF-8 ----------------------------------------------------------------------
@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])  # Python's choices by locale
def test_terminal_reads_non_utf8_stdin(tiny_loaded, errors):
    stdin = io.TextIOWrapper(io.BytesIO(LATIN1), encoding="utf-8", errors=errors)
    stdout, stderr = io.StringIO(), io.StringIO()
    session = ChatSession(tiny_loaded, GREEDY)
    run_terminal(session, stdin, stdout, stderr, show_stats=False)
    assert stderr.getvalue() == ""
    questions = [h["text"] for h in session.history()[::2]]
    assert questions == ["caf\ufffd \ufffd\ufffd hello", "What colour is it?"]
    assert len(stdout.getvalue().splitlines()) == 2  # both answered


def test_tokenizer_takes_lone_surrogates(tiny_loaded):
    """They reach it from a surrogateescape stream or a "\\udce9" escape in the web page's JSON."""
    encode = tiny_loaded.tokenizer.encode
    assert encode("caf\udce9 ok") == encode("caf\ufffd ok")


@pytest.mark.slow
def test_chat_py_with_non_utf8_stdin():
    proc = subprocess.run([sys.executable, "chat.py", "gpu=cpu", "checkpoint=random", "generation.max_new_tokens=4",
                           "hydra.run.dir=" + str(ROOT / "outputs/test_chat")],
                          input=LATIN1, capture_output=True, cwd=ROOT, timeout=120, env={**os.environ, "LC_ALL": "C"},
                          check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert len(proc.stdout.splitlines()) == 2 and b"Traceback" not in proc.stderr


# ---- /load of a bad conversation file --------------------------------------------------------------
def test_load_of_a_non_utf8_file_is_one_line_and_the_chat_goes_on(tiny_loaded, tmp_path):
    bad = tmp_path / "latin1.json"
    bad.write_bytes('{"messages": [{"role": "user", "text": "café"}]}'.encode("latin-1"))
    stdout, stderr = io.StringIO(), io.StringIO()
    session = ChatSession(tiny_loaded, GREEDY)
    run_terminal(session, io.StringIO(f"Hello\n/load {bad}\nAnd then?\n"), stdout, stderr, show_stats=False)
    assert stderr.getvalue() == f"error: conversation file {bad}: not UTF-8 text (byte 0xe9 at offset 43); " \
                                "give a JSON file written by /save\n"
    assert [h["text"] for h in session.history()[::2]] == ["Hello", "And then?"]


USER_MSG = {"role": "user", "text": "Hi"}
ANSWER = {"role": "assistant", "text": "Hello"}
IMAGE_MSG = {"role": "user", "text": "<Img><ImageHere></Img> What is it?"}


@pytest.mark.parametrize("data, problem", [
    ({"messages": [USER_MSG, ANSWER, ANSWER]}, "messages 2 and 3 are both assistant messages; each answer follows a user message"),
    ({"messages": [ANSWER, USER_MSG]}, "message 1 is an assistant message; a conversation starts with a user message"),
    ({"messages": [USER_MSG, {"role": "system", "text": "x"}]}, "message 2 has role 'system'; roles are 'user' and 'assistant'"),
    ({"messages": [{"role": "user", "text": ["Hi"]}]}, 'message 1 is not {"role": ..., "text": "..."}'),
    ({"messages": "Hi"}, 'expected a JSON object with a "messages" list, as /save writes'),
    ({"messages": [IMAGE_MSG], "images": []}, 'the messages hold 1 image(s) (<ImageHere>) but "images" lists 0'),
    ({"messages": [USER_MSG], "images": ["a.png"]}, 'the messages hold 0 image(s) (<ImageHere>) but "images" lists 1'),
    ({"messages": [IMAGE_MSG], "images": [""]}, '"images" is not a list of file paths'),
    ({"messages": [USER_MSG, {"role": "assistant", "text": "<ImageHere>"}], "images": ["a.png"]},
     "message 2 is an assistant message holding an image (<ImageHere>)"),
])
def test_a_conversation_file_with_a_wrong_structure_says_what_is_wrong(tiny_loaded, tmp_path, data, problem):
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    session = ChatSession(tiny_loaded, GREEDY)
    session.ask("Hello")
    with pytest.raises(UserError) as err:
        session.load(path)
    assert str(err.value) == f"conversation file {path}: not a saved conversation ({problem})"
    assert len(session.conversation.messages) == 2  # the conversation goes on


def test_a_loaded_conversation_whose_image_is_gone_names_the_file(tiny_loaded, tmp_path):
    path = tmp_path / "conv.json"
    path.write_text(json.dumps({"messages": [IMAGE_MSG, ANSWER], "images": [str(tmp_path / "gone.png")]}))
    with pytest.raises(UserError) as err:
        ChatSession(tiny_loaded, GREEDY).load(path)
    assert str(err.value) == f"conversation file {path}: image {tmp_path / 'gone.png'}: no such file"


# ---- a directory as an image -----------------------------------------------------------------------
def test_a_directory_given_as_an_image_says_so(tmp_path):
    with pytest.raises(UserError) as err:
        load_image(tmp_path)
    assert str(err.value) == f"image {tmp_path} is a directory; give an image file in it"


# ---- pickles that would run code ---------------------------------------------------------------------
class RunsCode:
    """Unpickling this calls os.system: what weights_only=True must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _hostile(path: Path, wrap=lambda payload: {"model": {"w": payload}}) -> Path:
    torch.save(wrap(RunsCode(path.with_suffix(".ran"))), path)
    return path


REFUSED = (f"is refused: loading it would run code (it asks for the global {os.system.__module__}.system); "
           "only weight files (dicts of tensors) are accepted; re-save a trusted file's state dict")


def test_a_pickle_that_runs_code_is_refused_by_name_when_building(tmp_path):
    from minigpt4.build import load_model

    path = _hostile(tmp_path / "proj.pth")
    with pytest.raises(UserError) as err:
        load_model(load_spec(compose("chat", ["gpu=cpu", "checkpoint=random", f"checkpoint.proj={path}"])))
    assert str(err.value) == f"checkpoint.proj={path} {REFUSED}"
    assert not path.with_suffix(".ran").exists()


def test_a_pickle_that_runs_code_is_refused_by_name_by_the_weight_tools(tmp_path):
    from minigpt4.checkpoints import TensorFiles

    path = _hostile(tmp_path / "delta.bin")
    with pytest.raises(UserError) as err:
        TensorFiles(path, "--delta")
    assert str(err.value) == f"--delta={path} {REFUSED}"
    assert not path.with_suffix(".ran").exists()


def test_a_resume_checkpoint_that_runs_code_is_refused_before_training(tmp_path):
    from minigpt4.config import finetune_settings
    from minigpt4.recipes.finetune import run as run_finetune

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    _hostile(ckpt, wrap=lambda payload: {"state_dict": {}, "global_step": payload})
    cfg = finetune_settings(compose("finetune", ["gpu=cpu", "trainer.num_workers=0", "trainer.progress_bar=false",
                                                 "data.size=8", f"output_dir={tmp_path / 'out'}",
                                                 f"resume={tmp_path / 'run'}"]))
    with pytest.raises(UserError) as err:
        run_finetune(cfg)
    assert str(err.value) == f"resume={tmp_path / 'run'}: {ckpt} {REFUSED}"
    assert not ckpt.with_suffix(".ran").exists()
