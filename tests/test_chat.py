"""ChatSession, the terminal and chat.py: prompts equal the official ones, images go where they
were given and are encoded once, overflow drops whole turns, the KV cache reuse changes nothing
but the work done, and whole stdin-driven sessions run (in-process and as a subprocess)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import BELOW_GOAL, DEMO

import minigpt4.chat as chat_module
from minigpt4.chat import ChatSession
from minigpt4.config import chat_settings
from minigpt4.conversation import (
    OFFICIAL_SYSTEM,
    TEXT_ONLY_SYSTEM,
    Conversation,
    encode_prompt,
    get_template,
)
from minigpt4.errors import UserError
from minigpt4.frontends.terminal import run_terminal
from minigpt4.generation import GenerationSettings
from minigpt4.model import IMAGE_TOKEN
from minigpt4.recipes import chat as chat_recipe

ROOT = Path(__file__).resolve().parents[1]
GREEDY = GenerationSettings(do_sample=False, max_new_tokens=6)
# docs/OFFICIAL.md ("Prompts"), verbatim: the official v1 prompt for one image and one question.
OFFICIAL_ONE_IMAGE = (
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide it to you. "
    "Please answer my questions.###Human: <Img><ImageHere></Img> Describe this image.###Assistant:"
)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[str]:
    """Three small distinct PNG files."""
    folder = tmp_path_factory.mktemp("pictures")
    paths = []
    for i, colour in enumerate([(220, 40, 40), (40, 80, 220), (40, 170, 60)]):
        path = folder / f"p{i}.png"
        Image.new("RGB", (64, 48), colour).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def recorded(monkeypatch):
    """Record the token sequences and image embeddings ChatSession hands to generate()."""
    calls = []
    real = chat_module.generate

    def spy(model, tokenizer, sequences, image_embeds, settings, **kwargs):
        calls.append({"ids": sequences[0], "images": image_embeds, "cache_length": kwargs["cache_length"]})
        return real(model, tokenizer, sequences, image_embeds, settings, **kwargs)

    monkeypatch.setattr(chat_module, "generate", spy)
    return calls


def run_chat(cfg) -> None:
    """What chat.py does with a composed config."""
    chat_recipe.run(chat_settings(cfg))


def _ids(loaded, prompt: str) -> list[int]:
    return encode_prompt(loaded.tokenizer.encode, prompt, loaded.model.num_image_tokens)


# ---- templates, verbatim -------------------------------------------------------------------------
def test_templates_match_the_official_strings():
    conv = Conversation(get_template("vicuna_v0"))
    conv.add_image("a.png")
    conv.ask("Describe this image.")
    assert conv.prompt() == OFFICIAL_ONE_IMAGE
    conv.add_answer("A cat.")
    conv.ask("What colour?")
    assert conv.prompt() == OFFICIAL_ONE_IMAGE + " A cat.###Human: What colour?###Assistant:"
    later = Conversation(get_template("vicuna_v0_later"), list(conv.messages))
    assert later.prompt().endswith("###Human: What colour?###Assistant: ")
    llama2 = Conversation(get_template("llama2"))
    llama2.add_image("a.png")
    llama2.ask("Describe this image.")
    assert llama2.prompt() == OFFICIAL_SYSTEM + "<s>[INST] <Img><ImageHere></Img> Describe this image. [/INST] "
    llama2.add_answer("A cat.")  # official SINGLE style, sep "": role + message, turn after turn
    llama2.ask("What colour?")
    assert llama2.prompt() == (OFFICIAL_SYSTEM + "<s>[INST] <Img><ImageHere></Img> Describe this image. [/INST] A cat."
                               "<s>[INST] What colour? [/INST] ")


def test_session_prompt_is_the_official_one(tiny_loaded, pictures, recorded):
    session = ChatSession(tiny_loaded, GREEDY)
    session.add_images(pictures[:1])
    reply = session.ask("Describe this image.")
    assert recorded[0]["ids"] == _ids(tiny_loaded, OFFICIAL_ONE_IMAGE)
    assert recorded[0]["ids"].count(tiny_loaded.tokenizer.bos_id) == 1 and recorded[0]["ids"][0] == tiny_loaded.tokenizer.bos_id
    assert session.conversation.to_json()["messages"] == [
        {"role": "user", "text": "<Img><ImageHere></Img> Describe this image."}, {"role": "assistant", "text": reply.text}]
    assert reply.n_tokens >= 1 and reply.text == reply.text.strip()


def test_two_images_then_a_question(tiny_loaded, pictures, recorded):
    session = ChatSession(tiny_loaded, GREEDY)
    session.add_images(pictures[:2])
    session.ask("Which is red?")
    expected = OFFICIAL_SYSTEM + "###Human: <Img><ImageHere></Img>###Human: <Img><ImageHere></Img> Which is red?###Assistant:"
    ids = recorded[0]["ids"]
    assert ids == _ids(tiny_loaded, expected)
    assert ids.count(IMAGE_TOKEN) == 2 * tiny_loaded.model.num_image_tokens
    direct = tiny_loaded.encode_images(pictures[:2])
    assert torch.allclose(recorded[0]["images"], direct)  # in the order given
    assert session.history()[0] == {"role": "user", "text": "Which is red?", "images": pictures[:2]}


def test_image_between_turns_and_text_only(tiny_loaded, pictures, recorded):
    session = ChatSession(tiny_loaded, GREEDY)
    first = session.ask("Hello")
    assert recorded[0]["ids"] == _ids(tiny_loaded, TEXT_ONLY_SYSTEM + "###Human: Hello###Assistant:")
    assert IMAGE_TOKEN not in recorded[0]["ids"] and recorded[0]["images"] is None
    session.add_images([pictures[2]])
    session.ask("And this?")
    expected = (OFFICIAL_SYSTEM + f"###Human: Hello###Assistant: {first.text}###"
                "Human: <Img><ImageHere></Img> And this?###Assistant:")
    assert recorded[1]["ids"] == _ids(tiny_loaded, expected)
    assert [h["role"] for h in session.history()] == ["user", "assistant", "user", "assistant"]
    assert session.history()[2]["images"] == [pictures[2]]


def test_training_dialogues_are_the_prompts_chat_builds(tiny_loaded):
    """The synthetic training conversations (one picture or several, pictures between turns,
    text-only) replayed through ChatSession: at every turn chat's prompt and token ids are the
    training example's, and the trained sequence holds chat's ids followed by the answer."""
    import random

    from minigpt4.conversation import encode_dialogue
    from minigpt4.data.dialogues import sample_dialogue, to_conversation
    from minigpt4.data.synthetic import make_picture

    tok, slots = tiny_loaded.tokenizer, tiny_loaded.model.num_image_tokens
    for seed in range(24):
        turns = sample_dialogue(random.Random(seed), text_fraction=0.1)
        session = ChatSession(tiny_loaded, GREEDY)
        trained, _ = encode_dialogue(tok.encode, to_conversation(turns, session.template), slots)
        for k, turn in enumerate(turns):
            session.add_images([make_picture(spec, 64) for spec in turn.images])
            prepared = session.prepare(turn.question)
            assert prepared.conversation.prompt() == to_conversation(turns, session.template, upto=k).prompt()
            assert prepared.ids == _ids(tiny_loaded, prepared.conversation.prompt())
            if prepared.conversation.images or not any(t.images for t in turns):  # the system text is final
                assert trained[: len(prepared.ids)] == prepared.ids
                answer = tok.encode(turn.answer + "###")
                assert trained[len(prepared.ids): len(prepared.ids) + len(answer)] == answer
            session.keep(prepared, turn.answer)


def test_system_override(tiny_loaded, recorded):
    session = ChatSession(tiny_loaded, GREEDY, system="You are terse.")
    session.ask("Hi")
    assert recorded[0]["ids"] == _ids(tiny_loaded, "You are terse.###Human: Hi###Assistant:")


def test_text_only_system_override_keeps_the_official_image_prompt(tiny_loaded, pictures, recorded):
    session = ChatSession(tiny_loaded, GREEDY, system_text_only="You are terse.")
    session.ask("Hi")
    assert recorded[0]["ids"] == _ids(tiny_loaded, "You are terse.###Human: Hi###Assistant:")
    session.reset()
    session.add_images(pictures[:1])
    session.ask("Describe this image.")
    assert recorded[1]["ids"] == _ids(tiny_loaded, OFFICIAL_ONE_IMAGE)


def test_each_image_is_encoded_once(tiny_loaded, pictures, monkeypatch):
    encoded = []
    real = tiny_loaded.model.encode_images
    monkeypatch.setattr(tiny_loaded.model, "encode_images", lambda px: encoded.append(len(px)) or real(px))
    session = ChatSession(tiny_loaded, GREEDY)
    session.add_images(pictures[:2])
    for question in ("one", "two", "three"):
        session.ask(question)
    session.regenerate()
    assert encoded == [2]


def test_bad_image_adds_nothing(tiny_loaded, pictures, tmp_path):
    session = ChatSession(tiny_loaded, GREEDY)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    for bad in (str(tmp_path / "missing.png"), str(broken)):
        with pytest.raises(UserError, match="image"):
            session.add_images([pictures[0], bad])
        assert session.conversation.images == [] and session.conversation.messages == []
    with pytest.raises(UserError):
        session.ask("   ")


# ---- context overflow -----------------------------------------------------------------------------
def test_overflow_drops_oldest_whole_turns_and_says_so_once(tiny_loaded, pictures):
    notices = []
    settings = GenerationSettings(do_sample=False, max_new_tokens=8, min_new_tokens=8)
    session = ChatSession(tiny_loaded, settings, max_context=150, notify=notices.append)
    replies = []
    for i in range(6):
        session.add_images([pictures[i % 3]])
        replies.append(session.ask(f"question number {i} about this picture"))
    assert sum(r.dropped_turns for r in replies) >= 2
    assert len(notices) == 1 and "max_context=150" in notices[0]
    conv = session.conversation
    saved = conv.to_json()
    placeholders = sum(m["text"].count("<ImageHere>") for m in saved["messages"])
    assert placeholders == len(conv.images) >= 1  # images leave with their turn, never half of one
    assert saved["messages"][0]["text"].startswith("<Img><ImageHere></Img>")  # starts at a whole turn
    assert "question number 5" in saved["messages"][-2]["text"]
    ids = _ids(tiny_loaded, conv.copy().prompt())
    assert len(ids) <= 150  # the last prompt (+ its answer) fitted


def test_overflow_that_only_limits_the_answer_says_so(tiny_loaded):
    notices = []
    session = ChatSession(tiny_loaded, GenerationSettings(do_sample=False, max_new_tokens=50),
                          max_context=60, notify=notices.append)
    session.ask("Hello there, how are you doing today, my friend?")
    assert len(notices) == 1 and "the answer is limited to" in notices[0] and "dropped" not in notices[0]


def test_a_message_longer_than_the_context_is_a_user_error(tiny_loaded):
    session = ChatSession(tiny_loaded, GREEDY, max_context=40)
    with pytest.raises(UserError, match="max_context"):
        session.ask("word " * 60)
    assert session.conversation.messages == []


# ---- KV cache reuse ---------------------------------------------------------------------------------
def _session_transcript(loaded, pictures, reuse: bool):
    session = ChatSession(loaded, GenerationSettings(do_sample=False, max_new_tokens=10), reuse_cache=reuse)
    script = [([], "Hello"), (pictures[:2], "Compare these two."), ([], "Which one is bigger?"),
              ([pictures[2]], "And this one?"), ([], "Thanks.")]
    replies = []
    for images, text in script:
        session.add_images(images)
        replies.append(session.ask(text))
    replies.append(session.regenerate())
    return replies


def test_kv_cache_reuse_gives_identical_greedy_answers_with_less_prefill(tiny_loaded, pictures):
    with_reuse = _session_transcript(tiny_loaded, pictures, reuse=True)
    without = _session_transcript(tiny_loaded, pictures, reuse=False)
    assert [r.text for r in with_reuse] == [r.text for r in without]
    assert all(r.reused == 0 for r in without)
    # turn 3 follows turn 2 without a new image or system change: nearly all of it is cached
    assert with_reuse[2].reused > 0 and with_reuse[2].prefilled < without[2].prefilled / 2
    assert with_reuse[5].prefilled < without[5].prefilled  # regenerate reuses the question too
    assert sum(r.prefilled for r in with_reuse) < sum(r.prefilled for r in without) / 2
    for r in with_reuse:
        assert r.prefilled + r.reused == without[with_reuse.index(r)].prefilled


def test_seeded_sessions_are_reproducible(tiny_loaded):
    def answers(seed):
        session = ChatSession(tiny_loaded, GenerationSettings(max_new_tokens=8), seed=seed)
        return [session.ask(q).text for q in ("Hi", "Tell me more")]

    assert answers(3) == answers(3)


# ---- persistence ------------------------------------------------------------------------------------
def test_save_load_round_trip(tiny_loaded, pictures, tmp_path):
    session = ChatSession(tiny_loaded, GREEDY)
    session.add_images([pictures[0], Image.new("RGB", (30, 30), (1, 2, 3))])
    session.ask("What are these?")
    session.save(tmp_path / "conv.json")
    data = json.loads((tmp_path / "conv.json").read_text())
    assert data["images"][0] == pictures[0] and Path(data["images"][1]).is_file()  # PIL image written as PNG
    other = ChatSession(tiny_loaded, GREEDY)
    other.load(tmp_path / "conv.json")
    assert other.conversation.prompt() == session.conversation.prompt()
    assert [str(i) for i in other.conversation.images] == data["images"]
    assert torch.allclose(other.conversation.images[0].embeds, session.conversation.images[0].embeds)
    a, b = session.ask("And now?"), other.ask("And now?")
    assert a.text == b.text
    with pytest.raises(UserError):
        other.load(tmp_path / "missing.json")


# ---- terminal and chat.py -------------------------------------------------------------------------
def test_terminal_session_in_process(tiny_loaded, pictures, tmp_path):
    saved = tmp_path / "chat.json"
    lines = [
        "Hello", "/image nowhere.png", f"/image {pictures[0]} {pictures[1]}", "What is in these pictures?",
        f"/save {saved}", "/reset", "/bogus", f"/load {saved}", "/help", "", "Tell me more.", "/quit", "never read",
    ]
    stdout, stderr = io.StringIO(), io.StringIO()
    session = ChatSession(tiny_loaded, GenerationSettings(do_sample=False, max_new_tokens=5))
    run_terminal(session, io.StringIO("\n".join(lines) + "\n"), stdout, stderr)
    err = stderr.getvalue()
    out = stdout.getvalue()
    assert out.endswith("\n") and "error" not in out and "tok/s" not in out  # answers only on stdout
    assert "error: image nowhere.png: no such file" in err
    assert "error: unknown command /bogus" in err
    assert "/image PATH" in err and err.count("tok/s") == 3
    assert json.loads(saved.read_text())["images"] == pictures[:2]
    history = session.history()  # the saved conversation (2 turns), reloaded after /reset, + 1 turn
    assert [h["text"] for h in history[::2]] == ["Hello", "What is in these pictures?", "Tell me more."]
    assert all(h["text"] in out for h in history[1::2])  # every answer was streamed to stdout
    assert history[2]["images"] == pictures[:2]


def test_terminal_stops_at_end_of_input(tiny_loaded):
    stdout, stderr = io.StringIO(), io.StringIO()
    run_terminal(ChatSession(tiny_loaded, GREEDY), io.StringIO("Hi"), stdout, stderr, show_stats=False)
    assert stdout.getvalue().endswith("\n") and stderr.getvalue() == ""


def test_beam_search_in_a_session_reports_whole_answer_speed(tiny_loaded, pictures):
    session = ChatSession(tiny_loaded, GenerationSettings(do_sample=False, num_beams=3, max_new_tokens=6, min_new_tokens=6))
    session.add_images(pictures[:1])
    reply = session.ask("What is this?")
    assert reply.n_tokens == 6 and session.conversation.to_json()["messages"][-1] == {"role": "assistant", "text": reply.text}
    # the answer comes whole: its speed and first-token time count the whole turn
    assert reply.first_token_s == pytest.approx(reply.seconds, rel=0.05)
    assert reply.tokens_per_s == pytest.approx(6 / reply.seconds, rel=0.05)


@pytest.mark.parametrize("data", ['{"messages": [{"role": "user", "text": 5}], "images": []}',
                                  '{"messages": [], "images": [{"a": 1}]}', '[1, 2]', '{"messages": [3]}'])
def test_a_malformed_conversation_file_is_a_user_error(tiny_loaded, tmp_path, data):
    session = ChatSession(tiny_loaded, GREEDY)
    session.ask("Hello")
    (tmp_path / "bad.json").write_text(data)
    with pytest.raises(UserError, match="not a saved conversation"):
        session.load(tmp_path / "bad.json")
    assert len(session.conversation.messages) == 2  # the conversation goes on


def test_saved_conversation_loads_from_another_folder(tiny_loaded, pictures, tmp_path, monkeypatch):
    session = ChatSession(tiny_loaded, GREEDY)
    monkeypatch.chdir(Path(pictures[0]).parent)
    session.add_images([Path(pictures[0]).name])  # a path relative to the current folder
    session.ask("What is this?")
    session.save(tmp_path / "conv.json")
    monkeypatch.chdir(tmp_path)
    other = ChatSession(tiny_loaded, GREEDY)
    other.load("conv.json")
    assert other.conversation.prompt() == session.conversation.prompt()


def test_run_chat_images_without_a_prompt(tiny_loaded, pictures, monkeypatch, capsys):
    """chat.images=a.png (no brackets) is one image; a bad one is an error and the chat starts."""
    from minigpt4.config import compose

    started = []
    monkeypatch.setattr("minigpt4.frontends.terminal.run_terminal", lambda session: started.append(len(session.conversation.images)))
    run_chat(compose("chat", ["gpu=cpu", "checkpoint=random", f"chat.images={pictures[0]}"]))
    run_chat(compose("chat", ["gpu=cpu", "checkpoint=random", "chat.images=[missing.png]"]))
    assert started == [1, 0]
    assert "error: image missing.png: no such file" in capsys.readouterr().err


def test_run_chat_one_shot_in_process(pictures, capsys):
    from minigpt4.config import compose

    cfg = compose("chat", ["gpu=cpu", "checkpoint=random", "generation=greedy", "generation.max_new_tokens=5",
                           "chat.prompt=What is this?", f"chat.images=[{pictures[0]},{pictures[1]}]"])
    run_chat(cfg)
    out, err = capsys.readouterr()
    assert out.endswith("\n") and "UNTRAINED" not in out and "tok/s" not in out
    assert "UNTRAINED" in err and "tok/s" in err


def test_banner_names_the_checkpoint_files(tiny_loaded, tmp_path, capsys):
    """A checkpoint.proj=... override shows on stderr beside the model, with the other files."""
    from official_files import write_minigpt4

    from minigpt4.config import compose

    proj = write_minigpt4(tiny_loaded.model, tmp_path / "proj.pth")
    one_shot = ["gpu=cpu", "generation=greedy", "generation.max_new_tokens=2", "chat.prompt=Hi"]
    run_chat(compose("chat", [*one_shot, f"checkpoint.proj={proj}"]))
    run_chat(compose("chat", [*one_shot, "checkpoint=random"]))
    err = capsys.readouterr().err
    assert "model: tiny on cpu" in err and f"\ncheckpoint: bundle={DEMO}, proj={proj}\n" in err
    assert err.count("checkpoint: ") == 1  # random weights: no files (the UNTRAINED warning says so)


def _chat_py(args: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "chat.py", "gpu=cpu", *args, "hydra.run.dir=" + str(ROOT / "outputs/test_chat")],
                          input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)


@pytest.mark.slow
def test_piped_session_subprocess(tmp_path):
    """A whole session through a pipe on the shipped demo model: text-only, a bad image (the
    chat goes on), then a picture and questions whose answers are checked."""
    from minigpt4.data.synthetic import make_picture, questions, sample_specs

    spec = sample_specs(1, seed=321)[0]
    make_picture(spec).save(tmp_path / "shapes.png")
    asked = {kind: (q, a) for q, a, kind in questions(spec)}
    (colour_q, colour_a), (count_q, count_a) = asked["colour"], asked["count"]
    proc = _chat_py(["generation=greedy", "generation.max_new_tokens=20"],
                    f"Hello\n/image missing.png\n/image {tmp_path / 'shapes.png'}\n{colour_q}\n{count_q}\n/quit\n")
    assert proc.returncode == 0, proc.stderr
    answers = proc.stdout.strip().splitlines()
    assert len(answers) == 3 and "tok/s" not in proc.stdout and "error" not in proc.stdout
    assert "error: image missing.png: no such file" in proc.stderr and proc.stderr.count("tok/s") == 3
    assert "Traceback" not in proc.stderr
    assert "UNTRAINED" not in proc.stderr  # the default checkpoint is the trained demo model
    assert answers[0].startswith("Hello")
    assert answers[1:] == [colour_a, count_a]


@pytest.mark.slow
def test_one_shot_subprocess(tmp_path):
    from minigpt4.data.synthetic import make_picture, questions, sample_specs

    spec = sample_specs(1, seed=123)[0]
    make_picture(spec).save(tmp_path / "shapes.png")
    question, answer = next((q, a) for q, a, kind in questions(spec) if kind == "background")
    proc = _chat_py(["generation=greedy", "generation.max_new_tokens=20", f"chat.prompt={question}",
                     f"chat.images=[{tmp_path / 'shapes.png'}]"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n") and "model:" in proc.stderr and "model:" not in proc.stdout
    assert "tok/s" in proc.stderr and "tok/s" not in proc.stdout
    assert "UNTRAINED" not in proc.stderr and proc.stdout == answer + "\n"  # the default: the trained demo model
    bad = _chat_py(["chat.prompt=What?", "chat.images=[missing.png]"])
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines()[-1] == "error: image missing.png: no such file"


# ---- the trained demo model (conftest's demo_loaded): real answers ------------------------------------
def test_demo_answers_questions_about_pictures(demo_loaded):
    from minigpt4.data.synthetic import make_picture, questions, sample_specs

    right, total = 0, 0
    for spec in sample_specs(4, seed=123):
        session = ChatSession(demo_loaded, GenerationSettings(do_sample=False, max_new_tokens=20))
        session.add_images([make_picture(spec)])
        for question, answer, kind in questions(spec):
            if kind in ("colour", "shape", "count", "background"):  # several turns about one picture
                right += session.ask(question).text.strip().lower().rstrip(".") == answer
                total += 1
    assert total >= 12 and right / total >= 0.75, f"{right}/{total}"


def test_demo_kv_reuse_caches_whole_earlier_turns(demo_loaded):
    from minigpt4.data.synthetic import make_picture, sample_specs

    spec = sample_specs(1, seed=7)[0]
    runs = {}
    for reuse in (True, False):
        session = ChatSession(demo_loaded, GenerationSettings(do_sample=False, max_new_tokens=20), reuse_cache=reuse)
        session.add_images([make_picture(spec)])
        runs[reuse] = [session.ask(q) for q in ("What colour is the background?", "How many shapes are there?",
                                                 "What shape is in the picture?")]
    assert [r.text for r in runs[True]] == [r.text for r in runs[False]]
    for before, after in zip(runs[True], runs[True][1:]):
        # a trained model's answer re-tokenises as generated: the whole previous turn is reused
        assert after.reused >= before.prefilled + before.reused + len(before.text.split())


def test_demo_chats_without_an_image(demo_loaded):
    from minigpt4.data.synthetic import text_dialogues

    session = ChatSession(demo_loaded, GenerationSettings(do_sample=False, max_new_tokens=40))
    user, expected = text_dialogues()[0][0]
    assert session.ask(user).text == expected


# ---- the README's two-picture conversation, and the new kinds (issue #18) -------------------------------
def two_picture_try_it() -> list[tuple[str, str, str | None]]:
    """The README's try-it block (the demo's two-picture conversation)
    -> [("image", path, None) | ("ask", question, answer)]."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- try-it:", 1)[1].split("```text\n", 1)[1].split("```", 1)[0].splitlines()
    steps, i = [], 0
    while i < len(block):
        line = block[i]
        assert line.startswith("> "), line
        if line.startswith("> /image "):
            steps.append(("image", line[len("> /image "):], None))
            i += 1
        else:
            steps.append(("ask", line[2:], block[i + 1]))
            i += 2
    return steps


def test_two_picture_try_it_answers_are_the_canonical_ones():
    """What the README says the demo answers is what the data generator calls right."""
    import importlib.util

    from minigpt4.data import dialogues, synthetic

    spec = importlib.util.spec_from_file_location("make_examples", ROOT / "examples" / "make_examples.py")
    make_examples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_examples)
    specs = make_examples.example_specs()
    star, triangles = specs[0], specs[3]
    steps = two_picture_try_it()
    assert [s[1] for s in steps if s[0] == "image"] == ["examples/prompts/images/picture_00.png",
                                                         "examples/prompts/images/picture_03.png"]
    expected = {
        "Where is the star?": synthetic.positions_text(star),
        "How many shapes are there in all?": dialogues.total_question([star, triangles])[1],
        "Which picture has more shapes?": dialogues.more_question([star, triangles], 0, 1)[1],
        "What colour is the star in the first picture?": star.colour,
        "Are the triangles green?": "yes" if triangles.colour == "green" else "no",
        "Where are the triangles?": synthetic.positions_text(triangles),
        "What is the difference between the two pictures?": dialogues.difference_text(star, triangles),
    }
    assert {q: a for kind, q, a in steps if kind == "ask"} == expected


def test_demo_answers_the_two_picture_conversation(demo_loaded):
    """The README's try-it lines through ChatSession, as `python chat.py` runs them (greedy)."""
    session = ChatSession(demo_loaded, GenerationSettings(do_sample=False, max_new_tokens=60))
    for kind, text, answer in two_picture_try_it():
        if kind == "image":
            session.add_images([str(ROOT / text)])
        else:
            assert session.ask(text).text == answer, text


@pytest.mark.slow
def test_demo_answers_every_kind_held_out(demo_loaded):
    """Positions, yes/no and the multi-picture kinds, asked as chat asks them (the model's own
    earlier answers in the history), on pictures from a seed no training or doc number uses.
    The goal is 95% per kind (docs/FINETUNE.md); 40 conversations per kind allow a little less
    (BELOW_GOAL in tiny_models.py: kinds accepted lower, none now)."""
    from minigpt4.data.dialogues import ALL_KINDS
    from minigpt4.training.heldout import heldout_accuracy

    result = heldout_accuracy(demo_loaded, pictures=40, seed=4343, kinds=ALL_KINDS)
    floor = {k: BELOW_GOAL.get(k, 0.9) for k in ALL_KINDS}
    low = {k: v for k, v in result["accuracy"].items() if k in floor and v < floor[k]}
    assert not low, (low, result["errors"])
