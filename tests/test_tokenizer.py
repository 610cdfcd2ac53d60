"""Tokenizer parity: every segment of the official prompts gets exactly the ids sentencepiece
(the official tokenizer) gives, including segments that start with a space; BOS only first."""

from __future__ import annotations

import re
import shutil

import pytest
import sentencepiece as spm
from official_files import TINY_TOKENIZER

from minigpt4.conversation import (
    IMAGE_PLACEHOLDER,
    STAGE2_INSTRUCTIONS,
    Conversation,
    encode_prompt,
    get_template,
)
from minigpt4.errors import UserError
from minigpt4.model import IMAGE_TOKEN
from minigpt4.tokenizer import Tokenizer

SP = spm.SentencePieceProcessor(model_file=str(TINY_TOKENIZER))
TOK = Tokenizer(TINY_TOKENIZER)


def official_ids(text: str) -> list[int]:
    """What the official (slow, sentencepiece) LlamaTokenizer gave for one segment: special
    tokens written in the text ("<s>" in the LLaMA-2 template) become their ids, every other
    stretch goes through sentencepiece as it is."""
    ids = []
    for chunk in re.split(r"(<s>|</s>|<unk>)", text):
        if chunk in ("<s>", "</s>", "<unk>"):
            ids.append(SP.piece_to_id(chunk))
        elif chunk:
            ids.extend(SP.encode(chunk))
    return ids


def prompts() -> dict[str, str]:
    out = {}
    for n_images in (1, 2):
        conv = Conversation(get_template("vicuna_v0"))
        for i in range(n_images):
            conv.add_image(f"{i}.png")
        conv.ask("Describe this image.")
        conv.add_answer("A red square on a blue background.")
        conv.ask("What colour is the square?")
        out[f"vicuna_v0, {n_images} image(s)"] = conv.prompt()
    conv = Conversation(get_template("llama2"))
    conv.add_image("0.png")
    conv.ask("Describe this image.")
    out["llama2"] = conv.prompt()
    conv = Conversation(get_template("vicuna_v0"))
    conv.ask("Hello")
    out["vicuna_v0, text only"] = conv.prompt()
    for i, instruction in enumerate(STAGE2_INSTRUCTIONS):  # fine-tuning prompts, target included
        conv = Conversation(get_template("vicuna_v0"))
        conv.add_image("0.png")
        conv.ask(instruction)
        out[f"stage 2, {i}"] = conv.stage2_prompt() + "A red square.###"
    return out


def segments() -> list[str]:
    return sorted({s for p in prompts().values() for s in p.split(IMAGE_PLACEHOLDER)})


def test_the_official_prompt_shape():
    prompt = prompts()["vicuna_v0, 1 image(s)"]
    assert "Please answer my questions.###Human: <Img><ImageHere></Img> Describe this image.###Assistant: A red" in prompt
    assert prompt.endswith("###Human: What colour is the square?###Assistant:")
    parts = prompt.split(IMAGE_PLACEHOLDER)
    assert parts[1].startswith("</Img> Describe this image.###Assistant:")


@pytest.mark.parametrize("segment", segments())
def test_every_segment_matches_sentencepiece(segment):
    assert TOK.encode(segment) == official_ids(segment)
    assert TOK.encode(segment, bos=True) == [SP.bos_id(), *official_ids(segment)]
    if "<s>" not in segment:
        assert TOK.encode(segment) == SP.encode(segment)  # plain text: raw sentencepiece, nothing else


@pytest.mark.parametrize("text", [" Describe this image.###Assistant:", "</Img> Describe", " ", "  two spaces",
                                  "###", "\nnew line", "émoji 🙂 and bytes"])
def test_leading_whitespace_and_odd_text(text):
    assert TOK.encode(text) == SP.encode(text)
    # a leading space is a token of its own, as in sentencepiece: it is not dropped
    if text.startswith(" "):
        assert TOK.encode(text) != TOK.encode(text.lstrip())


@pytest.mark.parametrize("name", sorted(prompts()))
def test_bos_only_on_the_first_segment(name):
    prompt = prompts()[name]
    ids = encode_prompt(TOK.encode, prompt, num_image_tokens=4)
    expected = []
    for i, segment in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
        if i:
            expected += [IMAGE_TOKEN] * 4
        expected += ([SP.bos_id()] if i == 0 else []) + official_ids(segment)
    assert ids == expected
    assert ids[0] == SP.bos_id()
    literal_bos = prompt.count("<s>")  # the LLaMA-2 template writes "<s>[INST]" into its text
    assert ids.count(SP.bos_id()) == 1 + literal_bos


def test_llama2_literal_bos():
    ids = TOK.encode("questions.<s>[INST] <Img>")
    assert ids == SP.encode("questions.") + [SP.bos_id()] + SP.encode("[INST] <Img>")


def test_decode_drops_specials_and_rows_past_the_vocabulary():
    ids = TOK.encode("Describe this image.", bos=True)
    assert TOK.decode(ids + [TOK.eos_id, TOK.vocab_size]) == "Describe this image."


def test_missing_or_broken_tokenizer_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        Tokenizer(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.model").write_text("not a model")
    with pytest.raises(UserError, match="not a sentencepiece model"):
        Tokenizer(tmp_path / "tokenizer.model")


def test_transformers_llama_tokenizers_do_not_give_the_official_ids(tmp_path):
    """Why minigpt4/tokenizer.py calls sentencepiece itself: transformers' Llama tokenizers, built
    from the same tokenizer.model, give other ids than the official (slow, sentencepiece) one on
    official prompt segments. If this fails, transformers gives the official ids again (with the
    ids above, test_every_segment_matches_sentencepiece is what must hold either way)."""
    from transformers import AutoTokenizer, LlamaTokenizer

    shutil.copy(TINY_TOKENIZER, tmp_path / "tokenizer.model")
    for cls in (LlamaTokenizer, AutoTokenizer):
        hf = cls.from_pretrained(str(tmp_path))
        differ = [s for s in segments() if hf.encode(s, add_special_tokens=False) != official_ids(s)]
        assert differ, f"transformers' {cls.__name__} now gives the official ids on every prompt segment"
