"""The prompt format, pinned: multi-image, multi-turn conversations as chat, evaluate and
finetune build them render to exactly the official strings (docs/OFFICIAL.md, FACTS), and a
saved conversation reloads to the same prompt."""

from __future__ import annotations

import json

import pytest

from minigpt4.conversation import (
    ASSISTANT,
    OFFICIAL_SYSTEM,
    TEXT_ONLY_SYSTEM,
    USER,
    Conversation,
    ImagePart,
    Message,
    TextPart,
    build_prompt,
    encode_dialogue,
    encode_prompt,
    get_template,
    load_conversation,
    parse_message,
    render_message,
)
from minigpt4.errors import UserError

IMG = "<Img><ImageHere></Img>"
V0 = get_template("vicuna_v0")


def chat_conversation(template=V0) -> Conversation:
    """Text first, then two images and a question, an answer, a third image and a question."""
    conv = Conversation(template)
    conv.ask("Hello")
    conv.add_answer("Hi.")
    conv.add_image("a.png")
    conv.add_image("b.png")
    conv.ask("Compare them.")
    conv.add_answer("A is red.")
    conv.add_image("c.png")
    conv.ask("And this?")
    return conv


def test_multi_image_multi_turn_chat_prompt_is_pinned():
    conv = chat_conversation()
    assert conv.prompt() == (
        OFFICIAL_SYSTEM + "###Human: Hello###Assistant: Hi.###"
        f"Human: {IMG}###Human: {IMG} Compare them.###Assistant: A is red.###"
        f"Human: {IMG} And this?###Assistant:"
    )
    assert conv.prompt(open_answer=False).endswith(f"###Human: {IMG} And this?###")
    later = Conversation(get_template("vicuna_v0_later"), list(conv.messages))
    assert later.prompt() == conv.prompt() + " "  # the later code keeps the open role's space
    llama2 = chat_conversation(get_template("llama2"))
    assert llama2.prompt() == (
        OFFICIAL_SYSTEM + "<s>[INST] Hello [/INST] Hi."
        f"<s>[INST] {IMG}<s>[INST] {IMG} Compare them. [/INST] A is red."
        f"<s>[INST] {IMG} And this? [/INST] "
    )
    assert conv.images == ["a.png", "b.png", "c.png"]


def test_dropping_turns_takes_their_images_along():
    conv = chat_conversation()
    assert conv.drop_oldest_turn()
    assert conv.prompt().startswith(OFFICIAL_SYSTEM + f"###Human: {IMG}###Human: {IMG} Compare them.")
    assert conv.drop_oldest_turn() and conv.images == ["c.png"]
    assert conv.prompt() == OFFICIAL_SYSTEM + f"###Human: {IMG} And this?###Assistant:"
    assert not conv.drop_oldest_turn()
    text_only = Conversation(V0)
    text_only.ask("Hi")
    assert text_only.prompt() == TEXT_ONLY_SYSTEM + "###Human: Hi###Assistant:"


def test_evaluation_markers_place_images_in_the_prompt():
    marked = build_prompt(V0, "Compare <image> and <image>.", ["a.png", "b.png"])
    assert marked.prompt() == OFFICIAL_SYSTEM + f"###Human: Compare###Human: {IMG} and###Human: {IMG} .###Assistant:"
    assert marked.images == ["a.png", "b.png"]
    first = build_prompt(V0, "<image> What is it?", ["a.png"])
    assert first.prompt() == OFFICIAL_SYSTEM + f"###Human: {IMG} What is it?###Assistant:"
    unmarked = build_prompt(V0, " Which is red? ", ["a.png", "b.png"])
    assert unmarked.prompt() == OFFICIAL_SYSTEM + f"###Human: {IMG}###Human: {IMG} Which is red?###Assistant:"
    with pytest.raises(UserError, match="2 <image> markers but 1 images"):
        build_prompt(V0, "<image> or <image>", ["a.png"])


def test_stage2_prompt_joins_the_user_messages():
    conv = build_prompt(V0, "Compare <image> and <image>.", ["a.png", "b.png"])
    assert conv.stage2_prompt() == f"###Human: Compare {IMG} and {IMG} . ###Assistant: "
    one = Conversation(V0)
    one.add_image("x.png")
    one.ask("Describe this image in detail.")
    assert one.stage2_prompt() == f"###Human: {IMG} Describe this image in detail. ###Assistant: "


def test_saved_conversation_reloads_to_the_same_prompt(tmp_path):
    conv = chat_conversation()
    conv.add_answer("Blue.")
    data = conv.to_json()
    assert data == {
        "template": "vicuna_v0",
        "messages": [
            {"role": "user", "text": "Hello"}, {"role": "assistant", "text": "Hi."},
            {"role": "user", "text": IMG}, {"role": "user", "text": f"{IMG} Compare them."},
            {"role": "assistant", "text": "A is red."}, {"role": "user", "text": f"{IMG} And this?"},
            {"role": "assistant", "text": "Blue."},
        ],
        "images": ["a.png", "b.png", "c.png"],
    }
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(data))
    loaded = load_conversation(path, V0)
    assert loaded.prompt() == conv.prompt() and loaded.images == conv.images
    assert loaded.to_json() == data


def test_messages_are_typed_parts_and_images_go_with_their_slots():
    conv = chat_conversation()
    assert conv.messages[2] == Message(USER, (ImagePart("a.png"),))
    assert conv.messages[3] == Message(USER, (ImagePart("b.png"), TextPart("Compare them.")))
    assert conv.messages[3].images == ["b.png"] and conv.messages[3].text == "Compare them."
    assert conv.messages[4] == Message(ASSISTANT, (TextPart("A is red."),))
    before = conv.prompt()
    conv.images = ["x", "y", "z"]  # new handles (encoded images, say), same slots, same prompt
    assert [m.images for m in conv.messages if m.images] == [["x"], ["y"], ["z"]] and conv.prompt() == before
    with pytest.raises(ValueError, match="2 images for 3 image slots"):
        conv.images = ["x", "y"]
    # a question may look like an image message's text; only an ImagePart is an image
    tricky = Conversation(V0)
    tricky.ask("Close the tag with </Img>")  # the old string test took this for an image message
    tricky.ask("And open it?")
    assert tricky.images == [] and len(tricky.messages) == 2
    with pytest.raises(UserError, match="may not contain <ImageHere>"):
        tricky.ask("<ImageHere>")


@pytest.mark.parametrize("text", ["Hi", "", IMG, f"{IMG} What is it?", f"Compare {IMG} and {IMG} .", f"{IMG} {IMG}",
                                  f"{IMG}  two spaces"])
def test_a_rendered_message_parses_back_to_its_parts(text):
    message = parse_message(USER, text, ["a.png", "b.png"])
    assert render_message(message) == text
    assert message.images == ["a.png", "b.png"][: text.count(IMG)]


@pytest.mark.parametrize("text", ["<ImageHere> bare", f"x{IMG}", f"{IMG}y", f"{IMG} "])
def test_a_hand_edited_message_that_would_not_render_back_is_refused(text):
    data = {"messages": [{"role": "user", "text": text}], "images": ["a.png"]}
    with pytest.raises(UserError) as err:
        Conversation.from_json(data, V0, "edited.json")
    assert str(err.value) == (f"edited.json: not a saved conversation (message 1: an image is written {IMG}, "
                              "separated from the text by one space)")


def test_encode_dialogue_trains_every_answer_where_chat_generates_it():
    """Each answer follows exactly the ids of the prompt chat sends at that turn; an answer given
    before the first image (whose system text the image replaces) is left untrained."""
    from minigpt4.config import ASSETS
    from minigpt4.tokenizer import Tokenizer

    encode = Tokenizer(ASSETS / "tiny_tokenizer.model").encode  # the demo's own kind of tokenizer
    conv = Conversation(V0)
    conv.ask("Hi")
    conv.add_answer("Hello")
    conv.add_image("a.png")
    conv.ask("Colour?")
    conv.add_answer("red")
    conv.add_image("b.png")
    conv.ask("How many in all?")
    conv.add_answer("3")
    ids, labels = encode_dialogue(encode, conv, num_image_tokens=2)
    trained = []
    for k in (3, 5):  # the assistant messages after the first image (an image joins its question's message)
        prompt = encode_prompt(encode, Conversation(V0, conv.messages[:k]).prompt(), 2)
        answer = encode(conv.messages[k].text + "###", bos=False)
        assert ids[: len(prompt)] == prompt
        assert ids[len(prompt): len(prompt) + len(answer)] == labels[len(prompt): len(prompt) + len(answer)] == answer
        trained += list(range(len(prompt), len(prompt) + len(answer)))
    assert [i for i, label in enumerate(labels) if label != -100] == trained  # "Hello" and the prompts are not
    assert ids[: trained[0]] == encode_prompt(encode, Conversation(V0, conv.messages[:3]).prompt(), 2)
    text_only = Conversation(V0, conv.messages[:2])  # no image: the first answer trains too
    ids, labels = encode_dialogue(encode, text_only, 2)
    assert [x for x in labels if x != -100] == encode("Hello###", bos=False)
    with pytest.raises(ValueError, match="no assistant message"):
        encode_dialogue(encode, Conversation(V0, conv.messages[:1]), 2)
