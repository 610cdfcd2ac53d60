"""The static-cache decoder (CUDA graphs on a GPU, the same cache logic eagerly on CPU) must give
exactly what the eager DynamicCache path gives: batches with left padding, and chat turns that
rewind to a shared prefix."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny_models import build_tiny
from transformers import LlamaConfig, LlamaForCausalLM

from minigpt4.chat import ChatSession
from minigpt4.conversation import encode_prompt
from minigpt4.decoding import StaticDecoder
from minigpt4.data.synthetic import make_picture, sample_specs
from minigpt4.generation import GenerationSettings, generate


def batch_of_prompts(loaded) -> list[list[int]]:
    """Two one-image questions and a shorter text-only one (left-padded in a batch)."""
    tok, n = loaded.tokenizer, loaded.model.num_image_tokens
    prompts = []
    for i, question in enumerate(["What colour are the shapes?", "How many shapes are there?"]):
        conv = loaded.conversation()
        conv.add_image(i)
        conv.ask(question)
        prompts.append(encode_prompt(tok.encode, conv.prompt(), n))
    text_only = loaded.conversation()
    text_only.ask("Hello! What can you do for me today?")
    prompts.append(encode_prompt(tok.encode, text_only.prompt(), n))
    return prompts


def test_static_generate_equals_dynamic_with_left_padding():
    loaded = build_tiny(["checkpoint=demo"])
    pictures = [make_picture(s, size=loaded.image_size) for s in sample_specs(2, seed=11)]
    prompts, embeds = batch_of_prompts(loaded), loaded.encode_images(pictures)
    greedy = GenerationSettings(do_sample=False, max_new_tokens=20)
    dynamic = generate(loaded.model, loaded.tokenizer, prompts, embeds, replace(greedy, cache="dynamic"))
    static = generate(loaded.model, loaded.tokenizer, prompts, embeds, replace(greedy, cache="static"))
    assert [r.ids for r in static] == [r.ids for r in dynamic]
    assert all(r.text for r in static)


def test_static_chat_session_reuses_prefix_and_matches_dynamic():
    loaded = build_tiny(["checkpoint=demo"])
    picture = make_picture(sample_specs(1, seed=5)[0], size=loaded.image_size)
    answers = {}
    for engine in ("dynamic", "static"):
        session = ChatSession(loaded, GenerationSettings(do_sample=False, max_new_tokens=16, cache=engine))
        session.add_images([picture])
        replies = [session.ask(q) for q in ("What colour are the shapes?", "How many shapes are there?", "Thanks!")]
        # regenerate rewinds the cache into the last turn: crop() runs outside inference mode
        replies.append(session.regenerate())
        answers[engine] = [r.text for r in replies]
        if engine == "static":
            assert isinstance(session._decoder, StaticDecoder)
            assert replies[1].reused > 0 and replies[2].reused > replies[1].reused
    assert answers["static"] == answers["dynamic"]
    assert answers["static"][0]  # a real answer, not an empty string
    assert answers["static"][3] == answers["static"][2]  # greedy: the same answer again


def test_reserved_image_marker_in_a_message_is_a_clear_error():
    from minigpt4.errors import UserError

    loaded = build_tiny(["checkpoint=demo"])
    session = ChatSession(loaded, GenerationSettings(do_sample=False, max_new_tokens=4, cache="dynamic"))
    with pytest.raises(UserError, match="ImageHere"):
        session.ask("what is <ImageHere> about?")
    assert session.ask("Hello!").text  # the session goes on


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graphs_match_eager_on_the_gpu(compile):
    """On CUDA: graphed prefill (batch 1, padded to a bucket) and graphed decode steps, with and
    without torch.compile, give the eager DynamicCache answers: chat turns, a regenerate (the
    cache rewinds into a turn), a reset, and a left-padded batch."""
    loaded = build_tiny(["checkpoint=demo", "gpu=0"])
    pictures = [make_picture(s, size=loaded.image_size) for s in sample_specs(2, seed=5)]
    questions = ("What colour are the shapes?", "How many shapes are there?", "Thanks!")
    answers = {}
    for engine in ("dynamic", "static"):
        settings = GenerationSettings(do_sample=False, max_new_tokens=16, cache=engine, compile=compile)
        session = ChatSession(loaded, settings)
        texts = []
        for picture in pictures:
            session.add_images([picture])
            texts += [session.ask(q).text for q in questions] + [session.regenerate().text]
            session.reset()
        answers[engine] = texts
        if engine == "static":
            assert session._decoder is None or isinstance(session._decoder, StaticDecoder)
    assert answers["static"] == answers["dynamic"]
    assert all(answers["static"][:3])

    prompts, embeds = batch_of_prompts(loaded), loaded.encode_images(pictures)
    greedy = GenerationSettings(do_sample=False, max_new_tokens=20, compile=compile)
    batch = {engine: [r.ids for r in generate(loaded.model, loaded.tokenizer, prompts, embeds, replace(greedy, cache=engine))]
             for engine in ("dynamic", "static")}
    assert batch["static"] == batch["dynamic"]



def test_padded_prefill_equals_plain_prefill():
    """Batch-1 prefills are padded to a bucket (CUDA replays a graph per bucket): the logits, the
    cache and the tokens decoded next must be those of the unpadded prefill, also for a turn
    that starts after a cached prefix."""
    loaded = build_tiny(["checkpoint=demo"])
    llm, hidden = loaded.model.llm, loaded.model.llm.config.hidden_size
    torch.manual_seed(3)
    first, second = torch.randn(1, 37, hidden) * 0.02, torch.randn(1, 70, hidden) * 0.02
    runs = []
    for padded in (False, True):
        dec = StaticDecoder(llm, 1, 256)
        dec.pad_prefill = padded
        ones = lambda e: torch.ones(1, e.shape[1], dtype=torch.long)  # noqa: E731
        logits = [dec.prefill(first, torch.arange(37)[None], ones(first)).clone()]
        logits.append(dec.step(logits[-1].argmax(-1), torch.tensor([37])).clone())
        logits.append(dec.prefill(second, torch.arange(38, 108)[None], ones(second), start=38).clone())
        tokens = []
        for i in range(5):
            tokens.append(int(logits[-1].argmax(-1)))
            logits.append(dec.step(torch.tensor(tokens[-1:]), torch.tensor([108 + i])).clone())
        runs.append((logits, tokens, dec.length))
    (plain, plain_tokens, plain_len), (padded_logits, padded_tokens, padded_len) = runs
    assert plain_tokens == padded_tokens and plain_len == padded_len == 113
    for a, b in zip(plain, padded_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("padded,gpu", [(False, False), (True, False), pytest.param(True, True, marks=pytest.mark.gpu)])
def test_a_growing_cache_decodes_as_one_allocated_whole(padded, gpu):
    """A cache that starts small (chat's) grows when a prefill or a step needs more slots, keeping
    what it held: logits, tokens and length equal those of a cache allocated whole (on the GPU:
    its graphs, made for the old cache, captured again)."""
    loaded = build_tiny(["checkpoint=demo"] + (["gpu=0"] if gpu else []))
    llm, hidden = loaded.model.llm, loaded.model.llm.config.hidden_size
    torch.manual_seed(3)
    device = llm.device
    first, second = (torch.randn(1, n, hidden, device=device, dtype=llm.dtype) * 0.02 for n in (37, 20))
    ones = lambda e: torch.ones(1, e.shape[1], dtype=torch.long, device=device)  # noqa: E731
    at = lambda *p: torch.tensor(p, device=device)  # noqa: E731
    runs = []
    for start_len in (None, 40, 100):
        dec = StaticDecoder(llm, 1, 256, start_len=start_len)
        dec.pad_prefill = padded
        logits = [dec.prefill(first, torch.arange(37, device=device)[None], ones(first)).clone()]
        sizes = [dec.max_len]
        for i in range(6):  # past 40 slots: the step grows a cache of 40 (unpadded)
            logits.append(dec.step(logits[-1].argmax(-1), at(37 + i)).clone())
            sizes.append(dec.max_len)
        positions = torch.arange(43, 63, device=device)[None]
        logits.append(dec.prefill(second, positions, ones(second), start=43).clone())  # 100: grows when padded (128)
        for i in range(3):
            logits.append(dec.step(logits[-1].argmax(-1), at(63 + i)).clone())
        runs.append((logits, dec.length, sizes))
    whole, whole_len, _ = runs[0]
    for grown, grown_len, sizes in runs[1:]:
        assert whole_len == grown_len == 66
        for a, b in zip(whole, grown):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert runs[1][2][0] == (256 if padded else 40)  # a padded prefill (64 slots) grows 40 at once
    with pytest.raises(ValueError, match="do not fit the static cache of 256"):
        StaticDecoder(llm, 1, 256, start_len=40).prefill(torch.zeros(1, 257, hidden, device=device, dtype=llm.dtype),
                                                          torch.arange(257, device=device)[None], ones(torch.zeros(1, 257)))


def test_chat_s_decoder_starts_small_and_is_reused_at_its_ceiling():
    from minigpt4.decoding import GROWABLE_START, make_decoder

    llm = build_tiny(["checkpoint=demo"]).model.llm
    dec = make_decoder(llm, 1, 2001, static=True, grow=True)
    assert (dec.max_len, dec.limit) == (GROWABLE_START, 2048)
    assert make_decoder(llm, 1, 2001, static=True, grow=True, reuse=dec) is dec
    assert make_decoder(llm, 1, 2001, static=True).max_len == 2048  # evaluation: the size it asked for


@pytest.mark.gpu
def test_failing_compile_falls_back_to_the_plain_graph(monkeypatch, caplog):
    import minigpt4.decoding.static as static

    def broken(*args, **kwargs):
        raise RuntimeError("no Triton here")

    monkeypatch.setattr(static, "_compiled", lambda forward, mode: broken)
    loaded = build_tiny(["checkpoint=demo", "gpu=0"])
    settings = GenerationSettings(do_sample=False, max_new_tokens=8)
    session = ChatSession(loaded, replace(settings, cache="static", compile=True))
    reference = ChatSession(loaded, replace(settings, cache="dynamic"))
    assert session.ask("Hello!").text == reference.ask("Hello!").text
    assert "generation.compile=True failed here (RuntimeError: no Triton here)" in caplog.text


def test_padded_prefill_of_a_left_padded_row_equals_plain_prefill():
    """A batch-1 prefill that carries left padding (an engine batching requests makes them):
    padded to a bucket, its rows keep their own position ids (0 after the padding). The H200
    run of 2026-12-01 gave 0.016 teacher-forced agreement here: the bucket's positions were
    counted from the first padding slot."""
    loaded = build_tiny(["checkpoint=demo"])
    llm, hidden = loaded.model.llm, loaded.model.llm.config.hidden_size
    torch.manual_seed(4)
    embeds = torch.randn(1, 40, hidden) * 0.02
    mask = torch.ones(1, 40, dtype=torch.long)
    mask[:, :9] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    runs = []
    for padded in (False, True):
        dec = StaticDecoder(llm, 1, 256)
        dec.pad_prefill = padded
        logits = [dec.prefill(embeds, positions, mask).clone()]
        for i in range(4):
            logits.append(dec.step(logits[-1].argmax(-1), torch.tensor([31 + i])).clone())
        runs.append(logits)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_step_equals_transformers_step():
    """The fused decode step (q/k/v and gate/up fused, attention over a length bucket) gives
    transformers' logits, on the CPU reference ops; the model's own forward still works after
    its weights became views of the fused matrices."""
    loaded = build_tiny(["checkpoint=demo"])
    llm, hidden = loaded.model.llm, loaded.model.llm.config.hidden_size
    torch.manual_seed(6)
    embeds = torch.randn(2, 30, hidden) * 0.02
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :7] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    before = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    runs = []
    for use_fused in (False, True):
        dec = StaticDecoder(llm, 2, 300, use_fused=use_fused)
        logits = [dec.prefill(embeds, positions, mask).clone()]
        for i in range(5):
            logits.append(dec.step(logits[-1].argmax(-1), positions[:, -1] + 1 + i).clone())
        runs.append(logits)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    after = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(before, after)
    q = llm.model.layers[0].self_attn.q_proj.weight
    assert q.data_ptr() == llm.__dict__["_minigpt4_fused"].layers[0].qkv.data_ptr()  # a view, no copy


def test_stepping_the_first_rows_leaves_the_others_alone():
    """step_rows over the first R of B rows (a serving engine with few rows in use) gives those rows
    the logits a step over all B rows gives them, and writes nothing into rows R..B-1."""
    loaded = build_tiny(["checkpoint=demo"])
    llm, hidden = loaded.model.llm, loaded.model.llm.config.hidden_size
    torch.manual_seed(7)
    embeds = torch.randn(4, 12, hidden) * 0.02
    mask = torch.ones(4, 12, dtype=torch.long)
    positions = torch.arange(12).expand(4, 12)
    full, part = StaticDecoder(llm, 4, 64), StaticDecoder(llm, 4, 64)
    for dec in (full, part):
        dec.prefill(embeds, positions, mask)
    tokens, pos = torch.tensor([5, 6, 7, 8]), torch.full((4,), 12)
    slots = torch.full((4,), 12)
    want = full.step_rows(tokens, pos, slots, longest=13).clone()
    untouched = [(layer.keys[2:].clone(), layer.values[2:].clone()) for layer in part.cache.layers]
    got = part.step_rows(tokens[:2], pos[:2], slots[:2], longest=13)
    assert got.shape[0] == 2
    torch.testing.assert_close(got, want[:2], rtol=1e-5, atol=1e-5)
    for layer, (k, v) in zip(part.cache.layers, untouched):
        assert torch.equal(layer.keys[2:], k) and torch.equal(layer.values[2:], v)
    assert not part.valid[2:, 12].any() and part.valid[:2, 12].all()


def test_fused_row_prefill_equals_transformers_prefill():
    """A serving engine's admission (prefill_rows: right-padded prompts into chosen rows, after a
    cached prefix) through the fused weights gives transformers' logits, keys, values and valid
    slots; the other rows are left alone."""
    loaded = build_tiny(["checkpoint=demo"])
    llm, hidden = loaded.model.llm, loaded.model.llm.config.hidden_size
    torch.manual_seed(8)
    prefix, new = torch.randn(4, 10, hidden) * 0.02, torch.randn(2, 9, hidden) * 0.02
    runs = []
    for use_fused in (False, True):
        dec = StaticDecoder(llm, 4, 64, use_fused=use_fused)
        first = dec.prefill_rows([0, 1, 2, 3], prefix, [10, 10, 10, 10]).clone()
        untouched = [(layer.keys[[0, 2]].clone(), layer.values[[0, 2]].clone()) for layer in dec.cache.layers]
        second = dec.prefill_rows([3, 1], new, [9, 5], start=10).clone()  # row 1's prompt is padded
        for layer, (k, v) in zip(dec.cache.layers, untouched):
            assert torch.equal(layer.keys[[0, 2]], k) and torch.equal(layer.values[[0, 2]], v)
        real = [(3, 19), (1, 15)]  # each row's real slots
        runs.append((first, second, [(layer.keys[r, :, :n], layer.values[r, :, :n]) for layer in dec.cache.layers
                                     for r, n in real], dec.valid.clone()))
    (first, second, cached, valid), (first_f, second_f, cached_f, valid_f) = runs
    torch.testing.assert_close(first_f, first, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second_f, second, rtol=1e-4, atol=1e-4)
    for (k, v), (k_f, v_f) in zip(cached, cached_f):
        torch.testing.assert_close(k_f, k, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v_f, v, rtol=1e-4, atol=1e-5)
    assert torch.equal(valid_f, valid) and valid[1, :15].all() and not valid[1, 15:].any()


def test_fused_row_prefill_takes_each_rows_own_cached_prefix():
    """An admission whose requests reuse different cached prefixes (start per row) is one forward
    that gives what transformers gives for each request prefilled alone after its own prefix."""
    loaded = build_tiny(["checkpoint=demo"])
    llm, hidden = loaded.model.llm, loaded.model.llm.config.hidden_size
    torch.manual_seed(9)
    prefix, new = torch.randn(4, 10, hidden) * 0.02, torch.randn(2, 9, hidden) * 0.02
    ref, fused = StaticDecoder(llm, 4, 64, use_fused=False), StaticDecoder(llm, 4, 64, use_fused=True)
    for dec in (ref, fused):
        dec.prefill_rows([0, 1, 2, 3], prefix, [10, 10, 10, 10])
    expected = torch.cat([ref.prefill_rows([3], new[:1], [9], start=10), ref.prefill_rows([1], new[1:, :5], [5], start=4)])
    got = fused.prefill_rows([3, 1], new, [9, 5], start=[10, 4])  # row 1: 4 cached, 5 new, padded to 9
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for a, b in zip(ref.cache.layers, fused.cache.layers):
        for row, n in ((3, 19), (1, 9)):
            torch.testing.assert_close(b.keys[row, :, :n], a.keys[row, :, :n], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(b.values[row, :, :n], a.values[row, :, :n], rtol=1e-4, atol=1e-5)
    assert torch.equal(fused.valid, ref.valid) and fused.valid[1, :9].all() and not fused.valid[1, 9:].any()
    with pytest.raises(ValueError, match="different cached prefixes"):
        ref.prefill_rows([3, 1], new, [9, 5], start=[10, 4])


def test_admissions_padded_to_graph_buckets_equal_the_exact_prefill():
    """use_row_prefill_graphs (row_prefill.py): three requests padded to four rows and 16 new
    positions (on the CPU eagerly, the same forward a CUDA graph replays) give the exact-shape
    prefill's logits, keys, values and valid slots; rows not admitted are left alone."""
    loaded = build_tiny(["checkpoint=demo"])
    llm, hidden = loaded.model.llm, loaded.model.llm.config.hidden_size
    torch.manual_seed(10)
    prefix, new = torch.randn(6, 12, hidden) * 0.02, torch.randn(3, 9, hidden) * 0.02
    exact, padded = StaticDecoder(llm, 6, 64, use_fused=True), StaticDecoder(llm, 6, 64, use_fused=True)
    padded.use_row_prefill_graphs()
    for dec in (exact, padded):
        dec.prefill_rows(list(range(6)), prefix, [12] * 6)
        with torch.inference_mode():  # (a padding row's zero keys written there would show)
            for layer in dec.cache.layers:
                layer.keys[:, :, -1], layer.values[:, :, -1] = 1.0, 1.0
    untouched = [(layer.keys[[0, 2, 4]].clone(), layer.values[[0, 2, 4]].clone()) for layer in padded.cache.layers]
    args = ([5, 1, 3], new, [9, 4, 7])
    expected = exact.prefill_rows(*args, start=[12, 3, 0]).clone()
    got = padded.prefill_rows(*args, start=[12, 3, 0]).clone()
    assert set(padded.row_prefill_graphs.inputs) == {(8, 16), (4, 16)}  # the buckets the two went through
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for a, b in zip(exact.cache.layers, padded.cache.layers):
        for row, n in ((5, 21), (1, 7), (3, 7)):
            torch.testing.assert_close(b.keys[row, :, :n], a.keys[row, :, :n], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(b.values[row, :, :n], a.values[row, :, :n], rtol=1e-4, atol=1e-5)
    for layer, (k, v) in zip(padded.cache.layers, untouched):
        assert torch.equal(layer.keys[[0, 2, 4]], k) and torch.equal(layer.values[[0, 2, 4]], v)
    assert torch.equal(padded.valid, exact.valid)


def test_admission_graphs_captured_at_start_cover_every_bucket_and_write_only_row_0s_last_slot():
    """RowPrefillGraphs.capture_all with the capture faked (each bucket's forward run once,
    eagerly): a graph per (rows, new positions, span) bucket within GRAPH_POSITIONS and the
    slots, and the captures touch nothing but row 0's last slot."""
    from minigpt4.decoding.row_prefill import GRAPH_POSITIONS, RowPrefillGraphs

    class Replayed:  # stands in for a CUDA graph: replaying returns what capturing computed
        def replay(self):
            pass

    loaded = build_tiny(["checkpoint=demo"])
    llm = loaded.model.llm
    dec = StaticDecoder(llm, 6, 64, use_fused=True)
    keys, values = [layer.keys for layer in dec.cache.layers], [layer.values for layer in dec.cache.layers]
    with torch.inference_mode():
        for layer in dec.cache.layers:
            layer.keys.fill_(1.0)
            layer.values.fill_(1.0)
        graphs = RowPrefillGraphs(dec._model, keys, values, dec.max_len, lambda run, rewind, pool: (Replayed(), run()))
        graphs.cuda = True  # capture as a GPU would, through the fake
        captured = graphs.capture_all(512)
    expected = {(rb, tb, 64) for rb in (1, 2, 4) for tb in (4, 8, 16, 32, 64, 128, 256, 512) if rb * tb <= GRAPH_POSITIONS}
    assert captured == len(expected) == 21 and set(graphs.graphs) == expected
    for layer in dec.cache.layers:
        changed = (layer.keys != 1.0).any(dim=(1, 3)) | (layer.values != 1.0).any(dim=(1, 3))  # [rows, slots]
        assert changed[0, -1] and changed.sum() == 1


def test_the_padded_lm_head_is_the_model_s_own_weight_and_the_llm_still_trains():
    """The fused weights (q/k/v, gate/up, the lm_head padded to 64 rows) are the model's own
    weights, not copies, and a decoder made in inference mode leaves them usable by autograd
    (finetuning the projection after chatting in the same process)."""
    from minigpt4.decoding import fused

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=100)
    llm = LlamaForCausalLM(cfg).requires_grad_(False)
    x = torch.randn(1, 4, 64)
    before = llm(inputs_embeds=x).logits
    padded = fused._padded_lm_head(llm, pad=True)
    assert padded.shape == (128, 64) and not padded[100:].any()
    assert llm.lm_head.weight.untyped_storage().data_ptr() == padded.untyped_storage().data_ptr()
    assert torch.equal(llm(inputs_embeds=x).logits, before)
    StaticDecoder(llm, 1, 32)  # fuses q/k/v and gate/up in inference mode
    x.requires_grad_(True)
    llm(inputs_embeds=x).logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
