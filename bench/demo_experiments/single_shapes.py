"""What probe.py and probe2.py share: the shipped demo model and 2,400 single-shape pictures."""
import random
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # the repository root
from minigpt4.build import load_model
from minigpt4.config import compose, load_spec
from minigpt4.data import synthetic
from minigpt4.images import preprocess


def demo_and_pictures(n: int = 2400, seed: int = 5):
    """-> (the demo MiniGPT4 in eval mode, specs of n single-shape pictures, their pixels [n,3,S,S] at the model's size)."""
    torch.manual_seed(0)
    lm = load_model(load_spec(compose("chat", ["gpu=cpu", "precision=fp32", "checkpoint=demo"])))
    rng = random.Random(seed)
    specs = []
    while len(specs) < n:
        s = synthetic.sample_spec(rng)
        if s.count == 1:
            specs.append(s)
    pixels = torch.stack([preprocess(synthetic.make_picture(s), lm.image_size) for s in specs])
    return lm.model.eval(), specs, pixels
