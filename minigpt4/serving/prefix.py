"""Prefix reuse across requests: which free cache row a new request goes to.

A free row keeps the keys and values of its last request. A new request goes to the free row
that already holds the longest prefix of it (a conversation's next turn finds its own history;
requests sharing a system prompt share that), and only the rest is prefilled. Image positions
are keyed by a digest of the image's soft tokens (or pixels), so two images never match.
"""

from __future__ import annotations

import hashlib

import torch

from minigpt4.decoding import cache_keys, reusable_prefix


def prompt_keys(ids: list[int], images: torch.Tensor | None, num_image_tokens: int) -> list:
    """Cache keys of a prompt; an image is known by a digest of its soft tokens or pixels
    (the same picture gives the same pixels, and so the same soft tokens)."""
    digests = [f"{tuple(e.shape)}:" + hashlib.sha1(e.float().cpu().numpy().tobytes()).hexdigest()
               for e in images] if images is not None else []
    return cache_keys(ids, digests, num_image_tokens)


def pick_row(rows: list, row_keys: list[list], row_freed: list[int], keys: list, taken: set[int]) -> tuple[int, int]:
    """The free row (rows[row] is None, not in `taken`) whose cache (row_keys[row]) holds the
    longest prefix of `keys` -> (row, reusable positions: at least one position is left to
    compute, and never a part of an image). Ties: a row below the highest row in use (a step
    covers those anyway; the least recently freed of them, by row_freed), else the lowest row:
    the rows in use stay low, and a step covers only them."""
    in_use = [row for row, active in enumerate(rows) if active is not None] + list(taken)
    extent = max(in_use) + 1 if in_use else 0

    def rank(row: int, n: int) -> tuple:
        inside = row < extent
        return (n, inside, -row_freed[row] if inside else -row)

    best, best_rank = None, None
    for row, active in enumerate(rows):
        if active is not None or row in taken:
            continue
        candidate = rank(row, reusable_prefix(row_keys[row], keys))
        if best_rank is None or candidate > best_rank:
            best, best_rank = row, candidate
    return best, best_rank[0]
