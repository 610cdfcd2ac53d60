"""The bench scripts' own bookkeeping, on the tiny model (CPU): a GPU figure is only as good as
what the script counts."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def test_varied_lengths_are_forced_alike_in_both_evaluate_paths(tmp_path):
    """bench_evaluate.py --lengths varied: the static batches and the serving engine each decode
    and count every row's own length + 1 (its EOS, or the token in its place), and nothing else."""
    from bench import bench_evaluate as bench
    from tiny_models import build_tiny

    torch.manual_seed(0)
    lm = build_tiny()
    lm.template = lm.template.with_overrides(stop=())
    rows = bench.prompt_rows(tmp_path, 6, numbered=True)
    lengths = bench.row_lengths(lm, rows, 16)
    assert len(set(lengths.values())) > 1 and min(lengths.values()) >= 2
    expected = sum(lengths.values()) + len(rows)
    assert bench.run_ours(lm, rows, 4, 16, False, lengths=lengths)[0] == expected
    assert bench.run_ours(lm, rows, 4, 16, False, engine=True, lengths=lengths)[0] == expected
    assert bench.run_ours(lm, rows, 4, 16, False)[0] == 16 * len(rows)  # the wrappers are gone again


def test_profile_admission_measures_cached_and_fresh_prompts(monkeypatch):
    """bench/profile_admission.py on the tiny model: a cached prompt prefills one position a
    request, a question of its own most of its prompt."""
    from bench import profile_admission

    torch.set_num_threads(1)
    rows, real = [], profile_admission.measure
    monkeypatch.setattr(sys, "argv", ["profile_admission.py", "--tiny", "--counts", "2", "--decoding", "2", "--repeats", "1"])
    monkeypatch.setattr(profile_admission, "measure", lambda *a, **k: rows.append(real(*a, **k)) or rows[-1])
    profile_admission.main()
    same, distinct = rows
    assert same["requests"] == distinct["requests"] == 2
    assert same["new_positions"] == 2 and distinct["new_positions"] > 100
    assert same["host_ms"] > 0 and distinct["aten_calls"] > 0


def test_profile_step_runs_the_step_as_decoding_runs_it():
    """bench/profile_step.py on the tiny model, fp16-style and on int8 weights: the step it
    profiles is the decoder's own (it broke once when the step gained its rows argument)."""
    from bench.bench_decode import build_llm
    from bench.profile_step import profile_step
    from minigpt4.decoding.quant import quantize_llm

    torch.set_num_threads(1)
    llm = build_llm(tiny=True)
    for model in (llm, quantize_llm(llm, "int8")):
        result = profile_step(model, 2, 8, compile=False, device=torch.device("cpu"))
        assert result["batch"] == 2 and result["fused"] and result["kernel_total_ms"] == 0  # no CUDA kernels on the CPU
