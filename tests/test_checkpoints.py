"""Checkpoint files in the official, Hugging Face and own layouts load and reproduce the model
they were written from, exactly (fp32, CPU); every mistake a user can make is one clear line."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from official_files import (
    TINY_TOKENIZER,
    official_source,
    ours_to_official,
    write_blip2,
    write_eva_vit,
    write_hf_blip2_dir,
    write_official_set,
)
from tiny_models import DEMO, build_tiny

from minigpt4 import checkpoints as ck
from minigpt4.build import load_model, save_bundle
from minigpt4.config import compose, load_spec
from minigpt4.conversation import encode_prompt
from minigpt4.errors import UserError
from minigpt4.model import IMAGE_TOKEN
from minigpt4.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
FP32 = ["gpu=cpu", "precision=fp32"]
LLAMA2 = ["model.arch.qformer=null", "model.template=llama2"]


def load(*overrides: str):
    return load_model(load_spec(compose("chat", [*FP32, "checkpoint=random", *overrides])))


def outputs(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(soft tokens of the images, logits of a sequence holding the first image)."""
    with torch.inference_mode():
        soft = model.encode_images(pixels)
        ids = torch.tensor([[1, 5, 6, *[IMAGE_TOKEN] * model.num_image_tokens, 7, 8, 9]])
        return soft, model(ids, image_embeds=soft[:1]).logits


def assert_same(a_model, b_model) -> None:
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    (sa, la), (sb, lb) = outputs(a_model, pixels), outputs(b_model, pixels)
    assert torch.equal(sa, sb), f"soft tokens differ by {(sa - sb).abs().max()}"
    assert torch.equal(la, lb), f"logits differ by {(la - lb).abs().max()}"


@pytest.fixture(scope="module")
def source(tiny_loaded):
    return official_source(tiny_loaded.model)


@pytest.fixture(scope="module")
def official(source, tmp_path_factory):
    return write_official_set(source, tmp_path_factory.mktemp("official"))


def _path(overrides: list[str], key: str) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith(f"checkpoint.{key}="))


# ---- round trips -----------------------------------------------------------------------------
def test_official_files_reproduce_the_source_exactly(source, official, caplog):
    rng = torch.random.get_rng_state()
    with caplog.at_level(logging.DEBUG, logger="minigpt4.checkpoints"):
        loaded = load(*official)
    assert torch.equal(rng, torch.random.get_rng_state()), "something was randomly initialised"
    assert loaded.trained and loaded.random_parts == [] and loaded.label == "tiny"
    assert_same(source, loaded.model)
    skipped = caplog.text
    n_layers = source.vision_model.config.num_hidden_layers  # the extra (EVA-CLIP 40th-like) block
    for extra in (f"blocks.{n_layers}.attn.qkv.weight", "norm.weight", "t5_proj.weight", "Qformer.cls.predictions.bias",
                  "layer.0.intermediate.dense.weight", "word_embeddings", "position_ids", "rotary_emb.inv_freq"):
        assert extra in skipped, f"{extra} was not listed as skipped"


def test_official_files_load_with_weights_only(official):
    for key in ("vit", "qformer", "proj"):
        obj = torch.load(_path(official, key), map_location="cpu", weights_only=True)
        assert isinstance(obj, dict) and obj
    trainer = torch.load(_path(official, "proj"), weights_only=True)
    assert trainer["epoch"] == 3 and set(trainer) >= {"model", "optimizer", "scaler", "config"}


def test_fp16_stored_vit_loads_into_fp32(tiny_loaded, tmp_path):
    source = official_source(tiny_loaded.model, vit_fp16=True)
    overrides = write_official_set(source, tmp_path, vit_dtype=torch.float16)
    stored = torch.load(_path(overrides, "vit"), weights_only=True)
    assert stored["blocks.0.attn.qkv.weight"].dtype == torch.float16
    loaded = load(*overrides)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert_same(source, loaded.model)


def test_key_map_is_its_own_inverse(source):
    ours = {k: v for k, v in source.state_dict().items() if not k.startswith("llm.")}
    back = ck.official_to_ours(ours_to_official(ours), source.vision_model.config.num_hidden_layers, "test")
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)


@pytest.mark.parametrize("vit", ["null", "file"])
def test_hugging_face_blip2_directory(source, official, tmp_path, vit):
    hf = write_hf_blip2_dir(source, tmp_path / "blip2-flan-t5-xxl")
    vit_value = "null" if vit == "null" else _path(official, "vit")
    rest = [o for o in official if not o.startswith(("checkpoint.qformer=", "checkpoint.vit="))]
    loaded = load(*rest, f"checkpoint.qformer={hf}", f"checkpoint.vit={vit_value}")
    assert loaded.random_parts == []
    assert_same(source, loaded.model)


def test_hugging_face_blip2_pytorch_bin_and_as_vit(source, official, tmp_path):
    state = {k: v for k, v in source.state_dict().items() if k.startswith(("vision_model.", "qformer.", "query_tokens"))}
    (tmp_path / "hf").mkdir()
    torch.save({**state, "language_model.lm_head.weight": torch.zeros(2, 2)}, tmp_path / "hf" / "pytorch_model.bin")
    rest = [o for o in official if not o.startswith(("checkpoint.qformer=", "checkpoint.vit="))]
    loaded = load(*rest, f"checkpoint.vit={tmp_path / 'hf'}", f"checkpoint.qformer={tmp_path / 'hf'}")
    assert_same(source, loaded.model)


def test_own_format_round_trip(tiny_loaded, tmp_path):
    bundle = save_bundle(tiny_loaded, tmp_path / "bundle")
    assert (bundle / "tokenizer.model").is_file() and ck.is_bundle(bundle)
    rng = torch.random.get_rng_state()
    loaded = load(f"checkpoint.bundle={bundle}")
    assert torch.equal(rng, torch.random.get_rng_state())
    assert loaded.random_parts == [] and loaded.template == tiny_loaded.template
    assert_same(tiny_loaded.model, loaded.model)
    rotary = loaded.model.llm.model.rotary_emb
    assert torch.equal(rotary.inv_freq, tiny_loaded.model.llm.model.rotary_emb.inv_freq)


def test_own_format_records_its_schema_and_origin(official, tmp_path):
    loaded = load(*official)
    info = ck.read_bundle_info(save_bundle(loaded, tmp_path / "bundle", trained_parts=["llama_proj"]), "test")
    assert info.format == ck.BUNDLE_FORMAT and info.name == "tiny" and info.template == loaded.template.name
    assert info.sources == {k: _path(official, k) for k in ("vit", "qformer", "llm", "proj")}
    assert info.random_parts == [] and info.trained_parts == ["llama_proj"] and info.dtype == "float32"
    assert info.arch["llm"]["hidden_size"] == loaded.model.llm.config.hidden_size


@pytest.mark.parametrize("version", ["no format key", "format 1"])
def test_bundles_written_before_the_schema_version_still_load(tiny_loaded, tmp_path, version):
    """finetune.py and save_bundle wrote no "format" (the shipped demo is one), the bundle
    command "format": 1, each with fewer fields: they load as they always did."""
    bundle = save_bundle(tiny_loaded, tmp_path / "bundle")
    old = {"arch": tiny_loaded.model.config.to_dict(), "template": "vicuna_v0", "image_size": 64, "name": "tiny",
           **({"format": 1, "dtype": "fp32", "sources": {}} if version == "format 1" else {"trained_parts": ["llm"]})}
    (bundle / ck.BUNDLE_JSON).write_text(json.dumps(old))
    assert ck.read_bundle_info(bundle, "test").format == 1
    assert_same(tiny_loaded.model, load(f"checkpoint.bundle={bundle}").model)


def test_a_bundle_from_a_newer_minigpt4_or_with_broken_json_is_one_line(tiny_loaded, tmp_path):
    bundle = save_bundle(tiny_loaded, tmp_path / "bundle")
    meta = json.loads((bundle / ck.BUNDLE_JSON).read_text())
    (bundle / ck.BUNDLE_JSON).write_text(json.dumps({**meta, "format": ck.BUNDLE_FORMAT + 1}))
    with pytest.raises(UserError) as err:
        load(f"checkpoint.bundle={bundle}")
    assert f"is format {ck.BUNDLE_FORMAT + 1}, newer than this minigpt4 reads" in one_line(err)
    (bundle / ck.BUNDLE_JSON).write_text("{not json")
    with pytest.raises(UserError) as err:
        load(f"checkpoint.bundle={bundle}")
    assert one_line(err).startswith(f"checkpoint.bundle={bundle}: minigpt4.json is not valid JSON")


def test_the_shipped_demo_model_is_there_and_loads(demo_loaded):
    """The one check of minigpt4/assets/demo: every test that uses the demo model (chat, evaluate,
    engine, web, API, fine-tuning) relies on it being a complete, trained bundle."""
    assert sorted(p.name for p in DEMO.iterdir()) == ["minigpt4.json", "model.safetensors", "tokenizer.model"]
    assert ck.read_bundle_info(DEMO, "checkpoint.bundle").name == "tiny"
    assert demo_loaded.trained and demo_loaded.label == "tiny" and demo_loaded.sources == {"bundle": str(DEMO)}


def test_own_format_with_tied_embeddings(tmp_path):
    tied = build_tiny(["model.arch.llm.tie_word_embeddings=true"])
    assert tied.model.llm.lm_head.weight is tied.model.llm.get_input_embeddings().weight
    loaded = load(f"checkpoint.bundle={save_bundle(tied, tmp_path / 'tied')}")
    assert loaded.model.llm.lm_head.weight is loaded.model.llm.get_input_embeddings().weight
    assert_same(tied.model, loaded.model)


def test_projection_from_own_safetensors_or_bundle(tiny_loaded, official, tmp_path):
    bundle = save_bundle(tiny_loaded, tmp_path / "bundle")  # a full bundle: only llama_proj is taken
    proj_file = tmp_path / "proj.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny_loaded.model.llama_proj.state_dict().items()
               for k in [f"llama_proj.{k}"]}, str(proj_file))
    for proj in (bundle, proj_file):
        loaded = load(f"checkpoint.proj={proj}")
        assert torch.equal(loaded.model.llama_proj.weight, tiny_loaded.model.llama_proj.weight)
        assert loaded.random_parts == ["vision_model", "qformer", "query_tokens", "llm"]


def test_llama2_variant(tmp_path):
    random = build_tiny(LLAMA2)
    model = random.model
    assert model.qformer is None and model.num_image_tokens == 16
    width = model.vision_model.config.hidden_size
    assert tuple(model.llama_proj.weight.shape) == (192, 4 * width)  # official [4096, 5632] at tiny size
    source = official_source(model)
    overrides = write_official_set(source, tmp_path)
    assert not any(o.startswith("checkpoint.qformer=") for o in overrides)
    loaded = load(*LLAMA2, *overrides)
    assert loaded.random_parts == []  # ln_vision keeps its initial values, as officially
    assert torch.equal(loaded.model.vision_model.post_layernorm.weight, torch.ones(width))
    assert_same(source, loaded.model)

    conv = loaded.conversation()
    conv.add_image("x.png")
    conv.ask("What is it?")
    prompt = conv.prompt()
    assert "<s>[INST] <Img><ImageHere></Img> What is it? [/INST]" in prompt
    ids = encode_prompt(loaded.tokenizer.encode, prompt, model.num_image_tokens)
    bos = loaded.tokenizer.bos_id
    assert ids[0] == bos and ids.count(bos) == 2  # the first segment's BOS and the literal "<s>"
    assert ids.count(IMAGE_TOKEN) == 16


# ---- errors: one line naming the thing and the fix --------------------------------------------
def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and text
    return text


@pytest.mark.parametrize("key", ["vit", "qformer", "llm", "proj", "bundle"])
def test_missing_file_names_its_config_key(key):
    with pytest.raises(UserError) as err:
        load(f"checkpoint.{key}=/nonexistent/x")
    assert one_line(err).startswith(f"checkpoint.{key}=/nonexistent/x: ") and f"set checkpoint.{key}=" in str(err.value)


@pytest.mark.parametrize(
    "shape, name", [((4096, 768), "Vicuna-7B (model=7b)"), ((5120, 768), "Vicuna-13B (model=13b)"),
                    ((4096, 5632), "LLaMA-2-7B (model=llama2_7b)")])
def test_projection_shape_names_the_model_it_is_for(tmp_path, shape, name):
    path = tmp_path / "proj.pth"  # real shapes, stored as stride-0 views: a few hundred bytes
    torch.save({"model": {"llama_proj.weight": torch.zeros(1, 1).expand(*shape),
                          "llama_proj.bias": torch.zeros(1).expand(shape[0])}}, path)
    with pytest.raises(UserError) as err:
        load(f"checkpoint.proj={path}")
    assert f"holds a projection {list(shape)} for {name}" in one_line(err)
    assert "this model needs [192, 96]" in str(err.value)


def _not_checkpoints(tmp_path: Path) -> dict[str, Path]:
    files = {"random bytes": tmp_path / "random.pth", "text": tmp_path / "notes.pth", "zip": tmp_path / "zip.pth",
             "pickle": tmp_path / "pickle.pth"}
    files["random bytes"].write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    files["text"].write_text("this is not a checkpoint\n" * 10)
    with zipfile.ZipFile(files["zip"], "w") as z:
        z.writestr("readme.txt", "hello")
    import pickle

    files["pickle"].write_bytes(pickle.dumps({"model": {"w": Path("/")}}, protocol=2))  # refused by weights_only
    files["plain pickle"] = tmp_path / "plain.pth"  # protocol 5: the weights-only unpickler cannot read it
    files["plain pickle"].write_bytes(pickle.dumps({"w": 1}, protocol=5))
    return files


@pytest.mark.parametrize("kind", ["random bytes", "text", "zip", "pickle", "plain pickle"])
def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path, kind):
    path = _not_checkpoints(tmp_path)[kind]
    with pytest.raises(UserError) as err:
        load(f"checkpoint.proj={path}")
    if kind == "pickle":  # a global to import and call: code, refused
        assert one_line(err).startswith(f"checkpoint.proj={path} is refused: loading it would run code "
                                        "(it asks for the global pathlib.PosixPath)")
    else:
        assert one_line(err).startswith(f"checkpoint.proj={path} is not a PyTorch checkpoint")
    assert "PyTorch 2.6" not in str(err.value)  # the reason, not torch's advice to load it unsafely


def test_other_unreadable_inputs(tmp_path, official):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    torch.save({"model": {"epoch": 3}}, tmp_path / "not_tensors.pth")
    (tmp_path / "empty_llm").mkdir()
    (tmp_path / "no_tok").mkdir()
    (tmp_path / "no_tok" / "config.json").write_text("{}")
    cases = {
        f"checkpoint.proj={tmp_path / 'bad.safetensors'}": "is not a readable safetensors file",
        f"checkpoint.proj={tmp_path / 'not_tensors.pth'}": "is not a state dict of tensors",
        f"checkpoint.llm={tmp_path / 'empty_llm'}": "no tokenizer.model in it",
        f"checkpoint.qformer={tmp_path / 'empty_llm'}": "no BLIP-2 weights",
        f"checkpoint.proj={tmp_path / 'empty_llm'}": "no model.safetensors in this directory",
    }
    for override, message in cases.items():
        with pytest.raises(UserError) as err:
            load(override)
        assert message in one_line(err), override
    (tmp_path / "empty_llm" / "tokenizer.model").write_bytes(TINY_TOKENIZER.read_bytes())
    with pytest.raises(UserError, match="not a Hugging Face model directory"):
        load(f"checkpoint.llm={tmp_path / 'empty_llm'}")


def test_a_training_checkpoint_given_as_weights_says_what_it_is(tiny_loaded, tmp_path):
    state = {f"model.{k}": v for k, v in tiny_loaded.model.state_dict().items() if k.startswith("llama_proj.")}
    torch.save({"state_dict": state, "global_step": 6, "optimizer_states": [], "pytorch-lightning_version": "2"},
               tmp_path / "last.ckpt")
    with pytest.raises(UserError) as err:
        load(f"checkpoint.proj={tmp_path / 'last.ckpt'}")
    assert "is a finetune.py training checkpoint" in one_line(err) and "projection.pth" in str(err.value)


def test_unknown_and_missing_keys(source, tmp_path):
    state = torch.load(write_eva_vit(source, tmp_path / "vit.pth"), weights_only=True)
    torch.save({**state, "decoder.head.weight": torch.zeros(2)}, tmp_path / "unknown.pth")
    with pytest.raises(UserError) as err:
        load(f"checkpoint.vit={tmp_path / 'unknown.pth'}")
    assert "unexpected keys ['decoder.head.weight']" in one_line(err)

    blip2 = write_blip2(source, tmp_path / "blip2.pth", drop=("query_tokens", "Qformer.bert.embeddings.LayerNorm.bias"))
    with pytest.raises(UserError) as err:
        load(f"checkpoint.qformer={blip2}")
    assert "lacks 2 of the" in one_line(err) and "query_tokens" in str(err.value)

    del state["blocks.1.attn.v_bias"]
    torch.save(state, tmp_path / "no_v_bias.pth")
    with pytest.raises(UserError, match="block 1 has \\['q_bias'\\] but needs both"):
        load(f"checkpoint.vit={tmp_path / 'no_v_bias.pth'}")


def test_qformer_file_for_the_llama2_variant(source, tmp_path):
    blip2 = write_blip2(source, tmp_path / "blip2.pth")
    with pytest.raises(UserError, match="set checkpoint.qformer=null"):
        load(*LLAMA2, f"checkpoint.qformer={blip2}")


def test_tokenizer_larger_than_the_llm(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=512))
    small.save_pretrained(tmp_path / "llm")
    (tmp_path / "llm" / "tokenizer.model").write_bytes(TINY_TOKENIZER.read_bytes())
    with pytest.raises(UserError) as err:
        load(f"checkpoint.llm={tmp_path / 'llm'}")
    pieces = Tokenizer(TINY_TOKENIZER).vocab_size
    assert pieces > 512 and f"tokenizer has {pieces} pieces but the LLM only 512 rows" in one_line(err)


def test_no_traceback_reaches_the_user(tmp_path):
    """The entry script turns a UserError into one line on stderr and exit code 2."""
    run = subprocess.run(
        [sys.executable, "chat.py", "gpu=cpu", "checkpoint.llm=/nonexistent/vicuna", "chat.prompt=hi",
         f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, run.stderr
    assert lines == [("error: checkpoint.llm=/nonexistent/vicuna: no such file or directory; "
                      "set checkpoint.llm=/path/to/it (or MINIGPT4_WEIGHTS)")], run.stderr


# ---- no random initialisation of weights a file provides --------------------------------------
def test_no_random_init_of_file_provided_weights(official, monkeypatch):
    from torch import nn
    from transformers.models.blip_2.modeling_blip_2 import Blip2PreTrainedModel

    calls: list[str] = []

    def counting(original, label):
        def wrapper(self, *args, **kwargs):
            target = args[0] if args else self
            if any(not p.is_meta for p in target.parameters(recurse=False)):
                calls.append(f"{label}:{type(target).__name__}")
            return original(self, *args, **kwargs)
        return wrapper

    for cls in (nn.Linear, nn.LayerNorm, nn.Embedding, nn.Conv2d):
        monkeypatch.setattr(cls, "reset_parameters", counting(cls.reset_parameters, cls.__name__))
    monkeypatch.setattr(Blip2PreTrainedModel, "_init_weights",
                        counting(Blip2PreTrainedModel._init_weights, "Blip2._init_weights"))
    load(*official)
    assert calls == []
    load()  # the counters do count: a random model initialises every part
    assert any(c.startswith("Linear") for c in calls) and any("Blip2" in c for c in calls)


def test_llm_directory_loads_without_accelerate(source, official, monkeypatch):
    """Without `accelerate` transformers refuses device_map: the LLM then comes through CPU memory."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else find_spec(name, *a))
    assert_same(source, load(*official).model)
    with pytest.raises(UserError, match=r"precision=bnb-int8 needs (bitsandbytes and )?accelerate: pip install -e '.\[quant\]'"):
        load_model(load_spec(compose("chat", ["gpu=cpu", "precision=bnb-int8", *official])))
