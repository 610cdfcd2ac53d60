"""python evaluate.py [model=7b] [gpu=0] [evaluate.prompts=[a.csv]] ... : batch evaluation
(python evaluate.py --help, docs/EVALUATE.md)."""

import os

from minigpt4.cli import run


def main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from minigpt4.config import evaluate_settings
    from minigpt4.recipes import evaluate

    run_dir = evaluate.run(evaluate_settings(cfg), HydraConfig.get().runtime.output_dir)
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
        print(f"results: {run_dir}")


if __name__ == "__main__":
    run("evaluate", main)
