"""Seeded random streams: every random draw of advdit comes from a ``torch.Generator`` whose seed
is a pure function of a few integers (run seed, rank, step, stream, sample number, ...).

That is how a resumed run draws exactly what the uninterrupted run drew without saving generator
states (EDM2 reseeds the same way), and how a sample set is the same for any number of ranks.
NumPy's SeedSequence mixes the integers, so neighbouring tuples give unrelated streams.
"""

from __future__ import annotations

import numpy as np
import torch

_SEED_MASK = (1 << 63) - 1  # torch.Generator.manual_seed takes a non-negative int64


def seed_of(*parts: int) -> int:
    """A 63-bit seed that depends on ``parts`` only (each a non-negative integer)."""
    state = np.random.SeedSequence(list(parts)).generate_state(2)
    return (int(state[0]) << 32 | int(state[1])) & _SEED_MASK


def seeded_rng(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded by ``seed_of(*parts)``."""
    return torch.Generator(device=device).manual_seed(seed_of(*parts))
