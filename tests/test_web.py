"""The web page (minigpt4/frontends/web.py) in a real browser: headless Chromium driven by Playwright.

The server runs in this process on a free port with the shipped tiny demo model (greedy, so
answers are reproducible; it answers single-picture questions about the synthetic shapes
correctly, which proves that an uploaded picture really reaches the model). Every answer comes
from the page's one serving engine; its model calls are slowed a little so that streaming is
observable in the browser, and instrumented to prove that two tabs are decoded in one batch.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minigpt4.config import ROOT, chat_settings, compose, load_spec
from minigpt4.errors import UserError

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
MAX_NEW_TOKENS = 24
SLOTS = 3  # engine rows: answers decoded together
WAIT_MS = 30_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def web_cfg(port: int):
    return compose("chat", [
        "gpu=cpu", "precision=fp32", "checkpoint=demo", "ui=web", f"ui.port={port}",
        "ui.max_upload_mb=0.05", "ui.max_images_per_message=2", "chat.max_context=400", "generation=greedy",
        f"generation.max_new_tokens={MAX_NEW_TOKENS}", f"serve.slots={SLOTS}",
    ])


# ---- no browser needed ----------------------------------------------------------------------
def test_defaults_are_safe():
    ui = compose("chat", ["ui=web"]).ui
    assert (ui.name, ui.host, ui.share) == ("web", "127.0.0.1", False)
    assert ui.max_upload_mb > 0 and ui.max_images_per_message >= 1


def engine_request(events: list[tuple[str, str]], pause: float = 0.0, reason: str = "stop"):
    """An engine Request whose events are put by a thread: (kind, value) pairs, then done."""
    from minigpt4.generation import GenerationSettings
    from minigpt4.serving.engine import Request

    request = Request([1], None, GenerationSettings(), ("###",), None)

    def feed():
        for kind, value in events:
            if request.cancelled.is_set():
                break
            request.events.put((kind, value))
            time.sleep(pause)
        request.finish_reason = "cancelled" if request.cancelled.is_set() else reason
        request.events.put(("done", request.finish_reason))
        request.done.set()

    threading.Thread(target=feed, daemon=True).start()
    return request


def test_stream_request_yields_the_growing_answer():
    from minigpt4.frontends.web import stream_request

    request = engine_request([("delta", piece) for piece in ("a", "b", "c")], pause=0.01)
    texts = list(stream_request(request, threading.Event()))
    assert texts and texts[-1] == "abc" and all("abc".startswith(t) for t in texts)
    assert texts == sorted(texts, key=len)  # it only grows


def test_stream_request_cancels_the_request_when_the_tab_stops_or_goes_away():
    from minigpt4.frontends.web import AnswerFailed, Cancelled, stream_request

    cancel = threading.Event()
    request = engine_request([("delta", "x")] * 1000, pause=0.002)
    stream = stream_request(request, cancel)
    next(stream)
    cancel.set()  # Restart
    with pytest.raises(Cancelled):
        list(stream)
    assert request.cancelled.is_set()

    request = engine_request([("delta", "x")] * 1000, pause=0.002)
    stream = stream_request(request, threading.Event())
    next(stream)
    stream.close()  # Gradio closes the handler of a tab that went away
    assert request.cancelled.is_set() and request.done.wait(5)

    request = engine_request([("delta", "x"), ("error", "RuntimeError: boom")])
    with pytest.raises(AnswerFailed, match="boom"):
        list(stream_request(request, threading.Event()))


def test_notices_escape_html_and_log_a_user_error_as_one_info_line(caplog):
    from minigpt4.frontends.web import explain, notice

    assert notice() == ""  # nothing to say: the line is hidden
    hostile = notice('image <img src=x onerror="alert(1)">.png: not an image file')
    assert "<img" not in hostile and "&lt;img" in hostile and 'role="alert"' in hostile
    caplog.set_level(logging.INFO, logger="minigpt4.frontends.web")
    shown = explain(UserError("message too long:\nshorten it"), "the answer")
    assert "refused" in shown and "message too long" in shown
    [record] = caplog.records
    assert record.levelno == logging.INFO and not record.exc_info
    assert record.getMessage() == "refused: message too long: shorten it"  # one line
    caplog.clear()
    try:
        raise RuntimeError("out of memory")
    except RuntimeError as err:
        shown = explain(err, "the answer")
    assert "failed" in shown and "the answer failed: RuntimeError: out of memory" in shown
    [record] = caplog.records
    assert record.levelno == logging.ERROR and record.exc_info  # a bug keeps its traceback


def test_busy_port_is_a_user_error(tiny_loaded):
    from minigpt4.frontends.web import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(UserError, match="ui.port"):
            serve(chat_settings(web_cfg(taken.getsockname()[1])), tiny_loaded, block=False)


@pytest.mark.slow
def test_chat_py_ui_web_serves_the_page(tmp_path):
    """The entry point as typed: python chat.py ui=web ui.port=N."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "chat.py", "ui=web", f"ui.port={port}", "gpu=cpu", "checkpoint=random",
         f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline, page = time.time() + 60, None
        while time.time() < deadline and proc.poll() is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
                break
            except OSError:
                time.sleep(0.3)
        assert page is not None, proc.stdout.read() if proc.poll() is not None else "no page within 60 s"
        assert "MiniGPT-4" in page
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ---- the browser ------------------------------------------------------------------------------
class ModelProbe:
    """Wraps the engine's model calls (a request's prefill into its row, one decode step of all
    rows) and the LLM's forward (beam search runs outside the engine): an optional delay per
    call, the number of calls, the most requests decoded in one step, and an optional exception
    to raise (an unexpected failure inside the model)."""

    def __init__(self, engine, llm):
        self.engine = engine
        self.delay, self.calls, self.most_rows = 0.0, 0, 0
        self.fail: Exception | None = None
        self.rows: set[int] = set()  # batch sizes the LLM's forward saw (beam search: one row per beam)
        self._lock = threading.Lock()

        def step_rows(*args, **kwargs):
            self.most_rows = max(self.most_rows, engine.active())

        def forward(*args, **kwargs):
            ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
            self.rows.add(ids.shape[0] if ids is not None else 0)

        decoder = engine.decoder
        decoder.prefill_rows = self.wrap(decoder.prefill_rows)
        decoder.step_rows = self.wrap(decoder.step_rows, step_rows)
        llm.forward = self.wrap(llm.forward, forward)

    def wrap(self, original, record=None):
        def call(*args, **kwargs):
            with self._lock:
                self.calls += 1
                if record is not None:
                    record(*args, **kwargs)
            if self.fail is not None:
                raise self.fail
            time.sleep(self.delay)
            return original(*args, **kwargs)

        return call


@pytest.fixture(scope="module")
def server():
    from minigpt4.build import load_model
    from minigpt4.frontends.web import serve

    cfg = web_cfg(free_port())
    loaded = load_model(load_spec(cfg))
    app = serve(chat_settings(cfg), loaded, block=False)
    probe = ModelProbe(app.engine, loaded.model.llm)
    port = cfg.ui.port
    yield f"http://127.0.0.1:{port}/", probe
    app.close()
    app.engine.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser, server):
    """open_page() -> a fresh tab (its own browser context, so its own Gradio session)."""
    url, _ = server
    contexts = []

    def open_tab():
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.external_requests = []
        page.on("request", lambda r: page.external_requests.append(r.url)
                if not r.url.startswith((url, "data:", "blob:")) else None)
        page.goto(url)
        page.wait_for_selector("#message textarea", timeout=WAIT_MS)
        return page

    yield open_tab
    for context in contexts:
        context.close()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """(specs, paths) of three synthetic pictures (a few KB each) and a 120 KB noise PNG."""
    from minigpt4.data.synthetic import make_picture, sample_specs

    folder = tmp_path_factory.mktemp("pictures")
    specs = sample_specs(3, seed=5)  # orange triangles, yellow squares, blue squares
    paths = [str(folder / f"picture{i + 1}.png") for i in range(len(specs))]
    for spec, path in zip(specs, paths):
        make_picture(spec).save(path)
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    big = str(folder / "big.png")
    Image.fromarray(noise).save(big)
    return specs, paths, big


def count(page, selector: str) -> int:
    return page.locator(selector).count()


def attach(page, files: list[str]) -> None:
    page.set_input_files("#message input[type=file]", files)
    page.wait_for_function(
        "n => document.querySelectorAll('#message img').length >= n", arg=len(files), timeout=WAIT_MS
    )


# n answers shown, the last one not empty, its stats line shown and the box enabled again
ANSWERED = """n => {
    const bots = document.querySelectorAll('#chat [data-testid=bot]');
    return bots.length === n && bots[n - 1].innerText.trim() !== ''
        && document.querySelector('#stats').innerText.includes('tokens/s')
        && !document.querySelector('#message textarea').disabled;
}"""


def send(page, text: str) -> None:
    """Type and send; wait until the answer is complete."""
    before = count(page, "#chat [data-testid=bot]")
    page.fill("#message textarea", text)
    page.press("#message textarea", "Enter")
    page.wait_for_function(ANSWERED, arg=before + 1, timeout=WAIT_MS)


def last_answer(page) -> str:
    return page.locator("#chat [data-testid=bot]").last.inner_text().strip()


def wait_notice(page, text: str) -> str:
    """Wait for the notice line above the box to say `text`; return what it says."""
    page.locator("#notice .notice", has_text=text).wait_for(timeout=WAIT_MS)
    return page.inner_text("#notice")


# The conversation is on screen and nothing covers it: the element at the middle of each message
# is that message (Gradio's "Error" overlay would cover the whole chat), and no error badge shows.
CONVERSATION_UNCOVERED = """() => {
    const messages = [...document.querySelectorAll('#chat [data-testid=user], #chat [data-testid=bot]')];
    return messages.length > 0 && messages.every(m => {
        m.scrollIntoView({block: 'center'});
        const r = m.getBoundingClientRect();
        return r.width > 0 && m.contains(document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2));
    }) && ![...document.querySelectorAll('[data-testid=status-tracker]')]
        .some(t => t.offsetParent !== null && t.innerText.includes('Error'));
}"""


def assert_conversation_visible(page, user_messages: int, answers: int) -> None:
    assert count(page, "#chat [data-testid=user]") == user_messages
    assert count(page, "#chat [data-testid=bot]") == answers
    assert page.evaluate(CONVERSATION_UNCOVERED)


@pytest.mark.browser
@pytest.mark.slow
def test_text_only_chat_works_at_once_and_offline(open_page, server):
    _, probe = server
    page = open_page()
    assert "MiniGPT-4" in page.title()
    assert "tiny" in page.locator("body").inner_text()
    send(page, "Hello! What can you do?")
    assert count(page, "#chat [data-testid=user]") == 1
    assert "shapes" in last_answer(page)  # the demo model's answer about itself
    stats = page.inner_text("#stats")
    assert "tokens/s" in stats and "images in the conversation: 0" in stats
    assert page.external_requests == []  # no CDN fonts, no analytics: the page works offline

    page.fill("#beams input[type=number]", "2")  # beam search goes through the same page
    page.press("#beams input[type=number]", "Tab")
    probe.rows.clear()
    send(page, "And with beams?")
    assert count(page, "#chat [data-testid=bot]") == 2 and last_answer(page)
    assert 2 in probe.rows


@pytest.mark.browser
@pytest.mark.slow
def test_two_images_and_a_streamed_answer(open_page, pictures, server):
    _, probe = server
    page = open_page()
    page.evaluate(
        """() => {  // record every text the newest answer shows while it streams
            window.seenAnswers = [];
            new MutationObserver(() => {
                const bots = document.querySelectorAll('#chat [data-testid=bot]');
                if (bots.length) window.seenAnswers.push(bots[bots.length - 1].innerText.trim());
            }).observe(document.querySelector('#chat'), {subtree: true, childList: true, characterData: true});
        }"""
    )
    _, paths, _ = pictures
    attach(page, paths[:2])
    probe.delay = 0.05  # ~20 tokens/s: slow enough to watch the answer grow
    try:
        send(page, "Describe this image.")
    finally:
        probe.delay = 0.0
    user_images = page.locator("#chat [data-testid=user] img")
    assert user_images.count() == 2
    assert "images in the conversation: 2" in page.inner_text("#stats")
    final = last_answer(page)
    partial = {t for t in page.evaluate("window.seenAnswers") if t and t != final}
    assert final and any(final.startswith(t) for t in partial), (final, partial)  # it grew
    assert count(page, "#message img") == 0  # the box was emptied for the next message


@pytest.mark.browser
@pytest.mark.slow
def test_images_alone_then_regenerate_and_restart(open_page, pictures):
    specs, paths, _ = pictures
    page = open_page()
    attach(page, paths[1:2])  # three large yellow squares on gray
    page.press("#message textarea", "Enter")  # images without text: added, no answer yet
    page.wait_for_function("() => document.querySelector('#stats').innerText.includes('1 image added')")
    assert count(page, "#chat [data-testid=bot]") == 0
    send(page, "What colour are the squares?")
    assert last_answer(page).lower().rstrip(".") == specs[1].colour  # the picture reached the model
    assert "images in the conversation: 1" in page.inner_text("#stats")

    page.evaluate(
        """() => { window.statsSeen = [];
                   new MutationObserver(() => window.statsSeen.push(document.querySelector('#stats').innerText))
                       .observe(document.querySelector('#stats'), {subtree: true, childList: true, characterData: true}); }"""
    )
    page.click("#regenerate")
    page.wait_for_function(
        f"() => window.statsSeen.some(s => s.includes('generating')) && ({ANSWERED})(1)", timeout=WAIT_MS
    )
    assert count(page, "#chat [data-testid=bot]") == 1  # replaced, not added
    assert last_answer(page).lower().rstrip(".") == specs[1].colour  # greedy: the same answer

    page.click("#restart")
    page.wait_for_function("() => document.querySelectorAll('#chat [data-testid=user]').length === 0")
    assert "New conversation" in page.inner_text("#stats")
    send(page, "Hi again")
    assert count(page, "#chat [data-testid=user]") == 1
    assert "images in the conversation: 0" in page.inner_text("#stats")  # the image is forgotten

def send_until_answering(page, text: str) -> None:
    """Send `text` and wait until the answer has started to stream."""
    page.fill("#message textarea", text)
    page.press("#message textarea", "Enter")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#chat [data-testid=bot]')].some(b => b.innerText.trim())",
        timeout=WAIT_MS,
    )


@pytest.mark.browser
@pytest.mark.slow
def test_restart_stops_an_answer_midway(open_page, server):
    _, probe = server
    page = open_page()
    probe.delay = 0.1  # 16 tokens would take ~1.6 s
    try:
        send_until_answering(page, "Tell me a long story")
        page.click("#restart")
        page.wait_for_function("() => document.querySelectorAll('#chat [data-testid=user]').length === 0")
        time.sleep(0.3)  # the worker notices at its next token
        calls = probe.calls
        time.sleep(0.5)
        assert probe.calls == calls  # the model stopped working on the dropped conversation
    finally:
        probe.delay = 0.0
    assert count(page, "#chat [data-testid=bot]") == 0
    send(page, "A new start")
    assert count(page, "#chat [data-testid=bot]") == 1


@pytest.mark.browser
@pytest.mark.slow
def test_oversized_and_too_many_uploads_are_refused(open_page, pictures):
    page = open_page()
    _, paths, big = pictures
    page.set_input_files("#message input[type=file]", [big])  # 120 KB > ui.max_upload_mb=0.05
    toast = page.locator("[data-testid=toast-body]").last
    toast.wait_for(timeout=WAIT_MS)
    assert "exceed the maximum allowed size" in toast.inner_text()
    assert count(page, "#message img") == 0
    page.click("[data-testid=toast-close]")

    attach(page, paths)  # 3 images > ui.max_images_per_message=2
    page.fill("#message textarea", "Compare them")
    page.press("#message textarea", "Enter")
    assert "3 images in one message: the limit is 2" in wait_notice(page, "max_images_per_message")
    assert count(page, "#chat [data-testid=user]") == 0  # nothing reached the conversation
    assert count(page, "#message img") == 3  # the message stays in the box to be fixed


@pytest.mark.browser
@pytest.mark.slow
def test_refusals_say_why_in_place_and_keep_the_conversation(open_page, tmp_path, capfd, caplog):
    """A non-image file and a question longer than chat.max_context: the reason stays on the page
    (no vanishing toast), the conversation stays visible (no error overlay), the server logs one
    info line (no traceback), and the next good message works."""
    caplog.set_level(logging.INFO, logger="minigpt4.frontends.web")
    broken = tmp_path / "holiday.png"
    broken.write_text("not really a picture")
    page = open_page()
    page.click("#regenerate")  # nothing to regenerate yet: a hint, not an error
    assert "Nothing to regenerate yet" in wait_notice(page, "ask something first")
    send(page, "Hello! What can you do?")
    assert count(page, "#notice .notice") == 0  # the next action clears the notice

    page.set_input_files("#message input[type=file]", [str(broken)])
    page.wait_for_selector("#message .thumbnail-item", timeout=WAIT_MS)
    page.fill("#message textarea", "What is this?")
    page.press("#message textarea", "Enter")
    said = wait_notice(page, "holiday.png")
    assert "not an image file" in said and "remove it" in said
    assert_conversation_visible(page, user_messages=1, answers=1)  # nothing of the message was added
    assert page.input_value("#message textarea") == "What is this?"  # the message stays to be fixed
    assert count(page, "#message .thumbnail-item") == 1
    assert count(page, "[data-testid=toast-body]") == 0  # said in the page, not in a vanishing toast

    page.click("#message button[aria-label='Remove file']")
    too_long = "word " * 500  # more than chat.max_context=400 tokens on its own
    page.fill("#message textarea", too_long)
    page.press("#message textarea", "Enter")
    said = wait_notice(page, "message too long")
    assert "chat.max_context" in said and "holiday.png" not in said
    page.wait_for_function("() => !document.querySelector('#message textarea').disabled")
    assert page.input_value("#message textarea").strip() == too_long.strip()  # given back to edit
    assert_conversation_visible(page, user_messages=1, answers=1)
    assert count(page, "[data-testid=toast-body]") == 0
    page.wait_for_timeout(1000)  # still there a moment later (a toast would be counting down)
    assert "message too long" in page.inner_text("#notice")

    send(page, "A short one then")
    assert_conversation_visible(page, user_messages=2, answers=2)
    assert last_answer(page) and count(page, "#notice .notice") == 0

    refused = [r for r in caplog.records if r.name == "minigpt4.frontends.web" and "refused" in r.getMessage()]
    assert [r.levelno for r in refused] == [logging.INFO, logging.INFO], [r.getMessage() for r in refused]
    assert all("\n" not in r.getMessage() and not r.exc_info for r in refused)
    printed = capfd.readouterr()
    assert "Traceback" not in printed.out + printed.err  # a user's mistake is not a server error


@pytest.mark.browser
@pytest.mark.slow
def test_an_unexpected_failure_keeps_the_conversation(open_page, server):
    _, probe = server
    page = open_page()
    send(page, "Hello! What can you do?")
    probe.fail = RuntimeError("the model broke")
    try:
        page.fill("#message textarea", "And now?")
        page.press("#message textarea", "Enter")
        said = wait_notice(page, "RuntimeError")
    finally:
        probe.fail = None
    assert "the model broke" in said
    page.wait_for_function("() => !document.querySelector('#message textarea').disabled")
    assert page.input_value("#message textarea") == "And now?"  # the question is given back
    assert_conversation_visible(page, user_messages=1, answers=1)
    send(page, "And now?")
    assert_conversation_visible(page, user_messages=2, answers=2)
    assert count(page, "#notice .notice") == 0


def tokens_in(page) -> int:
    """The answer's token count from the stats line ('12 tokens in 0.4 s · ...')."""
    return int(page.inner_text("#stats").split(" tokens in ")[0].split()[-1])


@pytest.mark.browser
@pytest.mark.slow
def test_tabs_have_their_own_conversations_and_are_answered_together(open_page, pictures, server):
    """Two tabs sending at once are decoded in the same engine steps, and each gets the answer
    it gets alone (greedy)."""
    _, probe = server
    engine = probe.engine
    assert engine.slots == SLOTS  # serve.slots
    _, paths, _ = pictures
    jobs = [([], "Hello! What can you do?"), (paths[:1], "Describe this image.")]

    alone = []
    for files, text in jobs:  # each question in a tab of its own, one after the other
        page = open_page()
        if files:
            attach(page, files)
        send(page, text)
        alone.append((last_answer(page), tokens_in(page)))
        assert count(page, "#chat [data-testid=user]") == 1 + len(files)  # not shared

    tabs = [open_page(), open_page()]
    for page, (files, text) in zip(tabs, jobs):
        if files:
            attach(page, files)
        page.fill("#message textarea", text)
    probe.delay, probe.most_rows = 0.03, 0  # a step every ~30 ms: the two answers overlap
    steps = engine.steps
    try:
        for page in tabs:
            page.press("#message textarea", "Enter")
        for page in tabs:
            page.wait_for_function(ANSWERED, arg=1, timeout=WAIT_MS)
    finally:
        probe.delay = 0.0
    together = [(last_answer(page), tokens_in(page)) for page in tabs]
    assert together == alone, (together, alone)
    assert probe.most_rows == 2  # both requests in one decode step
    # alone, an answer of n tokens takes n - 1 decode steps (the first token comes from its prefill)
    assert engine.steps - steps < sum(n - 1 for _, n in together)
    for page, (files, text) in zip(tabs, jobs):
        assert count(page, "#chat [data-testid=user]") == 1 + len(files)
        assert text in page.locator("#chat [data-testid=user]").last.inner_text()


@pytest.mark.browser
@pytest.mark.slow
def test_closing_a_tab_stops_its_answer(open_page, server):
    _, probe = server
    engine = probe.engine
    page = open_page()
    probe.delay = 0.25  # the answer's 17 tokens would take ~4 s
    try:
        send_until_answering(page, "Tell me a long story")
        [request] = [row.request for row in engine.rows if row is not None]
        page.close()  # Gradio closes the tab's running handler, which cancels its request
        assert request.done.wait(10)
        assert request.finish_reason == "cancelled" and request.completion_tokens < 17
        calls = probe.calls
        time.sleep(0.5)
        assert probe.calls == calls and engine.active() == 0  # its row is free, the model idle
    finally:
        probe.delay = 0.0


# ---- docs/web_multi_image.png -----------------------------------------------------------------
def save_screenshot(path: str, overrides: list[str]) -> None:
    """A multi-image conversation on the default tiny model (the trained demo when it ships),
    with pictures from minigpt4/data/synthetic.py."""
    import tempfile

    from playwright.sync_api import sync_playwright

    from minigpt4.build import load_model
    from minigpt4.data.synthetic import make_picture, sample_specs
    from minigpt4.frontends.web import serve

    port = free_port()
    cfg = compose("chat", ["gpu=cpu", "ui=web", f"ui.port={port}", "generation=greedy", *overrides])
    app = serve(chat_settings(cfg), load_model(load_spec(cfg)), block=False)
    folder = Path(tempfile.mkdtemp())
    pictures = []
    for i, spec in enumerate(sample_specs(2, seed=11)):
        pictures.append(str(folder / f"picture{i + 1}.png"))
        make_picture(spec).save(pictures[-1])
    try:
        with sync_playwright() as pw:
            chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = chromium.new_page(viewport={"width": 1280, "height": 1800})  # the chat is 62vh
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#message textarea", timeout=WAIT_MS)
            send(page, "Hello! What can you do?")
            attach(page, pictures[:1])
            send(page, "Describe this image.")
            attach(page, pictures[1:])
            send(page, "How many shapes are there?")
            bottom = page.locator("#stats").bounding_box()
            page.screenshot(path=path, clip={"x": 0, "y": 0, "width": 1280, "height": bottom["y"] + bottom["height"] + 16})
            chromium.close()
    finally:
        app.close()
        app.engine.close()


if __name__ == "__main__":  # python tests/test_web.py docs/web_multi_image.png [overrides...]
    save_screenshot(sys.argv[1], sys.argv[2:])
