"""Keyed random streams: every random draw in a run comes from (seed, purpose, cycle, client).

A stream is a pure function of its key, so a run that is resumed at cycle c draws exactly
what an uninterrupted run draws there, with no RNG state to save (DESIGN.md §3).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def _key_ints(key: tuple[object, ...]) -> tuple[int, ...]:
    out = []
    for part in key:
        if isinstance(part, (int, np.integer)):
            out.append(int(part) & 0xFFFFFFFF)
        else:  # a purpose name: a stable 32-bit hash (Python's hash() is salted per process)
            out.append(zlib.crc32(str(part).encode()))
    return tuple(out)


def seed_sequence(seed: int, *key: object) -> np.random.SeedSequence:
    return np.random.SeedSequence(entropy=int(seed), spawn_key=_key_ints(key))


def rng(seed: int, *key: object) -> np.random.Generator:
    """The numpy generator of stream `key`, e.g. rng(seed, "query", cycle, client)."""
    return np.random.default_rng(seed_sequence(seed, *key))


def torch_seed(seed: int, *key: object) -> int:
    return int(seed_sequence(seed, *key).generate_state(1, dtype=np.uint64)[0] >> 1)


def torch_generator(seed: int, *key: object) -> torch.Generator:
    """A CPU torch generator for stream `key` (shuffling, augmentation)."""
    g = torch.Generator()
    g.manual_seed(torch_seed(seed, *key))
    return g
