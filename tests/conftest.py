"""Shared fixtures: the tiny random model and the shipped demo model, one of each per session
(helpers in tiny_models.py; import them from there, not from this file)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny, load_demo

torch.set_num_threads(1)  # 2 shared cores: more threads made tiny-model tests ~70x slower

@pytest.fixture(scope="session")
def tiny_loaded():
    """The tiny model with random weights. Treat it as read-only (copy before changing it)."""
    return build_tiny()


@pytest.fixture(scope="session")
def demo_loaded():
    """The shipped demo model (test_checkpoints asserts it exists and loads). Read-only."""
    return load_demo()


def pytest_collection_modifyitems(config, items):
    """@pytest.mark.gpu tests are skipped on machines without CUDA (CI also deselects them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
