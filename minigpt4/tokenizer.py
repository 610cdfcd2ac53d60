"""The LLM tokenizer, as the official code used it: sentencepiece, segment by segment.

The official code called transformers' slow (sentencepiece) LlamaTokenizer. transformers 5's
Llama tokenizer is the Rust one, which tokenizes strings that start with whitespace
differently. We call sentencepiece directly, so every prompt segment gets the official ids by
construction. Like the slow tokenizer, literal "<s>", "</s>" and "<unk>" in a text become their
special ids (the LLaMA-2 template writes "<s>[INST]" into the prompt text).
"""

from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm

from minigpt4.errors import UserError

# Lone surrogates (undecodable bytes kept by Python's surrogateescape, or a "\ud800" escape in
# JSON from the web page) cannot be passed to sentencepiece: they become U+FFFD, as bad UTF-8 does.
_SURROGATES = re.compile("[\ud800-\udfff]")


class Tokenizer:
    def __init__(self, model_file: str | Path):
        path = Path(model_file)
        if not path.is_file():
            raise UserError(f"tokenizer {path}: no such file (an LLM directory needs its tokenizer.model)")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as err:
            raise UserError(f"tokenizer {path}: not a sentencepiece model ({err})") from None
        self.path = path
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id = max(self.unk_id, 0)
        self._specials = {
            self.sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id, self.unk_id) if i >= 0
        }
        pattern = "|".join(re.escape(s) for s in sorted(self._specials, key=len, reverse=True))
        self._special_re = re.compile(f"({pattern})") if pattern else None

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        return cls(Path(directory) / "tokenizer.model")

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Token ids of one segment; BOS first if asked (the official code's add_special_tokens)."""
        ids = [self.bos_id] if bos else []
        if not text:
            return ids
        text = _SURROGATES.sub("\ufffd", text)
        chunks = self._special_re.split(text) if self._special_re else [text]
        for chunk in chunks:
            if chunk in self._specials:
                ids.append(self._specials[chunk])
            elif chunk:
                ids.extend(self.sp.encode(chunk))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids; special ids and ids past the vocabulary (Vicuna v0 has 32001
        embedding rows for 32000 pieces) are dropped."""
        keep = [i for i in ids if 0 <= i < self.vocab_size and i not in (self.bos_id, self.eos_id)]
        return self.sp.decode(keep)


def sentencepiece_pieces(file: Path) -> int | None:
    """The number of pieces of a sentencepiece model file; None if `file` is not one."""
    if not file.is_file():
        return None
    try:
        return spm.SentencePieceProcessor(model_file=str(file)).get_piece_size()
    except (RuntimeError, OSError):
        return None
