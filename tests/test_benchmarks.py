"""Standard VLM benchmarks (benchmark=NAME): the scorers against hand-computed values, the
readers on small files in each format (tests/benchmark_files.py), the demo model end to end on
every benchmark config, and resume, re-scoring and failing rows on a TSV."""

from __future__ import annotations

import base64
import csv
import io
import json
import random
import re
import tracemalloc

import pytest
from benchmark_files import (
    BenchFiles,
    b64,
    colour_question,
    mmbench,
    write_all,
    write_tsv,
)
from PIL import Image
from test_evaluate import FAST, read_predictions

from minigpt4.config import compose, evaluate_settings
from minigpt4.data.synthetic import sample_specs
from minigpt4.errors import UserError
from minigpt4.evaluation import metrics
from minigpt4.evaluation.benchmarks.scorers import (
    SCORERS,
    extract_option,
    mme_yes_no,
    pope_yes_no,
)
from minigpt4.recipes.evaluate import Plan
from minigpt4.recipes.evaluate import run as run_evaluation
from minigpt4.images import StoredImage, load_pixels

DEMO = ["gpu=cpu", "precision=fp32", "evaluate.progress=false"]  # the default checkpoint: the demo model


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, BenchFiles]:
    return write_all(tmp_path_factory.mktemp("benchmarks"))


def plan_for(bench: BenchFiles, *extra: str) -> Plan:
    return Plan.from_settings(evaluate_settings(compose("evaluate", [*FAST, *bench.overrides(), *extra])))


def score(scorer: str, rows: list[tuple[dict, str | None]]) -> dict:
    """A scorer's summary over (saved input, answer) pairs; answer None: the row failed."""
    s = SCORERS[scorer]
    return s.summary([s.score(fields, answer) for fields, answer in rows])


# ---- scorers: hand-computed values ---------------------------------------------------------------
@pytest.mark.parametrize("answer, expected", [
    ("Yes", "yes"), ("no", "no"), ("Yes, there is a dog.", "yes"), ("No.", "no"), (" yes ", "yes"),
    ("I think yes", "other"),  # eval_tool looks at the first 4 characters only
    ("Not sure", "no"),  # ... so "not" reads as no, as in the official tool
    ("", "other"),
])
def test_mme_reads_yes_and_no_as_its_eval_tool_does(answer, expected):
    assert mme_yes_no(answer) == expected


def test_mme_scores_acc_and_acc_plus_per_subtask_and_sums_perception_and_cognition():
    def pair(task, picture, answers, truths=("yes", "no")):
        return [({"reference": t, "category": task, "group": picture}, a) for t, a in zip(truths, answers)]

    rows = (pair("existence", "e1.png", ["Yes", "No"])  # both right
            + pair("existence", "e2.png", ["Yes", "Yes"])  # one of two right: counts for acc, not acc+
            + pair("OCR", "o1.png", ["yes", "no"])
            + pair("code_reasoning", "c1.png", ["No", "maybe"])  # wrong, and an answer that is neither
            + pair("text_translation", "t1.png", ["yes", None]))  # the second row failed
    block = score("mme", rows)
    existence = block["subtasks"]["existence"]
    assert (existence["acc"], existence["acc_plus"], existence["score"]) == (75.0, 50.0, 125.0)
    assert block["subtasks"]["OCR"]["score"] == 200.0
    assert block["subtasks"]["text_translation"]["score"] == 50.0  # acc 50, acc+ 0
    assert block["perception"] == 325.0 and block["cognition"] == 50.0
    assert (block["perception_subtasks"], block["cognition_subtasks"]) == (2, 2)
    assert block["other_answers"] == 1 and block["failed"] == 1 and block["scored"] == 10


@pytest.mark.parametrize("answer, expected", [
    ("Yes, there is a dog in the image.", "yes"), ("No.", "no"), ("There is no dog.", "no"),
    ("There is not a dog in the image.", "no"), ("I see a dog. It is not a cat.", "yes"),  # first sentence only
    ("NO", "yes"),  # POPE's evaluate.py knows "No", "no" and "not" only
    ("no, none", "no"),
])
def test_pope_reads_yes_and_no_as_its_evaluate_py_does(answer, expected):
    assert pope_yes_no(answer) == expected


def test_pope_scores_each_split_and_their_mean():
    random_split = [("yes", "Yes"), ("yes", "No"), ("no", "Yes"), ("no", "No"), ("yes", None)]  # TP FN FP TN failed
    popular = [("yes", "yes"), ("no", "no")]
    rows = [({"reference": t, "split": "coco_pope_random"}, a) for t, a in random_split]
    rows += [({"reference": t, "split": "popular"}, a) for t, a in popular]
    block = score("pope", rows)
    r = block["per_split"]["random"]
    assert (r["accuracy"], r["precision"], r["yes_ratio"]) == (40.0, 50.0, 40.0)
    assert r["recall"] == pytest.approx(100 / 3, abs=0.01)  # 1 of the 3 "yes" truths found
    assert r["f1"] == pytest.approx(100 * 2 * 0.5 * (1 / 3) / (0.5 + 1 / 3), abs=0.01)
    assert block["per_split"]["popular"] == {**block["per_split"]["popular"], "accuracy": 100.0, "f1": 100.0,
                                             "yes_ratio": 50.0}
    assert block["accuracy"] == 70.0 and block["recall"] == pytest.approx((100 / 3 + 100) / 2, abs=0.01)


OPTIONS = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}


@pytest.mark.parametrize("answer, expected", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B. blue", "B"), ("Answer: D", "D"), ("The answer is C.", "C"),
    ("blue", "B"), ("It is blue.", "B"), ("A red circle.", "A"), ("A blue circle.", "B"),  # "A" the article
    ("purple", None), ("A or B", None), ("red and blue", None), ("I cannot tell.", None),
])
def test_an_option_is_read_from_a_letter_or_its_text_and_an_answer_naming_none_is_none(answer, expected):
    assert extract_option(answer, OPTIONS) == expected


def test_option_text_inside_a_longer_option_goes_to_the_longer_one():
    options = {"A": "circle", "B": "red circle"}
    assert extract_option("a red circle", options) == "B" and extract_option("a circle", options) == "A"


def test_circular_evaluation_counts_a_question_right_only_if_every_rotation_is():
    def rotations(group, category, answers, truths="ABCD"):
        return [({**OPTIONS, "reference": t, "group": group, "category": category}, a) for t, a in zip(truths, answers)]

    rows = (rotations("1", "colour", ["A", "B", "C", "D"])  # 4 of 4
            + rotations("2", "colour", ["A", "B", "C", "A"])  # 3 of 4: wrong
            + rotations("3", "shape", ["(A) red", "blue", "I cannot tell.", "D"]))  # names no option once: wrong
    block = score("choice", rows)
    assert block["circular"] and block["questions"] == 3
    assert block["accuracy"] == pytest.approx(100 / 3, abs=0.01)
    assert block["accuracy_first_rotation"] == 100.0
    assert block["per_category"] == {"colour": 50.0, "shape": 0.0}
    assert block["unanswerable"] == 1 and block["unanswerable_examples"] == ["I cannot tell."]


def test_vqa_accuracy_uses_the_official_normalisation_and_ten_leave_one_out_subsets():
    assert metrics.normalize("Two.") == "2" and metrics.normalize("None") == "0"
    assert metrics.normalize("The dog's bowl!") == "dog's bowl"
    assert metrics.normalize("dont") == "don't" == metrics.normalize("don't")
    assert metrics.normalize("1,000 boxes; 3.5 cm") == "1000 boxes 3.5 cm"
    assert metrics.normalize("black-and-white") == "black and white"
    humans = ["2"] * 2 + ["3"] * 8
    # two humans said "2": 8 subsets keep both (2/3), 2 subsets keep one (1/3)
    assert metrics.vqa_accuracy("two", humans) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert metrics.vqa_accuracy("3", humans) == 1.0
    rows = [({"reference": "|".join(humans), "category": "number"}, "Two"),
            ({"reference": "|".join(["yes"] * 10), "category": "yes/no"}, "Yes."),
            ({"reference": "|".join(["no"] * 10), "category": "yes/no"}, None)]  # failed
    block = score("vqa", rows)
    assert block["accuracy"] == pytest.approx(100 * (0.6 + 1 + 0) / 3, abs=0.01)
    assert block["per_category"] == {"number": 60.0, "yes/no": 50.0}


def test_gqa_is_exact_match_after_normalisation():
    block = score("exact_match", [({"reference": "table"}, "The table."), ({"reference": "table"}, "tables"),
                                  ({"reference": "2"}, "two")])
    assert block["accuracy"] == pytest.approx(200 / 3, abs=0.01)


def test_rows_without_an_answer_in_the_file_are_saved_but_not_scored():
    block = score("choice", [({**OPTIONS, "group": "1"}, "A"), ({**OPTIONS, "reference": "B", "group": "2"}, "B")])
    assert block["questions"] == 1 and block["without_reference"] == 1 and block["accuracy"] == 100.0


# ---- readers --------------------------------------------------------------------------------------
def test_every_format_reads_into_rows_with_prompts_references_and_pictures(files):
    expect = {"mme": 8, "pope": 6, "mmbench": 8, "seed_bench": 3, "scienceqa_img": 3, "vqav2": 3, "gqa": 3,
              "textvqa": 3, "mcq": 3, "vqa": 3}
    for name, bench in files.items():
        rows = plan_for(bench).rows
        assert len(rows) == expect[name], name
        for row in rows:
            assert row.input["reference"] and row.prompt.startswith(row.input.get("hint") or row.input["question"][:10])
            assert load_pixels(row.images, 32).shape[1:] == (3, 32, 32)
    seed = plan_for(files["seed_bench"]).rows
    assert [len(r.images) for r in seed] == [2, 1, 1]  # a row may carry several pictures
    assert len(plan_for(files["vqa"]).rows[-1].images) == 2
    vqav2 = plan_for(files["vqav2"]).rows[1]
    assert vqav2.input["reference"].split("|").count(vqav2.input["reference"].split("|")[-1]) == 8
    assert vqav2.category == "other"  # the annotation's answer_type
    assert vqav2.prompt.count("single word or phrase") == 1  # the question file carries the instruction
    pope = {r.input["split"] for r in plan_for(files["pope"]).rows}
    assert pope == {"coco_pope_random", "coco_pope_popular", "coco_pope_adversarial"}


def test_answers_files_in_each_form_and_a_row_limit(tmp_path, files):
    from minigpt4.evaluation.benchmarks.answers import read_answers

    (tmp_path / "labels.jsonl").write_text('{"question_id": 1, "label": "yes"}\n{"question_id": 2, "label": "no"}\n')
    assert read_answers(tmp_path / "labels.jsonl")["2"]["label"] == "no"
    (tmp_path / "textvqa.json").write_text(json.dumps({"data": [{"question_id": 7, "answers": ["a"] * 10}]}))
    assert read_answers(tmp_path / "textvqa.json")["7"]["answers"] == ["a"] * 10
    (tmp_path / "odd.json").write_text(json.dumps({"version": 1}))
    with pytest.raises(UserError, match="not a form of answers file this reads"):
        read_answers(tmp_path / "odd.json")
    assert len(plan_for(files["mmbench"], "benchmark.limit=3").rows) == 3


def test_mme_pairs_share_the_picture_of_the_row_they_point_to(files):
    rows = plan_for(files["mme"]).rows
    first, second = rows[0], rows[1]
    assert isinstance(second.images[0], StoredImage) and "the image of the row with index 1" in second.images[0].name
    assert second.images[0].read() == first.images[0].read()
    assert first.input["group"] == second.input["group"] != rows[2].input["group"]
    assert [r.input["reference"] for r in rows[:2]] == ["yes", "no"]


def test_mmbench_rotations_from_the_file_share_a_group_and_carry_their_own_answer(files):
    rows = plan_for(files["mmbench"]).rows
    by_id = {r.id: r for r in rows}
    assert sorted(by_id) == sorted(["0", "1", "1000000", "1000001", "2000000", "2000001", "3000000", "3000001"])
    original, rotated = by_id["0"], by_id["1000000"]
    assert original.input["group"] == rotated.input["group"] == "0"
    truth = original.input[original.input["reference"]]
    assert rotated.input[rotated.input["reference"]] == truth  # the same option, under another letter
    assert rotated.input["A"] == original.input["B"]


def test_circular_rotations_are_made_when_the_file_has_none(tmp_path):
    spec = sample_specs(1, 5)[0]
    path = write_tsv(tmp_path / "one.tsv", ["index", "question", "A", "B", "C", "D", "answer", "image"],
                     [[7, "Which?", "red", "blue", "green", "yellow", "B", b64(spec)]])
    rows = plan_for(BenchFiles("mcq", path), "benchmark.circular=true").rows
    assert [r.id for r in rows] == ["7", "1000007", "2000007", "3000007"]
    assert [[r.input[x] for x in "ABCD"] for r in rows][1] == ["blue", "green", "yellow", "red"]
    assert [r.input["reference"] for r in rows] == ["B", "A", "D", "C"]  # blue, wherever it went
    assert {r.input["group"] for r in rows} == {"7"}
    assert "B. green" in rows[1].prompt and rows[0].images[0].read() == rows[3].images[0].read()


def test_a_tsv_is_read_as_a_stream_not_into_memory(tmp_path):
    """40 rows of 0.5 MB base64 each (20 MB, one with a quoted cell): reading the rows holds one
    row at a time (2 MB measured; 4 MB for the row with quotes), and cells longer than csv's
    128 kB default are read."""
    cell = base64.b64encode(random.Random(0).randbytes(384 * 1024)).decode()
    rows = [[i, f"Question {i}?" if i != 5 else 'A "quoted" question?', "yes", cell] for i in range(40)]
    path = write_tsv(tmp_path / "big.tsv", ["index", "question", "answer", "image"], rows)
    del rows
    cfg = evaluate_settings(compose("evaluate", [*FAST, *BenchFiles("vqa", path).overrides()]))
    tracemalloc.start()
    try:
        loaded = Plan.from_settings(cfg).rows
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(loaded) == 40 and path.stat().st_size > 20 * 2**20
    assert peak < path.stat().st_size / 4, f"reading the rows peaked at {peak / 2**20:.1f} MB"
    assert loaded[5].input["question"] == 'A "quoted" question?'
    assert loaded[17].images[0].read() == base64.b64decode(cell)  # read back when the row is answered


def test_a_quoted_cell_may_span_lines(tmp_path):
    spec = sample_specs(1, 3)[0]
    path = write_tsv(tmp_path / "q.tsv", ["index", "question", "answer", "image"],
                     [[1, 'Read "this"\nthen\tanswer.', "no", b64(spec)], [2, "Plain?", "yes", b64(spec)]])
    rows = plan_for(BenchFiles("vqa", path), "benchmark.prompt={question}").rows
    assert [r.prompt for r in rows] == ['Read "this"\nthen\tanswer.', "Plain?"]
    assert rows[1].images[0].read() == base64.b64decode(b64(spec))


def test_image_path_columns_and_files_on_disk(tmp_path):
    spec = sample_specs(1, 4)[0]
    (tmp_path / "pics").mkdir()
    Image.open(io.BytesIO(base64.b64decode(b64(spec)))).save(tmp_path / "pics" / "a.png")
    path = write_tsv(tmp_path / "paths.tsv", ["index", "question", "answer", "image_path"],
                     [[1, "Which colour?", "red", "a.png"], [2, "Both?", "red", "['a.png', 'a.png']"]])
    rows = plan_for(BenchFiles("vqa", path), f"benchmark.images={tmp_path / 'pics'}").rows
    assert rows[0].images == [str(tmp_path / "pics" / "a.png")] and len(rows[1].images) == 2


def test_parquet_pictures_read_back_in_any_order_are_the_right_ones(files, monkeypatch):
    from minigpt4.evaluation.benchmarks.readers import TableFile

    monkeypatch.setattr(TableFile, "CACHE_BYTES", 1)  # keep one row group at a time: every jump re-reads
    rows = plan_for(files["seed_bench"]).rows
    pictures = [img for r in rows for img in r.images]
    first_pass = [p.read() for p in pictures]
    assert [p.read() for p in reversed(pictures)] == first_pass[::-1]
    assert len(set(first_pass)) == 3  # two rows, three pictures (row 1 shows its picture twice)
    pattern = files["seed_bench"].path / "data" / "test-*.parquet"  # one split of a snapshot
    assert [r.key for r in plan_for(BenchFiles("seed_bench", pattern)).rows] == [
        f"test-*.parquet#{i}" for i in (100, 101, 102)]
    with pytest.raises(UserError, match=r"validation-\*.parquet: no file matches"):
        plan_for(BenchFiles("seed_bench", pattern.with_name("validation-*.parquet")))


@pytest.mark.parametrize("header, row, message", [
    (["index", "prompt", "answer", "image"], [1, "Q?", "yes", "x"], "no question (looked for the column(s) ['question', 'text']"),
    (["index", "question", "answer", "image"], [1, "Q?", "maybe", "x"], "the answer 'maybe' is not yes or no"),
])
def test_structural_problems_are_one_line_naming_file_and_row(tmp_path, header, row, message):
    path = write_tsv(tmp_path / "bad.tsv", header, [row])
    with pytest.raises(UserError) as err:
        plan_for(BenchFiles("mme", path))
    assert f"bad.tsv:2: {message}" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("options, answer, message", [
    (["red", "", "", ""], "A", "fewer than 2 options"),
    (["red", "blue", "", ""], "C", "the answer 'C' is none of the options ['A', 'B']"),
])
def test_multiple_choice_problems_are_one_line(tmp_path, options, answer, message):
    path = write_tsv(tmp_path / "bad.tsv", ["index", "question", "A", "B", "C", "D", "answer", "image"],
                     [[1, "Which?", *options, answer, "x"]])
    with pytest.raises(UserError, match=re.escape(f"bad.tsv:2: {message}")):
        plan_for(BenchFiles("mmbench", path))


@pytest.mark.parametrize("overrides, message", [
    (["benchmark=mme"], "the benchmark MME needs its file: benchmark.path="),
    (["benchmark=vqa"], "the benchmark needs its file: benchmark.path="),
    (["benchmark=mme", "benchmark.path=/no/such.tsv"], "benchmark.path=/no/such.tsv: no such file or folder"),
    (["benchmark=vqa", "benchmark.path=.", "benchmark.prompt=What? {nothing"], "benchmark.prompt='What? {nothing'"),
    (["benchmark=vqa", "benchmark.path=.", "benchmark.prompt=Answer: {options}"], "the prompt must hold {question}"),
    (["benchmark=vqa", "benchmark.path=.", "benchmark.scorer=bleu"], "benchmark.scorer=bleu: use one of"),
    (["benchmark=vqa", "benchmark.path=.", "+benchmark.columns.answr=[a]"], "benchmark.columns.answr: no such field"),
])
def test_bad_benchmark_settings_fail_before_any_model(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        Plan.from_settings(evaluate_settings(compose("evaluate", [*FAST, *overrides])))


def test_prompt_template_leaves_out_empty_lines_and_names_unknown_columns(files):
    rows = plan_for(files["mmbench"]).rows
    assert rows[0].prompt.startswith("A picture of shapes.\nWhat colour") and rows[1].prompt.startswith("What colour")
    custom = plan_for(files["mmbench"], "benchmark.prompt=[{category}] {question}").rows  # taken as typed
    assert custom[0].prompt.startswith("[attribute_recognition] What colour")
    with pytest.raises(UserError, match=r"uses \{colour\} but the row has no such column"):
        plan_for(files["mmbench"], "benchmark.prompt={question} {colour}")


# ---- runs -------------------------------------------------------------------------------------------
BLOCK_KEYS = {"mme": {"perception", "cognition", "subtasks"},
              "pope": {"accuracy", "precision", "recall", "f1", "yes_ratio", "per_split"},
              "choice": {"accuracy", "per_category", "unanswerable"}, "vqa": {"accuracy"},
              "exact_match": {"accuracy"}}


@pytest.mark.parametrize("name", ["mme", "pope", "mmbench", "seed_bench", "scienceqa_img", "vqav2", "gqa",
                                  "textvqa", "mcq", "vqa"])
def test_the_demo_model_end_to_end_on_each_benchmark_config(files, tmp_path, name):
    bench = files[name]
    run_dir = run_evaluation(evaluate_settings(compose("evaluate", [*DEMO, *bench.overrides()])), tmp_path / "run")
    summary = json.loads((run_dir / "summary.json").read_text())
    block = summary["benchmark"]
    assert BLOCK_KEYS[block["scorer"]] <= set(block), block
    assert summary["counts"]["failed"] == 0 and block["scored"] == summary["counts"]["rows"] > 0
    predictions = read_predictions(run_dir)
    assert all(row["answer"] and row["score"] in ("0.0", "1.0") or block["scorer"] == "vqa" for row in predictions)
    assert summary["config"]["generation"]["max_new_tokens"] == 16 and summary["config"]["generation"]["do_sample"] is False
    assert (run_dir / "metrics_by_category.png").read_bytes()[:4] == b"\x89PNG"
    if name in ("mmbench", "seed_bench", "mcq"):  # colour questions: the demo names the colour it sees
        assert block["accuracy"] >= 50, predictions
    # the per-row scores add up to the summary
    if block["scorer"] in ("vqa", "exact_match"):
        assert block["accuracy"] == pytest.approx(100 * sum(float(r["score"]) for r in predictions) / len(predictions), abs=0.01)


def test_a_picture_that_is_not_base64_or_not_an_image_fails_its_row_only(tmp_path):
    good = b64(sample_specs(1, 9)[0])
    path = write_tsv(tmp_path / "mixed.tsv", ["index", "question", "answer", "image"], [
        [1, "What colour?", "red", good], [2, "What colour?", "red", "not base64 at all!" * 5],
        [3, "What colour?", "red", base64.b64encode(b"plain text, no picture at all, " * 4).decode()],
        [4, "What colour?", "red", "2"], [5, "What colour?", "red", "9"]])
    run_dir = run_evaluation(evaluate_settings(compose("evaluate", [*FAST, *BenchFiles("vqa", path).overrides(),
                                                  "generation.max_new_tokens=3"])), tmp_path / "run")
    errors = {r["id"]: r["error"] for r in read_predictions(run_dir)}
    assert errors["1"] == ""
    assert errors["2"].startswith("mixed.tsv:3: the image is not valid base64")
    assert errors["3"] == "image mixed.tsv:4: not an image file (or a format Pillow cannot read)"
    assert errors["4"].startswith("mixed.tsv:5 (the image of the row with index 2): the image is not valid base64")
    assert errors["5"].startswith("mixed.tsv:6 (the image of the row with index 9): no row with that index holds an image")
    assert all("\n" not in e for e in errors.values())
    block = json.loads((run_dir / "summary.json").read_text())["benchmark"]
    assert block["failed"] == 4 and block["scored"] == 5  # failures are wrong, not left out


def test_resume_and_score_only_on_a_tsv_benchmark(files, tmp_path):
    """A run cut short (a torn last line, as kill -9 leaves) resumes to the uninterrupted
    result; score_only re-scores from predictions.jsonl even when the file is gone."""
    common = [*FAST, "generation.max_new_tokens=4", "evaluate.batch_size=3"]
    bench = mmbench(tmp_path)
    full = run_evaluation(evaluate_settings(compose("evaluate", [*common, *bench.overrides()])), tmp_path / "full")
    expected = read_predictions(full)
    run_dir = tmp_path / "interrupted"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text((full / "config.yaml").read_text())
    lines = (full / "predictions.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "predictions.jsonl").write_text("".join(lines[:3]) + lines[3][:25])
    resumed = run_evaluation(evaluate_settings(compose("evaluate", [*FAST, f"resume={run_dir}"])), tmp_path / "unused")
    assert read_predictions(resumed) == expected
    assert json.loads((resumed / "summary.json").read_text())["throughput"]["rows_done_before"] == 3
    before = json.loads((full / "summary.json").read_text())["benchmark"]
    bench.path.rename(tmp_path / "moved.tsv")
    run_evaluation(evaluate_settings(compose("evaluate", [*FAST, f"score_only={full}"])), tmp_path / "unused")
    after = json.loads((full / "summary.json").read_text())
    assert after["benchmark"] == before and after["score_only"] is True and after["pending_rows"] is None


def test_generic_metrics_can_be_asked_for_on_a_benchmark_too(files, tmp_path):
    run_dir = run_evaluation(evaluate_settings(compose("evaluate", [*DEMO, *files["gqa"].overrides(), "evaluate.metrics=[contains]"])),
                             tmp_path / "run")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["metrics"]) == ["contains"] and "accuracy" in summary["benchmark"]
    with open(run_dir / "predictions.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[-4:] == ["contains", "extracted", "score", "error"]


@pytest.mark.slow
def test_kill_9_then_resume_and_two_processes_on_a_tsv(tmp_path):
    """The command line, killed mid-run, resumed; and two processes sharding the same TSV."""
    from test_evaluate_processes import evaluate_cli, kill_9_after

    from minigpt4.evaluation import store

    specs = sample_specs(24, 11)
    rows = []
    for i, spec in enumerate(specs):
        question, options, right = colour_question(spec, i % 4)
        rows.append([i, question, *options, "ABCD"[right], b64(spec) if i % 3 == 0 else str(i - i % 3)])
    path = write_tsv(tmp_path / "many.tsv", ["index", "question", "A", "B", "C", "D", "answer", "image"], rows)
    bench = BenchFiles("mcq", path).overrides()
    run_dir = tmp_path / "run"
    kill_9_after(evaluate_cli(*FAST, *bench, "generation.max_new_tokens=8", "evaluate.batch_size=1",
                              f"hydra.run.dir={run_dir}"), run_dir)
    assert 3 <= len(store.collect(run_dir)) < 24
    resumed = run_evaluation(evaluate_settings(compose("evaluate", [*FAST, f"resume={run_dir}", "evaluate.batch_size=8"])), tmp_path / "x")
    keys = [json.loads(line)["key"] for line in (resumed / "predictions.jsonl").read_text().splitlines()]
    assert keys == [f"many.tsv#{i}" for i in range(24)]
    common = [*FAST, *bench, "generation.max_new_tokens=8", "evaluate.batch_size=4"]
    one = run_evaluation(evaluate_settings(compose("evaluate", common)), tmp_path / "one")
    two = run_evaluation(evaluate_settings(compose("evaluate", [*common, "launch.accelerator=cpu", "launch.devices=2",
                                              "launch.strategy=ddp_spawn"])), tmp_path / "two")
    assert read_predictions(resumed) == read_predictions(one) == read_predictions(two)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (one, two)]
    assert summaries[1]["throughput"]["processes"] == 2 and summaries[0]["benchmark"] == summaries[1]["benchmark"]
