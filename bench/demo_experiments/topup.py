"""What exp_same_bg.py and exp_same_scaffold.py share: a CPU top-up of the shipped demo (all parts,
batch 64, cosine to 1e-5) on the data mix as the caller has patched it, then the full held-out set."""
import json
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # the repository root
from minigpt4.build import load_model
from minigpt4.config import compose, finetune_settings, load_spec
from minigpt4.data import dialogues
from minigpt4.recipes.finetune import run as run_finetune
from minigpt4.training.heldout import heldout_accuracy


def top_up_and_score(steps: int, lr: float, out: str, data_seed: int) -> dict:
    """Fine-tune checkpoint=demo for `steps`, print and return the held-out accuracy per kind."""
    cfg = compose("finetune", ["experiment=demo", "gpu=cpu", "precision=fp32", "vision_position_std=null", "checkpoint=demo",
          "trainer.num_workers=1", "trainer.progress_bar=false", f"output_dir={out}", "data.size=200000",
          f"data.seed={data_seed}", "trainer.batch_size=64", f"trainer.max_steps={steps}", "trainer.max_epochs=1",
          "trainer.max_time=null", f"trainer.lr.init={lr}", "trainer.lr.min=1e-5", "trainer.lr.warmup_steps=20",
          "trainer.lr.warmup_start=1e-6", "heldout.pictures=0", "seed=1"])
    t = time.time()
    run = run_finetune(finetune_settings(cfg))
    print("train s", round(time.time() - t), flush=True)
    lm = load_model(load_spec(compose("chat", ["gpu=cpu", "precision=fp32", "checkpoint=demo", f"checkpoint.bundle={run}/model"])))
    accuracy = heldout_accuracy(lm, 300, 1000, dialogues.ALL_KINDS)["accuracy"]
    print(json.dumps({"steps": steps, "lr": lr, "accuracy": accuracy}), flush=True)
    return accuracy
