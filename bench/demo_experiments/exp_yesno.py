"""Fine-tune the shipped demo (all parts) for a few hundred CPU steps on single-picture yes/no claims
(colour/shape/count/size/background/position, balanced); held-out yes/no before/after, per attribute."""
import collections
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # the repository root
from minigpt4.build import load_model
from minigpt4.config import compose, finetune_settings, load_spec
from minigpt4.data import dialogues, synthetic
from minigpt4.data.dialogues import heldout_dialogues
from minigpt4.recipes.finetune import run as run_finetune
from minigpt4.training.heldout import converse

steps, out = int(sys.argv[1]), sys.argv[2]
for k in dialogues.SINGLE_WEIGHTS: dialogues.SINGLE_WEIGHTS[k] = 0.0
dialogues.SINGLE_WEIGHTS.update(yesno=1.0, colour=0.1, shape=0.1)
def score(bundle):
    over = ["gpu=cpu", "precision=fp32", "checkpoint=demo"] + ([f"checkpoint.bundle={bundle}"] if bundle else [])
    lm = load_model(load_spec(compose("chat", over)))
    ds = heldout_dialogues("yesno", 300, 1000)
    got = converse(lm, ds)
    by = collections.defaultdict(list)
    for d, g in zip(ds, got):
        attr = synthetic.ATTRIBUTES[d[0].images[0].seed % 6]
        by[attr].append(g[-1].strip().lower() == d[-1].answer)
        by["all"].append(g[-1].strip().lower() == d[-1].answer)
    return {k: round(sum(v) / len(v), 2) for k, v in by.items()}
print("before", score(None), flush=True)
cfg = compose("finetune", ["gpu=cpu", "trainer.num_workers=0", "trainer.progress_bar=false", f"output_dir={out}",
      "checkpoint=demo", "trainable=[vision_model,qformer,query_tokens,llama_proj,llm]", "data.size=100000",
      "data.multi_fraction=0", "data.text_fraction=0", "trainer.batch_size=32", f"trainer.max_steps={steps}",
      "trainer.lr.init=5e-4", "trainer.lr.min=5e-4", "trainer.lr.warmup_steps=20", "heldout.pictures=0", "seed=1"])
t = time.time(); run = run_finetune(finetune_settings(cfg)); print("train s", round(time.time() - t))
print("after", steps, score(f"{run}/model"))
