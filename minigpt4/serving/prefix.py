"""Prefix reuse across requests: which free cache row a new request goes to.

A free row keeps the keys and values of its last request. A new request goes to the free row
that already holds the longest prefix of it (a conversation's next turn finds its own history;
requests sharing a system prompt share that), and only the rest is prefilled; requests admitted
together are matched longest prefix first (assign_rows). Image positions
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


def assign_rows(rows: list, row_keys: list[list], row_freed: list[int], wanted: list[list]) -> list[tuple[int, int]]:
    """Free rows (rows[row] is None; row_keys[row] what each row's cache holds) for requests
    admitted together (their cache keys, `wanted`) -> (row, reusable positions) for each, in
    order. The longest cached prefixes are matched first, so that a request sharing a token or a
    system prompt with a row never takes the row that holds all of another's prompt. Reusable:
    at least one position is left to compute, and never a part of an image. Ties: a row below
    the highest row in use (a step covers those anyway; the least recently freed of them, by
    row_freed), else the lowest row, then the earlier request: the rows in use stay low, and a
    step covers only them."""
    in_use = [row for row, active in enumerate(rows) if active is not None]
    extent = max(in_use) + 1 if in_use else 0
    free = [row for row, active in enumerate(rows) if active is None]
    pairs = []  # (rank, request, row, reusable)
    for k, keys in enumerate(wanted):
        for row in free:
            n = reusable_prefix(row_keys[row], keys)
            inside = row < extent
            pairs.append(((n, inside, -row_freed[row] if inside else -row, -k), k, row, n))
    pairs.sort(reverse=True)
    chosen: dict[int, tuple[int, int]] = {}
    taken: set[int] = set()
    for _, k, row, n in pairs:
        if k not in chosen and row not in taken:
            chosen[k] = (row, n)
            taken.add(row)
    return [chosen[k] for k in range(len(wanted))]
