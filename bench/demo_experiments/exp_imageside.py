"""Can the tiny image side (ViT -> Q-Former, order-blind cross-attention) learn WHERE a shape is?
Train ViT + Q-Former + a linear head on the 16 query outputs to predict the 3x3 occupancy of
synthetic pictures (multi-label), from scratch (tiny.yaml init), on CPU; report single-shape cell
accuracy on held-out pictures every 100 steps. Pictures pre-rendered once (pool)."""
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # the repository root
import os

from minigpt4.build import load_model
from minigpt4.config import compose, load_spec
from minigpt4.data import synthetic
from minigpt4.images import preprocess

torch.manual_seed(int(os.environ.get("SEED", "0")))
init, steps, lr, target, pos_std = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], float(sys.argv[5])
IMAGE = int(os.environ.get("IMAGE", "64"))  # the ViT's input size (patch 8): 64 is the demo's
lm = load_model(load_spec(compose("chat", ["gpu=cpu", "precision=fp32", f"checkpoint={init}", f"model.image_size={IMAGE}",
                                           f"model.arch.vision.image_size={IMAGE}"])))
m = lm.model
def sincos(grid, dim):
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float), torch.arange(grid, dtype=torch.float), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float) / (dim // 4))
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        out = coord[:, None] * omega[None]
        parts += [torch.sin(out), torch.cos(out)]
    return torch.cat([torch.zeros(1, dim), torch.cat(parts, 1)])[None]
if pos_std > 0:
    with torch.no_grad(): m.vision_model.embeddings.position_embedding.normal_(0, pos_std)
elif pos_std < 0:
    with torch.no_grad(): m.vision_model.embeddings.position_embedding.copy_(sincos(IMAGE // 8, 128) * -pos_std)
m.set_trainable(["vision_model", "qformer", "query_tokens"]); m.train()
def pool(n, seed):
    specs = synthetic.sample_specs(n, seed)
    px = torch.stack([preprocess(synthetic.make_picture(s), IMAGE) for s in specs])
    occ = torch.zeros(n, 9)
    for i, s in enumerate(specs):
        if target == "colour": occ[i, list(synthetic.COLOURS).index(s.colour)] = 1
        elif target == "shape": occ[i, synthetic.SHAPES.index(s.shape)] = 1
        else: occ[i, list(s.cells)] = 1
    return specs, px, occ
t = time.time(); tr_specs, tr_px, tr_occ = pool(6000, 11); te_specs, te_px, te_occ = pool(600, 12); print("pool s", round(time.time() - t))
head = torch.nn.Linear(16 * 96, 9)
params = [p for p in m.parameters() if p.requires_grad] + list(head.parameters())
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
single = torch.tensor([s.count == 1 for s in te_specs])
for step in range(1, steps + 1):
    b = torch.randint(0, len(tr_px), (64,))
    logits = head(m.image_features(tr_px[b]).flatten(1))
    loss = (torch.nn.functional.cross_entropy(logits[:, :4], tr_occ[b, :4].argmax(1)) if target == "shape"
            else torch.nn.functional.binary_cross_entropy_with_logits(logits, tr_occ[b]))
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 100 == 0:
        with torch.no_grad():
            m.eval(); out = head(m.image_features(te_px).flatten(1)); m.train()
        if target == "shape":  # one of 4 classes (the head's other outputs unused): small and large shapes apart
            right = (out[:, :4].argmax(1) == te_occ[:, :4].argmax(1)).float()
            small = torch.tensor([s.size == "small" for s in te_specs])
            print(f"step {step} loss {loss.item():.3f} shape {right.mean().item():.2f} small {right[small].mean().item():.2f} "
                  f"large {right[~small].mean().item():.2f} ({time.time() - t:.0f}s)", flush=True)
            continue
        exact = ((out > 0).float() == te_occ).all(1).float()
        cell = (out[single].argmax(1) == te_occ[single].argmax(1)).float().mean().item()
        print(f"step {step} loss {loss.item():.3f} occupancy exact {exact.mean().item():.2f} single cell {cell:.2f} ({time.time() - t:.0f}s)", flush=True)
