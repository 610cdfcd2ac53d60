"""Small benchmark files in each format evaluate.py reads, made from the demo model's pictures
(minigpt4/data/synthetic.py), with answers known from the pictures:

    mme            VLMEvalKit TSV: yes/no question pairs per picture; the second question's image
                   cell names the row holding the picture (VLMEvalKit's de-duplication)
    pope           POPE's own files: coco_pope_{random,popular,adversarial}.json (JSON lines with
                   labels) in one folder, pictures in val2014/
    mmbench        VLMEvalKit TSV with 4 options and the circular rotations (index + k * 1,000,000)
    seed_bench     lmms-eval parquet: choice_a..choice_d, pictures as a list of {bytes, path}
    scienceqa_img  lmms-eval parquet: a `choices` list, the answer as its index, a hint
    vqav2          LLaVA question file + image folder + VQA annotations (ten answers each)
    gqa            LLaVA question file + image folder + GQA's questions file
    textvqa        lmms-eval parquet: ten answers in a list, picture as {bytes, path}
    mcq            `datasets`' save_to_disk layout: an Arrow stream with options in columns A..D
    vqa            VLMEvalKit TSV: answers as a Python list in a cell, one row with two pictures

    python tests/benchmark_files.py OUT_DIR    # writes them all and prints each one's command
"""

from __future__ import annotations

import base64
import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from minigpt4.data.synthetic import (
    COLOURS,
    PLURALS,
    SHAPES,
    Spec,
    make_picture,
    sample_specs,
)

SEED = 2027  # not a seed the demo model was trained on
SIZE = 64  # the demo model's image size: small files


@dataclass
class BenchFiles:
    config: str  # conf/benchmark/<config>.yaml
    path: Path
    extra: list[str] = field(default_factory=list)  # further overrides (images=, answers=)

    def overrides(self) -> list[str]:
        return [f"benchmark={self.config}", f"benchmark.path={self.path}", *self.extra]


def png(spec: Spec) -> bytes:
    buffer = io.BytesIO()
    make_picture(spec, SIZE).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(spec: Spec) -> str:
    return base64.b64encode(png(spec)).decode("ascii")


def other_colour(spec: Spec, k: int = 1) -> str:
    colours = list(COLOURS)
    return colours[(colours.index(spec.colour) + k) % len(colours)]


def write_tsv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")  # as pandas' to_csv(sep="\t") quotes
        writer.writerow(header)
        writer.writerows(rows)
    return path


def save_pictures(folder: Path, specs: list[Spec]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, spec in enumerate(specs):
        names.append(f"{i:06d}.png")
        (folder / names[-1]).write_bytes(png(spec))
    return names


# ---- the files ------------------------------------------------------------------------------------
MME_SUBTASKS = ("existence", "color", "count", "commonsense_reasoning")


def mme(folder: Path, pictures: int = 4) -> BenchFiles:
    """Two questions per picture (yes, then no), one picture per subtask."""
    rows = []
    for i, spec in enumerate(sample_specs(pictures, SEED)):
        task = MME_SUBTASKS[i % len(MME_SUBTASKS)]
        claims = {"existence": (f"Is there a {spec.shape} in the image?", f"Is there a {SHAPES[(SHAPES.index(spec.shape) + 1) % 4]} in the image?"),
                  "color": (f"Is the {spec.noun} {spec.colour}?", f"Is the {spec.noun} {other_colour(spec)}?"),
                  "count": (f"Are there {spec.count} shapes?", f"Are there {spec.count % 4 + 1} shapes?"),
                  "commonsense_reasoning": (f"Is there a {spec.colour} {spec.shape}?", f"Is there a {other_colour(spec)} {spec.shape}?")}[task]
        image_path = f"{task}/{i:04d}.png"
        first = 2 * i + 1
        for k, (claim, answer) in enumerate(zip(claims, ("Yes", "No"))):
            rows.append([first + k, b64(spec) if k == 0 else str(first), f"{claim} Please answer yes or no.",
                         answer, task, image_path])
    return BenchFiles("mme", write_tsv(folder / "MME.tsv", ["index", "image", "question", "answer", "category", "image_path"], rows))


def pope(folder: Path, per_split: int = 2) -> BenchFiles:
    specs = sample_specs(3 * per_split, SEED + 1)
    names = save_pictures(folder / "val2014", specs)
    root = folder / "output" / "coco"  # as in POPE's repository
    root.mkdir(parents=True)
    for s, split in enumerate(("adversarial", "popular", "random")):
        lines = []
        for j in range(per_split):
            i = s * per_split + j
            spec, present = specs[i], j % 2 == 0
            shape = spec.shape if present else SHAPES[(SHAPES.index(spec.shape) + 1) % 4]
            lines.append({"question_id": j + 1, "image": names[i], "text": f"Is there a {shape} in the image?",
                          "label": "yes" if present else "no"})
        (root / f"coco_pope_{split}.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return BenchFiles("pope", root, [f"benchmark.images={folder / 'val2014'}"])


def colour_question(spec: Spec, k: int) -> tuple[str, list[str], int]:
    """'What colour is the circle?' with 4 colours as options, the right one at position k."""
    options = [other_colour(spec, j) for j in (1, 2, 3)]
    options.insert(k, spec.colour)
    be = "is" if spec.count == 1 else "are"
    return f"What colour {be} the {spec.noun}?", options, k


def mmbench(folder: Path, questions: int = 2) -> BenchFiles:
    """VLMEvalKit's layout: each question, then its rotations at index + k * 1,000,000."""
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split", "image"]
    rows = []
    for k in range(4):
        for i, spec in enumerate(sample_specs(questions, SEED + 2)):
            question, options, right = colour_question(spec, i % 4)
            rotated = options[k:] + options[:k]
            answer = "ABCD"[(right - k) % 4]
            image = b64(spec) if k == 0 else str(i)
            rows.append([i + k * 1_000_000, question, "A picture of shapes." if i == 0 else "", *rotated, answer,
                         "attribute_recognition", "FP-S", "dev", image])
    return BenchFiles("mmbench", write_tsv(folder / "MMBench_DEV_EN.tsv", header, rows))


def _image_struct(spec: Spec, name: str) -> dict:
    return {"bytes": png(spec), "path": name}


def seed_bench(folder: Path, questions: int = 3) -> BenchFiles:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i, spec in enumerate(sample_specs(questions, SEED + 3)):
        question, options, right = colour_question(spec, (i + 1) % 4)
        pictures = [_image_struct(spec, f"{i}.png")] if i else [_image_struct(spec, f"{i}a.png"), _image_struct(spec, f"{i}b.png")]
        rows.append({"question_id": f"{100 + i}", "question": question, **{f"choice_{c}": o for c, o in zip("abcd", options)},
                     "answer": "ABCD"[right], "question_type_id": 1 + i % 2, "data_type": "image", "image": pictures})
    path = folder / "SEED-Bench" / "data" / "test-00000-of-00001.parquet"  # a Hugging Face snapshot
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    return BenchFiles("seed_bench", path.parent.parent)


def scienceqa_img(folder: Path, questions: int = 3) -> BenchFiles:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i, spec in enumerate(sample_specs(questions, SEED + 4)):
        shapes = [spec.shape, SHAPES[(SHAPES.index(spec.shape) + 1) % 4]][:: 1 if i % 2 else -1]
        rows.append({"image": _image_struct(spec, f"{i}.png"), "question": "What shape is in the picture?",
                     "choices": shapes, "answer": shapes.index(spec.shape), "hint": "Look at the picture." if i else "",
                     "subject": "natural science", "category": "Shapes"})
    path = folder / "ScienceQA-IMG-test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return BenchFiles("scienceqa_img", path)


def ten_answers(right: str, wrong: str, humans_right: int) -> list[str]:
    return [right] * humans_right + [wrong] * (10 - humans_right)


def vqav2(folder: Path, questions: int = 3) -> BenchFiles:
    specs = sample_specs(questions, SEED + 5)
    names = save_pictures(folder / "val2014", specs)
    questions_file = folder / "llava_vqav2_mscoco_val.jsonl"
    lines, annotations = [], []
    for i, spec in enumerate(specs):
        qid = 5000 + i
        lines.append({"question_id": qid, "image": names[i], "text": f"What colour {'is' if spec.count == 1 else 'are'} the "
                      f"{spec.noun}?\nAnswer the question using a single word or phrase.", "category": "default"})
        answers = ten_answers(spec.colour, other_colour(spec), (10, 2, 3)[i % 3])
        annotations.append({"question_id": qid, "answer_type": "other", "multiple_choice_answer": spec.colour,
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)]})
    questions_file.write_text("".join(json.dumps(x) + "\n" for x in lines))
    answers = folder / "v2_mscoco_val2014_annotations.json"
    answers.write_text(json.dumps({"info": {}, "annotations": annotations}))
    return BenchFiles("vqav2", questions_file, [f"benchmark.images={folder / 'val2014'}", f"benchmark.answers={answers}"])


def gqa(folder: Path, questions: int = 3) -> BenchFiles:
    specs = sample_specs(questions, SEED + 6)
    names = save_pictures(folder / "gqa_images", specs)
    lines, truth = [], {}
    for i, spec in enumerate(specs):
        qid = f"20{i:05d}"
        lines.append({"question_id": qid, "image": names[i], "text": "What shape is in the picture?"})
        truth[qid] = {"imageId": names[i][:-4], "question": "What shape is in the picture?", "answer": spec.shape,
                      "fullAnswer": f"The shape is a {spec.shape}."}
    questions_file = folder / "llava_gqa_testdev_balanced.jsonl"
    questions_file.write_text("".join(json.dumps(x) + "\n" for x in lines))
    answers = folder / "testdev_balanced_questions.json"
    answers.write_text(json.dumps(truth))
    return BenchFiles("gqa", questions_file, [f"benchmark.images={folder / 'gqa_images'}", f"benchmark.answers={answers}"])


def textvqa(folder: Path, questions: int = 3) -> BenchFiles:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i, spec in enumerate(sample_specs(questions, SEED + 7)):
        rows.append({"image_id": f"t{i}", "question_id": 34602 + i, "question": "How many shapes are there?",
                     "answers": ten_answers(str(spec.count), PLURALS[spec.shape], (10, 4, 1)[i % 3]),
                     "image": _image_struct(spec, f"t{i}.jpg"), "ocr_tokens": []})
    path = folder / "textvqa-validation.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return BenchFiles("textvqa", path)


def mcq(folder: Path, questions: int = 3) -> BenchFiles:
    """`datasets`' save_to_disk layout: data-00000-of-00001.arrow (an Arrow stream) + json files."""
    import pyarrow as pa

    rows = []
    for i, spec in enumerate(sample_specs(questions, SEED + 8)):
        question, options, right = colour_question(spec, i % 4)
        rows.append({"index": i, "question": question, **dict(zip("ABCD", options)), "answer": "ABCD"[right],
                     "category": "colour", "image": _image_struct(spec, f"{i}.png")})
    table = pa.Table.from_pylist(rows)
    root = folder / "mcq_saved"
    root.mkdir()
    with pa.OSFile(str(root / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    (root / "dataset_info.json").write_text("{}")
    (root / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    return BenchFiles("mcq", root)


def vqa(folder: Path, questions: int = 3) -> BenchFiles:
    """Answers as VLMEvalKit writes a list into a cell; the last row shows two pictures."""
    rows = []
    specs = sample_specs(questions + 1, SEED + 9)
    for i, spec in enumerate(specs[:questions]):
        answers = ten_answers(spec.colour, other_colour(spec), 10 if i % 2 == 0 else 1)
        two = i == questions - 1
        image = json.dumps([b64(specs[-1]), b64(spec)]) if two else b64(spec)
        question = f"What colour {'is' if spec.count == 1 else 'are'} the {spec.noun} in the second picture?" if two \
            else f"What colour {'is' if spec.count == 1 else 'are'} the {spec.noun}?"
        rows.append([i, image, question, repr(answers), "colour"])
    return BenchFiles("vqa", write_tsv(folder / "shapes_vqa.tsv", ["index", "image", "question", "answer", "category"], rows))


WRITERS = (mme, pope, mmbench, seed_bench, scienceqa_img, vqav2, gqa, textvqa, mcq, vqa)


def write_all(folder: Path) -> dict[str, BenchFiles]:
    """Every benchmark's files in its own folder under `folder`, by config name."""
    out = {}
    for write in WRITERS:
        (folder / write.__name__).mkdir(parents=True)
        out[write.__name__] = write(folder / write.__name__)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/benchmark_files.py OUT_DIR")
    for files in write_all(Path(sys.argv[1]).resolve()).values():
        print(f"python evaluate.py gpu=cpu {' '.join(files.overrides())}")
