"""Chat latency: our ChatSession against the official demo's way of chatting.

    python bench/bench_chat.py           # 7B shape (EVA ViT-g + Q-Former + Vicuna-7B), random fp16, GPU 0
    python bench/bench_chat.py --compile # the same with generation.compile=true
    python bench/bench_chat.py --tiny    # the tiny model on CPU: a smoke test of this script

The "stock" side is what the official demo does: keep the image embeddings, re-embed the whole
conversation every turn and call transformers' generate(inputs_embeds=...) at batch 1. Ours is
minigpt4.chat.ChatSession (image encoded once, KV cache kept across turns). Both build prompts
with conversation.py. Measured:
  decode tok/s    batch 1, one image + a 100-token question, --new tokens
  first token     time to the first token for that prompt (image already encoded, as both
                  demos encode it on upload; the encoding time is reported on its own)
  turn 10 / 1     latency of turn 10 over turn 1 of a 10-turn chat with --turn-tokens answers
Ours runs in one ChatSession reset between conversations (as a terminal or web tab does); its
first turn in the process, which captures the CUDA graphs (and compiles), is reported apart.
Random weights never stop and mostly pick ids the tokenizer cannot print: answers are forced to
a fixed length (min_new_tokens, no stop string) and logits are limited to the tokenizer's pieces
(lm_head rows past it zeroed), so answers decode to text and the history grows as in a real chat.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt4.build import LoadedModel, load_model  # noqa: E402
from minigpt4.chat import ChatSession  # noqa: E402
from minigpt4.config import compose, load_spec  # noqa: E402
from minigpt4.conversation import clean_answer, encode_prompt  # noqa: E402
from minigpt4.data.synthetic import make_picture, sample_specs  # noqa: E402
from minigpt4.generation import GenerationSettings  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(tiny: bool) -> LoadedModel:
    overrides = ["gpu=cpu", "precision=fp32"] if tiny else ["model=7b", "checkpoint=random", "gpu=0"]
    torch.manual_seed(0)
    loaded = load_model(load_spec(compose("chat", overrides + ["generation=greedy"])))
    with torch.no_grad():  # logits only over pieces the tokenizer can print (see the docstring)
        loaded.model.llm.get_output_embeddings().weight[loaded.tokenizer.vocab_size :] = 0
    loaded.template = loaded.template.with_overrides(stop=())  # fixed-length answers
    return loaded


class StockChat:
    """The official demo's loop: image embeddings kept, the whole history re-embedded each turn."""

    def __init__(self, loaded: LoadedModel):
        self.loaded, self.conv, self.images = loaded, loaded.conversation(), []

    def add_image(self, image) -> None:
        self.images.append(self.loaded.encode_images([image])[0])
        self.conv.add_image("image")

    @torch.inference_mode()
    def ask(self, text: str, n: int) -> str:
        lm, tok = self.loaded, self.loaded.tokenizer
        self.conv.ask(text)
        ids = torch.tensor([encode_prompt(tok.encode, self.conv.prompt(), lm.model.num_image_tokens)], device=lm.device)
        embeds = lm.model.embed(ids, torch.stack(self.images) if self.images else None)
        out = lm.model.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                    min_new_tokens=n, do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        answer = clean_answer(tok.decode(out[0].tolist()), lm.template)
        self.conv.add_answer(answer)
        return answer


def question(loaded: LoadedModel, n_tokens: int, seed: int = 0) -> str:
    """A question of about n_tokens tokens."""
    words = ["how", "many", "red", "circles", "are", "there", "in", "the", "top", "left", "of", "picture",
             "and", "what", "colour", "is", "background", "shape", "large", "small"]
    text, i = "", seed
    while len(loaded.tokenizer.encode(text)) < n_tokens:
        text += words[i % len(words)] + " "
        i += 7
    return text.strip() + "?"


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def diagnose(loaded: LoadedModel, picture, n: int = 64) -> None:
    """Per decode step: CPU time to launch a step, time waiting for the GPU, and time spent
    between steps (sampling, streaming, bookkeeping), for ChatSession turns and plain generate()."""
    from minigpt4 import generation
    from minigpt4.decoding import DynamicDecoder, StaticDecoder

    reals, log = {cls: cls.step for cls in (StaticDecoder, DynamicDecoder)}, []

    def timed_step(self, *args):
        t0 = time.perf_counter()
        out = reals[type(self)](self, *args)
        t1 = time.perf_counter()
        out.sum().item()
        log.append((t0, t1, time.perf_counter()))
        return out

    for cls in reals:
        cls.step = timed_step
    settings = GenerationSettings(do_sample=False, max_new_tokens=n, min_new_tokens=n)
    try:
        for with_image in (True, False, True):
            s = ChatSession(loaded, settings, seed=0)
            s.add_images([picture] if with_image else [])
            for turn in range(2):
                log.clear()
                reply = s.ask(question(loaded, 20, seed=turn))
                _print_steps(f"session image={with_image} turn={turn + 1} ({reply.seconds:.2f} s)", log)
            log.clear()
            generation.generate(loaded.model, loaded.tokenizer, [[1] + list(range(100, 200))], None, settings, stops=())
            _print_steps("plain generate()", log)
    finally:
        for cls, real in reals.items():
            cls.step = real


def _print_steps(name: str, log: list[tuple[float, float, float]]) -> None:
    between = [b[0] - a[2] for a, b in zip(log, log[1:])]
    ms = lambda xs: 1e3 * sum(xs) / max(len(xs), 1)  # noqa: E731
    print(f"{name:45} steps {len(log):>3}  launch {ms([b - a for a, b, _ in log]):6.1f} ms  "
          f"gpu wait {ms([c - b for _, b, c in log]):6.1f} ms  between {ms(between):6.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke test)")
    ap.add_argument("--new", type=int, default=128, help="tokens for the decode-speed answer")
    ap.add_argument("--prompt-tokens", type=int, default=100, help="question length for first-token time")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--turn-tokens", type=int, default=64, help="answer length in the multi-turn chat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="generation.compile=true (torch.compile the decode step)")
    ap.add_argument("--diagnose", action="store_true", help="only print per-step timings (see diagnose())")
    ap.add_argument("--first-turn-only", action="store_true",
                    help="only time the process's first turn (graph capture; with --compile, compilation, "
                         "which Inductor's on-disk cache shortens in later processes)")
    args = ap.parse_args()
    loaded = build(args.tiny)  # the tiny model on the CPU runs on one thread (cpu_threads=auto)
    device = loaded.device
    picture = make_picture(sample_specs(1, seed=0)[0])
    if args.diagnose:
        diagnose(loaded, picture)
        return
    long_question = question(loaded, args.prompt_tokens)
    fixed = lambda n: GenerationSettings(do_sample=False, max_new_tokens=n, min_new_tokens=n,  # noqa: E731
                                         compile=args.compile)
    # One session throughout, reset between conversations, as in the terminal or a web tab: its
    # decoder (static cache, CUDA graphs, compiled code) is built by the first conversation.
    s = ChatSession(loaded, fixed(8), seed=0, notify=lambda m: print(m, file=sys.stderr))

    def new_conversation() -> ChatSession:
        s.reset()
        s.add_images([picture])
        return s

    start = time.perf_counter()
    new_conversation().ask(long_question)
    cold_first_turn_s = time.perf_counter() - start  # graph capture (and compilation) included
    if args.first_turn_only:
        print(f"first turn of the process (compile={args.compile}): {cold_first_turn_s:.1f} s")
        return
    for _ in range(2):  # warm-up: both paths, prefill + decode, a second turn
        stock = StockChat(loaded)
        stock.add_image(picture)
        new_conversation().ask(long_question), s.ask("and then?"), stock.ask(long_question, 8), stock.ask("and then?", 8)

    encode_s = statistics.median(timed(lambda: loaded.encode_images([picture]), device) for _ in range(args.repeats))

    # time to first token: image + ~100-token question, a new conversation each time
    ours_ttft, stock_ttft = [], []
    for _ in range(args.repeats):
        sync(device)
        ours_ttft.append(new_conversation().ask(long_question, settings=fixed(1)).first_token_s)
        stock = StockChat(loaded)
        stock.add_image(picture)
        stock_ttft.append(timed(lambda: stock.ask(long_question, 1), device))
    prompt_len = len(encode_prompt(loaded.tokenizer.encode, stock.conv.copy().prompt(), loaded.model.num_image_tokens))

    # decode speed at batch 1
    ours_tok_s, stock_tok_s = [], []
    for _ in range(max(2, args.repeats // 2)):
        reply = new_conversation().ask(long_question, settings=fixed(args.new))
        assert reply.n_tokens == args.new, reply
        ours_tok_s.append(reply.tokens_per_s)
        stock = StockChat(loaded)
        stock.add_image(picture)
        t_full = timed(lambda: stock.ask(long_question, args.new), device)
        stock_tok_s.append((args.new - 1) / max(t_full - statistics.median(stock_ttft), 1e-9))

    # a multi-turn chat: latency of each turn. Each 64-position prefill bucket's graph is captured
    # on its first use in the process, so one untimed chat of the same turns goes first.
    new_conversation()
    for turn in range(args.turns):
        s.ask(question(loaded, 20, seed=turn), settings=fixed(args.turn_tokens))
    new_conversation()
    stock = StockChat(loaded)
    stock.add_image(picture)
    ours_turns, stock_turns, prompt_lens, reused = [], [], [], []
    for turn in range(args.turns):
        q = question(loaded, 20, seed=turn)
        sync(device)
        reply = s.ask(q, settings=fixed(args.turn_tokens))
        ours_turns.append(reply.seconds)
        prompt_lens.append(reply.prefilled + reply.reused)
        reused.append(reply.reused)
        stock_turns.append(timed(lambda: stock.ask(q, args.turn_tokens), device))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {
        "device": name, "model": "tiny" if args.tiny else "7b (random fp16)", "date": time.strftime("%Y-%m-%d"),
        "args": vars(args), "ttft_prompt_positions": prompt_len, "image_encode_s": encode_s,
        "cold_first_turn_s": cold_first_turn_s,
        "ours": {"decode_tok_s": statistics.median(ours_tok_s), "ttft_s": statistics.median(ours_ttft),
                 "turn_s": ours_turns, "turn10_over_turn1": ours_turns[-1] / ours_turns[0]},
        "stock": {"decode_tok_s": statistics.median(stock_tok_s), "ttft_s": statistics.median(stock_ttft),
                  "turn_s": stock_turns, "turn10_over_turn1": stock_turns[-1] / stock_turns[0]},
        "turn_prompt_positions": prompt_lens, "turn_reused_positions": reused, "peak_gpu_gib": peak,
    }
    o, st = result["ours"], result["stock"]
    print(f"device: {name}; model: {result['model']}; prompt for first token: {prompt_len} positions; "
          f"image encoding {encode_s * 1e3:.1f} ms; compile={args.compile}; first turn of the process "
          f"(graph capture, compilation) {cold_first_turn_s:.1f} s")
    print(f"{'':28} {'ChatSession':>12} {'stock HF':>10} {'ratio':>7}")
    print(f"{'decode tok/s (batch 1)':28} {o['decode_tok_s']:>12.1f} {st['decode_tok_s']:>10.1f} "
          f"{o['decode_tok_s'] / st['decode_tok_s']:>7.2f}")
    print(f"{'first token ms':28} {o['ttft_s'] * 1e3:>12.1f} {st['ttft_s'] * 1e3:>10.1f} "
          f"{o['ttft_s'] / st['ttft_s']:>7.2f}")
    print(f"{'turn 1 s':28} {ours_turns[0]:>12.3f} {stock_turns[0]:>10.3f}")
    print(f"{f'turn {args.turns} s':28} {ours_turns[-1]:>12.3f} {stock_turns[-1]:>10.3f}")
    print(f"{f'turn {args.turns} / turn 1':28} {o['turn10_over_turn1']:>12.2f} {st['turn10_over_turn1']:>10.2f}")
    print(f"turn prompt positions {prompt_lens}; reused from cache {reused}")
    if peak is not None:
        print(f"peak GPU memory {peak:.1f} GiB")
    if os.environ.get("OUT"):
        name = "bench_chat_compile.json" if args.compile else "bench_chat.json"
        Path(os.environ["OUT"], name).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
