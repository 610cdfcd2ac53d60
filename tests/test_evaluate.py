"""Batch evaluation (evaluate.py): CSV validation, metrics, batch-size invariance, failing rows,
resume after a torn write, re-scoring without a model, the example set end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from minigpt4.config import compose, evaluate_settings
from minigpt4.errors import UserError
from minigpt4.evaluation import metrics, store
from minigpt4.evaluation.answering import answer_rows
from minigpt4.evaluation.prompts import PromptFile, parse_files, read_prompt_file
from minigpt4.generation import GenerationSettings
from minigpt4.recipes.evaluate import Plan
from minigpt4.recipes.evaluate import run as run_evaluation
from minigpt4.settings import EvaluateSettings

FAST = ["gpu=cpu", "precision=fp32", "checkpoint=random", "evaluate.progress=false"]


def write_csv(path: Path, header: list[str], rows: list[list], encoding: str = "utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def picture(path: Path, colour=(200, 30, 30)) -> str:
    Image.new("RGB", (32, 32), colour).save(path)
    return path.name


@pytest.fixture
def prompt_set(tmp_path: Path) -> Path:
    """Image rows, a text-only row, a two-image row with markers, a missing and a corrupt image."""
    red, blue = picture(tmp_path / "red.png"), picture(tmp_path / "blue.png", (20, 40, 220))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return write_csv(tmp_path / "set.csv", ["id", "prompt", "image", "reference", "category", "note"], [
        ["a", "What colour is the shape?", red, "red", "colour", "x"],
        ["b", "What colour is the shape?", blue, "blue", "colour", "y"],
        ["c", "Hello", "", "Hello!|Hi", "text", ""],
        ["d", "Compare <image> with <image> please.", f"{red};{blue}", "", "multi", ""],
        ["e", "Describe this image in detail.", red, "A red square.", "describe", ""],
        ["f", "What is it?", "missing.png", "red", "colour", ""],
        ["g", "What is it?", "broken.png", "red", "colour", ""],
        ["h", "How many shapes are there?", blue, "1|one", "count", "z"],
    ])


def cfg_for(csv_path: Path, *extra: str):
    return evaluate_settings(compose("evaluate", [*FAST, f"evaluate.prompts=[{csv_path}]", "generation.max_new_tokens=6", *extra]))


def read_predictions(run_dir: Path) -> list[dict]:
    with open(run_dir / "predictions.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ---- validation (no model) ------------------------------------------------------------------------
@pytest.mark.parametrize("name, content, message", [
    ("empty.csv", b"", "empty.csv:1: empty file"),
    ("noprompt.csv", b"question,image\nhi,\n", "noprompt.csv:1: no `prompt` column"),
    ("latin.csv", b"prompt\nfine\ncaf\xe9\n", "latin.csv:3: not UTF-8"),
    ("dup.csv", b"id,prompt\n1,a\n2,b\n1,c\n", "dup.csv:4: id '1' repeats the id of line 2"),
    ("ragged.csv", b"prompt,reference\na,b\nc,d,e\n", "ragged.csv:3: 3 fields but the header has 2"),
    ("header.csv", b"prompt\n", "header.csv:2: no rows"),
    ("markers.csv", b"prompt,image\n<image> vs <image>,a.png\n", "markers.csv:2: prompt has 2 <image> markers but the row lists 1"),
    ("blank.csv", b"prompt,id\n ,1\n", "blank.csv:2: empty prompt"),
])
def test_structural_csv_problems_are_one_error_naming_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=None) as err:
        read_prompt_file(parse_files([str(tmp_path / name)])[0])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_rows_parse_ids_images_references_and_extra_columns(prompt_set):
    rows = read_prompt_file(parse_files([str(prompt_set)])[0])
    by_id = {r.id: r for r in rows}
    assert [r.id for r in rows] == list("abcdefgh")
    assert by_id["d"].images == [str(prompt_set.parent / "red.png"), str(prompt_set.parent / "blue.png")]
    assert by_id["c"].images == [] and by_id["c"].references == ["Hello!", "Hi"]
    assert by_id["a"].input["note"] == "x" and by_id["a"].key == "set.csv#a"
    # a missing image is not a structural error: the row fails at run time
    assert by_id["f"].images == [str(prompt_set.parent / "missing.png")]
    # without an id column the row number is the id; a BOM is fine
    (prompt_set.parent / "plain.csv").write_bytes("\ufeffprompt\nHi\n\nHello\n".encode())
    plain = read_prompt_file(PromptFile(prompt_set.parent / "plain.csv", label="plain.csv"))
    assert [(r.id, r.prompt, r.line) for r in plain] == [("1", "Hi", 2), ("2", "Hello", 4)]


def test_bad_metric_names_and_prompt_entries_fail_before_any_model(prompt_set):
    with pytest.raises(UserError, match="unknown metric"):
        Plan.from_settings(cfg_for(prompt_set, "evaluate.metrics=[accuracy]"))
    cfg = evaluate_settings(compose("evaluate", [*FAST, f"evaluate.prompts=[{{path:{prompt_set},metrics:[bleu]}}]"]))
    assert Plan.from_settings(cfg).metrics == {"set.csv": ("bleu",)}
    with pytest.raises(UserError, match="no such file"):
        Plan.from_settings(evaluate_settings(compose("evaluate", [*FAST, "evaluate.prompts=[nowhere.csv]"])))


# ---- metrics ------------------------------------------------------------------------------------
def test_metrics_normalise_like_vqa_and_score_bleu_with_sacrebleu():
    assert metrics.normalize("The  Two red Circles.") == "2 red circles"
    assert metrics.normalize("1,000 boxes; 3.5 cm") == "1000 boxes 3.5 cm"
    assert metrics.exact_match("Two.", ["2"]) == 1.0
    assert metrics.exact_match("two circles", ["2"]) == 0.0
    assert metrics.contains("I see two circles.", ["2"]) == 1.0
    assert metrics.contains("I see twelve circles.", ["2"]) == 0.0  # whole words only
    assert metrics.vqa_accuracy("red", ["red"]) == 1.0
    assert metrics.vqa_accuracy("red", ["red", "blue", "green"]) == pytest.approx(1 / 3)
    ten = ["red"] * 2 + ["blue"] * 8  # official VQA: 2 of 10 humans -> mean of min(1, matches/3) over 10 subsets
    assert metrics.vqa_accuracy("red", ten) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert metrics.sentence_bleu("a red circle on white", ["a red circle on white"]) == pytest.approx(100.0)
    assert metrics.score_row(None, ["red"], ("exact_match", "bleu")) == {"exact_match": 0.0, "bleu": 0.0}
    assert metrics.score_row("x", [], ("exact_match",)) == {}
    values, counts = metrics.aggregate([("red", ["red"], {"exact_match": 1.0}), ("x", ["blue"], {"exact_match": 0.0})])
    assert values == {"exact_match": 0.5} and counts == {"exact_match": 2}


# ---- the run ------------------------------------------------------------------------------------
def diverse_tiny_model(cfg):
    """The tiny model with larger random weights, so each row gets a different answer."""
    from minigpt4.build import load_model

    lm = load_model(cfg.load)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    return lm


def test_greedy_answers_do_not_depend_on_the_batch_size(prompt_set):
    cfg = cfg_for(prompt_set)
    lm = diverse_tiny_model(cfg)
    plan = Plan.from_settings(cfg)
    settings = cfg.generation
    assert settings.greedy
    answers = {}
    for batch_size in (1, 4):
        out: list[dict] = []
        answer_rows(lm, plan.rows, settings, batch_size, out.append)
        answers[batch_size] = {r["key"]: (r["answer"], r["error"], r["n_tokens"]) for r in out}
    assert answers[1] == answers[4]
    good = [a for a, e, _ in answers[1].values() if e is None]
    assert len(good) == 6 and len(set(good)) >= 4  # the rows really got different answers


def test_compile_auto_compiles_only_jobs_long_enough_to_pay_it_back(prompt_set, monkeypatch):
    """generation.compile=auto is decided once per job from rows x max_new_tokens; a chat (no
    length known) never compiles on "auto". evaluate.py's default is off (the fused step is
    faster uncompiled)."""
    from minigpt4 import generation
    from minigpt4.evaluation import answering

    cfg = cfg_for(prompt_set)
    assert evaluate_settings(compose("evaluate", [])).generation.compile is False
    lm = diverse_tiny_model(cfg)
    rows = Plan.from_settings(cfg).rows
    seen = []
    monkeypatch.setattr(answering, "_generate_batch", lambda lm, batch, settings, decoder_for: seen.append(settings.compile) or [])
    settings = GenerationSettings(do_sample=False, max_new_tokens=10, compile="auto")
    answer_rows(lm, rows, settings, 4, lambda record: None)
    assert seen and set(seen) == {False}  # 6 answerable rows x 10 tokens: far too short
    seen.clear()
    monkeypatch.setattr(generation, "COMPILE_PAYS_FROM_TOKENS", 60)
    answer_rows(lm, rows, settings, 4, lambda record: None)
    assert set(seen) == {True}
    assert settings.compile_for(None) is False and settings.compile_for(10**9) is True
    assert GenerationSettings(compile="max-autotune-no-cudagraphs").compile_for(None) == "max-autotune-no-cudagraphs"


def test_demo_model_answers_the_example_set_identically_at_batch_1_and_16_and_through_the_engine():
    from minigpt4.build import load_model

    cfg = evaluate_settings(compose("evaluate", ["gpu=cpu", "precision=fp32", "checkpoint=demo", "generation.max_new_tokens=40"]))
    lm, rows = load_model(cfg.load), Plan.from_settings(cfg).rows
    settings = cfg.generation
    answers = []
    for batch_size, engine in ((1, False), (16, False), (6, True)):
        out: list[dict] = []
        answer_rows(lm, rows, settings, batch_size, out.append, engine=engine)
        answers.append({r["key"]: r["answer"] for r in out})
    assert answers[0] == answers[1] == answers[2] and len(answers[0]) == EXAMPLE_ROWS


def test_run_writes_predictions_summary_chart_and_records_failing_rows(prompt_set, tmp_path):
    run_dir = run_evaluation(cfg_for(prompt_set, "evaluate.batch_size=3"), tmp_path / "run")
    rows = read_predictions(run_dir)
    assert [r["id"] for r in rows] == list("abcdefgh")  # prompt order, whatever the batching
    assert list(rows[0])[:7] == ["csv", "id", "prompt", "image", "reference", "category", "note"]
    assert {"answer", "exact_match", "contains", "vqa_accuracy", "error"} <= set(rows[0])
    assert "bleu" not in rows[0]  # BLEU is chosen per file or run, not a default
    by_id = {r["id"]: r for r in rows}
    assert "missing.png: no such file" in by_id["f"]["error"]
    assert "broken.png" in by_id["g"]["error"] and by_id["g"]["exact_match"] == "0.0"  # failures score 0
    assert by_id["d"]["error"] == "" and by_id["d"]["exact_match"] == ""  # no reference: not scored
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["counts"] == {"rows": 8, "answered": 6, "failed": 2, "with_reference": 7}
    assert summary["n_scored"]["exact_match"] == 7
    assert set(summary["per_category"]) == {"colour", "text", "multi", "describe", "count"}
    assert summary["per_csv"]["set.csv"]["counts"]["rows"] == 8
    assert [f["key"] for f in summary["failures"]] == ["set.csv#f", "set.csv#g"]
    assert summary["throughput"]["rows"] == 8 and summary["throughput"]["generated_tokens"] > 0
    assert summary["seed"] == 42 and summary["versions"]["transformers"] and "commit" in summary["git"]
    assert summary["config"]["generation"]["do_sample"] is False
    assert (run_dir / "metrics_by_category.png").read_bytes()[:4] == b"\x89PNG"
    lines = (run_dir / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 8 and len({json.loads(line)["key"] for line in lines}) == 8


def test_resume_after_a_torn_write_loses_and_duplicates_nothing(prompt_set, tmp_path):
    full = run_evaluation(cfg_for(prompt_set), tmp_path / "full")
    expected = read_predictions(full)
    # an interrupted run: 5 rows finished, the 6th torn mid-line by kill -9
    run_dir = tmp_path / "interrupted"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text((full / "config.yaml").read_text())
    lines = (full / "predictions.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "predictions.jsonl").write_text("".join(lines[:5]) + lines[5][:30])
    assert len(store.collect(run_dir)) == 5
    partial = run_evaluation(evaluate_settings(compose("evaluate", [*FAST, f"score_only={run_dir}"])), tmp_path / "ignored")
    assert json.loads((partial / "summary.json").read_text())["pending_rows"] == len(expected) - 5
    resumed = run_evaluation(evaluate_settings(compose("evaluate", [*FAST, f"resume={run_dir}"])), tmp_path / "ignored")
    assert resumed == run_dir and not (tmp_path / "ignored").exists()
    assert read_predictions(run_dir) == expected
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pending_rows"] == 0
    assert summary["throughput"]["rows"] == len(expected) - 5  # this invocation's share
    assert summary["throughput"]["rows_done_before"] == 5
    keys = [json.loads(line)["key"] for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert sorted(keys) == sorted(r["csv"] + "#" + r["id"] for r in expected)
    # resuming a finished run loads no model and changes nothing
    summary = json.loads((run_dir / "summary.json").read_text())
    run_evaluation(evaluate_settings(compose("evaluate", [*FAST, f"resume={run_dir}"])), tmp_path / "ignored")
    assert read_predictions(run_dir) == expected
    assert json.loads((run_dir / "summary.json").read_text())["throughput"] == summary["throughput"]


def test_a_run_saved_by_an_older_version_still_resumes(prompt_set, tmp_path):
    """Older runs saved the whole composed config (weights_root, no evaluate.engine, no launch):
    what they lack takes today's value; a key this version does not know is one line."""
    import yaml

    full = run_evaluation(cfg_for(prompt_set), tmp_path / "full")
    saved = yaml.safe_load((full / "config.yaml").read_text())
    assert EvaluateSettings.from_dict(saved).to_dict() == saved  # what a run saves reads back the same
    del saved["evaluate"]["engine"], saved["evaluate"]["fail_on_error"], saved["launch"]
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.yaml").write_text(yaml.safe_dump({**saved, "weights_root": "weights"}))
    assert run_evaluation(evaluate_settings(compose("evaluate", [*FAST, f"resume={old}"])), tmp_path / "x") == old
    assert read_predictions(old) == read_predictions(full)
    saved["evaluate"]["beams"] = 2
    (old / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(UserError, match=rf"^resume={old}: its config.yaml does not fit this version "
                                        r"\(evaluate.beams: no such setting .*\); fix that key in .*, or start a new run$"):
        run_evaluation(evaluate_settings(compose("evaluate", [*FAST, f"resume={old}"])), tmp_path / "x")


def test_score_only_rescores_without_loading_a_model(prompt_set, tmp_path, monkeypatch):
    run_dir = run_evaluation(cfg_for(prompt_set), tmp_path / "run")
    before = json.loads((run_dir / "summary.json").read_text())
    import minigpt4.build

    monkeypatch.setattr(minigpt4.build, "load_model", lambda *a, **k: pytest.fail("score_only loaded a model"))
    # rewrite one saved answer: the new score must follow it
    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    records[0]["answer"] = "It is red."
    (run_dir / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = evaluate_settings(compose("evaluate", [*FAST, f"score_only={run_dir}", "evaluate.metrics=[contains]"]))
    assert run_evaluation(cfg, tmp_path / "unused") == run_dir
    after = json.loads((run_dir / "summary.json").read_text())
    assert list(after["metrics"]) == ["contains"] and after["score_only"] is True
    assert read_predictions(run_dir)[0]["contains"] == "1.0"
    assert after["throughput"] == before["throughput"]  # the generation numbers are kept
    with pytest.raises(UserError, match="no config.yaml"):
        run_evaluation(evaluate_settings(compose("evaluate", [*FAST, f"score_only={tmp_path}"])), tmp_path / "x")


def test_resume_retries_failed_rows_only_when_asked(prompt_set, tmp_path):
    run_dir = run_evaluation(cfg_for(prompt_set), tmp_path / "run")
    failed = lambda: {r["id"] for r in read_predictions(run_dir) if r["error"]}
    assert failed() == {"f", "g"}
    picture(prompt_set.parent / "missing.png")  # the user fixes one image
    run_evaluation(evaluate_settings(compose("evaluate", [*FAST, f"resume={run_dir}"])), tmp_path / "x")
    assert failed() == {"f", "g"}  # a plain resume redoes nothing
    before = {r["id"]: r for r in read_predictions(run_dir)}
    run_evaluation(evaluate_settings(compose("evaluate", [*FAST, f"resume={run_dir}", "evaluate.retry_failed=true"])), tmp_path / "x")
    after = {r["id"]: r for r in read_predictions(run_dir)}
    assert failed() == {"g"} and after["f"]["answer"] and len(after) == 8
    assert all(after[k] == before[k] for k in after if k not in ("f", "g"))  # finished rows untouched
    assert len((run_dir / "predictions.jsonl").read_text().splitlines()) == 8  # merged: one line a row


def test_score_only_metrics_replace_every_files_own_choice(prompt_set, tmp_path):
    cfg = evaluate_settings(compose("evaluate", [*FAST, "generation.max_new_tokens=6",
                               f"evaluate.prompts=[{{path: {prompt_set}, metrics: [bleu, exact_match]}}]"]))
    run_dir = run_evaluation(cfg, tmp_path / "run")
    assert list(json.loads((run_dir / "summary.json").read_text())["metrics"]) == ["exact_match", "bleu"]
    run_evaluation(evaluate_settings(compose("evaluate", [*FAST, f"score_only={run_dir}", "evaluate.metrics=[contains]"])), tmp_path / "x")
    assert list(json.loads((run_dir / "summary.json").read_text())["metrics"]) == ["contains"]


def test_resume_says_which_overrides_it_ignores_and_logs_into_the_run(prompt_set, tmp_path, caplog):
    from dataclasses import replace

    run_dir = run_evaluation(cfg_for(prompt_set), tmp_path / "run")
    typed = (f"resume={run_dir}", "generation.max_new_tokens=1", "evaluate.batch_size=2", "gpu=cpu", "+hydra.x=1")
    settings = evaluate_settings(compose("evaluate", [*FAST, f"resume={run_dir}"]))
    run_evaluation(replace(settings, command_line=typed), tmp_path / "ignored")  # as evaluate.py gets it from Hydra
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("ignored generation.max_new_tokens=1 (only gpu" in w for w in warnings), warnings
    assert not any("evaluate.batch_size=2" in w for w in warnings)
    assert "ignored generation.max_new_tokens=1" in (run_dir / "evaluate.log").read_text()


@pytest.mark.parametrize("override, message", [
    ("evaluate.max_context=abc", "evaluate.max_context=abc: use a whole number"),
    ("evaluate.batch_size=0", "evaluate.batch_size=0: use a whole number of 1 or more"),
    ("generation.max_new_tokens=0", "generation.max_new_tokens=0: use a whole number of 1 or more"),
    ("generation.top_p=1.5", "generation.top_p=1.5: use a number above 0 and at most 1"),
    ("generation.compile=fast", "generation.compile='fast': use true, false, auto or an Inductor mode"),
])
def test_bad_settings_fail_before_any_model(prompt_set, tmp_path, monkeypatch, override, message):
    import minigpt4.build

    monkeypatch.setattr(minigpt4.build, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(UserError) as err:
        run_evaluation(cfg_for(prompt_set, override), tmp_path / "run")
    assert message in str(err.value)


def test_columns_named_like_output_columns_are_refused(tmp_path, caplog):
    path = write_csv(tmp_path / "clash.csv", ["prompt", "answer", "error"], [["hi", "a", "b"]])
    with pytest.raises(UserError, match=r"clash.csv:1: column\(s\) \['answer', 'error'\] would be overwritten"):
        read_prompt_file(parse_files([str(path)])[0])
    near = write_csv(tmp_path / "near.csv", ["prompt", "images"], [["hi", "a.png"]])
    read_prompt_file(parse_files([str(near)])[0])
    assert "column 'images' is carried through unused; did you mean 'image'?" in caplog.text


@pytest.fixture(scope="module")
def example_run(tmp_path_factory) -> dict:
    """The shipped example set on the default checkpoint, the demo model (`python evaluate.py gpu=cpu`)."""
    overrides = ["gpu=cpu", "precision=fp32", "evaluate.progress=false", "evaluate.batch_size=16",
                 "generation.max_new_tokens=60"]
    run_dir = run_evaluation(evaluate_settings(compose("evaluate", overrides)), tmp_path_factory.mktemp("examples") / "run")
    return {"summary": json.loads((run_dir / "summary.json").read_text()), "rows": read_predictions(run_dir)}


EXAMPLE_ROWS = 114  # examples/make_examples.py: 64 shapes + 36 multi-image + 6 text-only + 8 descriptions
MULTI_KINDS = {"total", "nth", "more", "same", "difference", "latest"}  # categories of multi_image.csv


def test_example_set_end_to_end(example_run):
    """Structure and held-out accuracy of the demo model (thresholds below what it measured:
    colour, shape and count 22/24, text-only 6/6 before the abilities answer changed (#18),
    description BLEU 81)."""
    summary, rows = example_run["summary"], example_run["rows"]
    assert summary["counts"]["rows"] == len(rows) == EXAMPLE_ROWS and summary["counts"]["failed"] == 0
    assert set(summary["per_csv"]) == {"shapes.csv", "multi_image.csv", "text_only.csv", "descriptions.csv"}
    assert list(summary["per_csv"]["descriptions.csv"]["metrics"]) == ["exact_match", "bleu"]
    assert list(summary["per_csv"]["shapes.csv"]["metrics"]) == ["exact_match", "contains", "vqa_accuracy"]
    single = {"colour", "shape", "count", "position", "size", "background", "yesno"}
    assert single | MULTI_KINDS | {"text_only", "description"} == set(summary["per_category"])
    assert summary["model"] == "tiny"  # the default checkpoint is the trained demo (no UNTRAINED label)
    cat = summary["per_category"]
    for kind in ("colour", "count"):
        assert cat[kind]["metrics"]["exact_match"] >= 0.75, (kind, cat[kind]["metrics"])
    seen = sum(cat[k]["metrics"]["exact_match"] * cat[k]["counts"]["rows"] for k in ("colour", "shape", "count"))
    assert seen / 24 >= 0.75
    assert cat["text_only"]["metrics"]["exact_match"] >= 0.8
    assert summary["per_csv"]["descriptions.csv"]["metrics"]["bleu"] >= 50


def test_example_set_new_kinds_on_the_demo(example_run):
    """Positions, yes/no claims and questions over 2-4 pictures in the example set (#18): each
    kind >= 75% (4-16 rows each: one miss may cost 25%), >= 90% of all those rows (2026-12-02:
    the difference 3 of 4, every other kind all rows)."""
    cat = example_run["summary"]["per_category"]
    kinds = ("position", "size", "yesno", *sorted(MULTI_KINDS))
    low = {k: cat[k]["metrics"]["exact_match"] for k in kinds if cat[k]["metrics"]["exact_match"] < 0.75}
    assert not low, low
    right = sum(cat[k]["metrics"]["exact_match"] * cat[k]["counts"]["rows"] for k in kinds)
    assert right / sum(cat[k]["counts"]["rows"] for k in kinds) >= 0.9
    assert cat["text_only"]["metrics"]["exact_match"] == 1.0


def test_wandb_logs_summary_and_predictions_offline_and_is_imported_only_when_enabled(prompt_set, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # any import of wandb would now fail
    run_dir = run_evaluation(cfg_for(prompt_set), tmp_path / "run")
    monkeypatch.delitem(sys.modules, "wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_evaluation(evaluate_settings(compose("evaluate", [*FAST, f"score_only={run_dir}", "logger=wandb"])), tmp_path / "x")
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))
    table = json.loads(next(offline[0].glob("files/media/table/predictions_*.table.json")).read_text())
    assert len(table["data"]) == 8 and "answer" in table["columns"]
    n_tokens = table["columns"].index("n_tokens")
    assert all(isinstance(row[n_tokens], (int, float)) for row in table["data"])


def test_process_settings_come_from_gpu_or_trainer_keys():
    from minigpt4.recipes.evaluate import _fabric_settings

    assert _fabric_settings(evaluate_settings(compose("evaluate", ["gpu=cpu"]))) is None  # one process, no Fabric
    cpu2 = _fabric_settings(evaluate_settings(compose("evaluate", ["gpu=cpu", "launch.accelerator=cpu", "launch.devices=2"])))
    assert cpu2 == {"accelerator": "cpu", "devices": 2, "strategy": "auto", "num_nodes": 1}
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            _fabric_settings(evaluate_settings(compose("evaluate", ["gpu=[0,1]"])))
