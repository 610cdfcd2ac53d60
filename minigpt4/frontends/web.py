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

import inspect
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before Gradio reads it: no calls home

import gradio as gr
import torch

from minigpt4.build import LoadedModel
from minigpt4.chat import ChatSession, Reply
from minigpt4.conversation import clean_answer
from minigpt4.errors import UserError
from minigpt4.frontends.web_tab import (
    AnswerFailed,
    Cancelled,
    Tab,
    WebOptions,
    check_uploads,
    decode_speed,
    explain,
    format_stats,
    notice,
    stream_request,
)
from minigpt4.generation import GenerationSettings, generate
from minigpt4.serving.engine import Engine, QueueFull
from minigpt4.settings import ChatSettings

__all__ = ["AnswerFailed", "Cancelled", "WebOptions", "build_app", "explain", "notice", "serve", "stream_request"]
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

def build_app(loaded: LoadedModel, settings: ChatSettings, engine: Engine) -> gr.Blocks:
    """The page: chat history, a message box that takes text and images, buttons and controls.
    Every answer (but beam search) comes from `engine`."""
    ui = WebOptions(**settings.ui)
    defaults = settings.generation
    max_context = settings.chat.max_context
    seed = settings.seed
    beam_lock = threading.Lock()  # beam search runs outside the engine, one answer at a time
    # prefix reuse by conversation, where the engine offers it
    by_conversation = "conversation_id" in inspect.signature(engine.submit).parameters

    def new_session():  # chat.* and generation.* as in the terminal; overflow notices go to the log
        return ChatSession.from_settings(settings, loaded, notify=log.info)

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

def serve(settings: ChatSettings, loaded: LoadedModel, block: bool = True) -> gr.Blocks:
    """Start the page on ui.host:ui.port; block=False returns the running app (tests, notebooks),
    whose engine is app.engine (close it after app.close())."""
    ui = WebOptions(**settings.ui)
    if str(ui.host) not in LOCAL_HOSTS:
        log.warning("ui.host=%s: anyone who can reach this address can use the model (there is no login)", ui.host)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup probes, not news
    engine = Engine.for_chat(loaded, settings)
    app = build_app(loaded, settings, engine)
    app.engine = engine
    app.queue(default_concurrency_limit=1, max_size=int(ui.queue_size))
    log.info("web page: answers decoded together in %d engine rows", engine.slots)
    try:
        app.launch(
            server_name=str(ui.host),
            server_port=None if ui.port is None else int(ui.port),
            share=bool(ui.share),
            inbrowser=bool(ui.open_browser),
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
