"""Top up the shipped 96-px demo on CPU: all kinds, "same" asked more and half of it about backgrounds."""
import sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # the repository root
from minigpt4.data import dialogues
from topup import top_up_and_score

steps, lr, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
original = dialogues.multi_turn
def multi_turn(pictures, kind, rng, mix=dialogues.Mix()):
    if kind == "same" and rng.random() < 0.5:
        want = rng.choice(("yes", "no")); n = len(pictures)
        options = [(x, y) for x in range(n) for y in range(x + 1, n)
                   if (pictures[x].background == pictures[y].background) == (want == "yes")]
        if options:
            x, y = rng.choice(options)
            q, a = dialogues.same_question(pictures, x, y, "background", rng)
            return dialogues.Turn(q, a, kind)
    return original(pictures, kind, rng, mix)
dialogues.multi_turn = multi_turn
dialogues.MULTI_WEIGHTS["same"] = 3.0
dialogues.FOLLOW_UP["same"] = 2.0
top_up_and_score(steps, lr, out, data_seed=7)
