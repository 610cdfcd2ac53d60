"""evaluate.engine=true: rows go through the serving engine instead of length-grouped batches.

A static batch decodes until its longest answer ends, so rows whose answers end early leave
their slot idle; the engine (continuous batching) gives a finished row's slot to the next row
at once. Which is faster depends on how much the answer lengths differ: bench/bench_evaluate.py
--engine measures both on the same rows.
"""

from __future__ import annotations

import collections
from dataclasses import replace
from typing import Callable

import torch

from minigpt4.conversation import clean_answer
from minigpt4.evaluation.runner import with_pixels
from minigpt4.generation import GenerationSettings
from minigpt4.serving.engine import Engine, Request


def answer_through_engine(lm, encoded: list, settings: GenerationSettings, slots: int, max_context: int,
                          finish: Callable) -> None:
    """encoded [(row, ids)] -> finish(row, answer, error, finish_reason, n_tokens) for each row as
    it ends. Images are encoded `slots` rows at a time; at most 2 x slots rows are in flight."""
    engine = Engine(lm, slots=slots, max_context=max_context, max_queue=2 * slots + 1)
    settings = replace(settings, compile=False)  # the engine's step is not compiled
    pending: collections.deque[tuple] = collections.deque()

    def drain(keep: int) -> None:  # write the oldest rows once they are done
        while len(pending) > keep:
            row, request = pending.popleft()
            request.done.wait()
            _write(lm, row, request, finish)

    try:
        for start in range(0, len(encoded), slots):
            chunk = with_pixels(lm, encoded[start : start + slots], finish)
            pixels = [p for _, _, p in chunk if len(p)]
            with torch.inference_mode():
                embeds = lm.model.encode_images(torch.cat(pixels)) if pixels else None  # [N,Q,H]
            first = 0
            for row, ids, row_pixels in chunk:
                mine = embeds[first : first + len(row_pixels)] if len(row_pixels) else None
                first += len(row_pixels)
                drain(2 * slots - 1)
                pending.append((row, engine.submit(ids, mine, settings, stops=tuple(lm.template.stop))))
        drain(0)
    finally:
        engine.close()


def _write(lm, row, request: Request, finish: Callable) -> None:
    if request.finish_reason == "error":
        finish(row, None, request.error)
    else:
        finish(row, clean_answer(request.text, lm.template), None, request.finish_reason, request.completion_tokens)
