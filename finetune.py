"""python finetune.py [model=7b gpu=0] [data=cc_sbu_align] [experiment=demo] ... : stage-2 fine-tuning
(see docs/FINETUNE.md)."""

import hydra
from omegaconf import DictConfig

import minigpt4.config  # noqa: F401  (registers the ${asset:} resolver)
from minigpt4.errors import exit_on_user_error


@hydra.main(config_path="conf", config_name="finetune", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from minigpt4.train import run_finetune

    print(run_finetune(cfg))


if __name__ == "__main__":
    main()
