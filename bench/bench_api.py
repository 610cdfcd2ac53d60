"""The OpenAI-compatible API under load: N concurrent streaming clients against one engine.

    python bench/bench_api.py                       # 7B shape, random fp16, GPU 0: 1, 8, 32, 64 clients
    python bench/bench_api.py --tiny --clients 1 4  # CPU smoke test (the demo-sized model)

The clients run in four processes of their own (bench/api_clients.py: one asyncio loop each),
as real clients do. Each client sends its requests one after another over HTTP (server-sent events), each a text
question of ~100 tokens answered with exactly --new tokens (random weights never stop:
min_new_tokens and no stop string force the length, as the other benches do). Reported per
client count: aggregate generated tokens/s, p50/p99 time to first token, p50 time between
tokens, peak GPU memory, and the same requests sent one after another ("sequential"). The
same two latencies per token as the engine saw them ("per token (engine)"). Random weights
answer only with pieces a client sees at once (visible_answers_only: before 2026-12-02 most of
their tokens were ids the bench's tokenizer cannot show, and client-side latencies waited for
the visible ones). --sync-clients: those client counts again with the engine's steps not fed ahead (each
step's tokens taken on the host before the next step is queued: the engine before 2026-12-02).
--soak: 32 clients for that many seconds, GPU memory sampled every 5 s, once per
--soak-prompts: "same" (every request the same question: the row a request gets holds its whole
prompt, so an admission prefills one position and costs only its fixed part) and "distinct"
(each request its own question: only the system prompt is reused, as for real users). Peer: evaluate.py's
path (one static batch of 32, the same prompt), in the same process.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import api_clients  # noqa: E402
from minigpt4.build import load_model  # noqa: E402
from minigpt4.config import compose, load_spec  # noqa: E402
from minigpt4.frontends.api import ApiSettings, create_app  # noqa: E402
from minigpt4.generation import GenerationSettings  # noqa: E402
from minigpt4.serving.engine import ADMIT_WAIT, CAPTURED_POSITIONS, Engine  # noqa: E402


def start_server(loaded, slots: int, new: int, graph_admissions: bool = False):
    engine = Engine(loaded, slots=slots, max_context=2000, max_queue=1024, capture_positions=CAPTURED_POSITIONS,
                    graph_admissions=graph_admissions)  # as chat.py's
    engine.seen = []  # every request, for the engine-side token timings
    submit = engine.submit
    engine.submit = lambda *a, **k: engine.seen.append(submit(*a, **k)) or engine.seen[-1]
    fixed = GenerationSettings(do_sample=False, max_new_tokens=new, min_new_tokens=new)
    app = create_app(engine, loaded, fixed, ApiSettings(port=0), model_name="bench")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return engine, server, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"


def visible_answers_only(loaded) -> int:
    """Make every answer token a piece the client sees at once -> how many pieces can be answered.
    The random 7B has 32,000 output rows but the bench's tokenizer 1,024 pieces (256 of them bytes,
    which show only once a character completes): on 2026-12-02 a client got a text chunk every
    ~17 tokens, and its time to first token waited for the first visible one. The other rows of
    the output layer are zeroed: their logits are 0, below the best of ~700 random ones. Each
    step does the same work."""
    sp = loaded.tokenizer.sp
    visible = [i for i in range(sp.get_piece_size())
               if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)) and sp.decode([i]).strip()]
    head = loaded.model.llm.get_output_embeddings().weight  # [V,H]
    hidden = torch.ones(head.shape[0], dtype=torch.bool, device=head.device)
    hidden[visible] = False
    with torch.no_grad():
        head[hidden] = 0
    return len(visible)


def token_timings(requests) -> dict:
    """Engine-side, per token (random weights emit byte tokens that reach the client only once a
    character completes, which delays the client's text chunks): submit -> first token, and the
    mean time between a request's tokens."""
    ttft = sorted(r.first_token_at - r.submitted_at for r in requests if r.first_token_at)
    itl = sorted((r.finished_at - r.first_token_at) / (r.completion_tokens - 1)
                 for r in requests if r.completion_tokens > 1 and r.finished_at)
    if not ttft:
        return {}
    return {"token_ttft_p50_ms": 1e3 * ttft[len(ttft) // 2], "token_ttft_p99_ms": 1e3 * ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))],
            "token_itl_p50_ms": 1e3 * itl[len(itl) // 2] if itl else float("nan")}


def admissions(engine, before: collections.Counter, seconds: float) -> dict:
    """How the engine admitted requests since `before` (its stats then): each admission pauses
    every decoding row for a prefill."""
    done = engine.stats - before
    return {"admissions": done["admissions"], "per_admission": done["admitted"] / max(1, done["admissions"]),
            "admit_share": done["admit_s"] / seconds}


CLIENT_PROCESSES = 4  # the clients' processes: one asyncio loop parsing 32-64 streams lagged (client p99 TTFT 423 ms, engine 169 ms)


def run_clients(clients_process, url: str, clients: int, per_client: int, question: str, engine=None,
                seconds: float | None = None) -> dict:
    """`clients` streaming clients (spread over the clients' processes), each sending `per_client`
    requests in turn or, given `seconds`, requests back to back for that long -> the row of the table."""
    first = len(engine.seen) if engine is not None else 0
    before = engine.stats.copy() if engine is not None else None
    groups = [clients // CLIENT_PROCESSES + (k < clients % CLIENT_PROCESSES) for k in range(CLIENT_PROCESSES)]
    start_at = time.time() + 0.2  # every process's clients start together (measured from then to the last answer;
    # on 2026-12-02 each process timed itself, and their staggered starts overstated bursts of 32: 5,747 tokens/s)
    jobs = [clients_process.submit(api_clients.load, url, n, per_client, question, seconds, 1 + k * 10**6, start_at)
            for k, n in enumerate(groups) if n]
    parts = [job.result() for job in jobs]
    results = [r for part, _, _ in parts for r in part]
    seconds = max(end for _, _, end in parts) - min(start for _, start, _ in parts)
    ttft = sorted(r["ttft"] for r in results)
    gaps = [g for r in results for g in r["gaps"]]
    return {"clients": clients, "requests": len(results), "tok_s": sum(r["tokens"] for r in results) / seconds,
            "ttft_p50_ms": 1e3 * ttft[len(ttft) // 2], "ttft_p99_ms": 1e3 * ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))],
            "itl_p50_ms": 1e3 * statistics.median(gaps) if gaps else float("nan"), "seconds": seconds,
            **(token_timings(engine.seen[first:]) if engine is not None else {}),
            **(admissions(engine, before, seconds) if engine is not None else {})}


def soak(clients_process, url: str, clients: int, seconds: float, question: str, engine) -> dict:
    """`clients` clients sending requests back to back for `seconds` (the steady state: their
    requests no longer arrive together); GPU memory sampled every 5 s: it must stay flat (no
    per-request growth)."""
    samples, row = [], {}
    job = threading.Thread(target=lambda: row.update(run_clients(clients_process, url, clients, 0, question, engine, seconds)))
    job.start()
    while job.is_alive():
        samples.append(torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0)
        job.join(timeout=5)
    return {**row, "allocated_gib_first": samples[0], "allocated_gib_min": min(samples),
            "allocated_gib_max": max(samples), "allocated_gib_last": samples[-1], "samples": len(samples)}


@torch.inference_mode()
def batch_decode_peer(loaded, batch: int, question: str, new: int) -> float:
    """evaluate.py's path for the same prompt: one static batch of `batch` rows -> tokens/s."""
    from bench.bench_decode import ours, timed
    from minigpt4.decoding import make_decoder

    llm = loaded.model.llm
    ids = torch.tensor([loaded.tokenizer.encode(question)] * batch, device=loaded.device)
    embeds = llm.get_input_embeddings()(ids)
    mask = torch.ones(ids.shape, dtype=torch.long, device=loaded.device)
    decoder = make_decoder(llm, batch, ids.shape[1] + new, static=True)
    t, _ = timed(lambda: ours(decoder, embeds, mask, new), loaded.device)
    return batch * new / t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--per-client", type=int, default=2, help="requests each client sends in turn")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--soak", type=float, default=0,
                    help="then 32 clients back to back for this many seconds, once per --admit-wait-ms: memory flat?")
    ap.add_argument("--graph-admissions", action=argparse.BooleanOptionalAction, default=None,
                    help="short admissions replay CUDA graphs (decoding/row_prefill.py); default: as chat.py's "
                         "serve.graph_admissions=true, on a GPU only")
    ap.add_argument("--soak-prompts", nargs="+", choices=["same", "distinct"], default=["same"],
                    help="soak with every request asking the same question (its prompt is cached in the row it "
                         "gets: a one-position prefill) or each its own (only the system prompt is reused)")
    ap.add_argument("--admit-wait-ms", type=float, nargs="+", default=[ADMIT_WAIT * 1000],
                    help="the engine's admit_wait: the first for every run, the others again at 32 clients (and soaked)")
    ap.add_argument("--sync-clients", type=int, nargs="*", default=[32],
                    help="these client counts again with each step's tokens taken before the next step is queued")
    args = ap.parse_args()
    overrides = ["model=tiny", "checkpoint=random", "gpu=cpu"] if args.tiny else ["model=7b", "checkpoint=random", "gpu=0"]
    torch.manual_seed(0)
    loaded = load_model(load_spec(compose("chat", overrides)))
    loaded.template = loaded.template.with_overrides(stop=())
    visible_answers_only(loaded)
    question = " ".join(["how many red circles are there in the picture"] * 11) + "?"
    graphed = loaded.device.type == "cuda" if args.graph_admissions is None else args.graph_admissions
    engine, server, url = start_server(loaded, max(args.clients), args.new, graphed)
    engine.admit_wait = args.admit_wait_ms[0] / 1000
    rows, soaked = [], []
    clients_process = ProcessPoolExecutor(CLIENT_PROCESSES, mp_context=multiprocessing.get_context("spawn"))
    try:
        # warm-up: the first graphs, and the kernels of admissions of up to max(clients) rows (on
        # 2026-12-02 the first run with several rows paid ~1 s of first uses in its TTFTs)
        run_clients(clients_process, url, 1, 1, question)
        run_clients(clients_process, url, max(args.clients), 1, question)  # also starts every client process
        sequential = run_clients(clients_process, url, 1, max(args.clients) * args.per_client // 4 or 1, question, engine)
        print(f"sequential: {sequential['tok_s']:.1f} tok/s", flush=True)
        for n in args.clients:
            if loaded.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            row = run_clients(clients_process, url, n, args.per_client, question, engine)
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if loaded.device.type == "cuda" else None
            rows.append({**row, "feed_ahead": True, "admit_wait_ms": args.admit_wait_ms[0]})
            print(json.dumps(rows[-1]), flush=True)
        engine.feed_ahead = False  # the engine idles between runs: the next step reads it
        for n in args.sync_clients:
            rows.append({**run_clients(clients_process, url, n, args.per_client, question, engine), "feed_ahead": False,
                         "admit_wait_ms": args.admit_wait_ms[0]})
            print(json.dumps(rows[-1]), flush=True)
        engine.feed_ahead = True
        for k, wait in enumerate(args.admit_wait_ms):
            engine.admit_wait = wait / 1000
            if k:
                rows.append({**run_clients(clients_process, url, 32, args.per_client, question, engine),
                             "feed_ahead": True, "admit_wait_ms": wait})
                print(json.dumps(rows[-1]), flush=True)
            for prompts in args.soak_prompts if args.soak else []:
                asked = question if prompts == "same" else "Question {n}: " + question
                soaked.append({**soak(clients_process, url, 32, args.soak, asked, engine), "admit_wait_ms": wait,
                               "prompts": prompts})
                print("soak:", json.dumps(soaked[-1]), flush=True)
    finally:
        clients_process.shutdown()
        server.should_exit = True
        engine.close()
    peer = batch_decode_peer(loaded, 32, question, args.new)
    print(f"evaluate.py's path, one static batch of 32: {peer:.1f} tok/s", flush=True)
    print(f"\n{'run':>6} {'clients':>7} {'ahead':>5} {'wait':>6} {'tok/s':>9} {'ttft p50':>9} {'ttft p99':>9} {'itl p50':>8}"
          f" {'prompts':>8}   per token (engine): {'ttft p50':>9} {'ttft p99':>9} {'itl p50':>8}  admissions  per  prefill share")
    for name, r in [("burst", r) for r in rows] + [("soak", r) for r in soaked]:
        print(f"{name:>6} {r['clients']:>7} {r.get('feed_ahead', True)!s:>5} {r['admit_wait_ms']:>4.0f}ms"
              f" {r['tok_s']:>9.1f} {r['ttft_p50_ms']:>7.1f}ms {r['ttft_p99_ms']:>7.1f}ms {r['itl_p50_ms']:>6.1f}ms"
              f" {r.get('prompts', 'same'):>8}                       {r.get('token_ttft_p50_ms', float('nan')):>7.1f}ms "
              f"{r.get('token_ttft_p99_ms', float('nan')):>7.1f}ms {r.get('token_itl_p50_ms', float('nan')):>6.1f}ms"
              f"  {r.get('admissions', 0):>10} {r.get('per_admission', 0):>4.1f} {r.get('admit_share', 0):>13.2f}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_api.json").write_text(json.dumps(
            {"rows": rows, "sequential": sequential, "args": vars(args), "graph_admissions": graphed, "batch32_peer_tok_s": peer,
             "soak": soaked,
             "device": torch.cuda.get_device_name() if loaded.device.type == "cuda" else "cpu"}, indent=2))


if __name__ == "__main__":
    main()
