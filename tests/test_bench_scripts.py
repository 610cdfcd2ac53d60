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
