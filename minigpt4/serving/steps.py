"""The serving engine's decode step in flight: its inputs go to the device and its tokens are
sampled there without the host waiting for the GPU, so the host's work on the previous step's
tokens (streaming, stop strings, the end of a request) overlaps the next step on the GPU.

Any host->device copy from ordinary (pageable) memory makes torch wait for all queued work
(`copy_` synchronises the stream), and so does indexing a CUDA tensor with a Python list: the
step's inputs travel in one copy from a pinned buffer, and everything after the launch indexes
with device tensors or slices only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from minigpt4.generation import HostCopy, next_tokens
from minigpt4.serving.requests import ActiveRequest

Rows = list[tuple[int, ActiveRequest]]  # (cache row, the request decoding in it)


@dataclass
class InFlight:
    """A decode step whose sampled tokens the host has not read yet: the next step is fed from
    them on the device while the host reads them (rows[k] was `active` when tokens[k] was sampled)."""

    rows: Rows
    tokens: torch.Tensor  # [len(rows)] on the device
    copy: HostCopy


class StagedInputs:
    """Host ints -> one device tensor, without waiting for the device: staged in one of two
    pinned buffers in turn, each reused only once its last copy is done (an event each)."""

    def __init__(self, size: int, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        if self.cuda:
            self.buffers = [torch.empty(size, dtype=torch.long, pin_memory=True) for _ in range(2)]
            self.events = [torch.cuda.Event() for _ in range(2)]
            self.turn = 0

    def __call__(self, values: list[int]) -> torch.Tensor:
        if not self.cuda:
            return torch.tensor(values, dtype=torch.long, device=self.device)
        self.turn = k = 1 - self.turn
        if not self.events[k].query():  # the copy of two steps ago: done long since (a step was read back between)
            self.events[k].synchronize()
        host = self.buffers[k][: len(values)]
        host.copy_(torch.tensor(values, dtype=torch.long))
        staged = host.to(self.device, non_blocking=True)
        self.events[k].record()
        return staged


def _group_key(k: int, active: ActiveRequest) -> tuple:
    """Rows with equal keys sample in one call: no generator or token history of their own, the
    same settings, and EOS barred (min_new_tokens) for all of them or none."""
    request = active.request
    if request.sample_group is None:
        return ("own", k)
    return (request.sample_group, active.sampled < request.settings.min_new_tokens)


def in_sampling_groups(rows: Rows) -> Rows:
    """rows reordered (stably) so that the rows that sample in one call are next to each other."""
    groups: dict[tuple, Rows] = {}
    for k, item in enumerate(rows):
        groups.setdefault(_group_key(k, item[1]), []).append(item)
    return [item for group in groups.values() for item in group]


def sample(rows: Rows, logits: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Each row's next token on the device (logits[k] [V] float for rows[k]; rows from
    in_sampling_groups), with its own settings: one call per run of rows that share them."""
    keys = [_group_key(k, active) for k, (_, active) in enumerate(rows)]
    parts = []
    for _, run in itertools.groupby(range(len(rows)), key=keys.__getitem__):
        run = list(run)
        active = rows[run[0]][1]
        settings = active.request.settings
        generated = (torch.tensor([active.generated], dtype=torch.long, device=logits.device)
                     if settings.repetition_penalty != 1.0 else logits.new_zeros((1, 0), dtype=torch.long))
        parts.append(next_tokens(logits[run[0] : run[-1] + 1], settings, generated, active.sampled, eos_id,
                                 active.request.generator))
    for _, active in rows:
        active.sampled += 1
    return torch.cat(parts)
