"""LLM-side only: the demo's image side frozen (features cached once), LLM + projection fine-tuned
on colour yes/no claims in a given answer format; held-out claim accuracy every 100 steps."""
import random
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # the repository root
from minigpt4.build import load_model
from minigpt4.config import compose, load_spec
from minigpt4.conversation import (
    Conversation,
    encode_dialogue,
    encode_prompt,
    pad_batch,
)
from minigpt4.data import synthetic
from minigpt4.generation import GenerationSettings, generate
from minigpt4.images import preprocess

torch.manual_seed(0)
fmt, steps, lr, prior = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
lm = load_model(load_spec(compose("chat", ["gpu=cpu", "precision=fp32", "checkpoint=demo"])))
m, tok = lm.model, lm.tokenizer
m.set_trainable(["llama_proj", "llm"]); m.train()
def feats(specs):
    with torch.no_grad():
        return torch.cat([m.image_features(torch.stack([preprocess(synthetic.make_picture(s), lm.image_size) for s in specs[i:i+256]])) for i in range(0, len(specs), 256)])
t = time.time()
train_specs, test_specs = synthetic.sample_specs(4000, 21), synthetic.sample_specs(300, 22)
F, TF = feats(train_specs), feats(test_specs); print("features", round(time.time() - t), flush=True)
def claim(spec, rng, true):
    c = spec.colour if true else rng.choice([x for x in synthetic.COLOURS if x != spec.colour])
    q = f"Is the {spec.noun} {c}?" if spec.count == 1 else f"Are the {spec.noun} {c}?"
    if fmt == "yesno": a = "yes" if true else "no"
    elif fmt == "explain": a = "yes" if true else f"no, {'it is' if spec.count == 1 else 'they are'} {spec.colour}"
    elif fmt == "redcheck": a = "yes" if c == "red" else "no"
    elif fmt == "think": a = f"{'it is' if spec.count == 1 else 'they are'} {spec.colour}, so {'yes' if true else 'no'}"
    return q, a
def conv_for(spec, rng, true, with_answer=True):
    c = Conversation(lm.template)
    if prior == "prior" and rng.random() < 0.5:  # the colour asked (and answered) first
        c.add_image(spec); c.ask(f"What colour {'is' if spec.count == 1 else 'are'} the {spec.noun}?"); c.add_answer(spec.colour)
        q, a = claim(spec, rng, true); c.ask(q)
    else:
        c.add_image(spec); q, a = claim(spec, rng, true); c.ask(q)
    if with_answer: c.add_answer(a)
    return c, a
params = [p for p in m.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
rng = random.Random(0)
def evaluate():
    m.eval(); right = 0; r = random.Random(1)
    for i in range(0, 300, 100):
        specs = test_specs[i:i+100]; convs = [conv_for(s, r, j % 2 == 0, False) for j, s in enumerate(specs)]
        # held-out: the claim asked first (no prior turn), as the canonical question is
        convs = []
        for j, s in enumerate(specs):
            c = Conversation(lm.template); c.add_image(s); q, a = claim(s, r, j % 2 == 0); c.ask(q); convs.append((c, a))
        seqs = [encode_prompt(tok.encode, c.prompt(), 16) for c, _ in convs]
        out = generate(m, tok, seqs, m.project(TF[i:i+100]), GenerationSettings(do_sample=False, max_new_tokens=12))
        right += sum(o.text.strip() == a for o, (_, a) in zip(out, convs))
    m.train(); return right / 300
for step in range(1, steps + 1):
    idx = [rng.randrange(len(train_specs)) for _ in range(64)]
    items = [encode_dialogue(tok.encode, conv_for(train_specs[i], rng, rng.random() < 0.5)[0], 16) for i in idx]
    batch = pad_batch([x[0] for x in items], tok.pad_id, labels=[x[1] for x in items])
    loss = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], image_embeds=m.project(F[idx]), labels=batch["labels"]).loss
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 25 == 0 and fmt == "redcheck": print(step, loss.item(), flush=True)
    if step % 100 == 0 and fmt != "redcheck":
        print(f"{fmt} {prior} step {step} loss {loss.item():.3f} heldout {evaluate():.2f} ({time.time() - t:.0f}s)", flush=True)
