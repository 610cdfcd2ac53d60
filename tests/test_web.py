"""The web page (minigpt4/web.py) in a real browser: headless Chromium driven by Playwright.

The server runs in this process on a free port with the shipped tiny demo model (greedy, so
answers are reproducible; it answers single-picture questions about the synthetic shapes
correctly, which proves that an uploaded picture really reaches the model). The model's forward
pass is slowed a little so that streaming is observable in the browser, and instrumented to
prove that two tabs never run the model at the same time.
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

from minigpt4.config import ROOT, compose
from minigpt4.errors import UserError

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
MAX_NEW_TOKENS = 24
WAIT_MS = 30_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def web_cfg(port: int):
    return compose("chat", [
        "gpu=cpu", "precision=fp32", "checkpoint=demo", "ui=web", f"ui.port={port}",
        "ui.max_upload_mb=0.05", "ui.max_images_per_message=2", "chat.max_context=400", "generation=greedy",
        f"generation.max_new_tokens={MAX_NEW_TOKENS}",
    ])


# ---- no browser needed ----------------------------------------------------------------------
def test_defaults_are_safe():
    ui = compose("chat", ["ui=web"]).ui
    assert (ui.name, ui.host, ui.share) == ("web", "127.0.0.1", False)
    assert ui.max_upload_mb > 0 and ui.max_images_per_message >= 1


def test_stream_reply_yields_growing_text_then_the_reply():
    from minigpt4.web import stream_reply

    def call(on_text):
        for piece in ("a", "b", "c"):
            on_text(piece)
            time.sleep(0.01)
        return type("Reply", (), {"text": "abc"})()

    seen = list(stream_reply(call, threading.Event(), threading.Lock()))
    texts = [t for t, reply in seen if reply is None]
    assert texts and all("abc".startswith(t) for t in texts)
    assert seen[-1][0] == "abc" and seen[-1][1].text == "abc"


def test_stream_reply_stops_the_worker_when_cancelled():
    from minigpt4.web import Cancelled, stream_reply

    tokens = []

    def call(on_text):
        for i in range(1000):
            tokens.append(i)
            on_text("x")
            time.sleep(0.002)
        return None

    cancel = threading.Event()
    stream = stream_reply(call, cancel, threading.Lock())
    next(stream)
    cancel.set()
    with pytest.raises(Cancelled):
        list(stream)
    assert len(tokens) < 1000


def test_notices_escape_html_and_log_a_user_error_as_one_info_line(caplog):
    from minigpt4.web import explain, notice

    assert notice() == ""  # nothing to say: the line is hidden
    hostile = notice('image <img src=x onerror="alert(1)">.png: not an image file')
    assert "<img" not in hostile and "&lt;img" in hostile and 'role="alert"' in hostile
    caplog.set_level(logging.INFO, logger="minigpt4.web")
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
    from minigpt4.web import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(UserError, match="ui.port"):
            serve(web_cfg(taken.getsockname()[1]), tiny_loaded, block=False)


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
    """Wraps the LLM's forward: an optional delay per call, the most calls ever in flight, and an
    optional exception to raise (an unexpected failure inside the model)."""

    def __init__(self, llm):
        self.delay, self.active, self.most_active, self.calls = 0.0, 0, 0, 0
        self.fail: Exception | None = None
        self.rows: set[int] = set()  # batch sizes seen (beam search runs one row per beam)
        self._lock = threading.Lock()
        original = llm.forward

        def forward(*args, **kwargs):
            with self._lock:
                self.calls += 1
                self.active += 1
                ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
                self.rows.add(ids.shape[0] if ids is not None else 0)
                self.most_active = max(self.most_active, self.active)
            try:
                if self.fail is not None:
                    raise self.fail
                time.sleep(self.delay)
                return original(*args, **kwargs)
            finally:
                with self._lock:
                    self.active -= 1

        llm.forward = forward


@pytest.fixture(scope="module")
def server():
    from minigpt4.build import load_model
    from minigpt4.web import serve

    cfg = web_cfg(free_port())
    loaded = load_model(cfg)
    probe = ModelProbe(loaded.model.llm)
    app = serve(cfg, loaded, block=False)
    port = cfg.ui.port
    yield f"http://127.0.0.1:{port}/", probe
    app.close()


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


@pytest.mark.browser
@pytest.mark.slow
def test_restart_stops_an_answer_midway(open_page, server):
    _, probe = server
    page = open_page()
    probe.delay = 0.1  # 16 tokens would take ~1.6 s
    try:
        page.fill("#message textarea", "Tell me a long story")
        page.press("#message textarea", "Enter")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#chat [data-testid=bot]')].some(b => b.innerText.trim())",
            timeout=WAIT_MS,
        )
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
    caplog.set_level(logging.INFO, logger="minigpt4.web")
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

    refused = [r for r in caplog.records if r.name == "minigpt4.web" and "refused" in r.getMessage()]
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


@pytest.mark.browser
@pytest.mark.slow
def test_tabs_have_their_own_conversations_and_queue(open_page, server):
    _, probe = server
    first, second = open_page(), open_page()
    send(first, "I am the first tab")
    assert count(second, "#chat [data-testid=user]") == 0  # not shared

    probe.delay, probe.most_active = 0.02, 0
    try:
        for page, text in ((first, "Tell me more"), (second, "I am the second tab")):
            page.fill("#message textarea", text)
            page.press("#message textarea", "Enter")
        for page, answers in ((first, 2), (second, 1)):
            page.wait_for_function(ANSWERED, arg=answers, timeout=WAIT_MS)
    finally:
        probe.delay = 0.0
    assert probe.most_active == 1  # queued one after the other, never at once
    assert count(first, "#chat [data-testid=user]") == 2
    assert count(second, "#chat [data-testid=user]") == 1
    assert "second tab" in second.locator("#chat [data-testid=user]").first.inner_text()


# ---- docs/web_multi_image.png -----------------------------------------------------------------
def save_screenshot(path: str, overrides: list[str]) -> None:
    """A multi-image conversation on the default tiny model (the trained demo when it ships),
    with pictures from minigpt4/data/synthetic.py."""
    import tempfile

    from playwright.sync_api import sync_playwright

    from minigpt4.build import load_model
    from minigpt4.data.synthetic import make_picture, sample_specs
    from minigpt4.web import serve

    port = free_port()
    cfg = compose("chat", ["gpu=cpu", "ui=web", f"ui.port={port}", "generation=greedy", *overrides])
    app = serve(cfg, load_model(cfg), block=False)
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


if __name__ == "__main__":  # python tests/test_web.py docs/web_multi_image.png [overrides...]
    save_screenshot(sys.argv[1], sys.argv[2:])
