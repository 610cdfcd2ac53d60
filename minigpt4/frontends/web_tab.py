"""One browser tab of the web page (minigpt4/frontends/web.py): its conversation, the stream of
its answer from the serving engine, the notice line that says why a message was refused, and the
checks of its uploads. No Gradio here: the page's listeners use these."""

from __future__ import annotations

import html
import logging
import os
import queue
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from minigpt4.chat import ChatSession
from minigpt4.errors import UserError
from minigpt4.images import load_image
from minigpt4.serving.engine import Request

log = logging.getLogger("minigpt4.frontends.web")  # the page's one log


@dataclass(frozen=True)
class WebOptions:
    """conf/ui/web.yaml: where the page listens and what it accepts."""

    name: str
    host: str
    port: int | None
    share: bool
    max_upload_mb: float
    max_images_per_message: int
    queue_size: int
    open_browser: bool
    session_idle_minutes: float
    max_sessions: int


def notice(text: str = "", kind: str = "refused") -> str:
    """The notice line's HTML: '' hides it; kind is refused (the user's input), failed (a bug or
    the machine) or hint. role=alert makes screen readers announce it."""
    if not text:
        return ""
    mark = {"refused": "⚠ ", "failed": "✖ ", "hint": "ℹ "}[kind]
    return f'<div class="notice {kind}" role="alert">{mark}{html.escape(text)}</div>'


def explain(err: Exception, what: str) -> str:
    """The notice for an exception; a UserError is one info line in the log, anything else a
    logged traceback (it is a bug or a machine problem, not the user's mistake)."""
    if isinstance(err, UserError):
        log.info("refused: %s", " ".join(str(err).split()))
        return notice(str(err), "refused")
    if isinstance(err, AnswerFailed):  # the engine has logged its traceback
        log.error("%s failed: %s", what, err)
        return notice(f"{what} failed: {err}", "failed")
    log.exception("%s failed", what)
    return notice(f"{what} failed: {type(err).__name__}: {err}", "failed")


class Cancelled(Exception):
    """The tab's answer was stopped (Restart, or the tab went away)."""


class AnswerFailed(Exception):
    """The engine failed a request (its error message, e.g. 'RuntimeError: ...')."""


@dataclass
class Tab:
    """One browser tab's conversation (lives in gr.State). The page shows session.history(),
    the single record of what the model sees, plus the question being answered. The session
    holds the messages and the images' soft tokens; answers come from the shared engine."""

    session: ChatSession | None = None  # created on the first message (never decodes itself)
    cancel: threading.Event = field(default_factory=threading.Event)
    busy: threading.Lock = field(default_factory=threading.Lock)  # one send/regenerate at a time per tab
    request: Request | None = None  # the engine request being answered
    conversation_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    answers: int = 0  # answers requested so far (with `seed` set, answer n samples with seed + n)

    def stop(self) -> None:
        """Stop the tab's answer (Restart, an expired conversation): its engine row is freed."""
        self.cancel.set()
        request = self.request
        if request is not None:
            request.cancel()

    def shown(self) -> list[dict]:
        """Chatbot messages: each image, then the text it came with; every answer."""
        out = []
        for turn in self.session.history() if self.session else []:
            out.extend({"role": turn["role"], "content": {"path": str(p)}} for p in turn["images"])
            if turn["text"] or turn["role"] == "assistant":
                out.append({"role": turn["role"], "content": turn["text"]})
        return out

    def images_in_context(self) -> int:
        return sum(len(turn["images"]) for turn in self.session.history()) if self.session else 0


def stream_request(request: Request, cancel: threading.Event, poll: float = 0.05) -> Iterator[str]:
    """The growing answer of an engine request: yields the text so far each time text arrived
    (all that is ready at once: one page update per batch of tokens) and returns when the
    request is done. Raises Cancelled once `cancel` is set, AnswerFailed on an engine error (or
    when the engine cancelled the request itself: it was shut down). Closing the iterator early
    cancels the request."""
    text = ""
    try:
        while True:
            try:
                event = request.events.get(timeout=poll)
            except queue.Empty:
                if cancel.is_set():
                    raise Cancelled from None
                continue
            grown, finished = False, False
            while not finished:
                kind, value = event
                if kind == "delta":
                    text, grown = text + value, True
                elif kind == "error":
                    raise AnswerFailed(value)
                else:
                    finished = True
                    break
                try:
                    event = request.events.get_nowait()
                except queue.Empty:
                    break
            if cancel.is_set():
                raise Cancelled
            if finished and request.finish_reason == "cancelled":  # not by this tab
                raise AnswerFailed("the server stopped the answer (the engine was shut down)")
            if grown:
                yield text
            if finished:
                return
    finally:
        if not request.done.is_set():
            request.cancel()


def decode_speed(n_tokens: int, start: float, first: float, end: float) -> tuple[float, float]:
    """(tokens/s of the decoding after the first token, seconds to the first token), as
    ChatSession measures them; an answer that came whole counts all its time."""
    first = first or end
    decode_s = end - first
    if n_tokens > 1 and decode_s > 0:
        return (n_tokens - 1) / decode_s, first - start
    return n_tokens / max(end - start, 1e-9), first - start


def format_stats(reply, n_images: int) -> str:
    """The line under the chat: speed first, then anything the user should know."""
    parts = [
        f"{reply.n_tokens} tokens in {reply.seconds:.1f} s",
        f"**{reply.tokens_per_s:.1f} tokens/s**",
        f"first token after {reply.first_token_s:.2f} s",
    ]
    if reply.finish_reason == "length":
        parts.append("stopped at max new tokens")
    if reply.dropped_turns:
        parts.append(f"{reply.dropped_turns} oldest turn(s) dropped to fit the context")
    parts.append(f"images in the conversation: {n_images}")
    return " · ".join(parts)


def check_uploads(files: list[str], ui: WebOptions) -> list:
    """Uploaded paths -> RGB images, or a UserError naming the file and the limit."""
    max_images = int(ui.max_images_per_message)
    if len(files) > max_images:
        raise UserError(
            f"{len(files)} images in one message: the limit is {max_images} (ui.max_images_per_message). "
            "Send them over several messages."
        )
    limit = float(ui.max_upload_mb) * 2**20
    images = []
    for path in files:
        name = Path(path).name
        size = os.path.getsize(path)
        if size > limit:
            raise UserError(
                f"{name} is {size / 2**20:.2f} MB: the limit is {float(ui.max_upload_mb):g} MB per image "
                "(ui.max_upload_mb). Nothing was sent: remove it from the message and send again."
            )
        try:
            images.append(load_image(path, name=name))
        except UserError as err:
            fix = "Nothing was sent: remove it from the message and send again."
            raise UserError(f"{str(err).rstrip('.')}. {fix}") from None
    return images
