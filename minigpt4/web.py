"""The browser chat page (`python chat.py ui=web`): every tab's answers from one serving engine.

Why it is built this way:
- The model is loaded once, and one Engine (minigpt4/serving/engine.py) answers every tab:
  answers of concurrent tabs are decoded in the same batch of cache rows (`serve.slots`), with
  no decoder per tab. Each tab keeps only its conversation in gr.State: a ChatSession used for
  its messages and its images' soft tokens (encoded once, when added) and for building each
  prompt (ChatSession.prepare: the terminal's prompt and context-overflow rules); its own decoder
  is never created. Each answer submits the whole prompt to the engine (which may reuse a
  cached prefix of it) and streams the request's events to the page.
- Gradio's queue lets as many answers run at once as the engine has rows (the listeners that
  run the model share one concurrency id, limit `serve.slots`); more tabs wait in Gradio's
  queue and see their place in it.
- Beam search (Beams > 1) is not batched by the engine: those answers run through
  generation.generate with their own temporary cache, one at a time.
- Safe defaults: 127.0.0.1, no share link, upload limits checked before anything reaches the
  model, no analytics and no fonts from a CDN (the default theme's fonts ship with Gradio).
- A refused message (a bad file, too many images, a question longer than chat.max_context) or a
  failed answer never raises out of a listener: Gradio would cover every output (the whole
  conversation) with an "Error" overlay and give the reason in a toast that vanishes. Instead
  the reason stays in the notice line above the message box until the next action, the
  conversation stays as it was, and a UserError is logged as one info line (no traceback).
- Restart, a closed tab (Gradio closes its running handler) and an expired conversation cancel
  the tab's request in the engine, which frees its row at the next step.
"""

from __future__ import annotations


import html
import inspect
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before Gradio reads it: no calls home

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from minigpt4.build import LoadedModel  # noqa: E402
from minigpt4.conversation import clean_answer  # noqa: E402
from minigpt4.errors import UserError  # noqa: E402
from minigpt4.generation import GenerationSettings, generate  # noqa: E402
from minigpt4.images import load_image  # noqa: E402
from minigpt4.serving.engine import Engine, QueueFull, Request  # noqa: E402

log = logging.getLogger(__name__)

MODEL_QUEUE = "model"  # the concurrency id of every listener that runs the model
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
EMPTY_BOX = {"text": "", "files": []}
NO_CHANGE = (gr.skip(),) * 5  # for the outputs [tab, chatbot, box, stats, notice]
CSS = """
#chat img { max-height: 220px; width: auto; }
#stats { min-height: 1.5em; color: var(--body-text-color-subdued); }
#notice:not(:has(.notice)) { display: none; }
#notice .html-container { padding: 0; }
#notice .notice { padding: 8px 12px; border-radius: var(--radius-md); border: 1px solid; }
#notice .refused, #notice .failed { color: var(--error-text-color); border-color: var(--error-border-color);
                                    background: var(--error-background-fill); }
#notice .hint { color: var(--body-text-color); border-color: var(--border-color-primary);
                background: var(--background-fill-secondary); }
"""


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

    session: Any = None  # minigpt4.chat.ChatSession, created on the first message (never decodes itself)
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


def check_uploads(files: list[str], ui: DictConfig) -> list:
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


def make_engine(loaded: LoadedModel, cfg: DictConfig) -> Engine:
    """The page's one engine: serve.slots rows (null: the engine's default for the device),
    serve.max_queue, chat.max_context."""
    serve_cfg = cfg.get("serve") or {}
    return Engine(loaded, slots=serve_cfg.get("slots") or None,
                  max_context=int((cfg.get("chat") or {}).get("max_context", 2000)),
                  max_queue=int(serve_cfg.get("max_queue") or 64))


def build_app(loaded: LoadedModel, cfg: DictConfig, engine: Engine) -> gr.Blocks:
    """The page: chat history, a message box that takes text and images, buttons and controls.
    Every answer (but beam search) comes from `engine`."""
    from minigpt4.chat import ChatSession, Reply  # the chat module calls serve(); import late

    ui = cfg.ui
    defaults = GenerationSettings.from_cfg(cfg.generation)
    max_context = int(cfg.chat.max_context)
    seed = cfg.get("seed")
    beam_lock = threading.Lock()  # beam search runs outside the engine, one answer at a time
    # prefix reuse by conversation, where the engine offers it
    by_conversation = "conversation_id" in inspect.signature(engine.submit).parameters

    def new_session():  # chat.* and generation.* as in the terminal; overflow notices go to the log
        return ChatSession.from_cfg(cfg, loaded, notify=log.info)

    def settings_from(greedy, temperature, top_p, max_new_tokens, num_beams) -> GenerationSettings:
        return replace(  # the page's controls over the configured settings (top_k, cache, ...)
            defaults,
            do_sample=not greedy,
            temperature=float(temperature),
            top_p=float(top_p),
            num_beams=int(num_beams),
            max_new_tokens=int(max_new_tokens),
        )

    def beam_search(turn, stops, answer_seed) -> tuple[str, int, float, str]:
        """A beam-search answer (not batched by the engine) -> (raw text, tokens, first token
        time (0: it came whole), finish reason)."""
        generator = None
        if not turn.settings.greedy:
            generator = torch.Generator(device=loaded.device)
            generator.manual_seed(answer_seed) if answer_seed is not None else generator.seed()
        with beam_lock:
            result = generate(loaded.model, loaded.tokenizer, [turn.ids], turn.image_embeds, turn.settings,
                              stops=stops, generator=generator)[0]
        return result.text, result.n_steps, result.first_token_at, result.finish_reason

    def answer(tab: Tab, text: str | None, settings: GenerationSettings, before: list[dict], busy_box,
               box_on_error) -> Iterator[tuple]:
        """Answer `text` (None: the last question again) after the messages `before`, streaming,
        then re-enable the box. On an error the session is unchanged (ChatSession's promise):
        show it as it is, give the question back and say why in the notice line (never raise:
        Gradio would hide the conversation)."""
        yield tab, before + [{"role": "assistant", "content": ""}], busy_box, "*generating…*", notice()
        start, request = time.perf_counter(), None
        session = tab.session
        try:
            turn = session.prepare(text, settings)  # the prompt; UserError when it cannot fit
            stops = tuple(session.template.stop)
            answer_seed = None if seed is None else int(seed) + tab.answers
            tab.answers += 1
            if turn.settings.num_beams > 1:
                raw, n_tokens, first, finish = beam_search(turn, stops, answer_seed)
            else:
                extra = {"conversation_id": tab.conversation_id} if by_conversation else {}
                try:
                    request = engine.submit(turn.ids, turn.image_embeds, turn.settings, stops=stops,
                                            seed=answer_seed, **extra)
                except QueueFull as err:
                    raise UserError(f"the server is busy ({err}): send again in a moment") from None
                tab.request = request
                for shown in stream_request(request, tab.cancel):
                    yield tab, before + [{"role": "assistant", "content": shown}], gr.skip(), gr.skip(), gr.skip()
                raw, n_tokens, first = request.text, request.completion_tokens, request.first_token_at
                finish = request.finish_reason
            if tab.cancel.is_set():
                raise Cancelled
            end = time.perf_counter()
            reply_text = clean_answer(raw, session.template)
            session.keep(turn, reply_text)
            speed, first_s = decode_speed(n_tokens, start, first, end)
            reply = Reply(reply_text, n_tokens, end - start, speed, first_s, turn.dropped_turns, finish)
            yield tab, tab.shown(), gr.update(interactive=True), format_stats(reply, tab.images_in_context()), gr.skip()
        except Cancelled:  # Restart went first. Gradio re-sends an event's last values when it
            yield NO_CHANGE  # ends, so end with "no change" rather than the old conversation
        except Exception as err:  # the page must stay usable: keep the conversation and the question
            yield tab, tab.shown(), box_on_error, "", explain(err, "the answer")
        finally:  # also when Gradio closes this handler (the tab went away)
            if request is not None:
                if not request.done.is_set():
                    request.cancel()
                if tab.request is request:
                    tab.request = None

    def send(message, tab, greedy, temperature, top_p, max_new_tokens, num_beams):
        tab = tab or Tab()
        text = ((message or {}).get("text") or "").strip()
        files = [f if isinstance(f, str) else f["path"] for f in (message or {}).get("files") or []]
        if not text and not files:
            yield tab, gr.skip(), gr.skip(), gr.skip(), notice("Type a message or attach an image first.", "hint")
            return
        with tab.busy:  # after any answer of this tab still being written
            if tab.cancel.is_set():  # restarted meanwhile
                yield NO_CHANGE
                return
            try:  # refused: nothing of the message is added, the box keeps its text and files
                check_uploads(files, ui)
                session = tab.session or new_session()
                session.add_images(files)  # encoded now, once
            except Exception as err:
                yield tab, gr.skip(), gr.skip(), gr.skip(), explain(err, "the message")
                return
            tab.session = session
            if not text:
                n = len(files)
                note = f"{n} image{'s' * (n > 1)} added: ask about {'them' if n > 1 else 'it'}."
                yield tab, tab.shown(), gr.update(value=EMPTY_BOX), note, notice()
                return
            settings = settings_from(greedy, temperature, top_p, max_new_tokens, num_beams)
            question = [{"role": "user", "content": text}]
            yield from answer(tab, text, settings, tab.shown() + question,
                              busy_box=gr.update(value=EMPTY_BOX, interactive=False),
                              box_on_error=gr.update(value={"text": text, "files": []}, interactive=True))

    def regenerate(tab, greedy, temperature, top_p, max_new_tokens, num_beams):
        def nothing_yet():
            history = tab.session.history() if tab and tab.session else []
            return not history or history[-1]["role"] != "assistant"

        hint = (gr.skip(),) * 4 + (notice("Nothing to regenerate yet: ask something first.", "hint"),)
        if nothing_yet():
            yield hint
            return
        with tab.busy:
            if tab.cancel.is_set():
                yield NO_CHANGE
                return
            if nothing_yet():
                yield hint
                return
            settings = settings_from(greedy, temperature, top_p, max_new_tokens, num_beams)
            yield from answer(tab, None, settings, tab.shown()[:-1], busy_box=gr.update(interactive=False),
                              box_on_error=gr.update(interactive=True))

    def restart(tab):
        if tab:
            tab.stop()  # an answer still being written for the old conversation stops
        return Tab(), [], gr.update(value=EMPTY_BOX, interactive=True), "New conversation.", notice()

    trained_note = "" if loaded.trained else " — **untrained weights: answers are random tokens**"
    with gr.Blocks(title="MiniGPT-4 chat", analytics_enabled=False) as app:
        # an expired conversation stops its answer, if one is still being written
        tab = gr.State(None, time_to_live=float(ui.session_idle_minutes) * 60,
                       delete_callback=lambda t: t.stop() if isinstance(t, Tab) else None)
        gr.Markdown(
            f"### MiniGPT-4 · `{loaded.label}` on {loaded.device}{trained_note}\n"
            "Type to chat. Attach one or more images with the paperclip at any point: "
            "they join the conversation in order, and later questions can refer to all of them."
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(
                    elem_id="chat",
                    show_label=False,
                    height="62vh",
                    min_height=360,
                    placeholder="No messages yet.",
                    feedback_options=None,
                    buttons=["copy"],
                )
                # why the last message was refused or failed; stays until the next action
                notice_line = gr.HTML("", elem_id="notice", js_on_load=None)
                box = gr.MultimodalTextbox(
                    elem_id="message",
                    file_count="multiple",
                    file_types=["image"],
                    sources=["upload"],
                    placeholder="Message (Enter to send); attach images with the paperclip",
                    show_label=False,
                    autofocus=True,
                )
                with gr.Row():
                    regen_btn = gr.Button("Regenerate", elem_id="regenerate", size="sm")
                    restart_btn = gr.Button("Restart", elem_id="restart", size="sm")
                stats = gr.Markdown(elem_id="stats")
            with gr.Column(scale=1, min_width=240):
                greedy = gr.Checkbox(not defaults.do_sample, label="Greedy (deterministic)", elem_id="greedy")
                temperature = gr.Slider(0.05, 2.0, defaults.temperature, step=0.05, label="Temperature",
                                        interactive=defaults.do_sample, elem_id="temperature")
                top_p = gr.Slider(0.05, 1.0, defaults.top_p, step=0.05, label="Top-p",
                                  interactive=defaults.do_sample, elem_id="top_p")
                max_new = gr.Slider(1, max(1, max_context // 2), defaults.max_new_tokens, step=1,
                                    label="Max new tokens", elem_id="max_new_tokens")
                beams = gr.Slider(1, 5, defaults.num_beams, step=1, label="Beams", elem_id="beams")
                gr.Markdown(
                    f"Up to {int(ui.max_images_per_message)} images per message, "
                    f"{float(ui.max_upload_mb):g} MB each."
                )
        controls = [greedy, temperature, top_p, max_new, beams]
        outputs = [tab, chatbot, box, stats, notice_line]
        # as many answers at once as the engine has rows: their tokens are decoded in one batch
        on_model = dict(concurrency_id=MODEL_QUEUE, concurrency_limit=engine.slots, show_progress="minimal")
        sent = box.submit(send, [box, tab, *controls], outputs, **on_model)
        again = regen_btn.click(regenerate, [tab, *controls], outputs, **on_model)
        # Restart goes through the queue without waiting for a free answer slot, so that its result
        # reaches the page after anything the cancelled answer had already sent (one stream per tab).
        on_restart = dict(cancels=[sent, again], concurrency_limit=None, show_progress="hidden")
        restart_btn.click(restart, [tab], outputs, **on_restart)
        chatbot.clear(restart, [tab], outputs, **on_restart)  # the chat's own trash icon
        greedy.change(lambda g: [gr.update(interactive=not g)] * 2, greedy, [temperature, top_p], queue=False)
    return app


def serve(cfg: DictConfig, loaded: LoadedModel, block: bool = True) -> gr.Blocks:
    """Start the page on ui.host:ui.port; block=False returns the running app (tests, notebooks),
    whose engine is app.engine (close it after app.close())."""
    ui = cfg.ui
    if str(ui.host) not in LOCAL_HOSTS:
        log.warning("ui.host=%s: anyone who can reach this address can use the model (there is no login)", ui.host)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup probes, not news
    engine = make_engine(loaded, cfg)
    app = build_app(loaded, cfg, engine)
    app.engine = engine
    app.queue(default_concurrency_limit=1, max_size=int(ui.queue_size))
    log.info("web page: answers decoded together in %d engine rows", engine.slots)
    try:
        app.launch(
            server_name=str(ui.host),
            server_port=None if ui.port is None else int(ui.port),
            share=bool(ui.share),
            inbrowser=bool(ui.get("open_browser", False)),
            max_file_size=int(float(ui.max_upload_mb) * 2**20),
            max_threads=max(40, engine.slots + 8),  # every running answer holds a worker thread
            prevent_thread_lock=not block,
            show_error=True,
            run_history=False,  # Gradio would keep every conversation in the browser's storage
            footer_links=["api", "gradio", "settings"],
            state_session_capacity=int(ui.max_sessions),
            ssr_mode=False,
            mcp_server=False,
            pwa=False,
            css=CSS,
        )
    except OSError as err:
        engine.close()
        reason = str(err).split(". ")[0]  # Gradio's advice names its own env variable, not our key
        raise UserError(f"ui.port={ui.port}: {reason}; choose another with ui.port=N (ui.port=null: any free one)") from None
    except BaseException:
        engine.close()
        raise
    if block:  # launch returned: the server has stopped
        engine.close()
    return app
