"""python evaluate.py [model=7b] [gpu=0] [evaluate.prompts=[a.csv]] ... : batch evaluation (docs/EVALUATE.md)."""

import os

import hydra
from omegaconf import DictConfig

import minigpt4.config  # noqa: F401  (registers the ${asset:} resolver)
from minigpt4.errors import exit_on_user_error


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from minigpt4.evaluation.runner import run_evaluation

    run_dir = run_evaluation(cfg, HydraConfig.get().runtime.output_dir)
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
        print(f"results: {run_dir}")


if __name__ == "__main__":
    main()
