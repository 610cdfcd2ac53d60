"""Write the example prompt set in examples/prompts/ (what `python evaluate.py` runs by default).

    python examples/make_examples.py

Pictures and answers come from the demo data generator (minigpt4/data/synthetic.py and
dialogues.py) with a seed the demo model was not trained on, so the set measures held-out
accuracy (8 pictures, 3 of them with a single shape):
    shapes.csv        one picture per row: colour, shape, count, position, size, background,
                      a true and a false yes/no claim
    multi_image.csv   2-4 pictures per row, attached together with <image> markers, as chat
                      attaches several pictures: totals, "in the second picture", which has more,
                      same or not, the difference, and a question about the latest picture
    text_only.csv     no picture: greetings and what the model can do
    descriptions.csv  "Describe this image." with a one-sentence reference (scored with BLEU)
Categories are the question kinds of minigpt4/training/heldout.py. Deterministic: running it
again rewrites identical files.
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt4.data import dialogues, synthetic

SEED = 20250  # held out: the demo recipe trains on other seeds
N_PICTURES = 8
OUT = Path(__file__).resolve().parent / "prompts"


def example_specs() -> list[synthetic.Spec]:
    """The 8 pictures (images/picture_00.png ...): 3 single shapes first, then 5 with several."""
    pool = synthetic.sample_specs(100, seed=SEED)
    singles = [s for s in pool if s.count == 1][:3]
    return singles + [s for s in pool if s.count > 1][: N_PICTURES - len(singles)]


def _write(name: str, header: list[str], rows: list[list]) -> None:
    with open(OUT / name, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _multi_rows(specs: list[synthetic.Spec], names: list[str]) -> list[list[str]]:
    """Questions about 2-4 pictures attached together (canonical phrasings of dialogues.py)."""
    rows = []

    def add(picked: list[int], kind: str, question: str, answer: str, about: str = "") -> None:
        key = "m" + "".join(map(str, picked)) + f"-{kind}" + (f"-{about}" if about else "")
        rows.append([key, " ".join(["<image>"] * len(picked) + [question]), ";".join(names[i] for i in picked),
                     answer, kind, f"seed {SEED} " + ",".join(f"#{i}" for i in picked)])

    for first in range(0, N_PICTURES - 1, 2):
        picked = [first, first + 1]
        pair = [specs[i] for i in picked]
        add(picked, "total", *dialogues.total_question(pair))
        add(picked, "nth", *next((q, a) for q, a, k in synthetic.questions(pair[0], ref="first") if k == "colour"))
        add(picked, "more", *dialogues.more_question(pair, 0, 1))
        attribute = dialogues.VARIED[first // 2 % len(dialogues.VARIED)]
        add(picked, "same", *dialogues.same_question(pair, 0, 1, attribute))
        add(picked, "difference", *dialogues.difference_question(pair, 0, 1))
        for question, answer, kind in synthetic.questions(pair[1]):  # unnamed: about the latest picture
            if kind in ("colour", "shape", "count"):
                add(picked, "latest", question, answer, kind)
    for picked in ([0, 3, 5], [1, 2, 6, 7]):
        group = [specs[i] for i in picked]
        add(picked, "total", *dialogues.total_question(group))
        add(picked, "nth", *next((q, a) for q, a, k in synthetic.questions(group[2], ref="third") if k == "count"))
    return rows


def main() -> None:
    (OUT / "images").mkdir(parents=True, exist_ok=True)
    specs = example_specs()
    names = []
    for i, spec in enumerate(specs):
        name = f"images/picture_{i:02d}.png"
        synthetic.make_picture(spec).save(OUT / name, optimize=True)
        names.append(name)

    shapes = []
    for i, (spec, image) in enumerate(zip(specs, names)):
        asked = [q for q in synthetic.questions(spec) if q[2] not in ("yesno", "description")]
        rng = random.Random(spec.seed)  # a true and a false claim, about attributes that vary with i
        for attribute, true in ((synthetic.ATTRIBUTES[i % 6], True), (synthetic.ATTRIBUTES[(i + 3) % 6], False)):
            asked.append((*synthetic.claim(spec, attribute, true, rng), "yesno"))
        for question, answer, kind in asked:
            shapes.append([f"p{i}-{kind}-{answer.replace(' ', '_').replace(',', '')}", question, image, answer, kind,
                           f"seed {SEED} #{i}"])
    _write("shapes.csv", ["id", "prompt", "image", "reference", "category", "source"], shapes)
    multi = _multi_rows(specs, names)
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
