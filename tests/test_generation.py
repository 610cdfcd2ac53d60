"""generation.py: the decode loop against transformers, stop strings, streaming, cache reuse,
seeding, beams. Tiny random model on CPU; a scripted 'model' where exact text matters."""

from __future__ import annotations

import torch
import pytest

from minigpt4.generation import GenerationSettings, StreamState, generate, sampling_filter

GREEDY = GenerationSettings(do_sample=False, max_new_tokens=6)


def _prompt(loaded, text: str) -> list[int]:
    return loaded.tokenizer.encode(text, bos=True)


def test_greedy_loop_matches_transformers_generate(tiny_loaded):
    """Our prefill + decode_step loop produces the tokens stock HF generate does."""
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    ids = _prompt(tiny_loaded, "Human: what colour is it?###Assistant:")
    n = 8
    ours = generate(model, tok, [ids], None, GenerationSettings(do_sample=False, max_new_tokens=n, min_new_tokens=n),
                    stops=())[0]
    with torch.inference_mode():
        embeds = model.embed(torch.tensor([ids]))
        theirs = model.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                    eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    assert ours.n_steps == n and ours.finish_reason == "length"
    assert ours.ids == theirs[0].tolist()


def test_one_decoder_step_per_fed_token(tiny_loaded):
    """The loop calls decoder.step once per fed token, at consecutive positions."""
    from minigpt4.decoding import DynamicDecoder

    calls = []

    class Counting(DynamicDecoder):
        def step(self, tokens, positions):
            calls.append(tuple(positions.flatten().tolist()))
            return super().step(tokens, positions)

    ids = _prompt(tiny_loaded, "Hello there")
    out = generate(tiny_loaded.model, tiny_loaded.tokenizer, [ids], None,
                   GenerationSettings(do_sample=False, max_new_tokens=5, min_new_tokens=5), stops=(),
                   decoder=Counting(tiny_loaded.model.llm, 1))[0]
    assert out.n_steps == 5
    assert calls == [(len(ids) + i,) for i in range(4)]  # the last sampled token is never fed


def test_batched_left_padding_equals_single_rows(tiny_loaded):
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    rows = [_prompt(tiny_loaded, "a red circle"), _prompt(tiny_loaded, "Human: how many squares are there?###")]
    settings = GenerationSettings(do_sample=False, max_new_tokens=5, min_new_tokens=5)
    batched = generate(model, tok, rows, None, settings, stops=())
    single = [generate(model, tok, [r], None, settings, stops=())[0] for r in rows]
    assert [b.ids for b in batched] == [s.ids for s in single]


def test_cache_reuse_computes_only_the_new_positions(tiny_loaded):
    """A decoder holding a prefix gives the same greedy tokens while prefilling only the rest."""
    from minigpt4.decoding import DynamicDecoder

    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    first = _prompt(tiny_loaded, "Human: hello###Assistant:")
    settings = GenerationSettings(do_sample=False, max_new_tokens=4, min_new_tokens=4)
    decoder = DynamicDecoder(model.llm, 1)
    generate(model, tok, [first], None, settings, stops=(), decoder=decoder)
    assert decoder.length == len(first) + 3
    decoder.crop(len(first))  # keep exactly the first prompt
    longer = first + tok.encode(" fine, thanks###Human: and you?###Assistant:")
    reused = generate(model, tok, [longer], None, settings, stops=(), decoder=decoder, cache_length=len(first))[0]
    fresh = generate(model, tok, [longer], None, settings, stops=())[0]
    assert reused.ids == fresh.ids
    assert reused.prefilled == len(longer) - len(first) and fresh.prefilled == len(longer)


class _Script:
    """A Decoder whose logits force a fixed token sequence."""

    batch_size, length = 1, 0

    def __init__(self, tokens: list[int], vocab: int):
        self.tokens, self.vocab, self.i = tokens, vocab, 0

    def _next(self) -> torch.Tensor:
        logits = torch.zeros(1, self.vocab)
        logits[0, self.tokens[min(self.i, len(self.tokens) - 1)]] = 10.0
        self.i += 1
        return logits

    def prefill(self, embeds, positions, pad_mask, start=0):
        return self._next()

    def step(self, tokens, positions):
        return self._next()

    def crop(self, n):
        pass


def test_stop_string_ends_the_answer_and_streams_only_final_text(tiny_loaded):
    tok = tiny_loaded.tokenizer
    script = _Script(tok.encode("Three red circles.###Human: more") + [tok.eos_id], tiny_loaded.model.llm.config.vocab_size)
    streamed = []
    out = generate(tiny_loaded.model, tok, [[tok.bos_id]], None, GenerationSettings(do_sample=False, max_new_tokens=50),
                   on_text=lambda row, delta: streamed.append(delta), decoder=script)[0]
    assert out.finish_reason == "stop"
    assert out.text == "Three red circles."
    assert "".join(streamed) == "Three red circles."
    assert not any("#" in d for d in streamed)  # a partial '###' is held back, never shown


def test_eos_and_min_new_tokens(tiny_loaded):
    tok = tiny_loaded.tokenizer
    vocab = tiny_loaded.model.llm.config.vocab_size
    out = generate(tiny_loaded.model, tok, [[tok.bos_id]], None, GenerationSettings(do_sample=False, min_new_tokens=0),
                   decoder=_Script([tok.eos_id], vocab))[0]
    assert out.finish_reason == "eos" and out.ids == [] and out.n_steps == 1
    script = _Script([tok.eos_id] * 100, vocab)  # EOS is masked out for the first 3 steps
    out = generate(tiny_loaded.model, tok, [[tok.bos_id]], None,
                   GenerationSettings(do_sample=False, min_new_tokens=3, max_new_tokens=10), decoder=script)[0]
    assert out.finish_reason == "eos" and len(out.ids) == 3


def test_stream_state_holds_back_partial_stop():
    class Tok:
        def encode(self, text):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    state = StreamState(Tok(), ("###",))
    assert state.step([ord("a")]) == ("a", False, "a")
    assert state.step([ord("a"), ord("#")]) == ("a#", False, "")
    assert state.step([ord("a"), ord("#"), ord("b")]) == ("a#b", False, "#b")
    assert state.step([ord(c) for c in "a#b###x"]) == ("a#b", True, "")


def test_seeded_sampling_is_reproducible(tiny_loaded):
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    ids = _prompt(tiny_loaded, "Human: tell me a story###Assistant:")
    settings = GenerationSettings(do_sample=True, temperature=1.0, top_p=0.9, max_new_tokens=12, min_new_tokens=12)

    def run(seed):
        return generate(model, tok, [ids], None, settings, stops=(), generator=torch.Generator().manual_seed(seed))[0].ids

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_beam_search_goes_through_transformers(tiny_loaded):
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    ids = _prompt(tiny_loaded, "Human: what shape?###Assistant:")
    beams = GenerationSettings(do_sample=False, num_beams=3, max_new_tokens=5, min_new_tokens=5)
    out = generate(model, tok, [ids, ids[:4]], None, beams, stops=())
    assert len(out) == 2 and all(o.n_steps == 5 and len(o.ids) == 5 for o in out)
    # a beam search's best sequence scores at least as well as the greedy one
    greedy = generate(model, tok, [ids], None, GenerationSettings(do_sample=False, max_new_tokens=5, min_new_tokens=5),
                      stops=())[0]

    def logprob(new):
        with torch.inference_mode():
            logits = model.llm(input_ids=torch.tensor([ids + new])).logits[0].float().log_softmax(-1)
        return sum(logits[len(ids) - 1 + i, t].item() for i, t in enumerate(new))

    assert logprob(out[0].ids) >= logprob(greedy.ids) - 1e-4


def test_incremental_stream_text_equals_decoding_everything(tiny_loaded):
    """Streaming decodes a window per step; at every step the text must be what decoding all
    tokens gives (waiting while a character is incomplete), deltas must add up to the final
    text, and stop strings must be found across token boundaries."""
    import random

    tok = tiny_loaded.tokenizer
    texts = ["The red circle is left of the blue square.### Human: next", "naïve café: 日本語 ok ##", "a#b## #x###y"]
    sequences = [tok.encode(t) for t in texts]
    rng = random.Random(0)
    sequences += [[rng.randrange(tok.vocab_size + 3) for _ in range(80)] for _ in range(60)]  # byte pieces, ids past the vocabulary
    for ids in sequences:
        state, shown = StreamState(tok, ("###",)), []
        for n in range(1, len(ids) + 1):
            text, stopped, delta = state.step(ids[:n])
            shown.append(delta)
            full = tok.decode(ids[:n])
            cut = full.find("###")
            assert stopped == (cut >= 0)
            expected = full[:cut] if stopped else full
            assert expected.startswith(text)
            if not full.endswith("\ufffd"):  # no character pending: nothing held back
                assert text == expected
            if stopped:
                break
        final, stopped_at_end = state.finish(ids[:n])
        assert final == expected and stopped_at_end == stopped
        assert final.startswith("".join(shown))


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 50, 0.9), (0.7, 0, 0.8), (1.3, 5, 1.0), (1.0, 0, 1.0)])
def test_sampling_filters_equal_transformers_warpers(temperature, top_k, top_p):
    """Fixed logits, the same seeded generator: our filters sample exactly the ids that
    transformers' temperature -> top-k -> top-p warpers (its order) give."""
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    from minigpt4.generation import next_tokens

    torch.manual_seed(0)
    logits = torch.randn(6, 1000) * 3
    warpers = LogitsProcessorList(
        ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
        + ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))
    settings = GenerationSettings(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, min_new_tokens=0)
    theirs_gen, ours_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(20):
        probs = warpers(None, logits.clone()).softmax(-1)
        theirs = torch.multinomial(probs, 1, generator=theirs_gen).squeeze(1)
        ours = next_tokens(logits.clone(), settings, torch.zeros(6, 0, dtype=torch.long), 5, -1, ours_gen)
        assert ours.tolist() == theirs.tolist()
    kept = (sampling_filter(logits, temperature, top_k, top_p) > float("-inf")).sum(-1)
    assert (kept <= (top_k or 1000)).all() and (kept >= 1).all()
