"""Train the tiny model's sentencepiece tokenizer (Llama-style: byte fallback, unk 0, bos 1, eos 2).

    python -m minigpt4.data.tokenizer_corpus  # rewrites minigpt4/assets/tiny_tokenizer.model

The corpus is the prompt templates plus every text the demo data generator can produce, so
the demo model's vocabulary covers its world; anything else falls back to bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import sentencepiece as spm

from minigpt4.config import ASSETS
from minigpt4.conversation import (
    OFFICIAL_SYSTEM,
    STAGE2_INSTRUCTIONS,
    TEMPLATES,
    TEXT_ONLY_SYSTEM,
    USER,
    ImagePart,
    Message,
    TextPart,
    render_message,
)

VOCAB_SIZE = 1024


def corpus_lines() -> list[str]:
    lines = [OFFICIAL_SYSTEM, TEXT_ONLY_SYSTEM]
    lines += [render_message(Message(USER, (ImagePart(None), TextPart(i)))) for i in STAGE2_INSTRUCTIONS]
    for t in TEMPLATES.values():
        lines.append(t.sep.join([t.roles[0] + "Hello", t.roles[1] + "Hi there"]) + t.sep)
    try:  # the demo data generator, when present, contributes all of its texts
        from minigpt4.data.dialogues import tokenizer_texts

        lines.extend(tokenizer_texts())
    except ImportError:
        pass
    return lines


def train(out: Path = ASSETS / "tiny_tokenizer.model", vocab_size: int = VOCAB_SIZE) -> Path:
    model = io.BytesIO()
    # lines come from an iterator, so the model records no temp path: the same bytes every run
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines() * 3),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return out


if __name__ == "__main__":
    print(train())
