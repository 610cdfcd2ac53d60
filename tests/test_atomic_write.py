"""Files the project writes (own-format folders, bundles, projections) are complete or absent and
readable as any file the user writes: the umask's modes, not mkstemp/mkdtemp's owner-only ones."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from minigpt4 import checkpoints as ck
from minigpt4.config import ASSETS


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_own_folder_is_written_with_usual_modes_and_replaced_whole(tmp_path, umask_022):
    state = {"llama_proj.weight": torch.ones(2, 3), "llama_proj.bias": torch.zeros(2)}
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.txt").write_text("from an older model")
    ck.write_bundle(state, target, ck.BundleInfo(name="x"), tokenizer=ASSETS / "tiny_tokenizer.model")
    assert siblings(tmp_path) == ["model"]  # no .partial-/.old- folder left behind
    assert siblings(target) == ["minigpt4.json", "model.safetensors", "tokenizer.model"]
    assert modes(target) == {"model": 0o755, "model/minigpt4.json": 0o644, "model/model.safetensors": 0o644,
                             "model/tokenizer.model": 0o644}
    loaded, info = ck.read_bundle(target, "test")
    assert torch.equal(loaded["llama_proj.weight"], state["llama_proj.weight"]) and info.name == "x"


def test_a_failed_write_leaves_the_old_target_and_no_temporary(tmp_path):
    target = tmp_path / "projection.pth"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), ck.atomic_write(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and siblings(tmp_path) == ["projection.pth"]


def test_projection_file_has_usual_modes(tmp_path, umask_022):
    path = ck.save_official_projection({"llama_proj.weight": torch.ones(2, 2)}, tmp_path / "projection.pth")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and siblings(tmp_path) == ["projection.pth"]
    assert set(torch.load(path, weights_only=True)["model"]) == {"llama_proj.weight"}
