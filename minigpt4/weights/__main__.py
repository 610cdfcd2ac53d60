"""python -m minigpt4.weights {apply-delta, inspect, bundle, export-hf} ...  (docs/WEIGHTS.md)"""

from __future__ import annotations

import argparse
import logging
import sys

from minigpt4.errors import exit_on_user_error

EXAMPLES = """examples:
  python -m minigpt4.weights apply-delta --base llama-7b-hf --delta vicuna-7b-delta-v0 --target vicuna-7b-v0
  python -m minigpt4.weights inspect $MINIGPT4_WEIGHTS/prerained_minigpt4_7b.pth --model 7b
  python -m minigpt4.weights bundle model=7b checkpoint=official_7b --out weights/minigpt4-7b-bundle
  python -m minigpt4.weights export-hf model=7b --out weights/minigpt4-7b-hf
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minigpt4.weights", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("apply-delta", help="Vicuna v0 = LLaMA + delta (FastChat 0.1.10's method, streamed)")
    d.add_argument("--base", required=True, help="LLaMA in Hugging Face format (transformers' converter output)")
    d.add_argument("--delta", required=True, help="the Vicuna delta directory (e.g. vicuna-7b-delta-v0)")
    d.add_argument("--target", required=True, help="new directory for the merged model")
    d.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size (memory holds one)")
    d.add_argument("--force", action="store_true", help="replace a non-empty --target (only once the new one is complete)")
    d.add_argument("--skip-kind-check", action="store_true",
                   help="skip the base-looks-like-a-delta / delta-looks-like-a-model heuristic")

    i = sub.add_parser("inspect", help="say what a weight file or directory is")
    i.add_argument("path")
    i.add_argument("--model", help="also say whether it fits this model config (tiny, 7b, 13b, llama2_7b)")
    i.add_argument("--all-keys", action="store_true", help="list every key pattern")

    for name, helptext, shard in (
        ("bundle", "write a configured model in this project's fast-loading format", 4.0),
        ("export-hf", "write a Vicuna MiniGPT-4 as a transformers Blip2ForConditionalGeneration", 5.0),
    ):
        b = sub.add_parser(name, help=helptext)
        b.add_argument("overrides", nargs="*", help="config overrides as for chat.py, e.g. model=7b gpu=0")
        b.add_argument("--out", required=True, help="output directory (written complete or not at all)")
        b.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                       help="dtype of the LLM and ViT matrices (norms, Q-Former, projection stay fp32)")
        b.add_argument("--max-shard-gb", type=float, default=shard)
        b.add_argument("--allow-random", action="store_true", help="write even if some part has no weight file")
        b.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "apply-delta":
        from minigpt4.checkpoints import GB
        from minigpt4.weights.delta import apply_delta

        apply_delta(args.base, args.delta, args.target, int(args.max_shard_gb * GB), args.force,
                    check_kind=not args.skip_kind_check)
        print(f"wrote {args.target}; check it with: python -m minigpt4.weights inspect {args.target} --model 7b")
    elif args.command == "inspect":
        from minigpt4.weights.identify import inspect_path

        report = inspect_path(args.path, args.model, key_limit=10_000 if args.all_keys else 40)
        print(report.text())
        return 0 if report.fits in (None, True) else 1
    else:
        from minigpt4.weights.bundle import bundle
        from minigpt4.weights.export import export_hf

        write = bundle if args.command == "bundle" else export_hf
        out = write(args.overrides, args.out, args.dtype, args.max_shard_gb, args.allow_random, args.force)
        if args.command == "bundle":
            print(f"wrote {out}; use it with: python chat.py checkpoint=bundle checkpoint.bundle={out}")
        else:
            print(f"wrote {out}; load it with Blip2ForConditionalGeneration.from_pretrained('{out}') (docs/WEIGHTS.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
