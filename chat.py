"""python chat.py [model=7b] [gpu=0] [ui=web] [chat.prompt=...] ... : chat with MiniGPT-4
(python chat.py --help, docs/CHAT.md)."""

from minigpt4.cli import run


def main(cfg) -> None:
    from minigpt4.config import chat_settings
    from minigpt4.recipes import chat

    chat.run(chat_settings(cfg))


if __name__ == "__main__":
    run("chat", main)
