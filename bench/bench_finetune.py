"""Fine-tuning throughput: 7B shape (random fp16 weights), projection-only, batch 12, with the
official stage-2 data layout and prompts (a cc_sbu_align folder of synthetic 224px PNG pictures
whose captions are about as long as the real ones, ~100 tokens); samples/s and peak GPU memory,
with and without the image-feature cache. Runs the real `run_finetune` (Lightning, 16-mixed).

    python bench/bench_finetune.py            # on a GPU (goal: >= 60 samples/s on an H100)
    python bench/bench_finetune.py --tiny     # CPU smoke test of the same path on model=tiny
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from minigpt4.config import compose, finetune_settings  # noqa: E402
from minigpt4.data import synthetic  # noqa: E402
from minigpt4.recipes.finetune import run as run_finetune  # noqa: E402


def make_cc_sbu_align(root: Path, pictures: int, caption_words: int) -> Path:
    """A cc_sbu_align folder: image/{id}.png + filter_cap.json with long synthetic captions."""
    (root / "image").mkdir(parents=True)
    specs = synthetic.sample_specs(pictures + 8, seed=5)
    annotations = []
    for i, spec in enumerate(specs[:pictures]):
        synthetic.make_picture(spec).save(root / "image" / f"{i}.png")
        words: list[str] = []
        for other in [spec, *specs[i + 1 :]]:  # vary the sentences until the caption is long enough
            words += synthetic.describe(other).split()
            if len(words) >= caption_words:
                break
        annotations.append({"image_id": str(i), "caption": " ".join(words[:caption_words])})
    (root / "filter_cap.json").write_text(json.dumps({"annotations": annotations}))
    return root


def bench(cache: bool, args, data_dir: Path, out_dir: Path) -> dict:
    model = ["model=tiny", "gpu=cpu"] if args.tiny else ["model=7b", "gpu=0"]
    overrides = [*model, "checkpoint=random", "data=cc_sbu_align", f"data.path={data_dir}",
                 f"trainer.batch_size={args.batch}", "trainer.max_epochs=1",
                 f"trainer.iters_per_epoch={args.steps}", f"trainer.num_workers={args.workers}",
                 "trainer.log_every_n_steps=1", "trainer.progress_bar=false", f"cache_features={str(cache).lower()}",
                 f"output_dir={out_dir}"]
    cfg = finetune_settings(compose("finetune", overrides))
    start = time.perf_counter()
    run_dir = run_finetune(cfg)
    total = time.perf_counter() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    rates = pd.read_csv(run_dir / "metrics.csv")["samples_per_s"].dropna().tolist()
    steady = rates[args.warmup:] or rates
    return {
        "cache_features": cache,
        "samples_per_s": round(statistics.median(steady), 1),
        "steps": summary["global_step"],
        "peak_memory_gb": summary["peak_memory_gb"],
        "prepare_s": summary["prepare_seconds"],  # includes building the feature cache
        "fit_s": summary["fit_seconds"],
        "total_s": round(total, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="model=tiny on CPU (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 40; 6 with --tiny)")
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--pictures", type=int, default=None, help="pictures in the data set (default: steps x batch)")
    parser.add_argument("--caption-words", type=int, default=80, help="caption length (real ones: ~50-100 words)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    args.steps = args.steps or (6 if args.tiny else 40)
    args.workers = args.workers if args.workers is not None else (0 if args.tiny else 6)
    args.pictures = args.pictures or args.steps * args.batch
    if args.tiny:
        args.warmup = 1
    elif not torch.cuda.is_available():
        sys.exit("no CUDA GPU: use --tiny for the CPU smoke test")
    device = "cpu" if args.tiny else torch.cuda.get_device_name(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = make_cc_sbu_align(Path(tmp) / "cc_sbu_align", args.pictures, args.caption_words)
        for cache in (False, True):
            results.append(bench(cache, args, data_dir, Path(tmp) / f"cache_{cache}"))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    report = {"model": "tiny" if args.tiny else "7b (random fp16)", "device": device, "batch": args.batch,
              "caption_words": args.caption_words, "pictures": args.pictures,
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "results": results}
    print(json.dumps(report, indent=2))
    for r in results:
        print(f"cache_features={r['cache_features']!s:5}  {r['samples_per_s']:7.1f} samples/s  "
              f"peak {r['peak_memory_gb']} GB  (prepare {r['prepare_s']}s, fit {r['fit_s']}s)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
