"""Fine-tuning on CPU with the shipped demo model (tiny): it learns, resumes, exports, skips bad rows.

The runs are short (at most 200 steps); held-out accuracy is measured on pictures from a seed the
training data never uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch

from minigpt4.build import load_model
from minigpt4.config import compose
from minigpt4.conversation import encode_prompt
from minigpt4.data import synthetic
from minigpt4.train import prepare_model, run_finetune
from minigpt4.training.data import FinetuneDataModule
from minigpt4.training.heldout import heldout_accuracy
from minigpt4.training.module import FinetuneModule, lr_at

QUICK = ["gpu=cpu", "trainer.num_workers=0", "trainer.progress_bar=false", "trainer.log_every_n_steps=1"]
# Projection re-learnt from scratch with everything else frozen: RECOVER_STEPS steps of batch 12 at
# lr 3e-3 (cached features). Measured with the shipped demo (docs/FINETUNE.md, "Tests"): 0.19
# before, 0.97 after on these 30 pictures (0.94 on 200 others); 150 steps reached only 0.81.
RECOVER_STEPS = 200
RECOVER_THRESHOLD = 0.85
HELDOUT = dict(pictures=30, seed=4242)


def finetune_cfg(tmp_path: Path, *overrides: str):
    return compose("finetune", [*QUICK, f"output_dir={tmp_path}", *overrides])


@pytest.fixture(scope="module")
def recovered(tmp_path_factory):
    """A projection re-initialised and fine-tuned alone: (run dir, accuracy before, summary)."""
    out = tmp_path_factory.mktemp("recover")
    cfg = finetune_cfg(out, "checkpoint=demo", "reinit=[llama_proj]", "data.size=2400", "trainer.batch_size=12",
                       "trainer.max_epochs=1", f"trainer.iters_per_epoch={RECOVER_STEPS}",
                       "trainer.lr.init=3e-3", "trainer.lr.warmup_steps=5", "trainer.lr.min=1e-4")
    torch.manual_seed(0)
    before = heldout_accuracy(prepare_model(cfg, torch.device("cpu")), **HELDOUT)["accuracy"]["all"]
    run_dir = run_finetune(cfg)
    return run_dir, before, json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_projection_only_finetune_recovers_heldout_accuracy(recovered):
    run_dir, before, summary = recovered
    assert summary["cache_features"] is True and summary["global_step"] == RECOVER_STEPS
    assert summary["trainable"] == ["llama_proj"]
    lm = load_model(compose("chat", ["gpu=cpu", "checkpoint=demo", f"checkpoint.proj={run_dir / 'projection.pth'}"]))
    after = heldout_accuracy(lm, **HELDOUT)["accuracy"]
    assert before < 0.5, f"a re-initialised projection should not know the pictures ({before})"
    assert after["all"] >= RECOVER_THRESHOLD, after


@pytest.mark.slow
def test_both_export_formats_load_to_identical_outputs(recovered):
    run_dir, _, _ = recovered
    official = torch.load(run_dir / "projection.pth", weights_only=True)
    assert set(official) == {"model"} and set(official["model"]) == {"llama_proj.weight", "llama_proj.bias"}
    outputs = []
    for proj in ("projection.pth", "projection.safetensors"):
        lm = load_model(compose("chat", ["gpu=cpu", "checkpoint=demo", f"checkpoint.proj={run_dir / proj}"]))
        assert torch.equal(lm.model.llama_proj.weight, official["model"]["llama_proj.weight"])
        spec = synthetic.sample_specs(1, seed=9)[0]
        conv = lm.conversation()
        conv.add_image(spec)
        conv.ask("What colour is it?")
        ids = torch.tensor([encode_prompt(lm.tokenizer.encode, conv.prompt(), lm.model.num_image_tokens)])
        with torch.inference_mode():
            outputs.append(lm.model(ids, image_embeds=lm.encode_images([synthetic.make_picture(spec)])).logits)
    assert torch.equal(outputs[0], outputs[1])


def test_resume_continues_from_the_saved_step(tmp_path):
    common = ["data.size=48", "trainer.batch_size=4", "trainer.iters_per_epoch=3", "trainer.lr.warmup_steps=2"]
    first = run_finetune(finetune_cfg(tmp_path / "a", *common, "trainer.max_epochs=1"))
    second = run_finetune(finetune_cfg(tmp_path / "b", *common, "trainer.max_epochs=2", f"resume={first}"))
    summary = json.loads((second / "summary.json").read_text())
    assert summary["global_step"] == 6 and summary["resumed_from"].endswith("last.ckpt")
    steps = [int(s) for s in pd.read_csv(second / "metrics.csv")["step"].dropna()]
    assert min(steps) == 3 and max(steps) == 5  # the second run only did steps 3..5
    ckpt = torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == {"model.llama_proj.weight", "model.llama_proj.bias"}  # trainable only
    assert ckpt["global_step"] == 6
    adam = ckpt["optimizer_states"][0]["state"]
    assert all(int(s["step"]) == 6 for s in adam.values())  # the optimizer state went on, too
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 6


def test_bad_rows_are_skipped_and_counted(tmp_path):
    root = tmp_path / "cc_sbu_align"
    (root / "image").mkdir(parents=True)
    specs = synthetic.sample_specs(8, seed=2)
    for i, spec in enumerate(specs):
        synthetic.make_picture(spec, 64).save(root / "image" / f"{i}.png")
    (root / "image" / "8.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    anns = [{"image_id": str(i), "caption": synthetic.describe(s)} for i, s in enumerate(specs)]
    anns += [{"image_id": "8", "caption": "unreadable"}, {"image_id": "9", "caption": "missing"},
             {"image_id": "0", "caption": ""}]
    (root / "filter_cap.json").write_text(json.dumps({"annotations": anns}))
    for cache in ("true", "false"):
        run_dir = run_finetune(finetune_cfg(tmp_path / cache, "data=cc_sbu_align", f"data.path={root}",
                                            f"cache_features={cache}", "trainer.batch_size=4",
                                            "trainer.max_epochs=2", "trainer.iters_per_epoch=null"))
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["rows"] == 11 and len(summary["skipped_rows"]) == 3, summary["skipped_rows"]
        assert summary["global_step"] == 4  # 8 good rows, batch 4, 2 epochs


def test_frozen_parts_stay_in_eval_mode_during_training(tmp_path):
    cfg = finetune_cfg(tmp_path, "trainable=[llama_proj,llm]", "data.size=8", "trainer.batch_size=4",
                       "trainer.max_epochs=1")
    lm = prepare_model(cfg, torch.device("cpu"))
    seen = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            m = module.model
            seen.append((m.vision_model.training, m.qformer.training, m.llama_proj.training, m.llm.training))

    data = FinetuneDataModule(cfg, lm.model, lm.tokenizer, lm.template, lm.image_size, cache_features=False)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Probe()])
    trainer.fit(FinetuneModule(lm.model, cfg.trainer), datamodule=data)
    assert seen and all(s == (False, False, True, True) for s in seen)
    assert not lm.model.vision_model.embeddings.patch_embedding.weight.requires_grad
    assert lm.model.llm.model.layers[0].mlp.up_proj.weight.requires_grad


def test_official_schedule_and_weight_decay_groups():
    warm = [lr_at(s, 1000, 3e-5, 1e-5, 1e-6, 200) for s in (0, 100, 200, 600, 1000)]
    assert warm[0] == pytest.approx(1e-6) and warm[2] == pytest.approx(3e-5) and warm[-1] == pytest.approx(1e-5)
    assert warm[1] == pytest.approx((1e-6 + 3e-5) / 2) and warm[3] == pytest.approx(2e-5)
    from minigpt4.training.module import param_groups

    lm = prepare_model(compose("finetune", ["gpu=cpu", "trainable=[qformer,llama_proj]"]), torch.device("cpu"))
    decay, no_decay = param_groups(lm.model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert any(p is lm.model.llama_proj.weight for p in decay["params"])
    assert any(p is lm.model.llama_proj.bias for p in no_decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"]) and all(p.ndim >= 2 for p in decay["params"])


def test_bad_config_is_one_line_error(tmp_path):
    from minigpt4.errors import UserError

    with pytest.raises(UserError, match="trainable"):
        run_finetune(finetune_cfg(tmp_path, "trainable=[eyes]"))
    with pytest.raises(UserError, match="resume"):
        run_finetune(finetune_cfg(tmp_path, f"resume={tmp_path / 'nope'}"))
