"""The static-cache decoder (CUDA graphs on a GPU, the same cache logic eagerly on CPU) must give
exactly what the eager DynamicCache path gives: batches with left padding, and chat turns that
rewind to a shared prefix."""

from __future__ import annotations

from dataclasses import replace

import torch

from minigpt4.chat import ChatSession
from minigpt4.conversation import encode_prompt
from minigpt4.cuda_decode import StaticDecoder
from minigpt4.data.synthetic import make_picture, sample_specs
from minigpt4.generation import GenerationSettings, generate
from tests.conftest import build_tiny


def test_static_generate_equals_dynamic_with_left_padding():
    loaded = build_tiny(["checkpoint=demo"])
    tok, n = loaded.tokenizer, loaded.model.num_image_tokens
    pictures = [make_picture(s, size=loaded.image_size) for s in sample_specs(2, seed=11)]
    prompts = []
    for i, question in enumerate(["What colour are the shapes?", "How many shapes are there?"]):
        conv = loaded.conversation()
        conv.add_image(i)
        conv.ask(question)
        prompts.append(encode_prompt(tok.encode, conv.prompt(), n))
    text_only = loaded.conversation()
    text_only.ask("Hello! What can you do for me today?")
    prompts.append(encode_prompt(tok.encode, text_only.prompt(), n))
    embeds = loaded.encode_images(pictures)
    greedy = GenerationSettings(do_sample=False, max_new_tokens=20)
    dynamic = generate(loaded.model, tok, prompts, embeds, replace(greedy, cache="dynamic"))
    static = generate(loaded.model, tok, prompts, embeds, replace(greedy, cache="static"))
    assert [r.ids for r in static] == [r.ids for r in dynamic]
    assert all(r.text for r in static)


def test_static_chat_session_reuses_prefix_and_matches_dynamic():
    loaded = build_tiny(["checkpoint=demo"])
    picture = make_picture(sample_specs(1, seed=5)[0], size=loaded.image_size)
    answers = {}
    for engine in ("dynamic", "static"):
        session = ChatSession(loaded, GenerationSettings(do_sample=False, max_new_tokens=16, cache=engine))
        session.add_images([picture])
        replies = [session.ask(q) for q in ("What colour are the shapes?", "How many shapes are there?", "Thanks!")]
        answers[engine] = [r.text for r in replies]
        if engine == "static":
            assert isinstance(session._cache, StaticDecoder)
            assert replies[1].reused > 0 and replies[2].reused > replies[1].reused
    assert answers["static"] == answers["dynamic"]
    assert answers["static"][0]  # a real answer, not an empty string


def test_reserved_image_marker_in_a_message_is_a_clear_error():
    import pytest

    from minigpt4.errors import UserError

    loaded = build_tiny(["checkpoint=demo"])
    session = ChatSession(loaded, GenerationSettings(do_sample=False, max_new_tokens=4, cache="dynamic"))
    with pytest.raises(UserError, match="ImageHere"):
        session.ask("what is <ImageHere> about?")
    assert session.ask("Hello!").text  # the session goes on
