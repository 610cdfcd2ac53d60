"""The browser chat page (`python chat.py ui=web`): the terminal's ChatSession behind Gradio.

Why it is built this way:
- The model is loaded once and shared; each browser tab keeps its own ChatSession in gr.State
  (created on the tab's first message), so conversations never mix.
- The model serves one request at a time: every listener that runs it shares one queue slot
  ("model", concurrency 1), so other tabs wait in Gradio's queue (and see their place) instead
  of failing or slowing each other down.
- ChatSession.ask streams by calling on_text from the thread that generates; we run it in a
  worker thread and yield the growing answer to the page.
- Safe defaults: 127.0.0.1, no share link, upload limits checked before anything reaches the
  model, no analytics and no fonts from a CDN (the default theme's fonts ship with Gradio).
- A refused message (a bad file, too many images, a question longer than chat.max_context) or a
  failed answer never raises out of a listener: Gradio would cover every output (the whole
  conversation) with an "Error" overlay and give the reason in a toast that vanishes. Instead
  the reason stays in the notice line above the message box until the next action, the
  conversation stays as it was, and a UserError is logged as one info line (no traceback).
"""

from __future__ import annotations


import html
import logging
import os
import queue
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before Gradio reads it: no calls home

import gradio as gr  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from minigpt4.build import LoadedModel  # noqa: E402
from minigpt4.errors import UserError  # noqa: E402
from minigpt4.generation import GenerationSettings  # noqa: E402
from minigpt4.images import load_image  # noqa: E402

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
    log.exception("%s failed", what)
    return notice(f"{what} failed: {type(err).__name__}: {err}", "failed")


class Cancelled(Exception):
    """Raised inside on_text to stop a generation whose tab was restarted or closed."""


@dataclass
class Tab:
    """One browser tab's conversation (lives in gr.State). The page shows session.history(),
    the single record of what the model sees, plus the question being answered."""

    session: Any = None  # minigpt4.chat.ChatSession, created on the first message
    cancel: threading.Event = field(default_factory=threading.Event)

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


def stream_reply(call: Callable, cancel: threading.Event, lock: threading.Lock) -> Iterator[tuple[str, Any]]:
    """Run call(on_text) in a worker thread; yield (text so far, None) while it streams, then
    (final text, Reply). Closing the iterator (tab gone, Restart) stops the worker at its next token."""
    deltas: queue.Queue = queue.Queue()
    done = object()
    outcome: dict[str, Any] = {}
    stop = threading.Event()

    def on_text(delta: str) -> None:
        if stop.is_set() or cancel.is_set():
            raise Cancelled
        deltas.put(delta)

    def work() -> None:
        try:
            with lock:  # a cancelled worker finishes its token before the next request starts
                outcome["reply"] = call(on_text)
        except BaseException as err:  # handed to the page's thread below
            outcome["error"] = err
        finally:
            deltas.put(done)

    threading.Thread(target=work, name="minigpt4-web-generate", daemon=True).start()
    text, finished = "", False
    try:
        while not finished:
            item = deltas.get()
            while True:  # take everything that is ready: one page update per batch of tokens
                if item is done:
                    finished = True
                    break
                text += item
                try:
                    item = deltas.get_nowait()
                except queue.Empty:
                    break
            if not finished:
                yield text, None
    finally:
        stop.set()
    if "error" in outcome:
        raise outcome["error"]
    yield outcome["reply"].text, outcome["reply"]


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


def build_app(loaded: LoadedModel, cfg: DictConfig) -> gr.Blocks:
    """The page: chat history, a message box that takes text and images, buttons and controls."""
    from minigpt4.chat import ChatSession  # the chat module calls serve(); import late

    ui = cfg.ui
    defaults = GenerationSettings.from_cfg(cfg.generation)
    max_context = int(cfg.chat.max_context)
    model_lock = threading.Lock()

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

    def answer(tab: Tab, call: Callable, before: list[dict], busy_box, box_on_error) -> Iterator[tuple]:
        """Stream one answer after the messages `before`, then re-enable the box. On an error the
        session is unchanged (ChatSession's promise): show it as it is, give the question back and
        say why in the notice line (never raise: Gradio would hide the conversation)."""
        yield tab, before + [{"role": "assistant", "content": ""}], busy_box, "*generating…*", notice()
        try:
            for text, reply in stream_reply(call, tab.cancel, model_lock):
                if tab.cancel.is_set():
                    raise Cancelled
                if reply is None:
                    yield tab, before + [{"role": "assistant", "content": text}], gr.skip(), gr.skip(), gr.skip()
            yield tab, tab.shown(), gr.update(interactive=True), format_stats(reply, tab.images_in_context()), gr.skip()
        except Cancelled:  # Restart went first. Gradio re-sends an event's last values when it
            yield NO_CHANGE  # ends, so end with "no change" rather than the old conversation
            return
        except Exception as err:  # the page must stay usable: keep the conversation and the question
            yield tab, tab.shown(), box_on_error, "", explain(err, "the answer")

    def send(message, tab, greedy, temperature, top_p, max_new_tokens, num_beams):
        tab = tab or Tab()
        text = ((message or {}).get("text") or "").strip()
        files = [f if isinstance(f, str) else f["path"] for f in (message or {}).get("files") or []]
        if not text and not files:
            yield tab, gr.skip(), gr.skip(), gr.skip(), notice("Type a message or attach an image first.", "hint")
            return
        try:  # refused: nothing of the message is added, the box keeps its text and files
            check_uploads(files, ui)
            session = tab.session or new_session()
            session.add_images(files)
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
        ask = lambda on_text: session.ask(text, on_text=on_text, settings=settings)  # noqa: E731
        question = [{"role": "user", "content": text}]
        yield from answer(tab, ask, tab.shown() + question, busy_box=gr.update(value=EMPTY_BOX, interactive=False),
                          box_on_error=gr.update(value={"text": text, "files": []}, interactive=True))

    def regenerate(tab, greedy, temperature, top_p, max_new_tokens, num_beams):
        history = tab.session.history() if tab and tab.session else []
        if not history or history[-1]["role"] != "assistant":
            hint = notice("Nothing to regenerate yet: ask something first.", "hint")
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), hint
            return
        settings = settings_from(greedy, temperature, top_p, max_new_tokens, num_beams)
        session = tab.session
        again = lambda on_text: session.regenerate(on_text=on_text, settings=settings)  # noqa: E731
        yield from answer(tab, again, tab.shown()[:-1], busy_box=gr.update(interactive=False),
                          box_on_error=gr.update(interactive=True))

    def restart(tab):
        if tab:
            tab.cancel.set()  # a generation still running for the old conversation stops
        return Tab(), [], gr.update(value=EMPTY_BOX, interactive=True), "New conversation.", notice()

    trained_note = "" if loaded.trained else " — **untrained weights: answers are random tokens**"
    with gr.Blocks(title="MiniGPT-4 chat", analytics_enabled=False) as app:
        tab = gr.State(None, time_to_live=float(ui.session_idle_minutes) * 60)
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
        on_model = dict(concurrency_id=MODEL_QUEUE, concurrency_limit=1, show_progress="minimal")
        sent = box.submit(send, [box, tab, *controls], outputs, **on_model)
        again = regen_btn.click(regenerate, [tab, *controls], outputs, **on_model)
        # Restart goes through the queue without waiting for the model, so that its result reaches
        # the page after anything the cancelled answer had already sent (one stream per tab).
        on_restart = dict(cancels=[sent, again], concurrency_limit=None, show_progress="hidden")
        restart_btn.click(restart, [tab], outputs, **on_restart)
        chatbot.clear(restart, [tab], outputs, **on_restart)  # the chat's own trash icon
        greedy.change(lambda g: [gr.update(interactive=not g)] * 2, greedy, [temperature, top_p], queue=False)
    return app


def serve(cfg: DictConfig, loaded: LoadedModel, block: bool = True) -> gr.Blocks:
    """Start the page on ui.host:ui.port; block=False returns the running app (tests, notebooks)."""
    ui = cfg.ui
    if str(ui.host) not in LOCAL_HOSTS:
        log.warning("ui.host=%s: anyone who can reach this address can use the model (there is no login)", ui.host)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup probes, not news
    app = build_app(loaded, cfg)
    app.queue(default_concurrency_limit=1, max_size=int(ui.queue_size))
    try:
        app.launch(
            server_name=str(ui.host),
            server_port=None if ui.port is None else int(ui.port),
            share=bool(ui.share),
            inbrowser=bool(ui.get("open_browser", False)),
            max_file_size=int(float(ui.max_upload_mb) * 2**20),
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
        reason = str(err).split(". ")[0]  # Gradio's advice names its own env variable, not our key
        raise UserError(f"ui.port={ui.port}: {reason}; choose another with ui.port=N (ui.port=null: any free one)") from None
    return app
