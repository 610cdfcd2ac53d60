"""The OpenAI-compatible API: `python chat.py ui=api` serves /v1/chat/completions on 127.0.0.1:8000.

Scripts and evaluation tools that speak the OpenAI chat format (the `openai` client, lmms-eval's
and VLMEvalKit's OpenAI-compatible model types) reach the model here. Every request goes through
the one Engine (engine.py): concurrent requests are decoded in the same batch. Images come as
`data:image/...;base64,` URLs (local paths only with ui.allow_local_files=true; this tool never
fetches from the network). Errors are OpenAI error objects with the terminal's one-line messages.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import queue
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse

from minigpt4.build import LoadedModel
from minigpt4.conversation import USER, Conversation, clean_answer
from minigpt4.errors import UserError
from minigpt4.generation import GenerationSettings
from minigpt4.serving.engine import Engine, QueueFull, Request
from minigpt4.settings import ChatSettings

log = logging.getLogger(__name__)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ApiSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # required to bind any other host (or MINIGPT4_API_KEY)
    allow_local_files: bool = False  # image_url may name a file on this machine
    max_body_mb: float = 32.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def check_bind(settings: ApiSettings) -> ApiSettings:
    """Binding beyond this machine needs an API key (ui.api_key or MINIGPT4_API_KEY)."""
    key = settings.api_key or os.environ.get("MINIGPT4_API_KEY") or None
    if settings.host not in LOCAL_HOSTS and not key:
        raise UserError(f"ui.host={settings.host} opens the API to other machines: set ui.api_key=... "
                        "(or MINIGPT4_API_KEY), or keep ui.host=127.0.0.1")
    return replace(settings, api_key=key)


# ---- request parsing ----------------------------------------------------------------------------
def _image_bytes(url: str, allow_local_files: bool) -> bytes | str:
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if not header.endswith(";base64") or not header[5:].startswith("image/"):
            raise ApiError(400, "image_url: use a data:image/...;base64, URL", param="messages")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "image_url: the base64 data does not decode", param="messages") from None
    if url.startswith(("http://", "https://")):
        raise ApiError(400, "image_url: http(s) URLs are not fetched (this server never downloads): "
                            "send the image as a data:image/...;base64, URL", param="messages")
    path = url.removeprefix("file://")
    if not allow_local_files:
        raise ApiError(400, "image_url: local file paths are off (start the server with ui.allow_local_files=true) "
                            "or send a data:image/...;base64, URL", param="messages")
    return path


def build_conversation(loaded: LoadedModel, messages: Any, allow_local_files: bool):
    """OpenAI messages -> (Conversation with image slots, image sources in order)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: give a non-empty list of {role, content}", param="messages")
    template = loaded.template
    if isinstance(messages[0], dict) and messages[0].get("role") == "system":
        text = messages[0].get("content")
        if not isinstance(text, str):
            raise ApiError(400, "messages[0]: a system message's content is a string", param="messages")
        template = template.with_overrides(system=text, system_text_only=text)
        messages = messages[1:]
    conv = Conversation(template)
    images: list[Any] = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role == "assistant":
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}]: an assistant message's content is a string", param="messages")
            conv.add_answer(content)
            continue
        if role != "user":
            raise ApiError(400, f"messages[{i}]: role must be user or assistant (system only first), not {role!r}",
                           param="messages")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list) or not parts:
            raise ApiError(400, f"messages[{i}]: content is a string or a list of text and image_url parts",
                           param="messages")
        texts = []
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise ApiError(400, f"messages[{i}]: image_url needs a url", param="messages")
                if texts:  # text before an image closes that user message
                    conv.ask(" ".join(texts))
                    texts = []
                images.append(_image_bytes(url, allow_local_files))
                conv.add_image(len(images) - 1)
            else:
                raise ApiError(400, f"messages[{i}]: unknown content part {kind!r} (use text or image_url)",
                               param="messages")
        if texts:
            conv.ask(" ".join(texts))
    if not conv.messages or conv.messages[-1][0] != USER:
        raise ApiError(400, "messages: the last message must be the user's", param="messages")
    return conv, images


def settings_for(body: dict, defaults: GenerationSettings) -> tuple[GenerationSettings, tuple[str, ...] | None, int | None]:
    """The request's sampling parameters over the server's generation defaults."""
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, "n: only n=1 is served", param="n")
    changes: dict[str, Any] = {}
    if body.get("temperature") is not None:
        t = body["temperature"]
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 <= t <= 2:
            raise ApiError(400, "temperature: a number from 0 to 2", param="temperature")
        changes.update(temperature=float(t) or 1.0, do_sample=t > 0)
    if body.get("top_p") is not None:
        changes["top_p"] = body["top_p"]
    for key in ("max_tokens", "max_completion_tokens"):
        if body.get(key) is not None:
            changes["max_new_tokens"] = body[key]
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise ApiError(400, "stop: a string or a list of up to 4 strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ApiError(400, "seed: an integer", param="seed")
    try:
        settings = replace(defaults, **changes)
    except UserError as err:  # GenerationSettings names the generation key: say the API's
        message = str(err).replace("generation.max_new_tokens", "max_tokens").replace("generation.", "")
        raise ApiError(400, message) from None
    return settings, tuple(stop) if stop else None, seed


class _Guard:
    """The API key and body-size checks, as plain ASGI middleware. Starlette's
    @app.middleware("http") relays every streamed chunk through a memory stream and a task: at 32
    streams it took half the server's CPU from the engine (2026-12-02, a fake engine stepping
    every 6.5 ms: 2,910 -> 4,270 tokens/s without it)."""

    def __init__(self, app, settings: ApiSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send) -> None:
        refused = self.refusal(dict(scope["headers"])) if scope["type"] == "http" else None
        if refused is not None:
            return await refused.response()(scope, receive, send)
        await self.app(scope, receive, send)

    def refusal(self, headers: dict[bytes, bytes]) -> ApiError | None:
        """headers: lower-case byte names -> the error to answer with, if any."""
        key, limit = self.settings.api_key, self.settings.max_body_mb
        if key and headers.get(b"authorization", b"").decode("latin-1") != f"Bearer {key}":
            return ApiError(401, "missing or wrong API key: send Authorization: Bearer <ui.api_key>",
                            kind="authentication_error")
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > limit * 2**20:
            return ApiError(413, f"request body over ui.max_body_mb={limit:g} MB")
        return None


# ---- the app ------------------------------------------------------------------------------------
def create_app(engine: Engine | None, loaded: LoadedModel | None, defaults: GenerationSettings,
               settings: ApiSettings, model_name: str = "minigpt4"):
    """The FastAPI app; engine/loaded may be set later on app.state (503 until then)."""
    app = FastAPI(title="minigpt4", docs_url=None, redoc_url=None)
    app.state.engine, app.state.loaded = engine, loaded

    app.add_middleware(_Guard, settings=settings)

    @app.get("/health")
    async def health():
        ready = app.state.engine is not None
        return JSONResponse({"status": "ok" if ready else "loading"}, status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "minigpt4"}]}

    @app.post("/v1/chat/completions")
    async def completions(http: HttpRequest):
        engine, loaded = app.state.engine, app.state.loaded
        if engine is None:
            return ApiError(503, "the model is still loading: try again shortly", kind="server_error").response()
        try:
            body = json.loads(await http.body())
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return ApiError(400, "the body is not a JSON object").response()
        try:
            ready = asyncio.Event()  # set from the engine thread whenever the request has an event
            loop = asyncio.get_running_loop()
            request = await asyncio.to_thread(_submit, engine, loaded, body, defaults, settings,
                                              lambda: loop.call_soon_threadsafe(ready.set))
        except ApiError as err:
            return err.response()
        except QueueFull as err:
            return ApiError(429, f"server busy: {err}; retry later", kind="rate_limit_error").response()
        except UserError as err:
            return ApiError(400, str(err)).response()
        answer_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.get("stream"):
            return StreamingResponse(_stream(http, request, ready, answer_id, created, model_name),
                                     media_type="text/event-stream")
        try:
            await _wait(http, request, ready)
        except UserError as err:
            return ApiError(500, str(err), kind="server_error").response()
        if request.finish_reason == "cancelled":
            return ApiError(499, "cancelled").response()
        return {
            "id": answer_id, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": clean_answer(request.text, loaded.template)},
                         "finish_reason": request.finish_reason}],
            "usage": _usage(request),
        }

    return app


def _submit(engine: Engine, loaded: LoadedModel, body: dict, defaults: GenerationSettings,
            settings: ApiSettings, notify) -> Request:
    conv, sources = build_conversation(loaded, body.get("messages"), settings.allow_local_files)
    generation, stops, seed = settings_for(body, defaults)
    pixels = loaded.pixels(sources) if sources else None  # UserError if unreadable; the engine encodes them
    stops = tuple(loaded.template.stop) + (stops or ())
    return engine.submit(engine.prompt_ids(conv), None, generation, stops=stops, seed=seed, notify=notify,
                         pixels=pixels)


def _usage(request: Request) -> dict:
    return {"prompt_tokens": request.prompt_tokens, "completion_tokens": request.completion_tokens,
            "total_tokens": request.prompt_tokens + request.completion_tokens}


class _Events:
    """A request's events as the event loop reads them: every pending event at once (the engine
    adds one per token; at 32 streams a loop that woke, checked the connection and set a timer
    per token took the GIL from the engine), and the connection looked at twice a second."""

    CHECK_EVERY = 0.5  # seconds between two looks at the client's connection

    def __init__(self, http, request: Request, ready: asyncio.Event):
        self.http, self.request, self.ready = http, request, ready
        self.checked = time.monotonic()

    async def next(self) -> list[tuple[str, str]] | None:
        """The pending events (at least one); None (and the request cancelled) once the client is gone."""
        while True:
            self.ready.clear()
            events = []
            try:
                while True:
                    events.append(self.request.events.get_nowait())
            except queue.Empty:
                pass
            if time.monotonic() - self.checked >= self.CHECK_EVERY:  # not on every wake: a look costs a task and a timer
                self.checked = time.monotonic()
                if await self.http.is_disconnected():
                    self.request.cancel()
                    return None
            if events:
                return events
            try:
                await asyncio.wait_for(self.ready.wait(), timeout=self.CHECK_EVERY)
            except TimeoutError:
                pass


async def _wait(http, request: Request, ready: asyncio.Event) -> None:
    events = _Events(http, request, ready)
    while True:
        batch = await events.next()
        if batch is None:
            return
        for kind, value in batch:
            if kind == "done":
                return
            if kind == "error":
                raise UserError(value)


async def _stream(http, request: Request, ready: asyncio.Event, answer_id: str, created: int, model: str):
    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        data = {"id": answer_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    events = _Events(http, request, ready)
    try:
        while True:
            batch = await events.next()
            if batch is None:
                return
            text = "".join(value for kind, value in batch if kind == "delta")  # what arrived together, one chunk
            if text:
                yield chunk({"content": text})
            end = next(((kind, value) for kind, value in batch if kind != "delta"), None)
            if end is None:
                continue
            if end[0] == "error":
                yield f"data: {json.dumps(ApiError(500, end[1], kind='server_error').body())}\n\n"
            else:
                yield chunk({}, finish=request.finish_reason, usage=_usage(request))
                yield "data: [DONE]\n\n"
            return
    finally:
        if not request.done.is_set():  # the client went away mid-answer: free its row
            request.cancel()


def serve(settings: ChatSettings, loaded: LoadedModel) -> None:
    """chat.py ui=api: the engine and the app on ui.host:ui.port until Ctrl-C."""
    import uvicorn

    ui = settings.ui
    api = check_bind(ApiSettings(**{k: ui[k] for k in ApiSettings.__dataclass_fields__ if k in ui}))
    engine = Engine.for_chat(loaded, settings)
    app = create_app(engine, loaded, settings.generation, api, model_name=loaded.name)
    log.info("OpenAI-compatible API on http://%s:%d/v1 (%d rows)", api.host, api.port, engine.slots)
    try:
        uvicorn.run(app, host=api.host, port=int(api.port), log_level="warning")
    finally:
        engine.close()
