"""Top up the shipped 96-px demo on CPU with minimal pairs for "same background?": in 30% of the
conversations with pictures attached together, two pictures that differ in the background or
not (yes and no equally often) and, independently, in the count half of the time (the shipped
model answers as if asked whether the counts differ: probe_same_bg.py), then that question
(and the conversation's other questions). Args: steps, lr, output folder."""
import sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # the repository root
from dataclasses import replace
from minigpt4.data import dialogues, synthetic
from topup import top_up_and_score

steps, lr, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
original = dialogues._pictures_together


def minimal_pair(rng):
    first = synthetic.sample_spec(rng)
    values = {}
    if rng.random() < 0.5:
        values["background"] = rng.choice([b for b in synthetic.BACKGROUNDS if b != first.background])
    if rng.random() < 0.5:
        values["count"] = rng.choice([c for c in (1, 2, 3, 4) if c != first.count])
    return [first, dialogues.changed(first, rng, **values)]


def _pictures_together(rng, max_turns, mix):
    if rng.random() >= 0.3:
        return original(rng, max_turns, mix)
    pictures = minimal_pair(rng)
    turns = [dialogues.Turn(*dialogues.same_question(pictures, 0, 1, "background", rng), "same")]
    turns += [dialogues.multi_turn(pictures, mix.pick(dialogues.MULTI_WEIGHTS, rng), rng, mix)
              for _ in range(rng.randint(0, max_turns - 1))]
    rng.shuffle(turns)
    turns[0] = replace(turns[0], images=tuple(pictures))
    return turns


dialogues._pictures_together = _pictures_together
top_up_and_score(steps, lr, out, data_seed=9)
