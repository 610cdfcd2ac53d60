"""Top up the shipped 96-px demo on CPU: before half of the "same background" questions, the
conversation first asks each picture's background (the answers in the text), as the yes/no
claims are scaffolded by the plain question 30% of the time."""
import random
import sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # the repository root
from dataclasses import replace
from minigpt4.data import dialogues, synthetic
from topup import top_up_and_score

steps, lr, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
def background_same(pictures, rng):
    want = rng.choice(("yes", "no")); n = len(pictures)
    options = [(x, y) for x in range(n) for y in range(x + 1, n)
               if (pictures[x].background == pictures[y].background) == (want == "yes")]
    x, y = rng.choice(options) if options else (n - 2, n - 1)
    turns = []
    if rng.random() < 0.5:
        for k in (x, y):
            q, a = synthetic.ask(pictures[k], "background", rng, ref=dialogues.ORDINALS[k])
            turns.append(dialogues.Turn(q, a, "nth"))
    q, a = dialogues.same_question(pictures, x, y, "background", rng)
    return turns + [dialogues.Turn(q, a, "same")]
def _pictures_together(rng, max_turns, mix):
    pictures = dialogues.sample_pictures(rng.choice((2, 2, 3, 4)), rng)
    turns = []
    for _ in range(rng.randint(1, max_turns)):
        kind = mix.pick(dialogues.MULTI_WEIGHTS, rng)
        if kind == "same" and rng.random() < 0.4:
            turns += background_same(pictures, rng)
        else:
            turns.append(dialogues.multi_turn(pictures, kind, rng, mix))
    turns[0] = replace(turns[0], images=tuple(pictures))
    return turns
dialogues._pictures_together = _pictures_together
dialogues.MULTI_WEIGHTS["same"] = 3.0
top_up_and_score(steps, lr, out, data_seed=8)
