"""Where a serving engine's admission goes: the prefill of k waiting requests while rows decode.

    python bench/profile_admission.py          # 7B shape, random fp16, GPU 0: 32 rows decoding
    python bench/profile_admission.py --tiny   # CPU smoke test of the script

Every admission pauses every decoding row, so its cost decides how close 32 clients come to a
static batch of 32 (issue 16). On the H200 (2026-12-02) an admission whose requests had their
whole prompt cached (one new position each) still cost ~30 ms, where the arithmetic takes ~1.
Two cases, each for k = 1, 4, 11 and 32 requests:
- "same": each request's row holds its whole prompt (one position to compute a request);
- "distinct": each request its own question (only the system prompt is reused, ~110 new positions).
--graph-admissions: each case also with short admissions replayed as CUDA graphs (captured at
the start, as a server would). Reported per case: the host's time for Engine._admit (the median of a few, the GPU idle
beforehand), the GPU's busy time (kernels' total, one profiled admission), the kernels launched
and the aten calls made. Host time well above GPU time means the admission is bound by launches:
a CUDA graph (or a compiled prefill) would take most of it away.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt4.build import load_model  # noqa: E402
from minigpt4.config import compose, load_spec  # noqa: E402
from minigpt4.generation import GenerationSettings  # noqa: E402
from minigpt4.serving.engine import CAPTURED_POSITIONS, Engine  # noqa: E402

QUESTION = " ".join(["how many red circles are there in the picture"] * 11) + "?"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def prompt(engine: Engine, text: str) -> list[int]:
    conv = engine.loaded.conversation()
    conv.ask(text)
    return engine.prompt_ids(conv)


def admit(engine: Engine, prompts: list[list[int]], settings: GenerationSettings) -> list:
    """Queue these prompts and admit them in one round, on this thread -> their requests."""
    requests = [engine.submit(ids, None, settings) for ids in prompts]
    engine._admit()
    return requests


def finish(engine: Engine, requests: list) -> None:
    """End these requests and free their rows (their caches stay for the next ones)."""
    for row, active in enumerate(engine.rows):
        if active is not None and active.request in requests:
            engine._end(row, active, "length")


@torch.inference_mode()
def measure(engine: Engine, prompts_for: Callable[[int], list[list[int]]], repeats: int) -> dict:
    """Admit prompts_for(repeat) while the decoding rows hold still -> host ms (median), GPU busy
    ms, kernels, aten calls (of the last repeat, profiled)."""
    device = engine.loaded.device
    settings = GenerationSettings(do_sample=False, max_new_tokens=8)
    finish(engine, admit(engine, prompts_for(-1), settings))  # warm-up (a graph's capture, first uses)
    hosts = []
    for repeat in range(repeats):
        sync(device)
        started = time.perf_counter()
        requests = admit(engine, prompts_for(repeat), settings)  # ends with the first tokens on the host
        hosts.append(1e3 * (time.perf_counter() - started))
        finish(engine, requests)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        requests = admit(engine, prompts_for(repeats), settings)
        sync(device)
    finish(engine, requests)
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    aten = [e for e in events if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return {"requests": len(requests), "new_positions": sum(r.prefilled for r in requests),  # of the profiled repeat
            "host_ms": statistics.median(hosts), "host_ms_all": hosts,
            "gpu_busy_ms": sum(e.device_time for e in kernels) / 1e3 if kernels else None,
            "kernels": len(kernels), "aten_calls": len(aten)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 4, 11, 32])
    ap.add_argument("--decoding", type=int, default=32, help="rows decoding meanwhile (their caches are attended by nothing)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--graph-admissions", action="store_true",
                    help="each case also with short admissions replayed as CUDA graphs (decoding/row_prefill.py)")
    args = ap.parse_args()
    overrides = ["model=tiny", "checkpoint=random", "gpu=cpu"] if args.tiny else ["model=7b", "checkpoint=random", "gpu=0"]
    torch.manual_seed(0)
    loaded = load_model(load_spec(compose("chat", overrides)))
    slots = args.decoding + max(args.counts)
    engine = Engine(loaded, slots=slots, max_context=2000, start=False, capture_positions=CAPTURED_POSITIONS)
    long = GenerationSettings(do_sample=False, max_new_tokens=1500, min_new_tokens=1500)
    with torch.inference_mode():
        started = time.perf_counter()
        graphed = engine.decoder.use_row_prefill_graphs(CAPTURED_POSITIONS) if args.graph_admissions else 0
        sync(loaded.device)
        graphs, engine.decoder.row_prefill_graphs = engine.decoder.row_prefill_graphs, None
        print(f"captured {graphed} admission graphs in {time.perf_counter() - started:.1f} s", flush=True)
        admit(engine, [prompt(engine, f"Busy {n}: " + QUESTION) for n in range(args.decoding)], long)
        for _ in range(3):
            engine._step()
        sync(loaded.device)
    rows = []
    for k in args.counts:
        same = [prompt(engine, QUESTION)] * k
        with torch.inference_mode():  # the free rows then hold the whole prompt
            finish(engine, admit(engine, same, GenerationSettings(do_sample=False, max_new_tokens=1)))
        for graphed in [False, True] if graphs is not None else [False]:
            engine.decoder.row_prefill_graphs = graphs if graphed else None
            rows.append({"case": "same", "graphed": graphed,
                         **measure(engine, lambda repeat, same=same: same, args.repeats)})
            rows.append({"case": "distinct", "graphed": graphed, **measure(engine, lambda repeat, k=k, g=graphed: [
                prompt(engine, f"Question {((k * 2 + g) * 100 + repeat + 1) * 100 + n}: " + QUESTION) for n in range(k)],
                args.repeats)})
            print(json.dumps(rows[-2]), json.dumps(rows[-1]), sep="\n", flush=True)
    print(f"\n{'case':>9} {'graphed':>7} {'requests':>8} {'new positions':>13} {'host ms':>8} {'GPU busy ms':>11} {'kernels':>8} {'aten calls':>10}")
    for r in rows:
        gpu = f"{r['gpu_busy_ms']:.1f}" if r["gpu_busy_ms"] is not None else "-"
        print(f"{r['case']:>9} {r['graphed']!s:>7} {r['requests']:>8} {r['new_positions']:>13} {r['host_ms']:>8.1f} {gpu:>11} "
              f"{r['kernels']:>8} {r['aten_calls']:>10}")
    engine.close()
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "profile_admission.json").write_text(json.dumps(
            {"rows": rows, "args": vars(args),
             "device": torch.cuda.get_device_name() if loaded.device.type == "cuda" else "cpu"}, indent=2))


if __name__ == "__main__":
    main()
