"""Decoding speed of every path beside transformers' own, behind the correctness gate.

    python bench/bench_decode.py                      # 7B shape, random fp16 weights, GPU 0: gate + speed
    python bench/bench_decode.py --paths static "hf static" --batches 1 32
    python bench/bench_decode.py --no-gate            # speed only
    python bench/bench_decode.py --tiny               # CPU smoke test
    python bench/bench_decode.py --quant int8 int4    # also our weight-only int8/int4, gated against fp16
    python bench/bench_decode.py --memory int8        # peak memory of the whole 7B loaded as chat loads it

Speed: generated tokens/s at each batch size for a fixed prompt (32 image + 100 text positions,
half the rows left-padded) and a fixed number of new tokens (random weights never stop), prefill
included. Paths: ours as chat and evaluate.py run by default ("static": static cache, fused step,
CUDA graphs), ours compiled, the eager DynamicCache loop, and transformers' generate with its
dynamic cache ("hf") and with cache_implementation="static" ("hf static", which compiles the
decode step). "limit" is the bytes a step must read (weights + the valid KV cache) over the
device-to-device copy bandwidth measured in the same run.
Gate (minigpt4/decoding/gate.py): each of our paths teacher-forced against an eager forward on
the shapes users produce; the script exits 1 when any falls below 0.9 agreement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt4.decoding import DynamicDecoder, StaticDecoder, make_decoder  # noqa: E402
from minigpt4.decoding.gate import run_gate, run_rows_gate, table, with_row_prefill_graphs  # noqa: E402

SEVEN_B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32001, max_position_embeddings=2048, rms_norm_eps=1e-6)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=1000, max_position_embeddings=2048)


def build_llm(tiny: bool) -> LlamaForCausalLM:
    """The bare language model, random weights: 7B shape in fp16 on GPU 0, or tiny in fp32 on the CPU."""
    device = torch.device("cpu" if tiny else "cuda")
    torch.manual_seed(0)
    with torch.device(device):
        torch.set_default_dtype(torch.float32 if tiny else torch.float16)
        llm = LlamaForCausalLM(LlamaConfig(**(TINY if tiny else SEVEN_B))).eval()
        torch.set_default_dtype(torch.float32)
    return llm


def gate_paths(llm) -> dict:
    """Our decode paths a user can select (generation.cache / generation.compile), as decoder
    factories for the gate: (batch, positions) -> an empty decoder."""
    paths = {"dynamic": lambda b, n: DynamicDecoder(llm, b),
             "static": lambda b, n: make_decoder(llm, b, n, static=True),
             # chat's cache, which grows: here it must grow within each scenario, past its first prompt
             "static growing": lambda b, n: StaticDecoder(llm, b, n, start_len=n - 16)}
    if llm.device.type == "cuda":
        paths["static compile"] = lambda b, n: make_decoder(llm, b, n, static=True, compile=True)
        paths["static max-autotune-no-cudagraphs"] = lambda b, n: make_decoder(
            llm, b, n, static=True, compile="max-autotune-no-cudagraphs")
    return paths


def quantized_copy(llm, mode: str):
    """A copy of the LLM with int8/int4 weights (minigpt4/decoding/quant.py), as precision=MODE loads
    it; "int4-g32": int4 with groups of 32 (an experiment: the default groups are 128)."""
    import copy

    from minigpt4.decoding.quant import quantize_llm

    base, _, group = mode.partition("-g")
    return quantize_llm(copy.deepcopy(llm), base, group=int(group or 128))


def quant_gate_paths(qllm, mode: str) -> dict:
    return {f"{mode} static": lambda b, n: make_decoder(qllm, b, n, static=True),  # also with generation.compile (off on int weights)
            f"{mode} dynamic": lambda b, n: DynamicDecoder(qllm, b)}


@torch.inference_mode()
def memory_of_chat(precision: str, new: int, context: int = 2000, grow: bool = True) -> dict:
    """Peak GPU memory of the whole 7B MiniGPT-4 (random weights, loaded as chat loads it) answering
    one image + 100-token question with the cache chat makes for chat.max_context=`context`
    (default 2,000; it grows to that when a conversation needs it; grow=False: the whole cache
    from the start, the peak of a conversation that reached the context), in this fresh process."""
    from minigpt4.build import load_model
    from minigpt4.config import compose, load_spec

    lm = load_model(load_spec(compose("chat", ["model=7b", "checkpoint=random", f"precision={precision}", "gpu=0"])))
    loaded_gib = torch.cuda.max_memory_allocated() / 2**30
    llm = lm.model.llm
    embeds = torch.randn(1, 132, llm.config.hidden_size, device="cuda", dtype=torch.float16) * 0.02
    mask = torch.ones(1, 132, dtype=torch.long, device="cuda")
    decoder = make_decoder(llm, 1, context + 1, static=True, grow=grow)  # as chat's _new_decoder
    t, _ = timed(lambda: ours(decoder, embeds, mask, new), torch.device("cuda"))
    return {"precision": precision, "context": context, "grow": grow, "cache_slots": decoder.max_len, "loaded_gib": loaded_gib,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "tok_s": new / t}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def hf_generate(llm, embeds, mask, new_tokens, static: bool):
    extra = dict(cache_implementation="static") if static else {}
    return llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **extra)[:, -new_tokens:]


@torch.inference_mode()
def ours(decoder, embeds, mask, new_tokens):
    """Greedy decoding on one of our decoders -> tokens [B,new]."""
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    logits = decoder.prefill(embeds, pos, mask)
    nxt, out = pos[:, -1], []
    for _ in range(new_tokens):
        tok = logits.argmax(-1)
        out.append(tok)
        nxt = nxt + 1
        logits = decoder.step(tok, nxt)
    return torch.stack(out, 1)


def timed(fn, device, repeats=3):
    first = time.perf_counter()
    fn()  # warm-up (captures graphs, compiles)
    sync(device)
    first = time.perf_counter() - first
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], first


def copy_bandwidth(device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(device)
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        b.copy_(a)
    sync(device)
    return 2 * a.numel() * n / (time.perf_counter() - t0)


def speed_paths(llm, batch: int, length: int, new: int) -> dict:
    held = {}

    def decoder(compile):  # one decoder per path, kept across repeats (as chat and evaluate keep theirs)
        if compile not in held:
            held[compile] = make_decoder(llm, batch, length + new, static=True, compile=compile)
        held[compile].crop(0)
        return held[compile]

    return {
        "static": lambda e, m: ours(decoder(False), e, m, new),
        "static compile": lambda e, m: ours(decoder(True), e, m, new),
        "dynamic": lambda e, m: ours(DynamicDecoder(llm, batch), e, m, new),
        "hf": lambda e, m: hf_generate(llm, e, m, new, static=False),
        "hf static": lambda e, m: hf_generate(llm, e, m, new, static=True),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt", type=int, default=132, help="prompt positions (32 image + 100 text)")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--paths", nargs="+", default=["static", "static compile", "hf static", "hf"])
    ap.add_argument("--no-gate", action="store_true")
    ap.add_argument("--gate-only", action="store_true")
    ap.add_argument("--gate-paths", nargs="+", default=None, help="default: every path of gate_paths()")
    ap.add_argument("--gate-batches", type=int, nargs="+", default=None, help="default: --batches")
    ap.add_argument("--quant", nargs="*", default=[], choices=["int8", "int4", "int4-g64", "int4-g32"],
                    help="also gate and time our weight-only int8/int4 (paths 'int8', 'int4')")
    ap.add_argument("--memory", choices=["fp16", "int8", "int4"],
                    help="only: peak GPU memory of the whole 7B model loaded and answering as chat does")
    ap.add_argument("--context", type=int, default=2000, help="with --memory: chat.max_context (the cache's size)")
    ap.add_argument("--full-cache", action="store_true",
                    help="with --memory: the cache at its full size from the start (a conversation that reached the context)")
    args = ap.parse_args()
    if args.memory:
        result = memory_of_chat(args.memory, args.new, args.context, grow=not args.full_cache)
        print(json.dumps(result))
        if os.environ.get("OUT"):
            name = f"memory_{args.memory}" + ("" if args.context == 2000 else f"_{args.context}") + (
                "_full" if args.full_cache else "")
            Path(os.environ["OUT"], f"{name}.json").write_text(json.dumps(result, indent=2))
        return
    llm = build_llm(args.tiny)
    quantized = {mode: quantized_copy(llm, mode) for mode in args.quant}
    device, dtype = llm.device, llm.dtype
    out = {"args": vars(args), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    failed = False
    if not args.no_gate:
        paths = gate_paths(llm)
        paths = {k: v for k, v in paths.items() if args.gate_paths is None or k in args.gate_paths}
        results = run_gate(llm, paths, batches=tuple(args.gate_batches or args.batches))
        if "static" in paths:  # the serving engine's rows (web page, API): prefilled together, each at its own length
            results.append(run_rows_gate(llm, "engine rows", lambda b, n: StaticDecoder(llm, b, n)))
            results.append(run_rows_gate(llm, "engine rows, graphed admissions",
                                         with_row_prefill_graphs(lambda b, n: StaticDecoder(llm, b, n))))
        for mode, qllm in quantized.items():  # teacher-forced against the fp16 model's eager forward
            results += run_gate(qllm, quant_gate_paths(qllm, mode), batches=tuple(args.gate_batches or args.batches),
                                reference_llm=llm)
            # and against the quantized model's own eager forward: the kernels must compute the int
            # model exactly (random weights' flat logits make the fp16 gate blind)
            own = {f"{name} vs {mode}": fn for name, fn in quant_gate_paths(qllm, mode).items()}
            results += run_gate(qllm, own, batches=tuple(args.gate_batches or args.batches))
        print(table(results), flush=True)
        out["gate"] = [r.row() for r in results]
        failed = not all(r.ok() for r in results)
    if not args.gate_only:
        bandwidth = copy_bandwidth(device)
        weight_bytes = sum(p.nbytes for p in llm.parameters()) - llm.get_input_embeddings().weight.nbytes
        kv_per_position = 2 * llm.config.num_hidden_layers * llm.config.hidden_size * dtype.itemsize
        names = args.paths + args.quant  # the paths timed, in the table's order
        rows = []
        for b in args.batches:
            embeds = torch.randn(b, args.prompt, llm.config.hidden_size, device=device, dtype=dtype) * 0.02
            mask = torch.ones(b, args.prompt, dtype=torch.long, device=device)
            mask[b // 2 :, : args.prompt // 4] = 0  # half the rows left-padded (the first row of a batch of 1 is not)
            average_len = args.prompt + args.new / 2
            step_bytes = weight_bytes + b * average_len * kv_per_position
            row = {"batch": b, "limit_tok_s": b * bandwidth / step_bytes}
            paths = speed_paths(llm, b, args.prompt, args.new)
            for mode, qllm in quantized.items():
                ours_q = speed_paths(qllm, b, args.prompt, args.new)
                paths[mode] = ours_q["static"]
            for name, fn in paths.items():
                if name not in names:
                    continue
                t, first = timed(lambda: fn(embeds, mask), device)
                row[name] = b * args.new / t
                row[name + " first_s"] = first
                print(f"batch {b:>3} {name:<16} {row[name]:>9.1f} tok/s (first call {first:.1f} s)", flush=True)
            rows.append(row)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
        print(f"\n{'batch':>5} " + " ".join(f"{n:>14}" for n in names) + f" {'limit':>9}")
        for r in rows:
            print(f"{r['batch']:>5} " + " ".join(f"{r.get(n, float('nan')):>14.1f}" for n in names) + f" {r['limit_tok_s']:>9.1f}")
        print(f"tok/s; copy bandwidth {bandwidth / 1e12:.2f} TB/s; peak GPU memory {peak:.1f} GiB; {out['device']}")
        out.update(rows=rows, bandwidth_tb_s=bandwidth / 1e12, peak_gib=peak)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_decode.json").write_text(json.dumps(out, indent=2))
    if failed:
        print("FAILED: a decode path is below the correctness gate (agreement < 0.9)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
