"""python -m minigpt4.weights: apply-delta, inspect, bundle, export-hf on tiny generated checkpoints."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from official_files import (
    TINY_TOKENIZER,
    official_source,
    ours_to_official,
    write_official_set,
)
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from minigpt4 import checkpoints as ck
from minigpt4.build import load_model
from minigpt4.checkpoints import TensorFiles
from minigpt4.config import compose, load_spec, to_container
from minigpt4.conversation import encode_prompt
from minigpt4.errors import UserError
from minigpt4.weights.__main__ import main
from minigpt4.weights.bundle import bundle
from minigpt4.weights.delta import apply_delta
from minigpt4.weights.export import export_hf, hf_input_ids
from minigpt4.weights.identify import inspect_path

FP32_CPU = ["gpu=cpu", "precision=fp32"]
TINY = to_container(compose("chat", ["model=tiny"]).model.arch)  # tests follow conf/model/tiny.yaml
H, VIT_LAYERS = TINY["llm"]["hidden_size"], TINY["vision"]["num_hidden_layers"]


# ---- fixtures ----------------------------------------------------------------------------------
def _llama(directory: Path, vocab: int, seed: int = 0, delta: bool = False, tokenizer: Path | None = TINY_TOKENIZER,
           bin_shards: bool = False, **config) -> Path:
    """A Llama directory in fp16 with model=tiny's LLM shapes (unless `config` says otherwise):
    LLaMA-like weights (norms near 1), or delta-like ones (all near 0)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY["llm"], "vocab_size": vocab, **config})
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.002 if delta else 0.02) + (0 if delta or "norm" not in name else 1))
    model = model.half()
    if bin_shards:  # the 2023 layout: pytorch_model-0000i-of-00002.bin + index
        directory.mkdir(parents=True)
        state = model.state_dict()
        names = list(state)
        index = {}
        for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
            file = f"pytorch_model-0000{i + 1}-of-00002.bin"
            torch.save({k: state[k].clone() for k in part}, directory / file)
            index.update({k: file for k in part})
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
        cfg.save_pretrained(directory)
    else:
        model.save_pretrained(directory)
    if tokenizer:
        shutil.copy(tokenizer, directory / "tokenizer.model")
    return directory


def _fastchat_reference(base_dir: Path, delta_dir: Path) -> dict[str, torch.Tensor]:
    """FastChat 0.1.10's apply_delta, literally (in memory): fp16 models, base resized by one
    [PAD] row set to 0, then param += delta for every base tensor."""
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float16)
    delta = LlamaForCausalLM.from_pretrained(delta_dir, dtype=torch.float16)
    base.resize_token_embeddings(base.config.vocab_size + 1, mean_resizing=False)
    base.get_input_embeddings().weight.data[-1:] = 0
    base.get_output_embeddings().weight.data[-1:] = 0
    for name, param in base.state_dict().items():
        param.data += delta.state_dict()[name]
    return base.state_dict()


@pytest.fixture(scope="module")
def pieces() -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(TINY_TOKENIZER)).get_piece_size()


@pytest.fixture(scope="module")
def official(tiny_loaded, tmp_path_factory) -> tuple[list[str], object]:
    """The tiny model written as the four official files; (checkpoint overrides, source model)."""
    source = official_source(tiny_loaded.model)
    return write_official_set(source, tmp_path_factory.mktemp("official")), source


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or p.name.endswith(".old")]


# ---- apply-delta ---------------------------------------------------------------------------------
def test_apply_delta_equals_fastchat_0_1_10(tmp_path, pieces):
    base = _llama(tmp_path / "llama", pieces, bin_shards=True)  # .bin shards, as 2023 conversions were
    delta = _llama(tmp_path / "delta", pieces + 1, seed=1, delta=True)
    (delta / "tokenizer_config.json").write_text('{"from": "delta"}')
    target = apply_delta(base, delta, tmp_path / "vicuna", max_shard_bytes=400_000, progress=False)

    reference = _fastchat_reference(base, delta)
    files = TensorFiles(target)
    assert sorted(files.names()) == sorted(reference)
    for name, tensor in reference.items():  # bit-identical, including the [PAD] row = delta's row
        assert torch.equal(files.get(name), tensor), name
    assert torch.equal(files.get("model.embed_tokens.weight")[-1],
                       TensorFiles(delta).get("model.embed_tokens.weight")[-1])
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    config = json.loads((target / "config.json").read_text())
    assert config["vocab_size"] == pieces + 1 and config["torch_dtype"] == "float16"
    assert json.loads((target / "tokenizer_config.json").read_text()) == {"from": "delta"}
    assert (target / "tokenizer.model").read_bytes() == TINY_TOKENIZER.read_bytes()
    assert _leftovers(tmp_path) == []
    # the result is a usable checkpoint.llm for the tiny architecture
    lm = load_model(load_spec(compose("chat", [*FP32_CPU, "checkpoint=random", f"checkpoint.llm={target}"])))
    assert lm.model.llm.config.vocab_size == pieces + 1 and "llm" not in lm.random_parts


def test_apply_delta_checks_everything_before_writing(tmp_path, pieces):
    base = _llama(tmp_path / "llama", pieces)
    delta = _llama(tmp_path / "delta", pieces + 1, seed=1, delta=True)
    big_base = _llama(tmp_path / "llama-big", pieces, hidden_size=H + 64)
    deep_base = _llama(tmp_path / "llama-deep", pieces, num_hidden_layers=TINY["llm"]["num_hidden_layers"] + 1)
    target = tmp_path / "vicuna"
    cases = [
        (big_base, delta, f"base tensor lm_head.weight is [{pieces}, {H + 64}] but the delta's is [{pieces + 1}, {H}]"),
        (deep_base, delta, f"model.layers.{TINY['llm']['num_hidden_layers']}."),
        (delta, base, "lm_head.weight"),  # swapped: the vocabulary check fires first
        (base, base, "same directory"),
        (tmp_path / "nowhere", delta, "no such directory"),
    ]
    for b, d, needle in cases:
        with pytest.raises(UserError, match=re.escape(needle)):
            apply_delta(b, d, target, progress=False)
    # a merged model given as the delta: the norm heuristic refuses it
    merged = _llama(tmp_path / "merged", pieces + 1, seed=2)
    with pytest.raises(UserError, match="looks like full weights"):
        apply_delta(base, merged, target, progress=False)
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "params.json").write_text("{}")
    with pytest.raises(UserError, match="convert_llama_weights_to_hf"):
        apply_delta(tmp_path / "meta", delta, target, progress=False)
    assert not target.exists() and _leftovers(tmp_path) == []


def test_apply_delta_failure_midway_leaves_no_target(tmp_path, pieces, monkeypatch):
    base = _llama(tmp_path / "llama", pieces)
    delta = _llama(tmp_path / "delta", pieces + 1, seed=1, delta=True)
    calls = {"n": 0}
    real_get = TensorFiles.get

    def flaky(self, name):
        calls["n"] += 1
        if calls["n"] > 12:
            raise OSError("disk read error")
        return real_get(self, name)

    monkeypatch.setattr(TensorFiles, "get", flaky)
    with pytest.raises(OSError):
        apply_delta(base, delta, tmp_path / "vicuna", max_shard_bytes=100_000, progress=False)
    assert not (tmp_path / "vicuna").exists() and _leftovers(tmp_path) == []


# ---- inspect -------------------------------------------------------------------------------------
def test_inspect_official_files(official, tmp_path):
    overrides, _ = official
    paths = dict(o.removeprefix("checkpoint.").split("=", 1) for o in overrides if o.startswith("checkpoint."))
    vit = inspect_path(paths["vit"], model="tiny")
    assert vit.kind == "eva_vit" and f"{VIT_LAYERS + 1} blocks" in vit.title and vit.fits  # + EVA-CLIP's last
    assert any("final norm" in n for n in vit.notes) and any(f"block {VIT_LAYERS} " in w for w in vit.warnings)
    blip2 = inspect_path(paths["qformer"], model="tiny")
    assert blip2.kind == "blip2" and blip2.fits and any("t5_proj" in n for n in blip2.notes)
    assert inspect_path(paths["qformer"], model="llama2_7b").fits is False
    proj = inspect_path(paths["proj"], model="tiny")
    assert proj.kind == "projection" and proj.fits and any("optimizer" in n for n in proj.notes)
    llm = inspect_path(paths["llm"], model="tiny")
    assert llm.kind == "llama" and llm.fits and any(k.startswith("model.layers.{i}.") for k in llm.keys)
    layers = TINY["llm"]["num_hidden_layers"]
    assert f"num_hidden_layers is {layers}" in " ".join(inspect_path(paths["llm"], model="7b").problems)

    # the users' most common error: the 7B projection with model=13b
    seven = tmp_path / "prerained_minigpt4_7b.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(1, 1).expand(4096, 768),
                          "llama_proj.bias": torch.zeros(1).expand(4096)}}, seven)
    report = inspect_path(seven, model="13b")
    assert "Vicuna-7B (model=7b)" in report.title and report.fits is False
    assert "model=13b needs [5120, 768]" in report.problems[0]
    assert inspect_path(seven, model="7b").fits


def test_inspect_llama_versions(tmp_path, pieces):
    small = {"hidden_size": 8, "num_hidden_layers": 1}  # only shapes matter here
    v0 = inspect_path(_llama(tmp_path / "v0", 32001, tokenizer=None, **small))
    assert "32001 embedding rows" in v0.title and any("Vicuna v0" in n for n in v0.notes)
    assert any("no tokenizer.model" in n for n in v0.notes)
    llama2 = inspect_path(_llama(tmp_path / "l2", 32000, max_position_embeddings=4096, **small))
    assert any("LLaMA-2 family" in n for n in llama2.notes)
    llama1 = inspect_path(_llama(tmp_path / "l1", 32000, max_position_embeddings=2048, **small))
    assert any("cannot tell them apart" in n for n in llama1.notes)
    delta = inspect_path(_llama(tmp_path / "d", pieces + 1, delta=True, **small), model="tiny")
    assert "DELTA" in delta.title and any("apply-delta" in p for p in delta.problems)
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "consolidated.00.pth").write_bytes(b"")
    assert inspect_path(tmp_path / "meta").kind == "meta_llama"


def test_inspect_says_what_a_file_is_when_it_is_not_a_weight_part(tiny_loaded, tmp_path, capsys):
    """Files users point inspect at that are not one part: a tokenizer, a whole model in one file
    (ours or official names), finetune.py's Lightning checkpoint, a pickle without tensors."""
    assert main(["inspect", str(TINY_TOKENIZER), "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "sentencepiece tokenizer" in out and "checkpoint.llm" in out and "FITS" in out
    assert inspect_path(TINY_TOKENIZER, model="tiny").kind == "tokenizer"

    state = {k: v.clone() for k, v in tiny_loaded.model.state_dict().items()}
    bundle_dir = ck.write_bundle(state, tmp_path / "bundle", ck.BundleInfo(name="tiny"))
    whole = inspect_path(bundle_dir / ck.BUNDLE_WEIGHTS, model="tiny")
    assert whole.kind == "model" and "not a projection" in whole.title and "LLM" in whole.title and whole.fits
    assert any(f"checkpoint.bundle={bundle_dir}" in n for n in whole.notes)
    official = tmp_path / "whole_official.pth"
    torch.save({"model": ours_to_official(state)}, official)
    report = inspect_path(official, model="tiny")
    assert report.kind == "model" and "official key names" in " ".join(report.notes) and report.fits

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "last.ckpt"  # the top-level keys Lightning writes
    torch.save({"epoch": 1, "global_step": 6, "pytorch-lightning_version": "2.6.6",
                "state_dict": {f"model.{k}": v for k, v in state.items() if k.startswith("llama_proj.")},
                "loops": {}, "callbacks": {}, "optimizer_states": [{"state": {}, "param_groups": []}],
                "lr_schedulers": [{"last_epoch": 6}]}, ckpt)
    ck.save_official_projection(state, run / "projection.pth")
    lightning = inspect_path(ckpt, model="tiny")
    assert lightning.kind == "lightning" and "step 6" in lightning.title and lightning.fits
    assert any(f"resume={run}" in n for n in lightning.notes)
    assert any(f"checkpoint.proj={run / 'projection.pth'}" in n for n in lightning.notes)
    assert inspect_path(ckpt, model="7b").fits is False

    empty = tmp_path / "empty.pth"
    torch.save({"step": 3}, empty)
    assert "without tensors" in inspect_path(empty).title


# ---- bundle --------------------------------------------------------------------------------------
def test_bundle_round_trip(official, tmp_path, capsys):
    overrides, _ = official
    out = tmp_path / "bundle"
    assert main(["bundle", *FP32_CPU, *overrides, "--out", str(out), "--dtype", "fp32", "--max-shard-gb", "0.002"]) == 0
    assert "checkpoint.bundle=" in capsys.readouterr().out
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "tokenizer.model").is_file()
    meta = json.loads((out / ck.BUNDLE_JSON).read_text())
    assert meta["arch"]["llm"]["hidden_size"] == H and meta["sources"]["vit"].endswith("eva_vit_g.pth")

    official_lm = load_model(load_spec(compose("chat", [*FP32_CPU, *overrides])))
    bundled = load_model(load_spec(compose("chat", [*FP32_CPU, "checkpoint=bundle", f"checkpoint.bundle={out}"])))
    assert bundled.trained and bundled.template.name == official_lm.template.name
    want, got = official_lm.model.state_dict(), bundled.model.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    rope = dict(bundled.model.named_buffers())["llm.model.rotary_emb.inv_freq"]
    assert torch.equal(rope, dict(official_lm.model.named_buffers())["llm.model.rotary_emb.inv_freq"])
    report = inspect_path(out, model="tiny")
    assert report.kind == "own" and report.fits

    with pytest.raises(SystemExit) as exit_info:  # not over an existing bundle without --force
        main(["bundle", *FP32_CPU, *overrides, "--out", str(out)])
    assert exit_info.value.code == 2 and "--force" in capsys.readouterr().err


def test_bundle_fp16_is_the_inference_layout_and_refuses_random_parts(official, tmp_path):
    overrides, _ = official
    out = bundle([*FP32_CPU, *overrides], tmp_path / "b16", dtype="fp16")
    state = load_file(str(out / ck.BUNDLE_WEIGHTS))
    assert state["llm.model.embed_tokens.weight"].dtype == torch.float16
    assert state["vision_model.encoder.layers.0.mlp.fc1.weight"].dtype == torch.float16
    assert state["vision_model.post_layernorm.weight"].dtype == torch.float32  # ln_vision stays fp32
    assert state["llama_proj.weight"].dtype == torch.float32
    no_proj = [o for o in overrides if not o.startswith("checkpoint.proj=")]
    with pytest.raises(UserError, match="llama_proj would be random"):
        bundle([*FP32_CPU, *no_proj], tmp_path / "b2")
    assert not (tmp_path / "b2").exists()


@pytest.mark.gpu
def test_bundle_reads_straight_to_gpu(official, tmp_path):
    overrides, _ = official
    out = bundle([*FP32_CPU, *overrides], tmp_path / "bundle", dtype="fp16")
    state, _ = ck.read_bundle(out, "checkpoint.bundle", device="cuda:0")
    assert all(t.is_cuda for t in state.values())
    lm = load_model(load_spec(compose("chat", ["gpu=0", "checkpoint=bundle", f"checkpoint.bundle={out}"])))
    assert lm.model.llm.lm_head.weight.is_cuda and lm.trained


# ---- export-hf -----------------------------------------------------------------------------------
def test_export_hf_gives_the_same_logits(official, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    overrides, _ = official
    out = export_hf([*FP32_CPU, *overrides], tmp_path / "hf", dtype="fp32")
    ours = load_model(load_spec(compose("chat", [*FP32_CPU, *overrides])))
    hf = Blip2ForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    info = json.loads((out / "minigpt4_export.json").read_text())
    assert info["image_token_id"] == hf.config.image_token_id == ours.tokenizer.vocab_size

    conv = ours.conversation()
    conv.add_image("picture")
    conv.ask("What is in the picture?")
    ids = encode_prompt(ours.tokenizer.encode, conv.prompt(), ours.model.num_image_tokens)
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, ours.image_size, ours.image_size)
    hf_ids = torch.tensor([hf_input_ids(ids, info["image_token_id"])])
    with torch.no_grad():
        want = ours.model(torch.tensor([ids]), pixel_values=pixels).logits  # [1,T,V]
        v = want.shape[-1]
        as_loaded = hf(input_ids=hf_ids, pixel_values=pixels).logits[..., :v]  # ln_vision eps 1e-6
        hf.vision_model.post_layernorm.eps = info["ln_vision_eps"]
        exact = hf(input_ids=hf_ids, pixel_values=pixels).logits[..., :v]
        new = hf.generate(input_ids=hf_ids, pixel_values=pixels, max_new_tokens=1, do_sample=False)
    assert (exact - want).abs().max() < 1e-5  # everything else is identical
    assert (as_loaded - want).abs().max() < 1e-3  # the eps difference alone (measured ~2e-6 here)
    assert new[0, -1].item() == want[0, -1].argmax().item()


def test_export_hf_uses_vicuna_v0s_spare_row(official, tmp_path, pieces):
    """With FastChat's [PAD] row (rows = pieces + 1) the image placeholder is that row: no resizing."""
    overrides, _ = official
    v0 = _llama(tmp_path / "vicuna-v0", pieces + 1)
    overrides = [o for o in overrides if not o.startswith("checkpoint.llm=")] + [f"checkpoint.llm={v0}"]
    out = export_hf([*FP32_CPU, *overrides], tmp_path / "hf", dtype="fp32")
    config = json.loads((out / "config.json").read_text())
    assert config["image_token_index"] == pieces and config["text_config"]["vocab_size"] == pieces + 1
    state = TensorFiles(out)
    assert state.info["language_model.model.embed_tokens.weight"].shape == (pieces + 1, H)
    proj = next(o.split("=", 1)[1] for o in overrides if o.startswith("checkpoint.proj="))
    assert torch.equal(state.get("language_projection.weight"), TensorFiles(proj).get("llama_proj.weight"))


def test_export_hf_refuses_the_llama2_variant(tmp_path):
    with pytest.raises(UserError, match="no Q-Former"):
        export_hf(["model=llama2_7b", "gpu=cpu"], tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_cli_errors_are_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(tmp_path / "missing.pth")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "no such file" in err
