import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # the repository root
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "tests"))  # tiny_models
from pathlib import Path

from minigpt4.build import load_model
from minigpt4.config import compose, load_spec
from minigpt4.recipes.finetune import run as run_finetune
from minigpt4.training.heldout import heldout_accuracy
from tests.test_finetune import HELDOUT, RECOVER_KINDS, RECOVER_STEPS, finetune_cfg

out = Path("/tmp/demo_experiments/recover"); 
cfg = finetune_cfg(out, "checkpoint=demo", "reinit=[llama_proj]", "data.size=2400", f"data.kinds={RECOVER_KINDS}",
                   "trainer.batch_size=12", "trainer.max_epochs=1", f"trainer.iters_per_epoch={RECOVER_STEPS}",
                   "trainer.lr.init=3e-3", "trainer.lr.warmup_steps=5", "trainer.lr.min=1e-4")
torch.manual_seed(0)
run = run_finetune(cfg)
lm = load_model(load_spec(compose("chat", ["gpu=cpu", "checkpoint=demo", f"checkpoint.proj={run / 'projection.pth'}"])))
print("30 pictures", heldout_accuracy(lm, **HELDOUT)["accuracy"])
print("200 others", heldout_accuracy(lm, 200, 1000)["accuracy"])
