"""Fine-tune the shipped demo (all parts) for a few hundred CPU steps on single-picture dialogues,
with position asked often (weight 2.5) or about as rarely as in the old recipe (0.15, ~2% of answers);
then held-out position accuracy and an order-blind probe of position in the Q-Former output."""
import json
import random
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # the repository root
from minigpt4.build import load_model
from minigpt4.config import compose, finetune_settings, load_spec
from minigpt4.data import dialogues, synthetic
from minigpt4.images import preprocess
from minigpt4.recipes.finetune import run as run_finetune
from minigpt4.training.heldout import heldout_accuracy

weight, steps, out = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dialogues.SINGLE_WEIGHTS["position"] = weight
cfg = compose("finetune", ["gpu=cpu", "trainer.num_workers=0", "trainer.progress_bar=false", f"output_dir={out}",
      "checkpoint=demo", "trainable=[vision_model,qformer,query_tokens,llama_proj,llm]", "data.size=100000",
      "data.multi_fraction=0", "data.text_fraction=0", "trainer.batch_size=32", f"trainer.max_steps={steps}",
      "trainer.lr.init=5e-4", "trainer.lr.min=5e-4", "trainer.lr.warmup_steps=20", "heldout.pictures=0", "seed=1"])
t = time.time(); run = run_finetune(finetune_settings(cfg)); print("train s", round(time.time() - t))
lm = load_model(load_spec(compose("chat", ["gpu=cpu", "precision=fp32", "checkpoint=demo", f"checkpoint.bundle={run}/model"])))
acc = heldout_accuracy(lm, 200, 1000, ("position", "colour", "shape", "count"))["accuracy"]
# order-blind probe: Q-Former output (16 query tokens) -> cell of a single shape (linear on flattened queries)
rng = random.Random(5); specs = []
while len(specs) < 1200:
    s = synthetic.sample_spec(rng)
    if s.count == 1: specs.append(s)
m = lm.model.eval()
with torch.no_grad():
    q = torch.cat([m.image_features(torch.stack([preprocess(synthetic.make_picture(s), lm.image_size) for s in specs[i:i+200]])) for i in range(0, 1200, 200)]).flatten(1)
y = torch.tensor([s.cells[0] for s in specs]); q = (q - q[:900].mean(0)) / (q[:900].std(0) + 1e-5)
W = torch.zeros(q.shape[1], 9, requires_grad=True); opt = torch.optim.Adam([W], 1e-2, weight_decay=1e-3)
for _ in range(300):
    loss = torch.nn.functional.cross_entropy(q[:900] @ W, y[:900]); opt.zero_grad(); loss.backward(); opt.step()
print(json.dumps({"position_weight": weight, "steps": steps, "heldout": acc, "qformer_probe_cell": ((q[900:] @ W).argmax(1) == y[900:]).float().mean().item()}))
