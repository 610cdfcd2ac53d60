"""CPU thread count against speed: chat decoding and a fine-tuning step, per torch thread count.

    python bench/bench_cpu_threads.py                       # the shipped demo model (tiny)
    python bench/bench_cpu_threads.py checkpoint=random model.arch.llm.hidden_size=1024 \
        model.arch.llm.intermediate_size=2816               # a bigger LLM, random weights
    python bench/bench_cpu_threads.py --threads 1 2 4       # thread counts to try (default: 1, 2, torch's)

Measured, for each thread count, in one process (settings interleaved over --rounds, the median
kept, so a load that comes and goes hits every setting alike):
  decode tok/s   ChatSession, one picture, a greedy answer of --new tokens (stop strings off)
  train step     forward + backward of a batch of --batch picture/prompt rows, llama_proj trainable
This is what picked conf/base.yaml's cpu_threads=auto rule (docs/CHAT.md, "CPU threads").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt4.build import load_model  # noqa: E402
from minigpt4.chat import ChatSession  # noqa: E402
from minigpt4.config import compose, load_spec  # noqa: E402
from minigpt4.conversation import IMAGE_TOKEN  # noqa: E402
from minigpt4.data.synthetic import make_picture, sample_specs  # noqa: E402
from minigpt4.generation import GenerationSettings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. checkpoint=random model.arch.llm.hidden_size=1024")
    ap.add_argument("--threads", type=int, nargs="*", help="thread counts (default: 1, 2 and torch's default)")
    ap.add_argument("--new", type=int, default=64, help="tokens per answer")
    ap.add_argument("--batch", type=int, default=12, help="rows per training step (official: 12)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    default = torch.get_num_threads()
    counts = args.threads or sorted({1, 2, default})

    torch.manual_seed(0)
    lm = load_model(load_spec(compose("chat", ["gpu=cpu", "precision=fp32", "generation=greedy", *args.overrides])))
    lm.template = lm.template.with_overrides(stop=())  # fixed-length answers
    params = sum(p.numel() for p in lm.model.parameters())
    picture = make_picture(sample_specs(1, seed=0)[0])
    settings = GenerationSettings(do_sample=False, max_new_tokens=args.new, min_new_tokens=args.new)
    session = ChatSession(lm, settings, seed=0, notify=lambda m: None)

    def decode() -> float:
        session.reset()
        session.add_images([picture])
        return session.ask("What colour are the shapes?").tokens_per_s

    text = torch.randint(3, lm.tokenizer.vocab_size, (args.batch, 48))  # BOS, image slots, 48 text tokens
    image = torch.full((args.batch, lm.model.num_image_tokens), IMAGE_TOKEN)
    ids = torch.cat([torch.ones(args.batch, 1, dtype=torch.long), image, text], dim=1)
    labels = torch.cat([torch.full((args.batch, 1 + image.shape[1]), -100), text], dim=1)
    pixels = torch.randn(args.batch, 3, lm.image_size, lm.image_size)
    lm.model.set_trainable(["llama_proj"])

    def train_step() -> float:
        start = time.perf_counter()
        loss = lm.model(ids, pixel_values=pixels, labels=labels).loss
        loss.backward()
        return time.perf_counter() - start

    decode_s, step_s = {n: [] for n in counts}, {n: [] for n in counts}
    for n in counts:  # warm-up: first calls allocate and build thread pools
        torch.set_num_threads(n)
        decode(), train_step()
    for _ in range(args.rounds):
        for n in counts:
            torch.set_num_threads(n)
            decode_s[n].append(decode())
            step_s[n].append(train_step())
    print(f"{lm.label}: {params / 1e6:.1f}M parameters; torch default {default} threads; {args.rounds} rounds")
    for n in counts:
        print(f"  {n} thread(s){' (default)' if n == default else ''}: decode {statistics.median(decode_s[n]):7.1f} tok/s"
              f"  train step (batch {args.batch}) {statistics.median(step_s[n]) * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
