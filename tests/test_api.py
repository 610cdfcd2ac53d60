"""The OpenAI-compatible API (minigpt4/serving): the official `openai` client against a server
started here on the demo model, on 127.0.0.1 with a free port. Nothing is downloaded."""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from tiny_models import build_tiny  # noqa: E402

from minigpt4.chat import ChatSession  # noqa: E402
from minigpt4.data.synthetic import make_picture, sample_specs  # noqa: E402
from minigpt4.errors import UserError  # noqa: E402
from minigpt4.generation import GenerationSettings  # noqa: E402
from minigpt4.frontends.api import ApiSettings, check_bind, create_app  # noqa: E402
from minigpt4.serving.engine import Engine  # noqa: E402

GREEDY = GenerationSettings(do_sample=False, max_new_tokens=40)


class Server:
    """uvicorn in a thread on a free port; .url, .engine, .close()."""

    def __init__(self, loaded, slots=4, max_queue=16, api_key=None, defaults=GREEDY):
        self.engine = Engine(loaded, slots=slots, max_context=2000, max_queue=max_queue)
        app = create_app(self.engine, loaded, defaults, ApiSettings(port=0, api_key=api_key), model_name="demo")
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                break
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"

    def client(self, key="unused"):
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=60)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.close()


@pytest.fixture(scope="module")
def loaded():
    torch.set_num_threads(1)
    return build_tiny(["checkpoint=demo"])


@pytest.fixture(scope="module")
def server(loaded):
    s = Server(loaded)
    yield s
    s.close()


@pytest.fixture(scope="module")
def pictures(loaded):
    return [make_picture(spec, size=loaded.image_size) for spec in sample_specs(3, seed=21)]


def data_url(picture) -> str:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def alone(loaded, turns) -> str:
    """The answer ChatSession gives: turns = [(images, question), ...], answered in turn."""
    session = ChatSession(loaded, GREEDY)
    reply = None
    for images, question in turns:
        session.add_images(images)
        reply = session.ask(question)
    return reply.text


def ask(client, content, history=(), **kwargs):
    messages = [*history, {"role": "user", "content": content}]
    return client.chat.completions.create(model="demo", messages=messages, temperature=0, **kwargs)


def test_text_only_message(server, loaded):
    out = ask(server.client(), "Hello! What can you do?")
    assert out.choices[0].message.content == alone(loaded, [([], "Hello! What can you do?")])
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens > 0 and out.usage.completion_tokens > 0


def test_one_image_and_two_images_and_images_across_turns(server, loaded, pictures):
    client = server.client()
    one = ask(client, [{"type": "image_url", "image_url": {"url": data_url(pictures[0])}},
                       {"type": "text", "text": "What colour are the shapes?"}])
    assert one.choices[0].message.content == alone(loaded, [([pictures[0]], "What colour are the shapes?")])
    # the image's 16 soft tokens count in the prompt
    text_only = ask(client, "What colour are the shapes?")
    assert one.usage.prompt_tokens >= text_only.usage.prompt_tokens + loaded.model.num_image_tokens
    two = ask(client, [{"type": "image_url", "image_url": {"url": data_url(pictures[0])}},
                       {"type": "image_url", "image_url": {"url": data_url(pictures[1])}},
                       {"type": "text", "text": "How many shapes are there?"}])
    assert two.choices[0].message.content == alone(loaded, [(pictures[:2], "How many shapes are there?")])
    first = one.choices[0].message.content
    history = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(pictures[0])}},
                                            {"type": "text", "text": "What colour are the shapes?"}]},
               {"role": "assistant", "content": first}]
    later = ask(client, [{"type": "image_url", "image_url": {"url": data_url(pictures[2])}},
                         {"type": "text", "text": "How many shapes are there?"}], history)
    expected = alone(loaded, [([pictures[0]], "What colour are the shapes?"), ([pictures[2]], "How many shapes are there?")])
    assert later.choices[0].message.content == expected


def test_streaming_gives_the_same_answer(server, pictures):
    client = server.client()
    content = [{"type": "image_url", "image_url": {"url": data_url(pictures[1])}},
               {"type": "text", "text": "Describe the picture."}]
    whole = ask(client, content).choices[0].message.content
    chunks = list(ask(client, content, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == whole and len(chunks) > 3
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_bad_requests_are_400_with_the_reason(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="not an image file"):
        ask(client, [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"nope").decode()}},
                     {"type": "text", "text": "What is this?"}])
    with pytest.raises(openai.BadRequestError, match="http"):
        ask(client, [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}])
    with pytest.raises(openai.BadRequestError, match="local file"):
        ask(client, [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}])
    with pytest.raises(openai.BadRequestError, match="too long"):
        ask(client, "word " * 3000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], temperature=-1)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], n=2)
    assert ask(client, "Hello!").choices[0].message.content  # the server goes on


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list()] == ["demo"]
    assert httpx.get(server.url.removesuffix("/v1") + "/health").json() == {"status": "ok"}


def test_eight_concurrent_clients_get_their_answers_alone(server, loaded, pictures):
    questions = ["What colour are the shapes?", "How many shapes are there?", "What shape are they?",
                 "Hello!", "What is the background colour?", "Thanks!", "Are the shapes large or small?",
                 "What can you do?"]
    jobs = [([pictures[i % 3]] if i % 2 == 0 else [], q) for i, q in enumerate(questions)]
    expected = [alone(loaded, [job]) for job in jobs]

    def one(job):
        images, question = job
        content = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in images]
        return ask(server.client(), [*content, {"type": "text", "text": question}]).choices[0].message.content

    steps_before = server.engine.steps
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, jobs))
    assert got == expected
    assert server.engine.steps - steps_before < sum(len(e) for e in expected)  # decoded together, not one by one


def test_a_client_that_disconnects_frees_its_row(server):
    body = {"model": "demo", "stream": True, "temperature": 0, "max_tokens": 1000,
            "messages": [{"role": "user", "content": "Tell me a long story about shapes."}]}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break
    for _ in range(200):
        if server.engine.active() == 0:
            break
        time.sleep(0.05)
    assert server.engine.active() == 0


def test_a_full_queue_is_429():
    busy_model = build_tiny(["checkpoint=random"])
    busy_model.template = busy_model.template.with_overrides(stop=())  # answers run to max_tokens
    s = Server(busy_model, slots=1, max_queue=0, defaults=GenerationSettings(do_sample=False, min_new_tokens=1000))
    try:
        body = {"model": "demo", "stream": True, "temperature": 0, "max_tokens": 1000,
                "messages": [{"role": "user", "content": "Tell me a long story."}]}
        with httpx.stream("POST", s.url + "/chat/completions", json=body, timeout=60) as busy:
            lines = busy.iter_lines()
            while '"content": ""' in next(lines) or not s.engine.active():  # until the row decodes
                pass
            with pytest.raises(openai.RateLimitError, match="busy"):
                ask(s.client(), "Hello!")
    finally:
        s.close()


def test_api_key(loaded):
    with pytest.raises(UserError, match="api_key"):
        check_bind(ApiSettings(host="0.0.0.0"))
    assert check_bind(ApiSettings(host="0.0.0.0", api_key="k")).api_key == "k"
    assert check_bind(ApiSettings()).api_key is None  # 127.0.0.1 needs none
    s = Server(loaded, api_key="secret")
    try:
        with pytest.raises(openai.AuthenticationError):
            ask(s.client("wrong"), "Hello!")
        assert ask(s.client("secret"), "Hello!").choices[0].message.content
    finally:
        s.close()



def test_the_guard_refuses_big_bodies_and_wrong_keys_before_anything_else():
    """413 over ui.max_body_mb and 401 without the key, even while the model loads (no engine)."""
    from fastapi.testclient import TestClient

    client = TestClient(create_app(None, None, GREEDY, ApiSettings(api_key="k", max_body_mb=0.001)))
    big = {"messages": [{"role": "user", "content": "x" * 2000}]}
    too_big = client.post("/v1/chat/completions", json=big, headers={"Authorization": "Bearer k"})
    assert too_big.status_code == 413 and "ui.max_body_mb" in too_big.json()["error"]["message"]
    assert client.get("/health").status_code == 401
    assert client.get("/health", headers={"Authorization": "Bearer k"}).status_code == 503  # loading
    small = client.post("/v1/chat/completions", json={"messages": []}, headers={"Authorization": "Bearer k"})
    assert small.status_code == 503
