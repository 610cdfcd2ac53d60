"""How many steps does the tiny Llama (tiny.yaml, random init) need to learn token EQUALITY?
Text only: "The circle is green. Is it red?" -> yes/no (balanced). Loss on the answer token."""
import random
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # the repository root
from transformers import LlamaConfig, LlamaForCausalLM

from minigpt4.config import ASSETS
from minigpt4.tokenizer import Tokenizer

torch.manual_seed(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
lr, steps = float(sys.argv[1]), int(sys.argv[2])
tok = Tokenizer(ASSETS / "tiny_tokenizer.model")
cfg = LlamaConfig(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, vocab_size=1024, max_position_embeddings=256, rms_norm_eps=1e-6)
m = LlamaForCausalLM(cfg)
C = ["red", "green", "blue", "yellow", "purple", "orange"]; S = ["circle", "square", "star", "triangle"]
yes, no = tok.encode("yes")[-1], tok.encode("no")[-1]
def sample(rng):
    a = rng.choice(C); true = rng.random() < 0.5; c = a if true else rng.choice([x for x in C if x != a]); s = rng.choice(S)
    return tok.encode(f"The {s} is {a}. Is the {s} {c}?###Assistant:", bos=True), yes if true else no
opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.05)
rng = random.Random(0); t = time.time()
for step in range(1, steps + 1):
    items = [sample(rng) for _ in range(64)]
    L = max(len(x) for x, _ in items)
    ids = torch.tensor([[0] * (L - len(x)) + x for x, _ in items]); mask = (torch.arange(L)[None] >= torch.tensor([L - len(x) for x, _ in items])[:, None]).long()
    logits = m(input_ids=ids, attention_mask=mask).logits[:, -1]
    y = torch.tensor([a for _, a in items])
    loss = torch.nn.functional.cross_entropy(logits, y)
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 100 == 0:
        acc = (logits.argmax(-1) == y).float().mean().item()
        print(f"lr {lr} step {step} loss {loss.item():.3f} acc {acc:.2f} ({time.time()-t:.0f}s)", flush=True)
