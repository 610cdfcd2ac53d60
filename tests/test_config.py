"""Hydra configuration: every model x checkpoint composes, the command line works as typed,
one environment variable moves all weight paths, devices and precisions are validated."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from minigpt4.config import CONF_DIR, FREE_TEXT_KEYS, compose, load_spec
from minigpt4.devices import resolve_device, resolve_precision
from minigpt4.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
CHECKPOINTS = sorted(p.stem for p in (CONF_DIR / "checkpoint").glob("*.yaml"))
OFFICIAL_7B = {"vit": "eva_vit_g.pth", "qformer": "blip2_pretrained_flant5xxl.pth", "llm": "vicuna-7b-v0",
               "proj": "prerained_minigpt4_7b.pth"}


def test_the_expected_groups_exist():
    assert {"tiny", "7b", "13b", "llama2_7b"} <= set(MODELS)
    assert {"random", "bundle", "official_7b", "official_13b", "official_llama2_7b", "7b", "13b", "llama2_7b"} <= set(CHECKPOINTS)


@pytest.mark.parametrize("model", MODELS)
def test_every_model_and_checkpoint_composes_and_resolves(model):
    for checkpoint in CHECKPOINTS:
        extra = ["checkpoint.bundle=/some/bundle"] if checkpoint == "bundle" else []
        cfg = compose("chat", [f"model={model}", f"checkpoint={checkpoint}", *extra])
        plain = OmegaConf.to_container(cfg, resolve=True)
        assert set(plain["checkpoint"]) >= {"bundle", "vit", "qformer", "llm", "proj"}, (model, checkpoint)
        assert plain["model"]["name"] == model and plain["model"]["template"]


def test_model_defaults_pick_their_official_checkpoint():
    for model, llm in (("7b", "vicuna-7b-v0"), ("13b", "vicuna-13b-v0"), ("llama2_7b", "Llama-2-7b-chat-hf")):
        ckpt = compose("chat", [f"model={model}"]).checkpoint
        assert ckpt.llm.endswith("/" + llm)
    assert compose("chat", ["model=llama2_7b"]).checkpoint.qformer is None
    assert compose("chat", ["model=13b"]).checkpoint.proj.endswith("/pretrained_minigpt4.pth")


def test_weights_root_environment_variable(monkeypatch):
    monkeypatch.delenv("MINIGPT4_WEIGHTS", raising=False)
    assert compose("chat", ["model=7b"]).checkpoint.vit == "weights/eva_vit_g.pth"
    monkeypatch.setenv("MINIGPT4_WEIGHTS", "/data/minigpt4")
    ckpt = compose("chat", ["model=7b"]).checkpoint
    assert {k: ckpt[k] for k in OFFICIAL_7B} == {k: f"/data/minigpt4/{v}" for k, v in OFFICIAL_7B.items()}
    assert compose("chat", ["model=7b", "weights_root=/elsewhere"]).checkpoint.llm == "/elsewhere/vicuna-7b-v0"


def test_chat_cfg_job_exactly_as_typed():
    """The README's `python chat.py --cfg job --resolve model=7b gpu=0` prints the composed config
    with the resolved paths it promises (no GPU needed)."""
    line = next(l for l in (ROOT / "README.md").read_text().splitlines() if "# shows the resolved paths" in l)
    command = shlex.split(line.split("#")[0])
    assert command[:2] == ["python", "chat.py"] and "--resolve" in command
    env = {**os.environ, "MINIGPT4_WEIGHTS": "/data/w"}
    run = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    cfg = OmegaConf.create(run.stdout)
    assert cfg.gpu == 0 and cfg.model.name == "7b" and cfg.weights_root == "/data/w"
    assert {k: cfg.checkpoint[k] for k in OFFICIAL_7B} == {k: f"/data/w/{v}" for k, v in OFFICIAL_7B.items()}
    assert "gpu: 0\n" in run.stdout


# ---- the command line as typed ------------------------------------------------------------------
TYPED = ["Hello!", "What's this?", "Hi, what can you do?", 'He said "no" (twice), then: ok?', "${oc.env:HOME}",
         "\\${x} \\\\${y}", "a\\b\\", "it\\'s", "null", "", "[1,2]", "key=value", "line 1\nline 2", "100% sure \u2713"]


@pytest.mark.parametrize("text", TYPED)
def test_free_text_keys_take_any_text_exactly_as_typed(text):
    """chat.prompt, chat.system and chat.system_text_only (and evaluate.py's benchmark.prompt) are
    sentences, not Hydra syntax."""
    chat_keys = [key for key in FREE_TEXT_KEYS if key.startswith("chat.")]
    cfg = compose("chat", [f"{key}={text}" for key in chat_keys])
    assert [OmegaConf.select(cfg, key) for key in chat_keys] == [text] * 3
    assert OmegaConf.to_container(cfg, resolve=True)["chat"]["prompt"] == text


@pytest.mark.parametrize("override, message", [
    ("gpu=a!", "gpu=a!: Hydra cannot read this value; quote it: \"gpu='a!'\""),
    ("checkpoint.proj=/w/it's (1).pth", "checkpoint.proj=/w/it's (1).pth: Hydra cannot read this value; "
                                        "quote it: \"checkpoint.proj='/w/it\\\\'s (1).pth'\""),
    ("chat.images=[a.png,b (1).png]", "chat.images=[a.png,b (1).png]: Hydra cannot read this value; quote each "
                                      "item that holds special characters: \"chat.images=[plain,'an (odd) one!']\""),
    ("hello", "'hello' is not KEY=VALUE: write e.g. model=7b or gpu=cpu (python chat.py --help lists the keys)"),
    ("chat.promt=hi", "chat.promt: no such key in this config; check its spelling (python chat.py --help lists "
                      "the main keys; +chat.promt=hi would add it)"),
    ("model=8b", "model=8b: no such option; choose model=13b|7b|llama2_7b|tiny"),
    ("gpu=0,1", "gpu=0,1: a comma makes a list or a sweep; write gpu=[0,1] for a list, or quote it for one value: "
                "\"gpu='0,1'\""),
])
def test_a_bad_override_is_one_line_with_the_fix(override, message):
    with pytest.raises(UserError) as err:
        compose("chat", [override])
    assert str(err.value) == message
    if "quote it: " in message:  # the fix, typed into a shell, gives the value that was meant
        fixed = shlex.split(message.split("quote it: ")[1])[0]
        key, value = override.split("=", 1)
        assert OmegaConf.select(compose("chat", [fixed]), key) == value
    if "item that holds" in message:  # the example, typed into a shell, is a list of two items
        assert compose("chat", shlex.split(message.split(": ")[-1])).chat.images == ["plain", "an (odd) one!"]


# ---- devices ------------------------------------------------------------------------------------
def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(compose("chat", ["gpu=cpu"]).gpu) == torch.device("cpu")
    for bad in ("abc", "cuda:x", "-1", []):
        with pytest.raises(UserError, match="gpu="):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU is visible to this process: use gpu=cpu"):
            resolve_device(compose("chat", ["gpu=0"]).gpu)
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device(compose("chat", ["gpu=[0,1]"]).gpu)


# ---- precision ----------------------------------------------------------------------------------
def _dtype_quant(precision):
    return precision.dtype, precision.quant


def test_precisions():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert _dtype_quant(resolve_precision("auto", cpu)) == (torch.float32, None)
    assert _dtype_quant(resolve_precision("auto", gpu)) == (torch.float16, None)
    assert _dtype_quant(resolve_precision("bf16", cpu)) == (torch.bfloat16, None)
    assert _dtype_quant(resolve_precision("fp16", gpu)) == (torch.float16, None)
    assert _dtype_quant(resolve_precision("int8", gpu)) == (torch.float16, "int8")
    assert _dtype_quant(resolve_precision("int4", cpu)) == (torch.float32, "int4")
    with pytest.raises(UserError, match="precision=fp16 needs a GPU"):
        resolve_precision("fp16", cpu)
    assert _dtype_quant(resolve_precision("bnb-nf4", gpu)) == (torch.float16, "bnb-nf4")
    with pytest.raises(UserError, match="precision=fp8: choose auto, fp32, fp16, bf16, int8, int4, bnb-int8 or bnb-nf4"):
        resolve_precision("fp8", cpu)
    # the same setting is Lightning's precision when fine-tuning (trainable parts keep fp32 master weights)
    assert [resolve_precision(p, gpu).lightning for p in ("auto", "fp16", "bf16", "fp32", "int8")] == [
        "16-mixed", "16-mixed", "bf16-mixed", "32-true", "16-mixed"]
    assert resolve_precision("auto", cpu).lightning == "32-true"


def test_bf16_on_cpu_runs():
    from tiny_models import build_tiny

    loaded = build_tiny(["precision=bf16"])
    assert loaded.model.llm.dtype == torch.bfloat16
    assert loaded.model.llama_proj.weight.dtype == torch.float32  # official: projection in fp32
    assert loaded.model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert loaded.model.vision_model.embeddings.position_embedding.dtype == torch.float32
    soft = loaded.model.encode_images(torch.zeros(1, 3, 64, 64))
    assert soft.dtype == torch.bfloat16 and torch.isfinite(soft.float()).all()


def test_bitsandbytes_needs_an_llm_directory():
    with pytest.raises(UserError, match="precision=bnb-int8 quantises a loaded LLM: set checkpoint.llm="):
        from minigpt4.build import load_model

        load_model(load_spec(compose("chat", ["gpu=cpu", "precision=bnb-int8", "checkpoint=random"])))


@pytest.mark.parametrize("quant", ["bnb-int8", "bnb-nf4"])
def test_quantised_llm_through_bitsandbytes(tiny_loaded, tmp_path, quant):
    """bnb-int8/bnb-nf4 build a BitsAndBytesConfig; bitsandbytes 0.50 runs on CPU (it needs accelerate)."""
    from official_files import write_llama_dir

    from minigpt4.build import load_model

    llm = write_llama_dir(tiny_loaded.model, tmp_path / "llm")
    cfg = compose("chat", ["gpu=cpu", f"precision={quant}", "checkpoint=random", f"checkpoint.llm={llm}"])
    missing = [m for m in ("bitsandbytes", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        with pytest.raises(UserError, match=f"precision={quant} needs {' and '.join(missing)}: pip install"):
            load_model(load_spec(cfg))
        return
    loaded = load_model(load_spec(cfg))
    assert loaded.model.llm.is_quantized
    quant_cfg = loaded.model.llm.config.quantization_config
    assert (quant_cfg.load_in_8bit if quant == "bnb-int8" else quant_cfg.load_in_4bit)
    with torch.inference_mode():
        ids = torch.tensor([[1, 5, 6, 7]])
        ref = tiny_loaded.model(ids).logits
        out = loaded.model(ids).logits.float()
    assert out.shape == ref.shape and torch.isfinite(out).all()


# ---- the Python API as docs/API.md shows it ---------------------------------------------------
def test_docs_api_examples_run(tmp_path, monkeypatch):
    """Runs every Python block of docs/API.md in order on the tiny model (CPU, short answers)."""
    import re

    from PIL import Image

    doc = (ROOT / "docs" / "API.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL)
    assert len(blocks) >= 3
    code = "\n".join(blocks)
    as_typed = '["model=7b", "gpu=0"]'
    assert as_typed in code
    code = code.replace(as_typed, '["gpu=cpu", "generation.max_new_tokens=6"]')
    code = code.replace("max_new_tokens=50", "max_new_tokens=6")
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 48), (200, 30, 30)).save("cat.jpg")
    Image.new("RGBA", (30, 40), (20, 30, 200, 128)).save("dog.png")
    scope: dict = {}
    exec(compile(code, "docs/API.md", "exec"), scope)  # noqa: S102 - our own documentation
    model = scope["loaded"].model
    assert scope["soft"].shape == (2, model.num_image_tokens, model.llm.config.hidden_size)
    assert scope["logits"].shape[:2] == (1, len(scope["ids"]))
    assert scope["reply"].n_tokens >= 1 and isinstance(scope["out"][0].text, str)
    assert (tmp_path / "weights" / "my-minigpt4" / "minigpt4.json").is_file()
    assert scope["loaded"].random_parts == []  # reloaded from the bundle: nothing random any more


# ---- CPU threads (conf/base.yaml cpu_threads) ---------------------------------------------------
def test_cpu_threads_auto_is_one_thread_for_a_small_model_on_the_cpu(monkeypatch):
    """Measured (docs/CHAT.md, "CPU threads"): on 2 busy cores the demo ran 5-20x faster on one."""
    from tiny_models import build_tiny

    from minigpt4 import build

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        build_tiny()  # cpu_threads: auto
        assert torch.get_num_threads() == 1
        build_tiny(["cpu_threads=3"])
        assert torch.get_num_threads() == 3
        monkeypatch.setattr(build, "SMALL_MODEL_PARAMETERS", 1000)  # a big model keeps torch's default
        build_tiny()
        assert torch.get_num_threads() == 3
        monkeypatch.undo()
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # so does a user's explicit OMP_NUM_THREADS
        torch.set_num_threads(2)
        build_tiny()
        assert torch.get_num_threads() == 2
        for bad in ("0", "many", "2.5"):
            with pytest.raises(UserError, match=rf"^cpu_threads={bad}: use auto or a number of threads"):
                build_tiny([f"cpu_threads={bad}"])
    finally:
        torch.set_num_threads(1)  # conftest's setting


# ---- optional extras ----------------------------------------------------------------------------
def test_logger_wandb_without_the_extra_is_one_line_before_the_run(monkeypatch, tmp_path):
    import re

    from minigpt4.config import evaluate_settings, finetune_settings
    from minigpt4.recipes.evaluate import run as run_evaluation
    from minigpt4.recipes.finetune import run as run_finetune

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if `pip install -e '.[wandb]'` had not run
    message = "^" + re.escape("logger=wandb needs wandb: pip install -e '.[wandb]'") + "$"
    with pytest.raises(UserError, match=message):
        run_evaluation(evaluate_settings(compose("evaluate", ["gpu=cpu", "logger=wandb"])), tmp_path / "evaluate")
    with pytest.raises(UserError, match=message):
        run_finetune(finetune_settings(compose("finetune", ["gpu=cpu", "logger=wandb",
                                                            f"output_dir={tmp_path / 'finetune'}"])))
    assert not (tmp_path / "evaluate").exists() and not (tmp_path / "finetune").exists()  # nothing started
