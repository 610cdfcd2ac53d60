"""Does the ViT token CONTENT carry position (what a Q-Former can pool), or only the token index?"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from single_shapes import demo_and_pictures

m, specs, px = demo_and_pictures()
with torch.no_grad():
    vit = torch.cat([m.vision_model(pixel_values=px[i:i+200]).last_hidden_state for i in range(0, len(px), 200)])
torch.save({"vit": vit, "cells": [s.cells[0] for s in specs]}, "/tmp/demo_experiments/vit.pt")
y = torch.tensor([s.cells[0] for s in specs]); ntr = 1800
# (1) one token's content -> its own patch index (64 classes), background tokens included
tok = vit[:ntr, 1:, :].reshape(-1, 128); idx = torch.arange(64).repeat(ntr)
sel = torch.randperm(len(tok))[:20000]
W = torch.nn.Linear(128, 64); opt = torch.optim.Adam(W.parameters(), 1e-2)
for _ in range(300):
    loss = torch.nn.functional.cross_entropy(W(tok[sel]), idx[sel]); opt.zero_grad(); loss.backward(); opt.step()
tt = vit[ntr:, 1:, :].reshape(-1, 128); ti = torch.arange(64).repeat(len(vit) - ntr)
print("token content -> own patch index:", (W(tt).argmax(1) == ti).float().mean().item())
# (2) permutation-invariant attention pooling (a 1-query, 1-layer 'Q-Former') -> cell
class Pool(torch.nn.Module):
    def __init__(s):
        super().__init__(); s.q = torch.nn.Parameter(torch.randn(4, 128) * .02); s.k = torch.nn.Linear(128, 128); s.v = torch.nn.Linear(128, 128); s.o = torch.nn.Linear(4 * 128, 9)
    def forward(s, x):
        a = torch.softmax(torch.einsum("qd,bnd->bqn", s.q, s.k(x)) / 128 ** .5, -1)
        return s.o(torch.einsum("bqn,bnd->bqd", a, s.v(x)).flatten(1))
for shuffle in (False, True):
    x = vit.clone()
    if shuffle:  # shuffle token order: only content survives (a Q-Former is order-blind anyway)
        x = torch.stack([r[torch.randperm(65)] for r in x])
    p = Pool(); opt = torch.optim.Adam(p.parameters(), 3e-3)
    for _ in range(400):
        b = torch.randint(0, ntr, (256,))
        loss = torch.nn.functional.cross_entropy(p(x[b]), y[b]); opt.zero_grad(); loss.backward(); opt.step()
    print(f"attention-pool probe -> cell (tokens shuffled={shuffle}):", (p(x[ntr:]).argmax(1) == y[ntr:]).float().mean().item())
