"""Synthetic generator, data sets and batches (CPU, fast)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from minigpt4.config import ASSETS
from minigpt4.conversation import (
    ASSISTANT,
    IMAGE_PLACEHOLDER,
    STAGE2_INSTRUCTIONS,
    Conversation,
    encode_prompt,
    get_template,
)
from minigpt4.data import dialogues, synthetic
from minigpt4.data.datasets import SyntheticExamples, load_cc_sbu_align, load_csv
from minigpt4.errors import UserError
from minigpt4.model import IMAGE_TOKEN
from minigpt4.tokenizer import Tokenizer
from minigpt4.training.data import FeatureCache, FinetuneDataset, collate, scan_images

TEMPLATE = get_template("vicuna_v0")


def test_synthetic_is_deterministic_and_consistent():
    a, b = synthetic.sample_specs(20, seed=3), synthetic.sample_specs(30, seed=3)
    assert a == b[:20] and a != synthetic.sample_specs(20, seed=4)
    spec = a[0]
    assert np.array_equal(np.asarray(synthetic.make_picture(spec)), np.asarray(synthetic.make_picture(spec)))
    assert synthetic.make_picture(spec, 64).size == (64, 64)
    assert synthetic.Spec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    for spec in b:
        answers = {kind: ans for _, ans, kind in synthetic.questions(spec)}
        assert answers["colour"] == spec.colour and answers["shape"] == spec.shape
        assert answers["count"] == str(spec.count) and 1 <= spec.count <= 4
        assert answers["position"] == synthetic.positions_text(spec) and answers["size"] == spec.size
        assert synthetic.describe(spec) == answers["description"]
        assert [k for _, _, k in synthetic.questions(spec)] == list(synthetic.KINDS)
        named = {kind: (q, a) for q, a, kind in synthetic.questions(spec, ref="second")}
        assert all("second picture" in q for q, _ in named.values())
        assert {k: a for k, (_, a) in named.items()} == answers  # the same answers, about the second picture


def test_picture_shows_its_colour_and_background():
    spec = synthetic.Spec("square", "red", 1, "large", "white", (4,), seed=1)
    pixels = np.asarray(synthetic.make_picture(spec)).astype(int)
    centre, corner = pixels[112, 112], pixels[5, 5]
    assert abs(centre - np.array(synthetic.COLOURS["red"])).max() <= 20
    assert abs(corner - np.array(synthetic.BACKGROUNDS["white"])).max() <= 10


def test_tokenizer_covers_the_demo_world():
    """The shipped tiny tokenizer was trained on tokenizer_texts(): no byte fallback for them."""
    tok = Tokenizer(ASSETS / "tiny_tokenizer.model")
    pieces = {tok.sp.id_to_piece(i) for text in dialogues.tokenizer_texts()[:400] for i in tok.encode(text)}
    assert not [p for p in pieces if p.startswith("<0x")]


def test_synthetic_chat_examples_use_the_chat_prompt():
    examples = SyntheticExamples(200, seed=0, style="chat", template=TEMPLATE, text_fraction=0.2)
    assert examples[5] == examples[5]
    text_only = [e for e in examples if not e.images]
    with_images = [e for e in examples if e.images]
    assert text_only and with_images
    for e in examples:
        assert e.prompt.count(IMAGE_PLACEHOLDER) == len(e.images)
        assert e.prompt.endswith("###Assistant:") and e.target
    assert text_only[0].prompt.startswith(TEMPLATE.system_text_only)
    assert with_images[0].prompt.startswith(TEMPLATE.system)
    stage2 = SyntheticExamples(4, seed=0, style="stage2", template=TEMPLATE)[0]
    assert stage2.prompt.startswith("###Human: <Img><ImageHere></Img> ") and stage2.prompt.endswith("###Assistant: ")


def _write_png(path, colour=(10, 200, 30)):
    Image.new("RGB", (40, 30), colour).save(path)


def test_cc_sbu_align_skips_bad_rows(tmp_path):
    (tmp_path / "image").mkdir()
    _write_png(tmp_path / "image" / "1.jpg")
    _write_png(tmp_path / "image" / "2.png")
    (tmp_path / "image" / "3.jpg").write_bytes(b"not an image")
    anns = [{"image_id": "1", "caption": "a green box"}, {"image_id": "2", "caption": "another"},
            {"image_id": "3", "caption": "broken file"}, {"image_id": "4", "caption": "missing"},
            {"image_id": "1", "caption": "  "}]
    (tmp_path / "filter_cap.json").write_text(json.dumps({"annotations": anns}))
    examples, bad = load_cc_sbu_align(tmp_path, "stage2", TEMPLATE, seed=0)
    assert [e.target for e in examples] == ["a green box", "another", "broken file"]
    assert sorted(b.reason.split()[0] for b in bad) == ["empty", "no"]
    assert any(e.prompt == "###Human: <Img><ImageHere></Img> " + s + " ###Assistant: " for e in examples for s in STAGE2_INSTRUCTIONS)
    _, unreadable = scan_images([r for e in examples for r in e.images], 64, 224, num_workers=0)
    assert list(unreadable) == [str(tmp_path / "image" / "3.jpg")]
    with pytest.raises(UserError, match="filter_cap.json"):
        load_cc_sbu_align(tmp_path / "image", "stage2", TEMPLATE)


def test_csv_rows_with_several_images(tmp_path):
    _write_png(tmp_path / "a.png")
    _write_png(tmp_path / "b.png", (200, 0, 0))
    (tmp_path / "data.csv").write_text(
        "image,prompt,answer\n"
        "a.png;b.png,Compare <image> and <image>.,green then red\n"
        "a.png,What is it?,\n"
        "gone.png,What is it?,x\n"
        ",Hello,Hi\n"
    )
    examples, bad = load_csv(tmp_path / "data.csv", "chat", TEMPLATE)
    assert len(examples) == 2 and len(bad) == 2
    assert examples[0].images == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert examples[0].prompt.count(IMAGE_PLACEHOLDER) == 2 and "Compare" in examples[0].prompt
    assert examples[1].images == [] and examples[1].prompt.startswith(TEMPLATE.system_text_only)


def test_batches_train_every_answer_and_nothing_else():
    tok = Tokenizer(ASSETS / "tiny_tokenizer.model")
    examples = SyntheticExamples(6, seed=1, style="chat", template=TEMPLATE, text_fraction=0.0, multi_fraction=0.0)
    dataset = FinetuneDataset(examples, tok.path, num_image_tokens=4, image_size=32, picture_size=64)
    batch = collate([dataset[i] for i in range(3)], tok.pad_id)
    assert batch["pixels"].shape == (3, 3, 32, 32) and batch["n_samples"] == 3
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert int((ids == IMAGE_TOKEN).sum()) == 3 * 4
    for row in range(3):
        answers = [m.text for m in examples[row].conversation.messages if m.role == ASSISTANT]
        kept = labels[row][labels[row] != -100].tolist()
        assert kept == [i for a in answers for i in tok.encode(a + "###")]  # every answer + "###", in order
        assert answers[-1] == examples[row].target
        assert ids[row, 0] == tok.bos_id and labels[row, 0] == -100
        assert mask[row].sum() == len(dataset[row]["ids"])  # right padding, masked
    assert collate([None, None], tok.pad_id) is None
    assert torch.equal(collate([dataset[0], None], tok.pad_id)["input_ids"], collate([dataset[0]], tok.pad_id)["input_ids"])


def test_csv_is_read_by_the_evaluation_reader(tmp_path):
    """Fine-tuning CSVs go through prompt_files.py: the same strict checks and messages as
    evaluation's prompt CSVs; skipped rows are named by their physical line."""
    _write_png(tmp_path / "a.png")
    path = tmp_path / "data.csv"
    path.write_bytes("\ufeffimage,prompt,answer\n\na.png,\"Is it green, or red?\",green\n\n,Hi,\n".encode())
    examples, bad = load_csv(path, "stage2", TEMPLATE)
    assert [e.row for e in examples] == ["data.csv:3"] and [(b.row, b.reason) for b in bad] == [("data.csv:5", "empty answer")]
    assert examples[0].prompt == "###Human: <Img><ImageHere></Img> Is it green, or red? ###Assistant: "
    for content, message in [
        ("image,prompt,answer\na.png,What?,x,y\n", "data.csv:2: 4 fields but the header has 3; quote fields that hold commas"),
        ("image,prompt,answer\na.png,What?\n", "data.csv:2: 2 fields but the header has 3"),
        ("image,question,answer\na.png,What?,x\n", ("data.csv:1: no `prompt` column in the header ['image', 'question', "
                                                    "'answer']; a fine-tuning CSV has the columns image, prompt, answer")),
        ("image,prompt,answer\n", "data.csv:2: no rows below the header"),
    ]:
        path.write_text(content)
        with pytest.raises(UserError) as err:
            load_csv(path, "chat", TEMPLATE)
        assert str(err.value).startswith(f"{tmp_path}/{message}")
    path.write_bytes(b"image,prompt,answer\n,caf\xe9,x\n")
    with pytest.raises(UserError, match="data.csv:2: not UTF-8 text"):
        load_csv(path, "chat", TEMPLATE)


# ---- several pictures, several turns -----------------------------------------------------------------
def _blobs(pixels: np.ndarray, background: tuple) -> list[tuple[float, float]]:
    """Centres (x, y) of the connected regions that are not background (4-neighbour flood fill)."""
    todo = np.abs(pixels.astype(int) - np.array(background)).max(-1) > 25  # shades vary by <= 15 + 8
    centres = []
    for y0, x0 in zip(*np.nonzero(todo)):
        if not todo[y0, x0]:
            continue
        stack, points = [(y0, x0)], []
        todo[y0, x0] = False
        while stack:
            y, x = stack.pop()
            points.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < todo.shape[0] and 0 <= nx < todo.shape[1] and todo[ny, nx]:
                    todo[ny, nx] = False
                    stack.append((ny, nx))
        if len(points) > 4:
            centres.append((np.mean([p[1] for p in points]), np.mean([p[0] for p in points])))
    return centres


@pytest.mark.parametrize("size", [224, 64])
def test_position_answers_match_the_pixels(size):
    """Where the shapes really are, read from the drawn picture (at the model's 64 px too),
    is what the position answers and the true position claims say."""
    for spec in synthetic.sample_specs(40, seed=9):
        pixels = np.asarray(synthetic.make_picture(spec).resize((size, size)))
        found = sorted(int(y * 3 // size) * 3 + int(x * 3 // size) for x, y in _blobs(pixels, synthetic.BACKGROUNDS[spec.background]))
        assert found == list(spec.cells), spec
        answer = {k: a for _, a, k in synthetic.questions(spec)}["position"]
        assert answer == synthetic.positions_text(spec)
        assert answer.replace(" and ", ", ").split(", ") == [synthetic.POSITIONS[c] for c in found]
        question, yes = synthetic.claim(spec, "position", True, random.Random(0))
        assert yes == "yes" and any(synthetic.POSITIONS[c] in question for c in found)


def test_yes_no_answers_are_balanced_and_true():
    rng = random.Random(3)
    for spec in synthetic.sample_specs(30, seed=4):
        for attribute in synthetic.ATTRIBUTES:
            question, yes = synthetic.claim(spec, attribute, True, rng)
            question_no, no = synthetic.claim(spec, attribute, False, rng)
            assert (yes, no) == ("yes", "no") and question != question_no
        assert f" {spec.colour}" in synthetic.claim(spec, "colour", True, rng)[0]
        assert f" {spec.colour}" not in synthetic.claim(spec, "colour", False, rng)[0].replace(spec.noun, "")
    turns = [t for i in range(3000) for t in dialogues.sample_dialogue(random.Random(f"balance:{i}"))]
    for kind in ("yesno", "same"):  # "same" about backgrounds: "white and gray, so no"
        answers = [t.answer.split()[-1] for t in turns if t.kind == kind]
        assert len(answers) > 300 and set(answers) == {"yes", "no"}
        assert 0.45 < answers.count("yes") / len(answers) < 0.55, kind
    for kind in ("yesno", "same"):
        held = [d[-1].answer.split()[-1] for d in dialogues.heldout_dialogues(kind, 300, 1000)]
        assert 0.44 < held.count("yes") / len(held) < 0.56, kind
    more = [d[-1].answer for d in dialogues.heldout_dialogues("more", 300, 1000)]
    assert {more.count(a) for a in ("the first", "the second", dialogues.SAME_NUMBER)} == {100}


def test_comparisons_and_totals():
    star = synthetic.Spec("star", "yellow", 1, "small", "gray", (6,), seed=1)
    triangles = synthetic.Spec("triangle", "green", 3, "large", "white", (3, 5, 8), seed=2)
    pair = [star, triangles]
    assert dialogues.total_question(pair) == ("How many shapes are there in all?", "4")
    assert dialogues.more_question(pair, 0, 1) == ("Which picture has more shapes?", "the second")
    assert dialogues.same_question(pair, 0, 1, "colour") == ("Are the shapes in the two pictures the same colour?", "no")
    assert dialogues.same_question(pair, 0, 1, "background") == ("Do the two pictures have the same background?",
                                                                 "gray and white, so no")
    assert dialogues.difference_question(pair, 0, 1)[1] == (
        "colour: yellow vs green, shape: star vs triangle, count: 1 vs 3, size: small vs large, background: gray vs white")
    assert dialogues.difference_text(star, synthetic.Spec("star", "yellow", 1, "small", "gray", (2,), seed=3)) == "only the positions"
    three = [star, triangles, star]
    assert dialogues.more_question(three, 0, 2)[0] == "Which has more shapes, the first or the third picture?"
    assert dialogues.more_question(three, 0, 2)[1] == dialogues.SAME_NUMBER


def test_dialogues_follow_chat_and_name_pictures_in_order():
    """Pictures are attached before the question they come with, as chat.py does; a named
    picture is one already shown; held-out 'earlier' asks about the first picture after a second."""
    for i in range(300):
        turns = dialogues.sample_dialogue(random.Random(i))
        conv = dialogues.to_conversation(turns, TEMPLATE)
        assert len(conv.images) == sum(len(t.images) for t in turns) <= 4
        shown = 0
        for turn in turns:
            shown += len(turn.images)
            named = [n for n, word in enumerate(dialogues.ORDINALS) if f"{word} picture" in turn.question
                     or f"the {word} or" in turn.question or f"the {word} and" in turn.question]
            assert all(n < shown for n in named), turn
            assert turn.kind == "text" or shown > 0
    earlier = dialogues.heldout_dialogues("earlier", 4, 1000)[0]
    assert [len(t.images) for t in earlier] == [1, 1, 0] and "first picture" in earlier[-1].question
    first = earlier[0].images[0]
    assert earlier[-1].answer == next(a for q, a, _ in synthetic.questions(first, ref="first") if q == earlier[-1].question)
    latest = dialogues.heldout_dialogues("latest", 4, 1000)[1]
    assert latest[-1].answer in {a for _, a, _ in synthetic.questions(latest[1].images[0])}


def test_multi_picture_examples_have_one_image_slot_run_per_picture_and_train_every_turn():
    tok = Tokenizer(ASSETS / "tiny_tokenizer.model")
    examples = SyntheticExamples(40, seed=2, style="chat", template=TEMPLATE, text_fraction=0.0, multi_fraction=1.0)
    dataset = FinetuneDataset(examples, tok.path, num_image_tokens=4, image_size=32, picture_size=64)
    rows = [i for i in range(40) if len(examples[i].images) >= 3][:3]
    assert rows
    items = [dataset[i] for i in rows]
    batch = collate(items, tok.pad_id)
    n_images = sum(len(examples[i].images) for i in rows)
    assert batch["pixels"].shape == (n_images, 3, 32, 32)
    assert int((batch["input_ids"] == IMAGE_TOKEN).sum()) == 4 * n_images
    for i, item in zip(rows, items):
        conv = examples[i].conversation
        ids, labels = item["ids"], item["labels"]
        assert sum(x == IMAGE_TOKEN for x in ids) == 4 * len(examples[i].images)
        answers = [(k, m.text) for k, m in enumerate(conv.messages) if m.role == ASSISTANT]
        assert len(answers) >= 2
        trained = set()
        for k, text in answers:  # each answer is trained right where chat's prompt for that turn ends
            prompt = encode_prompt(tok.encode, Conversation(TEMPLATE, conv.messages[:k]).prompt(), 4)
            answer = tok.encode(text + "###")
            span = range(len(prompt), len(prompt) + len(answer))
            assert ids[: len(prompt)] == prompt and [ids[j] for j in span] == answer == [labels[j] for j in span]
            trained.update(span)
        assert {j for j, label in enumerate(labels) if label != -100} == trained  # nothing else
    # the feature cache serves rows with several pictures in prompt order
    refs = list(dict.fromkeys(r for i in rows for r in examples[i].images))
    cache = FeatureCache({r: n for n, r in enumerate(refs)}, torch.arange(len(refs), dtype=torch.float).view(-1, 1, 1))
    cached = FinetuneDataset(examples, tok.path, num_image_tokens=4, image_size=32, picture_size=64, cache=cache)
    features = collate([cached[i] for i in rows], tok.pad_id)["features"]
    assert features.flatten().tolist() == [float(refs.index(r)) for i in rows for r in examples[i].images]


def test_minimal_pairs_differ_in_the_asked_attribute_half_the_time_and_leave_the_default_data_alone():
    """data.minimal_pairs: a share of the conversations with pictures attached together start
    with two pictures that differ in the attribute asked about (or not: yes and no equally
    often) and, independently, in one other attribute half the time. Off (0.0, the default),
    every conversation is the one the shipped demo was trained on."""
    default = dialogues.Mix()
    for i in range(200):
        assert dialogues.sample_dialogue(random.Random(i)) == dialogues.sample_dialogue(random.Random(i), mix=default)
    pairs = dialogues.Mix(minimal_pairs=1.0)
    firsts = []
    for i in range(2000):
        turns = dialogues.sample_dialogue(random.Random(f"pairs:{i}"), text_fraction=0.0, multi_fraction=1.0, mix=pairs)
        if len(turns[0].images) == 2 and turns[0].kind == "same":
            firsts.append(turns[0])
    assert len(firsts) > 700  # about half the multi-picture conversations attach their pictures together
    answers = [t.answer.split()[-1] for t in firsts]
    assert 0.45 < answers.count("yes") / len(answers) < 0.55
    backgrounds = [t for t in firsts if "background" in t.question]
    assert 0.45 < len(backgrounds) / len(firsts) < 0.55
    for turn in firsts:
        a, b = turn.images
        differing = [attr for attr in dialogues.VARIED if getattr(a, attr) != getattr(b, attr)]
        assert len(differing) <= 2
        asked = next(attr for attr, word in (("background", "background"), ("colour", "colour"), ("count", "number"),
                                             ("size", "size"), ("shape", "shape")) if word in turn.question)
        assert turn.answer.split()[-1] == ("no" if asked in differing else "yes")
    with pytest.raises(UserError, match="data.minimal_pairs"):
        SyntheticExamples(4, seed=0, style="chat", template=TEMPLATE, minimal_pairs=1.5)
