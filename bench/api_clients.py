"""Streaming clients for bench/bench_api.py, run in a process of their own (as real clients are):
in the server's process, 32-64 client threads parsing server-sent events took the GIL from the
engine and the event loop and inflated every latency (2026-12-02: client-side first chunk 1.3 s
where the engine's first token came after 0.27 s). One asyncio loop drives every client here."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import httpx


async def _one(client: httpx.AsyncClient, url: str, question: str) -> dict:
    """Stream one answer -> {ttft, gaps, tokens} (text chunks' arrival times)."""
    if "{n}" in question:  # each request its own question (no cached prefix beyond the system prompt)
        question = question.replace("{n}", str(next(_numbers)))
    body = {"model": "bench", "stream": True, "messages": [{"role": "user", "content": question}]}
    start, stamps, tokens = time.perf_counter(), [], 0
    async with client.stream("POST", url + "/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                stamps.append(time.perf_counter())
            if line.startswith("data: {") and '"usage"' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return {"ttft": stamps[0] - start if stamps else float("nan"),
            "gaps": [b - a for a, b in itertools.pairwise(stamps)], "tokens": tokens}


_numbers = itertools.count(1)


async def _clients(url: str, clients: int, per_client: int, question: str, seconds: float | None,
                   start_at: float | None) -> tuple[list, float, float]:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:
        if start_at is not None:  # the other processes' clients start at the same moment
            await asyncio.sleep(max(0.0, start_at - time.time()))
        started = time.time()
        stop = started + seconds if seconds else None

        async def one_client() -> list[dict]:
            done = []
            while (stop is None and len(done) < per_client) or (stop is not None and time.time() < stop):
                done.append(await _one(client, url, question))
            return done

        batches = await asyncio.gather(*(one_client() for _ in range(clients)))
        return [r for batch in batches for r in batch], started, time.time()


def load(url: str, clients: int, per_client: int, question: str, seconds: float | None = None,
         first_number: int = 1, start_at: float | None = None) -> tuple[list, float, float]:
    """`clients` concurrent clients, each sending `per_client` requests in turn (or for `seconds`),
    starting at time.time() == start_at (several processes together) -> (one result per request,
    when they started, when the last ended: time.time(), comparable across processes). "{n}" in
    the question: a number of its own per request, counted from first_number."""
    global _numbers
    _numbers = itertools.count(first_number)
    return asyncio.run(_clients(url, clients, per_client, question, seconds, start_at))
