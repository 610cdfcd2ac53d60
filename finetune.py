"""python finetune.py [model=7b gpu=0] [data=cc_sbu_align] [experiment=demo] ... : stage-2 fine-tuning
(python finetune.py --help, docs/FINETUNE.md)."""

from minigpt4.cli import run


def main(cfg) -> None:
    from minigpt4.config import finetune_settings
    from minigpt4.recipes import finetune

    print(finetune.run(finetune_settings(cfg)))


if __name__ == "__main__":
    run("finetune", main)
