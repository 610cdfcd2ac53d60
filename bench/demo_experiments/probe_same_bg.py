"""What the shipped demo's answer to "same background?" follows: the held-out "same" conversations
about backgrounds (seed 1000, 600 of them: 120 on backgrounds), greedy, and how often the answer
agrees with each attribute being the same in the two pictures (2026-12-02: background 58/120,
count 19/120: it answers as if asked whether the counts differ). Arg: a bundle to probe instead
(e.g. a top-up's <output>/model)."""
import collections
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # the repository root
from minigpt4.build import load_model
from minigpt4.config import compose, load_spec
from minigpt4.data import dialogues
from minigpt4.training.heldout import converse, normalise

bundle = [f"checkpoint.bundle={sys.argv[1]}"] if len(sys.argv) > 1 else []
lm = load_model(load_spec(compose("chat", ["gpu=cpu", "checkpoint=demo", *bundle])))
convs = [d for i, d in enumerate(dialogues.heldout_dialogues("same", 600, 1000)) if dialogues.VARIED[(i // 2) % 5] == "background"]
with torch.inference_mode():
    replies = converse(lm, convs)
agrees, said = collections.Counter(), collections.Counter()
for turns, got in zip(convs, replies):
    first, second = turns[0].images
    answer = normalise(got[-1]).split()[-1] if got[-1].strip() else ""  # "white and gray, so no" -> "no"
    said[answer] += 1
    for attribute in dialogues.VARIED:
        agrees[attribute] += (answer == "yes") == (getattr(first, attribute) == getattr(second, attribute))
print(f"{len(convs)} conversations; answers {dict(said)}; agreement with 'the same <attribute>':")
for attribute in dialogues.VARIED:
    print(f"  {attribute:<10} {agrees[attribute]:>4}/{len(convs)}")
