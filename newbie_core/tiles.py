"""Tile layout for the VAE's tiled decode and encode: evenly spread overlapping tiles and feather-blend weights."""
from __future__ import annotations

import torch


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts covering [0, length): evenly spread, neighbours overlapping by at least `overlap`."""
    if length <= tile:
        return [0]
    n = -(-(length - tile) // (tile - overlap)) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def ramp_weights(size: int, lead: int, trail: int, device) -> torch.Tensor:
    """1-D blend weights of a tile: linear ramps over the `lead`/`trail` pixels shared with its neighbours."""
    w = torch.ones(size, dtype=torch.float32, device=device)
    for n, flip in ((min(lead, size), False), (min(trail, size), True)):
        if n > 0:
            ramp = torch.arange(1, n + 1, dtype=torch.float32, device=device) / (n + 1)
            if flip:
                w[-n:] = torch.minimum(w[-n:], ramp.flip(0))
            else:
                w[:n] = torch.minimum(w[:n], ramp)
    return w


def shared_span(starts: list[int], i: int, tile: int, length: int) -> tuple[int, int]:
    """How many pixels tile `i` shares with its previous (lead) and next (trail) neighbour."""
    end = min(starts[i] + tile, length)
    lead = max(0, min(starts[i - 1] + tile, length) - starts[i]) if i > 0 else 0
    trail = max(0, end - starts[i + 1]) if i + 1 < len(starts) else 0
    return lead, trail
