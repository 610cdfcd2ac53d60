"""Batch-evaluation throughput: our runner's generation path vs a stock transformers generate loop.

    python bench/bench_evaluate.py            # 7B shape, random fp16 weights, GPU 0
    python bench/bench_evaluate.py --tiny     # CPU smoke test on the tiny model

Both paths answer the same prompt set (one synthetic picture + a question per row) in the same
batches (grouped by length, left padding), image encoding included:
  ours   minigpt4.evaluation.answering.answer_rows -> generation.generate (what evaluate.py runs)
  stock  model.llm.generate(inputs_embeds=..., attention_mask=..., do_sample=False)
Random weights never stop, so both produce exactly --new-tokens tokens per row
(min_new_tokens = max_new_tokens, no stop string). Generated tokens/s per batch size, after a
warm-up; a table on stdout and JSON in $OUT/bench_evaluate.json when OUT is set.

--lengths varied (with --engine, issue #16 item 4): answers of different lengths, as real ones
are, row i exactly L_i tokens (seeded, uniform in [new/8, 2 x new]) then EOS, in both of
evaluate.py's paths: the static batches (a batch decodes until its longest row ends) and the
serving engine (a row that ends frees its slot for the next). Each row's question carries its
number, so its prompt ids name it; the length is forced by this script alone: generate()'s
sampling is wrapped to bar EOS before L_i and emit it at L_i, and the engine's submit gets
max_new_tokens = min_new_tokens = L_i + 1 (its last token in place of the EOS): both paths then
decode and count L_i + 1 tokens a row.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt4 import generation  # noqa: E402
from minigpt4.build import load_model  # noqa: E402
from minigpt4.config import compose, load_spec  # noqa: E402
from minigpt4.conversation import build_prompt, encode_prompt, pad_batch  # noqa: E402
from minigpt4.data import synthetic  # noqa: E402
from minigpt4.evaluation import answering  # noqa: E402
from minigpt4.evaluation.answering import answer_rows  # noqa: E402
from minigpt4.evaluation.prompts import PromptRow  # noqa: E402
from minigpt4.generation import GenerationSettings  # noqa: E402
from minigpt4.serving.engine import Engine  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompt_rows(folder: Path, n: int, numbered: bool = False) -> list[PromptRow]:
    """n rows: a synthetic picture each and one of its questions (prompts of varying length);
    numbered: each question ends with its row number (distinct prompt ids)."""
    rows = []
    for i, spec in enumerate(synthetic.sample_specs(n, seed=99)):
        path = folder / f"p{i}.png"
        synthetic.make_picture(spec).save(path)
        question = synthetic.questions(spec, all_phrasings=True)[i % 8][0] + (f" (row {i})" if numbered else "")
        rows.append(PromptRow(f"bench#{i}", "bench", str(i), i + 2, question, [str(path)], [], "", {"prompt": question}))
    return rows


class ForcedLengths:
    """Each row answers exactly its own number of tokens, then EOS (random weights never stop):
    `lengths` maps a prompt's ids to its length. While active, generate()'s batches sample
    through `sample` (EOS barred before a row's length, forced at it) and the engine's requests
    get their length + 1 as max_new_tokens = min_new_tokens (the last token for the EOS)."""

    def __init__(self, lengths: dict[tuple, int]):
        self.lengths = lengths
        self.ends: torch.Tensor | None = None  # [B]: the lengths of the batch generate() is decoding

    def __enter__(self):
        self.saved = generation.next_tokens, answering.generate, Engine.submit
        next_tokens, generate, submit = self.saved

        def sample(logits, settings, generated, step, eos_id, generator):
            logits[:, eos_id] = torch.where(step < self.ends, float("-inf"), float("inf"))
            return next_tokens(logits, replace(settings, min_new_tokens=0), generated, step, eos_id, generator)

        def generate_batch(model, tokenizer, sequences, *args, **kwargs):
            self.ends = torch.tensor([self.lengths[tuple(ids)] for ids in sequences], device=model.device)
            return generate(model, tokenizer, sequences, *args, **kwargs)

        def submit_row(engine, ids, embeds, settings, *args, **kwargs):
            n = self.lengths[tuple(ids)] + 1  # its tokens, and a last one in place of the EOS
            return submit(engine, ids, embeds, replace(settings, max_new_tokens=n, min_new_tokens=n), *args, **kwargs)

        generation.next_tokens, answering.generate, Engine.submit = sample, generate_batch, submit_row
        return self

    def __exit__(self, *exc):
        generation.next_tokens, answering.generate, Engine.submit = self.saved


def row_lengths(lm, rows: list[PromptRow], new_tokens: int) -> dict[tuple, int]:
    """Prompt ids -> a seeded answer length in [new/8, 2 x new] (mean ~1.06 x new)."""
    rng = random.Random(0)
    out = {}
    for row in rows:
        conv = build_prompt(lm.template, row.prompt, row.images)
        out[tuple(encode_prompt(lm.tokenizer.encode, conv.prompt(), lm.model.num_image_tokens))] = \
            rng.randint(max(1, new_tokens // 8), 2 * new_tokens)
    assert len(out) == len(rows), "two rows with the same prompt ids"
    return out


def run_ours(lm, rows: list[PromptRow], batch_size: int, new_tokens: int, compile: bool,
             engine: bool = False, lengths: dict[tuple, int] | None = None) -> tuple[int, float]:
    """-> (generated tokens, seconds). lengths: each row's forced length (ForcedLengths)."""
    if lengths is not None:
        with ForcedLengths(lengths):
            return run_ours(lm, rows, batch_size, max(lengths.values()) + 1, compile, engine)
    settings = GenerationSettings(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  compile=compile)
    out: list[dict] = []
    sync(lm.device)
    start = time.perf_counter()
    answer_rows(lm, rows, settings, batch_size, out.append, max_context=10**6, engine=engine)
    sync(lm.device)
    seconds = time.perf_counter() - start
    failed = [r["error"] for r in out if r["error"]]
    if failed:
        raise RuntimeError(f"rows failed: {failed[:2]}")
    return sum(r["n_tokens"] for r in out), seconds


@torch.inference_mode()
def run_stock(lm, rows: list[PromptRow], batch_size: int, new_tokens: int) -> tuple[int, float]:
    """The same rows and batches through transformers' generate on inputs_embeds."""
    encoded = []
    for row in rows:
        conv = build_prompt(lm.template, row.prompt, row.images)
        encoded.append((row, encode_prompt(lm.tokenizer.encode, conv.prompt(), lm.model.num_image_tokens)))
    encoded.sort(key=lambda item: len(item[1]))
    tokens = 0
    sync(lm.device)
    start = time.perf_counter()
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i : i + batch_size]
        embeds_img = lm.model.encode_images(torch.cat([lm.pixels(r.images) for r, _ in chunk]))
        batch = pad_batch([ids for _, ids in chunk], lm.tokenizer.pad_id, side="left")
        ids, mask = batch["input_ids"].to(lm.device), batch["attention_mask"].to(lm.device)
        out = lm.model.llm.generate(inputs_embeds=lm.model.embed(ids, embeds_img), attention_mask=mask,
                                    do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    pad_token_id=lm.tokenizer.pad_id)
        tokens += out.shape[0] * out.shape[1]  # generate(inputs_embeds=) returns only the new tokens
    sync(lm.device)
    return tokens, time.perf_counter() - start


def write_report(args, lm, device_name: str, new_tokens: int, load_s: float, results: list[dict]) -> None:
    report = {"device": device_name, "model": lm.label, "dtype": str(lm.model.dtype), "new_tokens": new_tokens,
              "lengths": args.lengths,
              "compile": args.compile, "load_s": round(load_s, 1), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "command": "python bench/bench_evaluate.py " + " ".join(sys.argv[1:]), "results": results}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_evaluate.json").write_text(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke test)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per row (default 128; tiny 16)")
    parser.add_argument("--batches-per-size", type=int, default=2, help="timed batches per batch size")
    parser.add_argument("--skip-stock", action="store_true")
    parser.add_argument("--compile", action="store_true", help="generation.compile=true")
    parser.add_argument("--engine", action="store_true",
                        help="also time evaluate.engine=true (rows through the serving engine) on the same rows")
    parser.add_argument("--lengths", choices=["fixed", "varied"], default="fixed",
                        help="varied: each row its own answer length (see the module docstring)")
    args = parser.parse_args()
    new_tokens = args.new_tokens or (16 if args.tiny else 128)
    overrides = ["model=tiny", "checkpoint=random", "gpu=cpu"] if args.tiny else ["model=7b", "checkpoint=random", "gpu=0"]
    torch.manual_seed(0)
    start = time.perf_counter()
    lm = load_model(load_spec(compose("evaluate", overrides)))
    load_s = time.perf_counter() - start
    lm.template = lm.template.with_overrides(stop=())  # random weights: no stop string either
    device_name = torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else "cpu"
    print(f"{lm.label} on {device_name} ({lm.model.dtype}), loaded in {load_s:.1f}s; {new_tokens} new tokens per row")

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        rows = prompt_rows(Path(tmp), max(args.batches) * args.batches_per_size, numbered=args.lengths == "varied")
        lengths = row_lengths(lm, rows, new_tokens) if args.lengths == "varied" else None
        for bs in args.batches:
            timed = rows[: bs * args.batches_per_size]
            # The first pass builds what a run builds once: a decoder and graph per (batch, length
            # bucket) and, with --compile, the compiled step (a second shape compiles it once more,
            # symbolically). It is reported apart; the timed pass answers the same rows again.
            _, cold_s = run_ours(lm, timed, bs, new_tokens, args.compile, lengths=lengths)
            tokens, seconds = run_ours(lm, timed, bs, new_tokens, args.compile, lengths=lengths)
            entry = {"batch": bs, "rows": len(timed), "ours_tokens": tokens, "ours_s": round(seconds, 3),
                     "ours_tok_s": round(tokens / seconds, 1), "ours_first_pass_s": round(cold_s, 3)}
            if args.engine:
                run_ours(lm, timed, bs, new_tokens, False, engine=True, lengths=lengths)
                e_tokens, e_seconds = run_ours(lm, timed, bs, new_tokens, False, engine=True, lengths=lengths)
                entry.update(engine_tok_s=round(e_tokens / e_seconds, 1), engine_s=round(e_seconds, 3))
            if not args.skip_stock and lengths is None:  # (stock generate cannot take per-row lengths)
                run_stock(lm, rows[:bs], bs, 8)
                s_tokens, s_seconds = run_stock(lm, timed, bs, new_tokens)
                entry.update({"stock_tokens": s_tokens, "stock_s": round(s_seconds, 3),
                              "stock_tok_s": round(s_tokens / s_seconds, 1),
                              "speedup": round((tokens / seconds) / (s_tokens / s_seconds), 2)})
            if lm.device.type == "cuda":
                entry["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(lm.device) / 2**30, 2)
            results.append(entry)
            print(json.dumps(entry), flush=True)
            write_report(args, lm, device_name, new_tokens, load_s, results)  # a timeout keeps what finished

    print(f"\n| batch | rows | ours tok/s | stock tok/s | speedup |\n|---:|---:|---:|---:|---:|")
    for e in results:
        print(f"| {e['batch']} | {e['rows']} | {e['ours_tok_s']} | {e.get('stock_tok_s', '-')} | {e.get('speedup', '-')} |")


if __name__ == "__main__":
    main()
