"""One engine for many conversations: continuous batching over a fixed number of cache rows.

The engine owns the loaded model and one static decoder with `slots` rows. A background thread
loops: admit waiting requests into free rows (each is prefilled into its own row), then run
one decode step for every active row at once, each row at its own length (the fused step
writes each row's own cache slot and attends to its own valid slots). A step covers only the
rows up to the highest in use (rounded up to a power of two), and requests take the lowest free
rows, so one conversation on a 64-row engine decodes at batch-1 speed. A request that finishes
frees its row at once; a new one joins between two steps. Each request keeps its own sampling
settings, token budget, stop strings and random generator, so a greedy answer equals the same
request decoded alone. The API and the web page submit requests and read their events.
Prefix reuse (serving/prefix.py): a free row keeps its last request's keys and values, and a
new request goes to the free row that holds the longest prefix of it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from minigpt4.build import LoadedModel
from minigpt4.conversation import Conversation, encode_prompt
from minigpt4.decoding import StaticDecoder
from minigpt4.decoding.fused import unsupported_reason
from minigpt4.errors import UserError
from minigpt4.generation import GenerationSettings, HostCopy, StreamState
from minigpt4.model import IMAGE_TOKEN
from minigpt4.serving.prefix import assign_rows, prompt_keys
from minigpt4.serving.requests import ActiveRequest, QueueFull, Request, chunks
from minigpt4.serving.steps import InFlight, StagedInputs, in_sampling_groups, sample
from minigpt4.settings import MAX_CONTEXT, ChatSettings

__all__ = ["Engine", "QueueFull", "Request", "default_slots"]

log = logging.getLogger(__name__)

PREFILL_POSITIONS = 8192  # positions (rows x longest new part) one admission forward computes at most
ADMIT_WAIT = 0.05  # seconds a request may wait for others to be prefilled with it while rows decode (serve.admit_wait_ms)
CAPTURED_POSITIONS = 512  # a server captures its decode graphs at start for conversations up to this long


def default_slots(device: torch.device, llm, max_len: int) -> int:
    """Rows for the decoder: a few on the CPU; on a GPU as many as half the free memory holds
    (the KV cache of one row is 2 x layers x hidden x max_len values), at most 64."""
    if device.type != "cuda":
        return 4
    cfg = llm.config
    per_row = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) \
        * max_len * llm.dtype.itemsize
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(64, int(free * 0.5 // per_row)))


class Engine:
    """Engine(loaded, slots=None, max_context=MAX_CONTEXT, max_queue=64): call submit() from any thread."""

    @classmethod
    def for_chat(cls, loaded: LoadedModel, settings: ChatSettings) -> Engine:
        """The engine of chat.py's ui=web and ui=api: serve.slots rows (None: the device's
        default), serve.max_queue, chat.max_context; serve.graph_admissions on a GPU only (on the
        CPU the padded buckets would only add arithmetic)."""
        serve = settings.serve
        return cls(loaded, slots=serve.slots or None, max_context=settings.chat.max_context,
                   max_queue=serve.max_queue, capture_positions=CAPTURED_POSITIONS, admit_wait=serve.admit_wait_ms / 1000,
                   graph_admissions=serve.graph_admissions and loaded.device.type == "cuda")

    def __init__(self, loaded: LoadedModel, slots: int | None = None, max_context: int = MAX_CONTEXT, max_queue: int = 64,
                 capture_positions: int = 0, feed_ahead: bool = True, admit_wait: float = ADMIT_WAIT,
                 graph_admissions: bool = False, start: bool = True):
        """admit_wait: while rows decode, a waiting request is admitted once it has waited this many
        seconds or enough others wait to fill the free rows: every admission pauses every row's
        decoding for a prefill, and 32 clients that arrive one by one would pause it 32 times.
        capture_positions: on a GPU, capture the decode graphs of every step size for lengths up
        to this many positions now (a server: ~50 ms a graph for a 7B, which no request should wait
        for), not on first use. feed_ahead=False takes each step's tokens before the next step is
        queued (slower: for comparison). graph_admissions: short admissions replayed as CUDA
        graphs (decoding/row_prefill.py; serve.graph_admissions). start=False runs no engine
        thread (the caller calls _admit and _step)."""
        self.loaded = loaded
        self.max_len = -(-(max_context + 1) // 64) * 64
        self.max_context = max_context
        self.slots = slots or default_slots(loaded.device, loaded.model.llm, self.max_len)
        self.max_queue = max_queue
        reason = unsupported_reason(loaded.model.llm)  # rows at their own lengths need the fused step
        if reason is not None:
            log.warning("the serving engine decodes one request at a time: the fused step cannot run this "
                        "LLM (%s; precision=fp16 or bf16 can)", reason)
            self.slots = 1
        self.decoder = StaticDecoder(loaded.model.llm, self.slots, self.max_len, use_fused=reason is None)
        with torch.inference_mode():
            self.decoder.valid[:, 0] = True  # idle rows attend to one slot (never to nothing)
        # every step size at the usual lengths, before any request waits for one
        row_counts = sorted({self._stepped(row) for row in range(self.slots)})
        started = time.perf_counter()
        if captured := self.decoder.capture_steps(row_counts, min(capture_positions, self.max_len)):
            log.info("captured %d decode graphs in %.1f s", captured, time.perf_counter() - started)
        started = time.perf_counter()
        if graph_admissions and (captured := self.decoder.use_row_prefill_graphs(capture_positions)):
            log.info("captured %d admission graphs in %.1f s", captured, time.perf_counter() - started)
        self.rows: list[ActiveRequest | None] = [None] * self.slots
        self.row_keys: list[list] = [[] for _ in range(self.slots)]  # what each row's cache holds
        self.row_freed = [0] * self.slots  # when each row was last freed (least recently used goes first)
        self.waiting: collections.deque[Request] = collections.deque()
        self.wake = threading.Condition()
        self.closed = False
        self.admitting = 0  # popped from the queue, being prefilled into a row
        self.steps = 0
        self.in_flight: InFlight | None = None  # the last step, its tokens not yet read on the host
        self.host_copies = [HostCopy(self.slots, loaded.device) for _ in range(2)]  # this step's and the last's
        self.staged = StagedInputs(5 * self.slots, loaded.device)  # a step's inputs: see _launch
        self.feed_ahead = feed_ahead
        self.admit_wait = admit_wait
        # admissions, requests admitted, seconds spent admitting (prefill included)
        self.stats = collections.Counter()
        self.thread = threading.Thread(target=self._loop, name="minigpt4-engine", daemon=True)
        if start:
            self.thread.start()

    # ---- front-end side ------------------------------------------------------------------------
    def prompt_ids(self, conversation: Conversation) -> list[int]:
        return encode_prompt(self.loaded.tokenizer.encode, conversation.prompt(), self.loaded.model.num_image_tokens)

    def submit(self, ids: list[int], image_embeds: torch.Tensor | None, settings: GenerationSettings,
               stops: tuple[str, ...] | None = None, seed: int | None = None,
               notify: Callable[[], None] | None = None, pixels: torch.Tensor | None = None) -> Request:
        """Queue one answer; raises UserError when it cannot fit and QueueFull when too many wait.
        Images come encoded (image_embeds [N,Q,H]) or as pixels [N,3,S,S], which the engine
        encodes together with the images of the other requests it admits at the same time.
        notify() is called on the engine thread after each of the request's events."""
        if settings.num_beams != 1:
            raise UserError("num_beams > 1 is not served by the engine: use num_beams=1")
        room = self.max_context - len(ids)
        if room < 1:
            raise UserError(f"message too long: the prompt is {len(ids)} tokens and the context is "
                            f"{self.max_context}; shorten it (or its images)")
        generator = None
        if not settings.greedy:
            generator = torch.Generator(device=self.loaded.device)
            generator.manual_seed(int(seed)) if seed is not None else generator.seed()
        request = Request(ids, image_embeds, replace(settings, max_new_tokens=min(settings.max_new_tokens, room)),
                          tuple(stops if stops is not None else self.loaded.template.stop), generator,
                          keys=prompt_keys(ids, image_embeds if pixels is None else pixels,
                                           self.loaded.model.num_image_tokens), notify=notify,
                          pixels=pixels)
        with self.wake:
            if self.closed:
                raise UserError("the engine is shut down")
            if len(self.waiting) + self.admitting + self.active() >= self.slots + self.max_queue:  # all rows and the queue taken
                raise QueueFull(f"{len(self.waiting)} requests are waiting (serve.max_queue={self.max_queue})")
            self.waiting.append(request)
            self.wake.notify()
        return request

    def active(self) -> int:
        return sum(row is not None for row in self.rows)

    def close(self) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify()
        if self.thread.ident is not None:  # started
            self.thread.join(timeout=30)

    # ---- the engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self.closed and not self.waiting and not any(self.rows):
                    self.wake.wait()
                if self.closed:
                    for request in [*self.waiting, *(a.request for a in self.rows if a)]:
                        self._finish(request, "cancelled")
                    return
            try:
                with torch.inference_mode():
                    if self._admission_due():
                        self._admit()
                    if any(self.rows):
                        self._step()
            except Exception as err:
                log.exception("engine step failed")
                self.in_flight = None
                for i, active in enumerate(self.rows):
                    if active is not None:
                        self._fail(active.request, f"{type(err).__name__}: {err}")
                        self._free(i)

    def _admission_due(self) -> bool:
        """Admit now? When requests wait and either no row decodes (nobody pays for the pause),
        enough wait to fill the free rows, or the first has waited admit_wait."""
        with self.wake:
            free = self.rows.count(None)
            if not self.waiting or not free:
                return False
            return (free == self.slots or len(self.waiting) >= free
                    or time.perf_counter() - self.waiting[0].submitted_at >= self.admit_wait)

    def _admit(self) -> None:
        """Admit as many waiting requests as there are free rows: their images in one forward,
        their prompts in batched prefills, then their first tokens."""
        with self.wake:
            free = self.rows.count(None)
            batch = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
            self.admitting = len(batch)
        started = time.perf_counter()
        try:
            live = []
            for request in batch:
                if request.cancelled.is_set():
                    self._finish(request, "cancelled")
                else:
                    live.append(request)
            self._encode_pixels(live)
            live = [r for r in live if not r.done.is_set()]  # (done: its images failed)
            placed = []  # (request, row, positions its row holds already)
            for request, (row, start) in zip(live, assign_rows(self.rows, self.row_keys, self.row_freed,
                                                               [r.keys for r in live])):
                self.row_keys[row] = []  # the row is rewritten from `start` on
                placed.append((request, row, start))
            for chunk in chunks(placed, lambda item: len(item[0].ids) - item[2], PREFILL_POSITIONS):
                self._prefill(chunk)
        finally:
            self.admitting = 0
            self.stats.update(admissions=1, admitted=len(batch), admit_s=time.perf_counter() - started)

    def _encode_pixels(self, requests: list[Request]) -> None:
        """The soft tokens of every request that brought pixels, in one forward of the image side."""
        todo = [r for r in requests if r.pixels is not None and r.image_embeds is None]
        if not todo:
            return
        try:
            embeds = self.loaded.model.encode_images(torch.cat([r.pixels for r in todo]).to(self.loaded.device))
        except Exception as err:  # noqa: BLE001 - these requests fail, the others go on
            log.warning("encoding the images of %d requests failed", len(todo), exc_info=True)
            for request in todo:
                self._fail(request, f"{type(err).__name__}: {err}")
            return
        for request, part in zip(todo, embeds.split([len(r.pixels) for r in todo])):
            request.image_embeds, request.pixels = part, None

    def _prefill(self, chunk: list[tuple[Request, int, int]]) -> None:
        """Prefill requests into their rows, each after the `start` positions its row holds, in
        one forward (ids in one copy, one embed call), and take their first tokens; a request
        whose images do not fill its slots fails alone."""
        model, device = self.loaded.model, self.loaded.device
        ready, images = [], []
        for request, row, start in chunk:
            request.prefilled = len(request.ids) - start
            part = request.images_after(start)
            given, slots = 0 if part is None else part.shape[0] * part.shape[1], request.ids[start:].count(IMAGE_TOKEN)
            if slots != given:
                self._fail(request, f"{slots} image slots but {given} image tokens given")
                self._free(row)
                continue
            ready.append((request, row, start))
            if given:
                images.append(part)
        if not ready:
            return
        rows, lengths = [row for _, row, _ in ready], [len(request.ids) - start for request, _, start in ready]
        try:
            longest = max(lengths)
            ids = torch.tensor([request.ids[start:] + [0] * (longest - n) for (request, _, start), n in zip(ready, lengths)],
                               device=device)  # [R,T], right-padded
            embeds = model.embed(ids, torch.cat(images) if images else None)  # [R,T,H]: images fill rows in order
            logits = self.decoder.prefill_rows(rows, embeds, lengths, start=[start for _, _, start in ready]).float()
        except Exception as err:  # noqa: BLE001 - these requests fail, the others go on
            log.warning("prefill of %d requests failed", len(ready), exc_info=True)
            for request, row, _ in ready:
                self._fail(request, f"{type(err).__name__}: {err}")
                self._free(row)
            return
        for request, row, _ in ready:
            self.rows[row] = ActiveRequest(request, StreamState(self.loaded.tokenizer, request.stops), len(request.ids))
        ordered = in_sampling_groups([(row, self.rows[row]) for row in rows])
        position = {row: k for k, row in enumerate(rows)}  # logits[k] is rows[k]'s
        index = torch.tensor([position[row] for row, _ in ordered], device=logits.device)
        for (row, active), token in zip(ordered, sample(ordered, logits[index], self.loaded.tokenizer.eos_id).tolist()):
            self._take(row, active, token)

    def _step(self) -> None:
        """One decode step, fed ahead: it is queued on the device before the host takes the
        previous step's tokens (streams them, checks stop strings, ends requests), so the GPU does
        not wait for that Python. A request found finished then had one step for nothing, which
        is dropped. A row that samples from its whole token history (a repetition penalty) makes
        the engine take each step at once instead (so does feed_ahead=False)."""
        previous, self.in_flight = self.in_flight, None
        current = self._launch(previous)
        if previous is not None:
            self._take_step(previous)
        if current is None:
            return
        if not self.feed_ahead or any(a.request.settings.repetition_penalty != 1.0 for _, a in current.rows):
            self._take_step(current)
        else:
            self.in_flight = current

    def _launch(self, previous: InFlight | None) -> InFlight | None:
        """Queue a decode step for the rows with tokens left to sample, and their sampling, without
        waiting for the device. The step covers the rows up to the highest of them (rounded up to
        a power of two: a graph each); a row that still holds the request `previous` sampled for
        is fed that token on the device."""
        live = [(i, a) for i, a in enumerate(self.rows) if a is not None and a.sampled < a.request.settings.max_new_tokens]
        if not live:
            return None
        stepped = self._stepped(live[-1][0])  # rows 0..stepped-1
        live = in_sampling_groups(live)
        carried = {row: k for k, (row, active) in enumerate(previous.rows) if self.rows[row] is active} if previous else {}
        tokens, positions, carry = [0] * stepped, [0] * stepped, [-1] * stepped
        slots = [self.max_len - 1] * stepped  # idle rows write their last slot, which no request reaches
        for i, active in live:
            tokens[i], positions[i], slots[i], carry[i] = active.next_token, active.length, active.length, carried.get(i, -1)
            active.length += 1
        longest = max(slots[i] for i, _ in live) + 1
        staged = self.staged(tokens + positions + slots + carry + [i for i, _ in live])  # one copy to the device
        tokens_d, positions_d, slots_d, carry_d = staged[: 4 * stepped].view(4, stepped)
        if carried:  # [stepped]: the previous step's token where carried, else the host's
            tokens_d = torch.where(carry_d >= 0, previous.tokens[carry_d.clamp(min=0)], tokens_d)
        logits = self.decoder.step_rows(tokens_d, positions_d, slots_d, longest=longest)  # [stepped,V]
        self.steps += 1
        sampled = sample(live, logits[staged[4 * stepped :]].float(), self.loaded.tokenizer.eos_id)
        return InFlight(live, sampled, self.host_copies[self.steps % 2].start(sampled))

    def _stepped(self, highest: int) -> int:
        """How many rows a step covers when `highest` is the highest row it must: a power of two
        (a graph each), at most the slots."""
        return min(self.slots, 1 << highest.bit_length())

    def _take_step(self, step: InFlight) -> None:
        """Take a step's tokens on the host, for the rows that still hold the request that sampled them."""
        for (row, active), token in zip(step.rows, step.copy.wait()):
            if self.rows[row] is not active:  # ended (a step late) or cancelled since
                continue
            if active.request.cancelled.is_set():
                self._finish(active.request, "cancelled")
                self._free(row)
            else:
                self._take(row, active, token)

    def _take(self, row: int, active: ActiveRequest, token: int) -> None:
        """Take the row's next token: stream it, finish the row if done."""
        request, tok = active.request, self.loaded.tokenizer
        if not active.generated:
            request.first_token_at = time.perf_counter()
        request.completion_tokens += 1
        if token == tok.eos_id:
            return self._end(row, active, "stop")
        active.generated.append(token)
        text, stopped, delta = active.stream.step(active.generated)
        request.text = text
        if delta:
            if not active.shown:  # the official clean-up strips the answer's leading space
                delta = delta.lstrip()
            if delta:
                active.shown = True
                request.put("delta", delta)
        if stopped:
            return self._end(row, active, "stop")
        if len(active.generated) >= request.settings.max_new_tokens or active.length >= self.max_len:
            return self._end(row, active, "length")
        active.next_token = token

    def _end(self, row: int, active: ActiveRequest, reason: str) -> None:
        request = active.request
        request.text, _ = active.stream.finish(active.generated)
        rest = request.text[active.stream.emitted :]  # held back as a possible stop string
        if rest and (active.shown or rest.strip()):
            request.put("delta", rest if active.shown else rest.lstrip())
        fed = active.length - len(request.ids)  # generated tokens that went into the cache
        self.row_keys[row] = request.keys + active.generated[:fed]
        self._finish(request, reason)
        self._free(row)

    def _free(self, row: int) -> None:
        self.rows[row] = None
        self.row_freed[row] = self.steps
        with torch.inference_mode():  # also called from the loop's error path
            self.decoder.valid[row] = False
            self.decoder.valid[row, 0] = True

    @staticmethod
    def _finish(request: Request, reason: str) -> None:
        request.finished_at = time.perf_counter()
        request.finish_reason = reason
        request.put("done", reason)
        request.done.set()

    @staticmethod
    def _fail(request: Request, message: str) -> None:
        request.finished_at = time.perf_counter()
        request.finish_reason, request.error = "error", message
        request.put("error", message)
        request.done.set()

