"""`python chat.py`: load the model, then the web page (ui=web), the API (ui=api), a one-shot
answer (chat.prompt=...) or the terminal chat. The session (minigpt4/chat.py) knows none of them."""

from __future__ import annotations

import sys

import torch

from minigpt4.build import load_model
from minigpt4.chat import ChatSession, Reply
from minigpt4.errors import UserError
from minigpt4.extras import require
from minigpt4.settings import ChatSettings

FRONTENDS = ("terminal", "web", "api")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def one_shot(session: ChatSession, prompt: str, images: list[str]) -> Reply:
    """Answer one prompt about `images` (they come first): the answer to stdout, stats to stderr."""
    session.add_images(list(images))
    reply = session.ask(prompt)
    print(reply.text, flush=True)
    _stderr(reply.summary())
    return reply


def run(settings: ChatSettings) -> None:
    """Load the model and hand it to the chosen front-end (or answer chat.prompt once)."""
    ui = settings.ui.get("name", "terminal")
    if ui not in FRONTENDS:
        raise UserError(f"ui={ui}: choose ui=terminal, ui=web or ui=api")
    if ui == "api":  # before the model loads
        require("ui=api", "api", "fastapi", "uvicorn")
    torch.manual_seed(int(settings.seed or 0))  # an untrained (random) model is reproducible too
    loaded = load_model(settings.load)
    _stderr(f"model: {loaded.label} on {loaded.device} (loaded in {loaded.load_seconds:.1f} s)")
    files = settings.load.checkpoint.files()
    if files:  # which files answer (a checkpoint.proj=... override among them)
        _stderr("checkpoint: " + ", ".join(f"{key}={path}" for key, path in files.items()))
    if not loaded.trained:
        _stderr(
            "WARNING: this model is UNTRAINED (random weights): its answers are noise. "
            "Point checkpoint=... at real weights (see docs/CHAT.md)."
        )
    if ui == "web":
        from minigpt4.frontends import web  # Gradio is imported only for ui=web

        web.serve(settings, loaded)
        return
    if ui == "api":
        from minigpt4.frontends import api  # FastAPI too

        api.serve(settings, loaded)
        return
    from minigpt4.frontends.terminal import run_terminal

    session = ChatSession.from_settings(settings, loaded)
    images = settings.chat.image_list()
    if settings.chat.prompt:
        one_shot(session, str(settings.chat.prompt), images)
        return
    try:
        session.add_images(images)  # chat.images without a prompt: attached to the first message
    except UserError as err:  # the chat starts all the same, without them
        _stderr(f"error: {err}")
    run_terminal(session)
