"""python chat.py [model=7b] [gpu=0] [ui=web] ... : chat with MiniGPT-4 (see README)."""

import hydra
from omegaconf import DictConfig

import minigpt4.config  # noqa: F401  (registers the ${asset:} resolver)
from minigpt4.errors import exit_on_user_error


@hydra.main(config_path="conf", config_name="chat", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from minigpt4.chat import run_chat

    run_chat(cfg)


if __name__ == "__main__":
    main()
