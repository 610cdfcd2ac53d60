"""The two models tests run on, built in-process on the CPU: the tiny architecture with random
weights (seeded), and the shipped demo model (minigpt4/assets/demo: model=tiny, trained).

Tests import these helpers from here (`from tiny_models import build_tiny`), never from conftest;
conftest.py makes session fixtures of them (tiny_loaded, demo_loaded). The demo model is part of
the repository: test_checkpoints.py asserts it is there and loads, every other test relies on it.
"""

from __future__ import annotations

import torch

from minigpt4.config import ASSETS, load_spec

DEMO = ASSETS / "demo"  # checkpoint=demo (conf/checkpoint/demo.yaml)

# Issue #18: question kinds whose held-out rate a test of the demo's answers may accept below the
# goal. None since the top-up of 2026-12-02 (every kind >= 97% held-out, greedy, 300 per kind).
BELOW_GOAL: dict[str, float] = {}


def build_tiny(overrides: list[str] | None = None, seed: int = 0):
    """load_model on the tiny architecture with random weights (fp32, CPU), seeded; overrides
    come last (e.g. checkpoint=demo for the shipped demo model)."""
    from minigpt4.build import load_model
    from minigpt4.config import compose

    torch.manual_seed(seed)
    return load_model(load_spec(compose("chat", ["gpu=cpu", "precision=fp32", "checkpoint=random", *(overrides or [])])))


def load_demo(overrides: list[str] | None = None):
    """The shipped demo model (fp32, CPU)."""
    return build_tiny(["checkpoint=demo", *(overrides or [])])
