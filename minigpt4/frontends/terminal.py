"""The terminal front-end of chat.py: lines from stdin, answers streamed to stdout.

Works the same whether stdin is a terminal or a pipe (`printf 'Hello\\n/quit\\n' | python chat.py`):
answers go to stdout, everything else (prompts, notices, errors, tokens/s) to stderr, so a
piped session's stdout holds only the answers, one per line.
"""

from __future__ import annotations

import io
import shlex
import sys
from typing import TextIO

from minigpt4.chat import ChatSession
from minigpt4.errors import UserError

HELP = """commands:
  /image PATH [PATH ...]  attach images to your next message (encoded once, now)
  /reset                  start a new conversation
  /save FILE              save the conversation as JSON (with image paths)
  /load FILE              continue a saved conversation
  /help                   show this help
  /quit                   leave (end of input, Ctrl-D, does too)
anything else is a message to the model."""


def run_terminal(
    session: ChatSession,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    show_stats: bool = True,
) -> None:
    """Read lines until /quit or end of input; a bad command or image is a one-line error."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    _replace_undecodable(stdin)
    interactive = stdin.isatty()
    if interactive:
        print("Type a message, /image PATH to show a picture, /help for commands.", file=stderr)
    while True:
        line = _read_line(stdin, stderr, interactive)
        if line is None:
            break
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                if _command(session, line, stderr) == "quit":
                    break
                continue
            if interactive:
                stdout.write("Assistant: ")

            def show(delta: str) -> None:
                stdout.write(delta)
                stdout.flush()

            reply = session.ask(line, on_text=show)
            stdout.write("\n")
            stdout.flush()
            if show_stats:
                print(reply.summary(), file=stderr, flush=True)
        except UserError as err:
            print(f"error: {err}", file=stderr, flush=True)
        except KeyboardInterrupt:
            if not interactive:
                raise
            stdout.write("\n")
            print("(interrupted: the unfinished answer was dropped)", file=stderr, flush=True)


def _replace_undecodable(stdin: TextIO) -> None:
    """Bytes that are not valid in stdin's encoding (a Latin-1 file piped in, a mis-set terminal)
    become U+FFFD: strict decoding would end the chat, surrogateescape (Python's choice under the
    C locale) would hand lone surrogates to the tokenizer. input() decodes with these settings too."""
    if isinstance(stdin, io.TextIOWrapper) and stdin.errors != "replace":
        stdin.reconfigure(errors="replace")


def _read_line(stdin: TextIO, stderr: TextIO, interactive: bool) -> str | None:
    """The next line, or None at end of input (and on Ctrl-C/Ctrl-D at the prompt)."""
    try:
        if interactive and stdin is sys.stdin:
            return input("You: ")  # line editing through readline
        line = stdin.readline()
        return line if line else None
    except (EOFError, KeyboardInterrupt):
        print(file=stderr)
        return None


def _command(session: ChatSession, line: str, stderr: TextIO) -> str | None:
    try:
        words = shlex.split(line)
    except ValueError as err:
        raise UserError(f"cannot parse {line!r}: {err}") from None
    name, args = words[0].lower(), words[1:]
    if name in ("/quit", "/exit"):
        return "quit"
    if name == "/help":
        print(HELP, file=stderr)
    elif name == "/reset":
        session.reset()
        print("(new conversation)", file=stderr)
    elif name == "/image":
        if not args:
            raise UserError("/image needs at least one path: /image PATH [PATH ...]")
        session.add_images(args)
        print(f"(attached {len(args)} image(s) to your next message)", file=stderr)
    elif name in ("/save", "/load"):
        if len(args) != 1:
            raise UserError(f"{name} needs one file name: {name} FILE")
        if name == "/save":
            session.save(args[0])
            print(f"(saved to {args[0]})", file=stderr)
        else:
            session.load(args[0])
            print(f"(loaded {args[0]}: {len(session.history())} messages)", file=stderr)
    else:
        raise UserError(f"unknown command {name}: /help lists the commands")
    stderr.flush()
    return None
