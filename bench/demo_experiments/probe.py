"""Linear probes on the shipped demo model's image side: is position present in ViT / Q-Former / soft tokens?"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from single_shapes import demo_and_pictures

from minigpt4.data import synthetic

m, specs, px = demo_and_pictures()
feats = {}
with torch.no_grad():
    vit, qf = [], []
    for i in range(0, len(px), 200):
        v = m.vision_model(pixel_values=px[i:i+200]).last_hidden_state
        q = m.qformer(query_embeds=m.query_tokens.expand(len(v), -1, -1), encoder_hidden_states=v,
                      encoder_attention_mask=torch.ones(v.shape[:-1], dtype=torch.long)).last_hidden_state
        vit.append(v); qf.append(q)
    feats["pixels"] = px.flatten(1)
    feats["vit"] = torch.cat(vit).flatten(1)
    feats["qformer"] = torch.cat(qf).flatten(1)
    feats["soft"] = m.llama_proj(torch.cat(qf)).flatten(1)
labels = {"cell": [s.cells[0] for s in specs], "colour": [list(synthetic.COLOURS).index(s.colour) for s in specs],
          "shape": [synthetic.SHAPES.index(s.shape) for s in specs], "row": [s.cells[0] // 3 for s in specs],
          "col": [s.cells[0] % 3 for s in specs]}
ntr = 1800
for name, x in feats.items():
    x = (x - x[:ntr].mean(0)) / (x[:ntr].std(0) + 1e-5)
    out = []
    for lab, y in labels.items():
        y = torch.tensor(y)
        k = int(y.max()) + 1
        W = torch.zeros(x.shape[1], k, requires_grad=True); b = torch.zeros(k, requires_grad=True)
        opt = torch.optim.Adam([W, b], lr=1e-2, weight_decay=1e-3)
        for _ in range(300):
            loss = torch.nn.functional.cross_entropy(x[:ntr] @ W + b, y[:ntr]); opt.zero_grad(); loss.backward(); opt.step()
        acc = ((x[ntr:] @ W + b).argmax(1) == y[ntr:]).float().mean().item()
        out.append(f"{lab} {acc:.2f}")
    print(name, x.shape[1], " ".join(out), flush=True)
