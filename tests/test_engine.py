"""The serving engine (minigpt4/serving/engine.py) without the HTTP layer: concurrent requests
decoded together get the answers each gets alone (CPU here; CUDA graphs with -m gpu)."""

from __future__ import annotations

import types

import pytest
import torch
from tiny_models import build_tiny

from minigpt4.chat import ChatSession
from minigpt4.config import chat_settings, compose
from minigpt4.conversation import clean_answer
from minigpt4.data.synthetic import make_picture, sample_specs
from minigpt4.generation import GenerationSettings
from minigpt4.serving.engine import Engine

GREEDY = GenerationSettings(do_sample=False, max_new_tokens=40)


def alone(loaded, images, question) -> str:
    session = ChatSession(loaded, GREEDY)
    session.add_images(images)
    return session.ask(question).text


def submit_jobs(engine, loaded, jobs, as_pixels: bool = False, settings=GREEDY, **submit) -> list:
    """Each (images, question) as a one-turn chat prompt; images encoded here, or sent as pixels
    for the engine to encode. settings: for every job, or a list of one per job."""
    requests = []
    for k, (images, question) in enumerate(jobs):
        conv = loaded.conversation()
        for i, _ in enumerate(images):
            conv.add_image(i)
        conv.ask(question)
        setting = settings[k] if isinstance(settings, list) else settings
        if as_pixels:
            pixels = loaded.pixels(images) if images else None
            requests.append(engine.submit(engine.prompt_ids(conv), None, setting, pixels=pixels, **submit))
        else:
            embeds = loaded.encode_images(images) if images else None
            requests.append(engine.submit(engine.prompt_ids(conv), embeds, setting, **submit))
    return requests


def engine_answers(loaded, jobs, slots, **options):
    engine = Engine(loaded, slots=slots, max_context=2000, **options)
    try:
        requests = submit_jobs(engine, loaded, jobs)
        for r in requests:
            assert r.done.wait(120)
        return [clean_answer(r.text, loaded.template) for r in requests], engine.steps
    finally:
        engine.close()


def jobs_for(loaded):
    pictures = [make_picture(spec, size=loaded.image_size) for spec in sample_specs(3, seed=21)]
    return [([pictures[0]], "What colour are the shapes?"), ([], "Hello! What can you do?"),
            ([pictures[1]], "How many shapes are there?"), ([pictures[2]], "What shape are they?"),
            (pictures[:2], "How many shapes are there?")]


def test_engine_answers_as_sessions_do_with_fewer_rows_than_requests():
    torch.set_num_threads(1)
    loaded = build_tiny(["checkpoint=demo"])
    jobs = jobs_for(loaded)
    expected = [alone(loaded, *job) for job in jobs]
    got, _ = engine_answers(loaded, jobs, slots=2)  # rows are freed and reused
    assert got == expected


def test_requests_take_the_lowest_rows_and_a_step_covers_only_those():
    """One request at a time on an 8-row engine decodes in row 0 with one-row steps; three
    together take rows 0-2 and steps of four rows (a power of two); the answers are the ones
    each request gets alone."""
    torch.set_num_threads(1)
    loaded = build_tiny(["checkpoint=demo"])
    jobs = jobs_for(loaded)[:3]
    expected = [alone(loaded, *job) for job in jobs]
    engine = Engine(loaded, slots=8, max_context=2000)
    stepped = []
    step_rows = engine.decoder.step_rows
    engine.decoder.step_rows = lambda tokens, *a, **k: stepped.append(len(tokens)) or step_rows(tokens, *a, **k)
    try:
        first = submit_jobs(engine, loaded, jobs[:1])[0]
        assert first.done.wait(60)
        assert set(stepped) == {1}
        stepped.clear()
        with engine.wake:  # the engine thread waits: the three are admitted in one round
            requests = submit_jobs(engine, loaded, jobs)
        for r in requests:
            assert r.done.wait(60)
        assert stepped[0] == 4 and set(stepped) <= {1, 2, 4}  # rows 0-2, then fewer as answers end
        assert [clean_answer(r.text, loaded.template) for r in requests] == expected
    finally:
        engine.close()


def test_steps_fed_ahead_end_each_request_where_it_ends_alone():
    """Each step is fed from the last step's tokens before the host reads them, so a request is
    found finished a step late: requests that end at different steps (their own token budgets, a
    minimum length, a repetition penalty, which makes the engine wait for its tokens) still get
    exactly their answers alone, in 2 rows reused by 5 requests."""
    from dataclasses import replace

    torch.set_num_threads(1)
    loaded = build_tiny(["checkpoint=demo"])
    jobs = jobs_for(loaded)
    settings = [replace(GREEDY, max_new_tokens=3), replace(GREEDY, max_new_tokens=40),
                replace(GREEDY, repetition_penalty=1.3, max_new_tokens=20),
                replace(GREEDY, min_new_tokens=12, max_new_tokens=14), replace(GREEDY, max_new_tokens=1)]
    expected, counts = [], []
    for (images, question), setting in zip(jobs, settings):
        session = ChatSession(loaded, setting)
        session.add_images(images)
        reply = session.ask(question)
        expected.append(reply.text)
        counts.append(reply.n_tokens)
    engine = Engine(loaded, slots=2, max_context=2000)
    try:
        requests = submit_jobs(engine, loaded, jobs, settings=settings)
        for r in requests:
            assert r.done.wait(60)
        assert [clean_answer(r.text, loaded.template) for r in requests] == expected
        assert [r.completion_tokens for r in requests] == counts  # no token of a step for nothing
        assert counts[0] <= 3 and counts[4] == 1
    finally:
        engine.close()


@pytest.mark.gpu
@pytest.mark.parametrize("graph_admissions", [False, True])
def test_engine_on_the_gpu_answers_as_sessions_do(graph_admissions):
    """CUDA graphs per attention bucket, rows at different lengths, the Triton per-row cache
    writes; and admissions replayed as graphs (captured at start up to 256 positions, later on
    first use)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    loaded = build_tiny(["checkpoint=demo", "gpu=0"])
    jobs = jobs_for(loaded)
    expected = [alone(loaded, *job) for job in jobs]
    got, _ = engine_answers(loaded, jobs, slots=3, graph_admissions=graph_admissions, capture_positions=256)
    assert got == expected


def test_admissions_padded_to_graph_buckets_answer_as_sessions_do():
    """graph_admissions on the CPU: the same bucketed forward a GPU replays, run eagerly."""
    torch.set_num_threads(1)
    loaded = build_tiny(["checkpoint=demo"])
    jobs = jobs_for(loaded)
    expected = [alone(loaded, *job) for job in jobs]
    got, _ = engine_answers(loaded, jobs, slots=3, graph_admissions=True)
    assert got == expected


def test_chat_graphs_admissions_on_a_gpu_only_and_as_told():
    """serve.graph_admissions (default true) reaches the engine on a GPU; on the CPU the padded
    buckets would only add arithmetic, so chat.py's engine prefills there exactly."""
    loaded = build_tiny(["checkpoint=demo"])
    made = []

    class Recorded(Engine):
        def __init__(self, loaded, **options):
            made.append(options["graph_admissions"])

    for override, device, expected in (([], "cpu", False), ([], "cuda", True),
                                       (["serve.graph_admissions=false"], "cuda", False)):
        settings = chat_settings(compose("chat", ["model=tiny", "checkpoint=demo", *override]))
        on = types.SimpleNamespace(device=torch.device(device))
        Recorded.for_chat(on if device == "cuda" else loaded, settings)
        assert made.pop() is expected, (override, device)


@pytest.mark.gpu
def test_a_step_is_queued_without_waiting_for_the_gpu():
    """Feeding steps ahead pays only if queueing one never waits for the device: a copy from
    pageable memory or an index given as a Python list would (torch synchronises the stream).
    torch's sync debug mode raises on any such wait while _launch queues a step of 3 rows. The
    engine captured every step's graph at start (rows 1, 2, 4 x lengths up to 512): none is
    captured while requests decode."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from minigpt4.decoding.static import ATTEND_BUCKET
    from minigpt4.serving.engine import CAPTURED_POSITIONS

    loaded = build_tiny(["checkpoint=demo", "gpu=0"])
    engine = Engine(loaded, slots=4, max_context=2000, capture_positions=CAPTURED_POSITIONS, start=False)
    captured = set(engine.decoder.step_graphs)
    assert captured == {(a, r) for a in range(ATTEND_BUCKET, CAPTURED_POSITIONS + 1, ATTEND_BUCKET) for r in (1, 2, 4)}
    settings = GenerationSettings(do_sample=False, max_new_tokens=200, min_new_tokens=200)
    submit_jobs(engine, loaded, jobs_for(loaded)[:3], settings=settings, stops=())
    with torch.inference_mode():
        engine._admit()
        engine._step()  # its graph was captured at start, as was the next one's
        engine._step()
        previous, engine.in_flight = engine.in_flight, None
        assert previous is not None
        torch.cuda.set_sync_debug_mode("error")
        try:
            current = engine._launch(previous)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        engine._take_step(previous)
        engine._take_step(current)
    assert len(current.rows) == 3 and all(a.sampled == a.length - len(a.request.ids) + 1 for _, a in current.rows)
    assert set(engine.decoder.step_graphs) == captured


def test_while_rows_decode_a_newcomer_waits_to_be_prefilled_with_others():
    """Every admission pauses every decoding row for a prefill: while rows decode, a request is
    admitted once it has waited admit_wait or enough wait to fill the free rows; with no row
    decoding, at once. Their answers are the ones each gets alone."""
    torch.set_num_threads(1)
    loaded = build_tiny(["checkpoint=demo"])
    engine = Engine(loaded, slots=4, max_context=2000, admit_wait=60.0, start=False)
    jobs = jobs_for(loaded)
    with torch.inference_mode():
        first = submit_jobs(engine, loaded, jobs[:1])
        assert engine._admission_due()  # nothing decodes: at once
        engine._admit()
        engine._step()
        second = submit_jobs(engine, loaded, jobs[1:2])
        assert not engine._admission_due()  # one waits, three rows free, 60 s not passed
        second[0].submitted_at -= 60.0
        assert engine._admission_due()  # waited long enough
        third = submit_jobs(engine, loaded, jobs[2:4])
        assert engine._admission_due()  # three wait for three free rows
        engine._admit()
        assert engine.stats["admissions"] == 2 and engine.stats["admitted"] == 4
        assert not engine._admission_due()  # none waits
        while any(engine.rows):
            engine._step()
    answers = [clean_answer(r.text, loaded.template) for r in first + second + third]
    assert answers == [clean_answer(alone(loaded, images, q), loaded.template) for images, q in jobs[:4]]


def test_a_conversations_next_turn_reuses_its_rows_prefix():
    """Turn 2 goes to the free row that holds turn 1 and prefills only what is new; the answers
    are ChatSession's (which keeps its own cache). Another request with another image in the
    same position reuses nothing of that image."""
    torch.set_num_threads(1)
    loaded = build_tiny(["checkpoint=demo"])
    pictures = [make_picture(spec, size=loaded.image_size) for spec in sample_specs(2, seed=8)]
    session = ChatSession(loaded, GREEDY)
    session.add_images([pictures[0]])
    expected = [session.ask("What colour are the shapes?").text, session.ask("How many shapes are there?").text]
    engine = Engine(loaded, slots=3, max_context=2000)
    try:
        conv = loaded.conversation()
        conv.add_image(0)
        conv.ask("What colour are the shapes?")
        embeds = loaded.encode_images([pictures[0]])
        first = engine.submit(engine.prompt_ids(conv), embeds, GREEDY)
        assert first.done.wait(60)
        conv.add_answer(clean_answer(first.text, loaded.template))
        conv.ask("How many shapes are there?")
        second = engine.submit(engine.prompt_ids(conv), embeds, GREEDY)
        assert second.done.wait(60)
        assert [clean_answer(r.text, loaded.template) for r in (first, second)] == expected
        assert first.prefilled == len(first.ids)
        assert second.prefilled < len(second.ids) - len(first.ids) + 5  # only the new turn, about
        other = loaded.conversation()
        other.add_image(0)
        other.ask("What colour are the shapes?")
        third = engine.submit(engine.prompt_ids(other), loaded.encode_images([pictures[1]]), GREEDY)
        assert third.done.wait(60)
        image_start = third.keys.index(next(k for k in third.keys if isinstance(k, tuple)))
        assert third.prefilled >= len(third.ids) - image_start  # the system text may be reused, the image not
        assert clean_answer(third.text, loaded.template) == alone(loaded, [pictures[1]], "What colour are the shapes?")
    finally:
        engine.close()



def test_an_llm_the_fused_step_cannot_run_is_served_one_request_at_a_time(caplog):
    """bitsandbytes int8/int4 layers or biases: transformers' step in one row, same answers."""
    torch.set_num_threads(1)
    loaded = build_tiny(["checkpoint=demo"])
    layer = loaded.model.llm.model.layers[0].self_attn.q_proj
    layer.bias = torch.nn.Parameter(torch.zeros(layer.out_features))  # as an LLM with biases would have
    jobs = jobs_for(loaded)[:3]
    expected = [alone(loaded, *job) for job in jobs]
    got, _ = engine_answers(loaded, jobs, slots=4)
    assert got == expected
    assert "one request at a time" in caplog.text and "biases" in caplog.text


def test_arrivals_are_admitted_together_images_and_prompts_batched():
    """Requests waiting when rows free up are admitted in one round: their pixels through the image
    side in one forward, their prompts in one right-padded prefill; each answer is still the one it
    gets alone. A prompt sharing a cached prefix prefills only the rest."""
    torch.set_num_threads(1)
    loaded = build_tiny(["checkpoint=demo"])
    jobs = jobs_for(loaded)
    expected = [alone(loaded, *job) for job in jobs]
    engine = Engine(loaded, slots=8, max_context=2000)
    prefills, encodes = [], []
    prefill_rows, encode = engine.decoder.prefill_rows, loaded.model.encode_images
    engine.decoder.prefill_rows = lambda rows, *a, **k: prefills.append((list(rows), k["start"])) or prefill_rows(rows, *a, **k)
    loaded.model.encode_images = lambda pixels: encodes.append(len(pixels)) or encode(pixels)
    try:
        with engine.wake:  # hold the engine thread: everything below waits in the queue together
            requests = submit_jobs(engine, loaded, jobs, as_pixels=True)
        for r in requests:
            assert r.done.wait(120)
        assert [clean_answer(r.text, loaded.template) for r in requests] == expected
        assert encodes == [5]  # the 5 pictures of 4 requests in one forward
        assert sorted(len(rows) for rows, _ in prefills) == [5] and prefills[0][1] == [0] * 5
        again = engine.submit(requests[0].ids, None, GREEDY, pixels=loaded.pixels(jobs[0][0]))
        assert again.done.wait(120) and clean_answer(again.text, loaded.template) == expected[0]
        assert prefills[-1][1][0] > 0 and again.prefilled < len(again.ids)  # its prefix came from the cache
    finally:
        engine.close()


def test_requests_with_different_cached_prefixes_are_prefilled_in_one_forward():
    """An admission prefills every request after what its row holds already, in one forward:
    a repeated prompt (all but its last position cached), a question sharing only the system
    prompt, and a fresh row, together; each answer is the one it gets alone."""
    torch.set_num_threads(1)
    loaded = build_tiny(["checkpoint=demo"])
    jobs = jobs_for(loaded)
    expected = [alone(loaded, *job) for job in jobs]
    engine = Engine(loaded, slots=4, max_context=2000)
    prefills = []
    prefill_rows = engine.decoder.prefill_rows
    engine.decoder.prefill_rows = lambda rows, *a, **k: prefills.append(k["start"]) or prefill_rows(rows, *a, **k)
    try:
        with engine.wake:  # admitted together (into rows 0 and 1)
            first = submit_jobs(engine, loaded, jobs[:2])
        for r in first:
            assert r.done.wait(120)
        with engine.wake:  # admitted together: job 0 must not take job 1's row for their common first token
            requests = submit_jobs(engine, loaded, [jobs[0], jobs[1], jobs[3]])
        for r in requests:
            assert r.done.wait(120)
        assert [clean_answer(r.text, loaded.template) for r in requests] == [expected[0], expected[1], expected[3]]
        starts = prefills[-1]
        assert len(starts) == 3 and len(set(starts)) > 1  # one forward, different cached prefixes
        assert [r.prefilled for r in requests[:2]] == [1, 1]  # the repeated prompts: their last position only
    finally:
        engine.close()


def test_admission_chunks_keep_each_prefill_within_its_position_budget():
    from minigpt4.serving.requests import chunks as _chunks

    sizes = [100, 30, 300, 50, 5000, 10]
    runs = _chunks(sizes, lambda n: n, budget=600)
    assert [n for run in runs for n in run] == sizes  # order kept, nothing lost
    assert all(len(run) * max(run) <= 600 or len(run) == 1 for run in runs)
    assert runs == [[100, 30], [300, 50], [5000], [10]]


def test_rows_are_assigned_longest_cached_prefix_first():
    from minigpt4.serving.prefix import assign_rows

    rows, freed = [None, None, None, object()], [0, 0, 0, 0]
    held = [[1, 2, 3, 4, 5], [1, 9, 9, 9], [], [1, 2]]
    wanted = [[1, 7, 7], [1, 9, 9, 9, 8], [1, 2, 3, 4, 5, 6]]  # request 0 shares one token with rows 0 and 1
    assert assign_rows(rows, held, freed, wanted) == [(2, 0), (1, 4), (0, 5)]
    # nothing cached: the lowest free rows, in order
    assert assign_rows([None] * 4, [[]] * 4, freed, [[5, 6], [7, 8]]) == [(0, 0), (1, 0)]


def test_a_request_whose_images_do_not_fill_its_slots_fails_alone():
    torch.set_num_threads(1)
    loaded = build_tiny(["checkpoint=demo"])
    jobs = jobs_for(loaded)
    expected = alone(loaded, *jobs[0])
    engine = Engine(loaded, slots=4, max_context=2000)
    try:
        conv = loaded.conversation()
        conv.add_image(0)
        conv.ask("What colour are the shapes?")
        two_images = loaded.encode_images([jobs[0][0][0], jobs[2][0][0]])  # for a prompt with one image
        with engine.wake:  # admitted together
            bad = engine.submit(engine.prompt_ids(conv), two_images, GREEDY)
            good = submit_jobs(engine, loaded, jobs[:1])[0]
        assert bad.done.wait(120) and good.done.wait(120)
        assert bad.finish_reason == "error" and "image slots" in bad.error
        assert clean_answer(good.text, loaded.template) == expected
    finally:
        engine.close()
