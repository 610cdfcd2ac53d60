"""The two models tests run on, built in-process on the CPU: the tiny architecture with random
weights (seeded), and the shipped demo model (minigpt4/assets/demo: model=tiny, trained).

Tests import these helpers from here (`from tiny_models import build_tiny`), never from conftest;
conftest.py makes session fixtures of them (tiny_loaded, demo_loaded). The demo model is part of
the repository: test_checkpoints.py asserts it is there and loads, every other test relies on it.
"""

from __future__ import annotations

import pytest
import torch

from minigpt4.config import ASSETS, load_spec

DEMO = ASSETS / "demo"  # checkpoint=demo (conf/checkpoint/demo.yaml)

# Issue #18: assertions about the demo model's answers on the new kinds (positions, yes/no,
# several pictures) that only the retrained demo can pass. Once the retrained model is installed
# in minigpt4/assets/demo, make this a no-op (PENDING_DEMO_RETRAIN = lambda test: test).
PENDING_DEMO_RETRAIN = pytest.mark.skip(reason="pending demo retrain (#18)")


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
