"""Held-out accuracy on synthetic pictures: the demo model's acceptance test.

Pictures come from a seed training never uses; each canonical question is asked in a fresh
chat conversation (the exact prompt chat.py builds), decoded greedily, cleaned up the official
way and compared with the canonical answer (exact match after lower-casing and dropping a final
period).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from minigpt4.build import LoadedModel
from minigpt4.conversation import clean_answer, encode_prompt
from minigpt4.data import synthetic
from minigpt4.generation import GenerationSettings, generate

GREEDY = GenerationSettings(do_sample=False, max_new_tokens=40, min_new_tokens=1)


def normalise(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def answer(lm: LoadedModel, chats: list[tuple[list, str]], settings: GenerationSettings = GREEDY) -> list[str]:
    """[(images, question)] -> cleaned answers, one single-turn conversation each (batched)."""
    sequences, images = [], []
    for pictures, question in chats:
        conv = lm.conversation()
        for picture in pictures:
            conv.add_image(picture)
        conv.ask(question)
        sequences.append(encode_prompt(lm.tokenizer.encode, conv.prompt(), lm.model.num_image_tokens))
        images.extend(pictures)
    embeds = lm.encode_images(images) if images else None
    out = generate(lm.model, lm.tokenizer, sequences, embeds, settings, stops=lm.template.stop)
    return [clean_answer(g.text, lm.template) for g in out]


@torch.inference_mode()
def heldout_accuracy(lm: LoadedModel, pictures: int = 200, seed: int = 1000,
                     kinds: tuple[str, ...] = ("colour", "shape", "count"), batch_size: int = 64) -> dict:
    """-> {"accuracy": {kind: fraction, "all": fraction}, "n": {kind: count}, "errors": [...], "greeting": str}"""
    was_training = lm.model.training
    lm.model.eval()
    rows = []
    for spec in synthetic.sample_specs(pictures, seed):
        picture = synthetic.make_picture(spec)
        rows.extend((picture, q, a, kind) for q, a, kind in synthetic.questions(spec) if kind in kinds)
    right, total, errors = defaultdict(int), defaultdict(int), []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        predictions = answer(lm, [([picture], q) for picture, q, _, _ in chunk])
        for (_, question, expected, kind), predicted in zip(chunk, predictions):
            ok = normalise(predicted) == normalise(expected)
            right[kind] += ok
            total[kind] += 1
            if not ok and len(errors) < 20:
                errors.append({"question": question, "expected": expected, "got": predicted})
    accuracy = {k: right[k] / total[k] for k in total}
    accuracy["all"] = sum(right.values()) / max(1, sum(total.values()))
    greeting = answer(lm, [([], "Hello")])[0]
    lm.model.train(was_training)
    return {"accuracy": accuracy, "n": dict(total), "pictures": pictures, "seed": seed, "errors": errors,
            "greeting": greeting}


if __name__ == "__main__":  # python -m minigpt4.training.heldout [pictures=300] [seed=1000] [kinds=all] [chat overrides...]
    import json
    import sys

    from minigpt4.build import load_model
    from minigpt4.config import compose, load_spec

    opts = {"pictures": "300", "seed": "1000", "kinds": "colour,shape,count"}
    overrides = []
    for arg in sys.argv[1:]:
        key = arg.split("=", 1)[0]
        (opts.__setitem__(key, arg.split("=", 1)[1]) if key in opts else overrides.append(arg))
    kinds = synthetic.KINDS if opts["kinds"] == "all" else tuple(opts["kinds"].split(","))
    lm = load_model(load_spec(compose("chat", overrides)))
    result = heldout_accuracy(lm, int(opts["pictures"]), int(opts["seed"]), kinds)
    print(json.dumps({"model": lm.label, **result}, indent=2))
