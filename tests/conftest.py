"""Shared fixtures: one tiny random model per session (built in-process, CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)  # 2 shared cores: more threads made tiny-model tests ~70x slower


def build_tiny(overrides: list[str] | None = None, seed: int = 0):
    """load_model on the tiny architecture with random weights (fp32, CPU), seeded."""
    from minigpt4.build import load_model
    from minigpt4.config import compose

    torch.manual_seed(seed)
    return load_model(compose("chat", ["gpu=cpu", "precision=fp32", "checkpoint=random", *(overrides or [])]))


@pytest.fixture(scope="session")
def tiny_loaded():
    """The tiny model with random weights. Treat it as read-only (copy before changing it)."""
    return build_tiny()


def pytest_collection_modifyitems(config, items):
    """@pytest.mark.gpu tests are skipped on machines without CUDA (CI also deselects them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
