"""Top up the shipped 96-px demo on CPU: all kinds, "same" asked more and half of it about backgrounds."""
import json, sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # the repository root
from minigpt4.build import load_model
from minigpt4.config import compose, finetune_settings, load_spec
from minigpt4.data import dialogues
from minigpt4.recipes.finetune import run as run_finetune
from minigpt4.training.heldout import heldout_accuracy

steps, lr, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
original = dialogues.multi_turn
def multi_turn(pictures, kind, rng, mix=dialogues.Mix()):
    if kind == "same" and rng.random() < 0.5:
        want = rng.choice(("yes", "no")); n = len(pictures)
        options = [(x, y) for x in range(n) for y in range(x + 1, n)
                   if (pictures[x].background == pictures[y].background) == (want == "yes")]
        if options:
            x, y = rng.choice(options)
            q, a = dialogues.same_question(pictures, x, y, "background", rng)
            return dialogues.Turn(q, a, kind)
    return original(pictures, kind, rng, mix)
dialogues.multi_turn = multi_turn
dialogues.MULTI_WEIGHTS["same"] = 3.0
dialogues.FOLLOW_UP["same"] = 2.0
cfg = compose("finetune", ["experiment=demo", "gpu=cpu", "precision=fp32", "vision_position_std=null", "checkpoint=demo",
      "trainer.num_workers=1", "trainer.progress_bar=false", f"output_dir={out}", "data.size=200000", "data.seed=7",
      "trainer.batch_size=64", f"trainer.max_steps={steps}", "trainer.max_epochs=1", "trainer.max_time=null",
      f"trainer.lr.init={lr}", "trainer.lr.min=1e-5", "trainer.lr.warmup_steps=20", "trainer.lr.warmup_start=1e-6",
      "heldout.pictures=0", "seed=1"])
t = time.time(); run = run_finetune(finetune_settings(cfg)); print("train s", round(time.time() - t), flush=True)
lm = load_model(load_spec(compose("chat", ["gpu=cpu", "precision=fp32", "checkpoint=demo", f"checkpoint.bundle={run}/model"])))
r = heldout_accuracy(lm, 300, 1000, dialogues.ALL_KINDS)
print(json.dumps({"steps": steps, "lr": lr, "accuracy": r["accuracy"]}), flush=True)
