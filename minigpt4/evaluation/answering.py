"""How rows get their answers: in batches of similar prompt length through one reused decoder
(the default), or through the serving engine (evaluate.engine=true), where a row that finishes
hands its slot to the next row at once instead of waiting for its batch's longest answer. Which
is faster depends on how much answer lengths differ: bench/bench_evaluate.py --engine measures
both on the same rows. Each finished (or failed) row is written at once.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from minigpt4.conversation import build_prompt, clean_answer, encode_prompt
from minigpt4.decoding import Decoder, make_decoder
from minigpt4.errors import UserError
from minigpt4.evaluation.prompts import PromptRow
from minigpt4.generation import COMPILE_PAYS_FROM_TOKENS, GenerationSettings, generate
from minigpt4.serving.engine import Engine, Request
from minigpt4.settings import MAX_CONTEXT

log = logging.getLogger(__name__)


def answer_rows(lm, rows: list[PromptRow], settings: GenerationSettings, batch_size: int,
                write: Callable[[dict], None], max_context: int = MAX_CONTEXT, progress: bool = False,
                engine: bool = False) -> dict:
    """Answer rows in batches of similar length (engine=True: through the serving engine, with
    batch_size rows decoded at once); each finished (or failed) row is written at once.
    Returns {"rows", "generated_tokens", "seconds"} for this call."""
    from tqdm import tqdm

    start = time.perf_counter()
    limit = min(max_context, lm.model.llm.config.max_position_embeddings)
    bar = tqdm(total=len(rows), unit="row", disable=not progress, dynamic_ncols=True)
    stats = {"rows": 0, "generated_tokens": 0}

    def finish(row: PromptRow, answer: str | None, error: str | None = None, finish_reason=None, n_tokens=0):
        write({**row.to_record(), "answer": answer, "finish_reason": finish_reason, "n_tokens": n_tokens, "error": error})
        stats["rows"] += 1
        stats["generated_tokens"] += n_tokens
        elapsed = time.perf_counter() - start
        bar.set_postfix(tok_s=f"{stats['generated_tokens'] / elapsed:.0f}", refresh=False)
        bar.update(1)

    encoded: list[tuple[PromptRow, list[int]]] = []
    for row in rows:
        try:
            conv = build_prompt(lm.template, row.prompt, row.images)
            ids = encode_prompt(lm.tokenizer.encode, conv.prompt(), lm.model.num_image_tokens)
        except UserError as err:
            finish(row, None, str(err))
            continue
        if len(ids) + settings.max_new_tokens > limit:
            finish(row, None, f"prompt is {len(ids)} tokens: with max_new_tokens={settings.max_new_tokens} "
                              f"it exceeds the {limit}-token context")
            continue
        encoded.append((row, ids))
    encoded.sort(key=lambda item: len(item[1]))  # stable: equal lengths keep prompt order
    if settings.compile == "auto":  # decided once for the whole job, by its length
        budget = len(encoded) * settings.max_new_tokens
        settings = replace(settings, compile=settings.compile_for(budget))
        if lm.device.type == "cuda":
            log.info("generation.compile=auto: %s for up to %d new tokens (compiling pays from %d)",
                     "compiling the decode step" if settings.compile else "not compiling", budget,
                     COMPILE_PAYS_FROM_TOKENS)

    if engine:
        _answer_through_engine(lm, encoded, settings, batch_size, limit, finish)
    else:
        _answer_in_batches(lm, encoded, settings, batch_size, finish)
    bar.close()
    stats["seconds"] = time.perf_counter() - start
    return stats


def with_pixels(lm, items: list, finish: Callable) -> list[tuple]:
    """[(row, ids)] -> [(row, ids, pixels)]; a row whose image is missing or unreadable fails
    (finish) and the run goes on."""
    out = []
    for row, ids in items:
        try:
            out.append((row, ids, lm.pixels(row.images)))
        except UserError as err:
            finish(row, None, str(err))
    return out


def _answer_in_batches(lm, encoded: list, settings: GenerationSettings, batch_size: int, finish: Callable) -> None:
    """Rows in batches of similar length (encoded is sorted by prompt length), one decoder reused."""
    decoder: Decoder | None = None

    def decoder_for(batch: list) -> Decoder:  # one decoder, reused while it fits (make_decoder decides)
        nonlocal decoder
        longest = max(len(ids) for _, ids, _ in batch)
        decoder = make_decoder(lm.model.llm, len(batch), longest + settings.max_new_tokens,
                               static=settings.use_static(lm.device), compile=settings.compile, reuse=decoder)
        return decoder

    for i in range(0, len(encoded), batch_size):
        batch = with_pixels(lm, encoded[i : i + batch_size], finish)
        for (row, _, _), result, error in _generate_batch(lm, batch, settings, decoder_for):
            if error is not None:
                finish(row, None, error)
                continue
            n_tokens = getattr(result, "n_steps", 0) or len(result.ids) + (result.finish_reason == "eos")
            finish(row, clean_answer(result.text, lm.template), None, result.finish_reason, n_tokens)


def _generate_batch(lm, batch: list, settings: GenerationSettings, decoder_for: Callable[[list], Decoder]) -> list[tuple]:
    """[(row, ids, pixels)] -> [(item, Generated | None, error | None)]. A batch that fails as a
    whole (out of memory, say) is retried row by row so only the rows at fault fail."""
    if not batch:
        return []
    try:
        pixels = [p for _, _, p in batch if len(p)]
        embeds = lm.model.encode_images(torch.cat(pixels)) if pixels else None  # [N,Q,H]
        with torch.inference_mode():
            results = generate(lm.model, lm.tokenizer, [ids for _, ids, _ in batch], embeds, settings,
                               stops=lm.template.stop, decoder=decoder_for(batch))
        return [(item, result, None) for item, result in zip(batch, results)]
    except Exception as err:  # noqa: BLE001 - recorded per row; the run goes on
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(batch) > 1:
            log.warning("a batch of %d failed (%s); retrying its rows one by one", len(batch), err)
            return [out for item in batch for out in _generate_batch(lm, [item], settings, decoder_for)]
        log.warning("row %s failed: %s", batch[0][0].key, err)
        return [(batch[0], None, f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}")]


def _answer_through_engine(lm, encoded: list, settings: GenerationSettings, slots: int, max_context: int,
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
