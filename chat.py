"""python chat.py [model=7b] [gpu=0] [ui=web] [chat.prompt=...] ... : chat with MiniGPT-4
(python chat.py --help, docs/CHAT.md)."""

from minigpt4.cli import run


def main(cfg) -> None:
    from minigpt4.chat import run_chat

    run_chat(cfg)


if __name__ == "__main__":
    run("chat", main)
