"""Decode-step microbenchmark: stock transformers generate vs our static-cache CUDA-graph decoder.

    python bench/bench_decode.py                 # 7B shape, random fp16 weights, needs a GPU
    python bench/bench_decode.py --tiny          # CPU smoke test

Measures generated tokens/s at several batch sizes for a fixed prompt length and a fixed
number of new tokens (random weights never stop, so lengths are forced), and checks that the
greedy tokens of both paths agree.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minigpt4.cuda_decode import StaticDecoder

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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def stock(llm, embeds, mask, new_tokens):
    out = llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, -new_tokens:]


@torch.inference_mode()
def ours(llm, embeds, mask, new_tokens, compile=False, forced=None):
    """Greedy tokens [B,new]; with `forced` [B,new] feed those tokens instead and return the
    argmax predictions (teacher-forced agreement with the stock path)."""
    b, t, _ = embeds.shape
    from minigpt4.cuda_decode import decoder_for

    dec = decoder_for(llm, b, t + new_tokens, compile=compile)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    logits = dec.prefill(embeds, pos, mask)
    nxt = pos[:, -1]
    out = []
    for i in range(new_tokens):
        tok = logits.argmax(-1)
        out.append(tok)
        if forced is not None:
            tok = forced[:, i]
        nxt = nxt + 1
        logits = dec.step(tok, nxt)
    return torch.stack(out, 1)


def timed(fn, device, repeats=3):
    fn()  # warm-up (captures graphs)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt", type=int, default=132, help="prompt positions (32 image + 100 text)")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--compile", nargs="?", const=True, default=False,
                    help="torch.compile the decode step before capture (optionally: an Inductor mode)")
    args = ap.parse_args()
    llm = build_llm(args.tiny)
    device, dtype = llm.device, llm.dtype
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        embeds = torch.randn(b, args.prompt, llm.config.hidden_size, device=device, dtype=dtype) * 0.02
        mask = torch.ones(b, args.prompt, dtype=torch.long, device=device)
        mask[b // 2 :, : args.prompt // 4] = 0  # half the rows left-padded
        t_stock, out_stock = timed(lambda: stock(llm, embeds, mask, args.new), device)
        t_ours, out_ours = timed(lambda: ours(llm, embeds, mask, args.new, args.compile), device)
        agree = float((out_stock == out_ours).float().mean())
        # near-uniform random-weight logits make free-running greedy paths diverge at the first
        # fp16 near-tie; teacher forcing compares the two implementations position by position
        forced = ours(llm, embeds, mask, args.new, args.compile, forced=out_stock)
        forced_agree = float((forced == out_stock).float().mean())
        rows.append(dict(batch=b, stock_tok_s=b * args.new / t_stock, ours_tok_s=b * args.new / t_ours,
                         stock_s=t_stock, ours_s=t_ours, greedy_agreement=agree,
                         teacher_forced_agreement=forced_agree))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    print(f"{'batch':>5} {'stock tok/s':>12} {'ours tok/s':>11} {'speed-up':>8} {'free agree':>10} {'forced agree':>12}")
    for r in rows:
        print(f"{r['batch']:>5} {r['stock_tok_s']:>12.1f} {r['ours_tok_s']:>11.1f} "
              f"{r['ours_tok_s'] / r['stock_tok_s']:>8.2f} {r['greedy_agreement']:>10.3f} {r['teacher_forced_agreement']:>12.3f}")
    print(f"peak GPU memory {peak:.1f} GiB; device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_decode.json"), "w") as f:
            json.dump(dict(rows=rows, peak_gib=peak, args=vars(args)), f, indent=2)


if __name__ == "__main__":
    main()
