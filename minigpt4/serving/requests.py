"""What a front-end holds while the engine answers: a Request (its settings, and the events it
streams), and how the engine keeps a request that is decoding in a row (ActiveRequest)."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from minigpt4.errors import UserError
from minigpt4.generation import GenerationSettings, StreamState


class QueueFull(Exception):
    """More requests are waiting than serve.max_queue allows."""


@dataclass
class Request:
    """One answer to produce. Read `events` (or iterate `deltas()`) for the streamed text; the
    final state is in text / finish_reason / completion_tokens once `done` is set."""

    ids: list[int]
    image_embeds: torch.Tensor | None  # [N,Q,H] for the images of ids, in order
    settings: GenerationSettings
    stops: tuple[str, ...]
    generator: torch.Generator | None
    id: int = field(default_factory=lambda: next(_ids))
    events: queue.Queue[tuple[str, str]] = field(default_factory=queue.Queue)  # ("delta", text) | ("done", reason) | ("error", msg)
    notify: Callable[[], None] | None = None  # called (on the engine thread) after each event
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    text: str = ""
    finish_reason: str = ""  # "stop" (EOS or a stop string) | "length" | "cancelled" | "error"
    error: str = ""  # the reason, when finish_reason is "error"
    completion_tokens: int = 0
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float = 0.0
    finished_at: float = 0.0
    prefilled: int = 0  # prompt positions computed (the rest came from the row's cached prefix)
    keys: list = field(default_factory=list)  # one per prompt position: token id, or (image digest, slot)
    pixels: torch.Tensor | None = None  # [N,3,S,S]: images the engine encodes (batched with other arrivals)
    # requests with the same key sample in one call (no generator or token history of their own)
    sample_group: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.generator is None and self.settings.repetition_penalty == 1.0:
            self.sample_group = repr(self.settings)

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)

    def images_after(self, start: int) -> torch.Tensor | None:
        """The soft tokens [N,Q,H] of the images in ids[start:] (a row's cache holds those before)."""
        if self.image_embeds is None:
            return None
        return self.image_embeds[sum(isinstance(k, tuple) and k[1] == 0 for k in self.keys[:start]):]

    def cancel(self) -> None:
        self.cancelled.set()

    def put(self, kind: str, value: str) -> None:
        self.events.put((kind, value))
        if self.notify is not None:
            self.notify()

    def deltas(self, timeout: float | None = None):
        """Yield streamed text until the answer is done (raises UserError on an engine error)."""
        while True:
            kind, value = self.events.get(timeout=timeout)
            if kind == "delta":
                yield value
            elif kind == "error":
                raise UserError(value)
            else:
                return


_ids = itertools.count(1)


@dataclass
class ActiveRequest:
    """A request decoding in a row."""

    request: Request
    stream: StreamState
    length: int  # positions of the row fed so far (the next token is written at this slot)
    generated: list[int] = field(default_factory=list)  # tokens taken on the host (no EOS)
    sampled: int = 0  # tokens sampled, also those still on their way to the host
    next_token: int = 0  # the next input, when the host has it (else the last step's, on the device)
    shown: bool = False


def chunks(items: list, size, budget: int) -> list[list]:
    """items in order, cut into runs whose len(run) x largest size(item) stays within budget
    (a single item always forms a run)."""
    runs, run, longest = [], [], 0
    for item in items:
        longest_with = max(longest, size(item))
        if run and longest_with * (len(run) + 1) > budget:
            runs.append(run)
            run, longest_with = [], size(item)
        run.append(item)
        longest = longest_with
    return runs + ([run] if run else [])
