"""Write the example prompt set in examples/prompts/ (what `python evaluate.py` runs by default).

    python examples/make_examples.py

Pictures and answers come from the demo data generator (minigpt4/data/synthetic.py) with a
seed the demo model was not trained on, so the set measures held-out accuracy (8 pictures,
3 of them with a single shape so that position and size are asked too):
    shapes.csv        one picture per row, short answers (colour, shape, count, position, ...)
    multi_image.csv   two pictures per row placed with <image> markers; about the last one
    text_only.csv     no picture: greetings and what the model can do
    descriptions.csv  "Describe this image." with a one-sentence reference (scored with BLEU)
Deterministic: running it again rewrites identical files.
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt4.data import synthetic  # noqa: E402

SEED = 20250  # held out: the demo recipe trains on other seeds
N_PICTURES = 8
OUT = Path(__file__).resolve().parent / "prompts"


def _write(name: str, header: list[str], rows: list[list]) -> None:
    with open(OUT / name, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def main() -> None:
    (OUT / "images").mkdir(parents=True, exist_ok=True)
    pool = synthetic.sample_specs(100, seed=SEED)
    singles = [s for s in pool if s.count == 1][:3]  # position and size questions need a single shape
    specs = singles + [s for s in pool if s.count > 1][: N_PICTURES - len(singles)]
    names = []
    for i, spec in enumerate(specs):
        name = f"images/picture_{i:02d}.png"
        synthetic.make_picture(spec).save(OUT / name, optimize=True)
        names.append(name)

    shapes = []
    for i, (spec, image) in enumerate(zip(specs, names)):
        asked = [q for q in synthetic.questions(spec) if q[2] not in ("yesno", "description")]
        yesno = [q for q in synthetic.questions(spec, all_phrasings=True, rng=random.Random(spec.seed)) if q[2] == "yesno"]
        asked += [next(q for q in yesno if q[1] == "yes"), next(q for q in yesno if q[1] == "no")]  # one of each
        for question, answer, kind in asked:
            shapes.append([f"p{i}-{kind}-{answer.replace(' ', '_')}", question, image, answer, kind, f"seed {SEED} #{i}"])
    _write("shapes.csv", ["id", "prompt", "image", "reference", "category", "source"], shapes)

    multi = []
    for i in range(0, N_PICTURES - 1, 2):
        first, last = specs[i], specs[i + 1]
        for question, answer, kind in synthetic.questions(last):
            if kind in ("colour", "shape", "count"):
                multi.append([f"m{i}-{kind}", f"<image> <image> {question}", f"{names[i]};{names[i + 1]}",
                              answer, "multi_image", f"about the second of seed {SEED} #{i},#{i + 1}"])
    _write("multi_image.csv", ["id", "prompt", "image", "reference", "category", "source"], multi)

    text = [[user, assistant, "text_only"] for user, assistant in (
        ("Hello", synthetic.GREETING),
        ("What can you do?", synthetic.ABILITIES),
        ("Who are you?", synthetic.IDENTITY),
        ("What is the capital of France?", synthetic.OUT_OF_WORLD),
        ("Thank you!", "You are welcome!"),
        ("Goodbye", "Goodbye!"),
    )]
    _write("text_only.csv", ["prompt", "reference", "category"], text)

    descriptions = [[f"d{i}", "Describe this image.", image, synthetic.describe(spec), "description"]
                    for i, (spec, image) in enumerate(zip(specs, names))]
    _write("descriptions.csv", ["id", "prompt", "image", "reference", "category"], descriptions)
    print(f"wrote {len(shapes)} + {len(multi)} + {len(text)} + {len(descriptions)} rows to {OUT}")


if __name__ == "__main__":
    main()
