"""Synthetic generator, data sets and batches (CPU, fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from minigpt4.config import ASSETS
from minigpt4.conversation import IMAGE_PLACEHOLDER, STAGE2_INSTRUCTIONS, get_template
from minigpt4.data import synthetic
from minigpt4.data.datasets import SyntheticExamples, load_cc_sbu_align, load_csv
from minigpt4.errors import UserError
from minigpt4.model import IMAGE_TOKEN
from minigpt4.tokenizer import Tokenizer
from minigpt4.training.data import FinetuneDataset, collate, scan_images

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
        assert ("position" in answers) == (spec.count == 1)
        assert synthetic.describe(spec) == answers["description"]


def test_picture_shows_its_colour_and_background():
    spec = synthetic.Spec("square", "red", 1, "large", "white", (4,), seed=1)
    pixels = np.asarray(synthetic.make_picture(spec)).astype(int)
    centre, corner = pixels[112, 112], pixels[5, 5]
    assert abs(centre - np.array(synthetic.COLOURS["red"])).max() <= 20
    assert abs(corner - np.array(synthetic.BACKGROUNDS["white"])).max() <= 10


def test_tokenizer_covers_the_demo_world():
    """The shipped tiny tokenizer was trained on tokenizer_texts(): no byte fallback for them."""
    tok = Tokenizer(ASSETS / "tiny_tokenizer.model")
    pieces = {tok.sp.id_to_piece(i) for text in synthetic.tokenizer_texts()[:400] for i in tok.encode(text)}
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


def test_batches_mask_everything_but_the_answer():
    tok = Tokenizer(ASSETS / "tiny_tokenizer.model")
    examples = SyntheticExamples(6, seed=1, style="chat", template=TEMPLATE, text_fraction=0.0)
    dataset = FinetuneDataset(examples, tok.path, num_image_tokens=4, image_size=32, picture_size=64)
    batch = collate([dataset[i] for i in range(3)], tok.pad_id)
    assert batch["pixels"].shape == (3, 3, 32, 32) and batch["n_samples"] == 3
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert int((ids == IMAGE_TOKEN).sum()) == 3 * 4
    for row in range(3):
        target = tok.encode(examples[row].target + "###")
        kept = labels[row][labels[row] != -100].tolist()
        assert kept == target  # loss only on answer + "###"
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
