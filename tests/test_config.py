"""Hydra configuration: every model x checkpoint composes, the command line works as typed,
one environment variable moves all weight paths, devices and precisions are validated."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from minigpt4.config import CONF_DIR, compose, resolve_device, resolve_precision
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
    """`python chat.py --cfg job model=7b gpu=0` prints the composed config (no GPU needed)."""
    env = {**os.environ, "MINIGPT4_WEIGHTS": "/data/w"}
    run = subprocess.run([sys.executable, "chat.py", "--cfg", "job", "--resolve", "model=7b", "gpu=0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    cfg = OmegaConf.create(run.stdout)
    assert cfg.gpu == 0 and cfg.model.name == "7b" and cfg.weights_root == "/data/w"
    assert {k: cfg.checkpoint[k] for k in OFFICIAL_7B} == {k: f"/data/w/{v}" for k, v in OFFICIAL_7B.items()}
    assert "gpu: 0\n" in run.stdout


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
def test_precisions():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("auto", cpu) == (torch.float32, None)
    assert resolve_precision("auto", gpu) == (torch.float16, None)
    assert resolve_precision("bf16", cpu) == (torch.bfloat16, None)
    assert resolve_precision("fp16", gpu) == (torch.float16, None)
    assert resolve_precision("int8", gpu) == (torch.float16, "int8")
    assert resolve_precision("int4", cpu) == (torch.float32, "int4")
    with pytest.raises(UserError, match="precision=fp16 needs a GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(UserError, match="precision=fp8: choose auto, fp32, fp16, bf16, int8 or int4"):
        resolve_precision("fp8", cpu)


def test_bf16_on_cpu_runs():
    from conftest import build_tiny

    loaded = build_tiny(["precision=bf16"])
    assert loaded.model.llm.dtype == torch.bfloat16
    assert loaded.model.llama_proj.weight.dtype == torch.float32  # official: projection in fp32
    assert loaded.model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert loaded.model.vision_model.embeddings.position_embedding.dtype == torch.float32
    soft = loaded.model.encode_images(torch.zeros(1, 3, 64, 64))
    assert soft.dtype == torch.bfloat16 and torch.isfinite(soft.float()).all()


def test_quantisation_needs_an_llm_directory():
    with pytest.raises(UserError, match="precision=int8 quantises a loaded LLM: set checkpoint.llm="):
        from minigpt4.build import load_model

        load_model(compose("chat", ["gpu=cpu", "precision=int8", "checkpoint=random"]))


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantised_llm_through_bitsandbytes(tiny_loaded, tmp_path, quant):
    """int8/int4 build a BitsAndBytesConfig; bitsandbytes 0.50 runs on CPU (it needs accelerate)."""
    from official_files import write_llama_dir

    from minigpt4.build import load_model

    llm = write_llama_dir(tiny_loaded.model, tmp_path / "llm")
    cfg = compose("chat", ["gpu=cpu", f"precision={quant}", "checkpoint=random", f"checkpoint.llm={llm}"])
    missing = [m for m in ("bitsandbytes", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        with pytest.raises(UserError, match=f"precision={quant} needs {' and '.join(missing)}: pip install"):
            load_model(cfg)
        return
    loaded = load_model(cfg)
    assert loaded.model.llm.is_quantized
    quant_cfg = loaded.model.llm.config.quantization_config
    assert (quant_cfg.load_in_8bit if quant == "int8" else quant_cfg.load_in_4bit)
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
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
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
