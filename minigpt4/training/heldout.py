"""Held-out accuracy on synthetic pictures: the demo model's acceptance test.

Pictures come from a seed training never uses (data/dialogues.heldout_dialogues). Every
question kind is asked as chat would ask it: one picture and its canonical question, or a
real multi-picture conversation (pictures attached together, or added between turns), built
with conversation.py turn by turn with the model's OWN earlier answers in the history. The
last turn's answer, cleaned up the official way, is compared with the canonical answer (exact
match after lower-casing and dropping a final period). Greedy by default; `settings` (e.g. the
official sampling defaults, generation=official) gives the rate under sampling.

    python -m minigpt4.training.heldout gpu=cpu pictures=300 seed=1000 kinds=all [generation=official]
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import torch

from minigpt4.build import LoadedModel
from minigpt4.conversation import clean_answer, encode_prompt
from minigpt4.data import synthetic
from minigpt4.data.dialogues import (
    ALL_KINDS,
    MULTI_KINDS,
    Turn,
    heldout_dialogues,
    to_conversation,
)
from minigpt4.errors import UserError
from minigpt4.generation import GenerationSettings, generate
from minigpt4.settings import Heldout

# eager decoding: a static cache would capture CUDA graphs again for every batch shape
GREEDY = GenerationSettings(do_sample=False, max_new_tokens=64, min_new_tokens=1, cache="dynamic")
ERRORS_PER_KIND = 3


def normalise(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


class _Pictures:
    """Soft tokens of synthetic pictures, each drawn and encoded once."""

    def __init__(self, lm: LoadedModel):
        self.lm, self.cache = lm, {}

    def embeds(self, specs: list[synthetic.Spec]) -> torch.Tensor | None:
        new = [s for s in dict.fromkeys(specs) if s not in self.cache]
        for start in range(0, len(new), 256):
            chunk = new[start : start + 256]
            for spec, soft in zip(chunk, self.lm.encode_images([synthetic.make_picture(s) for s in chunk])):
                self.cache[spec] = soft
        return torch.stack([self.cache[s] for s in specs]) if specs else None


def converse(lm: LoadedModel, dialogues: list[list[Turn]], settings: GenerationSettings = GREEDY,
             batch_size: int = 64, generator: torch.Generator | None = None) -> list[list[str]]:
    """Play each dialogue as a chat would: turn by turn, its pictures attached before their
    question, the model's own cleaned answers kept in the history. -> the answers per turn."""
    answers: list[list[str]] = [[] for _ in dialogues]
    pictures = _Pictures(lm)
    for turn in range(max(len(d) for d in dialogues)):
        rows = [i for i, d in enumerate(dialogues) if len(d) > turn]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            convs = [to_conversation(dialogues[i], lm.template, answers[i], upto=turn) for i in chunk]
            sequences = [encode_prompt(lm.tokenizer.encode, c.prompt(), lm.model.num_image_tokens) for c in convs]
            embeds = pictures.embeds([image for c in convs for image in c.images])
            out = generate(lm.model, lm.tokenizer, sequences, embeds, settings, stops=lm.template.stop, generator=generator)
            for i, generated in zip(chunk, out):
                answers[i].append(clean_answer(generated.text, lm.template))
    return answers


@torch.inference_mode()
def heldout_accuracy(lm: LoadedModel, pictures: int = 200, seed: int = 1000,
                     kinds: tuple[str, ...] = ("colour", "shape", "count"), batch_size: int = 64,
                     settings: GenerationSettings = GREEDY, sample_seed: int = 0) -> dict:
    """-> {"accuracy": {kind: fraction, "all": fraction}, "n": {kind: count}, "errors": [...], "greeting": str}.
    `pictures` single pictures per single-picture kind, as many conversations per multi-picture kind."""
    parse_kinds(",".join(kinds))
    settings = replace(settings, cache=GREEDY.cache)
    was_training = lm.model.training
    lm.model.eval()
    dialogues = [(kind, d) for kind in kinds for d in heldout_dialogues(kind, pictures, seed)]
    generator = None if settings.greedy else torch.Generator(lm.model.device).manual_seed(sample_seed)
    replies = converse(lm, [d for _, d in dialogues], settings, batch_size, generator)
    right, total, errors = defaultdict(int), defaultdict(int), defaultdict(list)
    for (kind, turns), got in zip(dialogues, replies):
        ok = normalise(got[-1]) == normalise(turns[-1].answer)
        right[kind] += ok
        total[kind] += 1
        if not ok and len(errors[kind]) < ERRORS_PER_KIND:
            asked = [t.question for t in turns]
            errors[kind].append({"kind": kind, "question": " / ".join(asked), "expected": turns[-1].answer, "got": got[-1]})
    accuracy = {k: right[k] / total[k] for k in total}
    accuracy["all"] = sum(right.values()) / max(1, sum(total.values()))
    greeting = converse(lm, [[Turn("Hello", synthetic.GREETING, "text")]], GREEDY)[0][0]
    lm.model.train(was_training)
    return {"accuracy": accuracy, "n": dict(total), "pictures": pictures, "seed": seed,
            "errors": [e for k in kinds for e in errors[k]], "greeting": greeting,
            "decoding": "greedy" if settings.greedy else "sampled"}


def parse_kinds(text: str) -> tuple[str, ...]:
    """'all' | 'single' | 'multi' | 'colour,position,...' -> kinds (UserError naming an unknown one)."""
    named = {"all": ALL_KINDS, "single": synthetic.KINDS, "multi": MULTI_KINDS}
    kinds = named.get(text) or tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in ALL_KINDS]
    if not kinds or unknown:
        raise UserError(f"held-out kinds={text}: choose all, single, multi or a list of {', '.join(ALL_KINDS)}")
    return kinds


def run_heldout(lm: LoadedModel, heldout: Heldout) -> dict:
    """finetune.py's `heldout:` settings -> heldout_accuracy's result (+ "sampled": accuracy per
    kind under the official sampling defaults, GenerationSettings(), with sampled: true)."""
    kinds, args = parse_kinds(heldout.kinds), (heldout.pictures, heldout.seed)
    result = heldout_accuracy(lm, *args, kinds, heldout.batch_size)
    if heldout.sampled:
        result["sampled"] = heldout_accuracy(lm, *args, kinds, heldout.batch_size, GenerationSettings())["accuracy"]
    return result


if __name__ == "__main__":  # python -m minigpt4.training.heldout [pictures=300] [seed=1000] [kinds=all] [generation=official] [chat overrides...]
    import json
    import sys

    from minigpt4.build import load_model
    from minigpt4.config import chat_settings, compose, load_spec
    from minigpt4.errors import exit_on_user_error

    @exit_on_user_error
    def main() -> None:
        opts = {"pictures": "300", "seed": "1000", "kinds": "colour,shape,count", "batch_size": "64"}
        overrides = []
        for arg in sys.argv[1:]:
            key = arg.split("=", 1)[0]
            (opts.__setitem__(key, arg.split("=", 1)[1]) if key in opts else overrides.append(arg))
        kinds = parse_kinds(opts["kinds"])
        cfg = compose("chat", overrides)
        sampled = any(o.split("=", 1)[0] in ("generation", "generation.do_sample") for o in overrides)
        settings = chat_settings(cfg).generation if sampled else GREEDY
        lm = load_model(load_spec(cfg))
        result = heldout_accuracy(lm, int(opts["pictures"]), int(opts["seed"]), kinds, int(opts["batch_size"]), settings)
        print(json.dumps({"model": lm.label, **result}, indent=2))

    main()
