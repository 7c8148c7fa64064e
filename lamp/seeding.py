"""Every random draw in lamp-grid is a function of (seed, example id, purpose).

A generator is derived from a hash of those values alone, so the same cell gives
the same draws whatever the batch size, worker count or process order (the
study reseeded a global RNG per batch, so its draws depended on all three).
"""

import hashlib

import numpy as np


def example_rng(seed: int, example_id: str, purpose: str) -> np.random.Generator:
    """A generator owned by one example and one use of randomness."""
    digest = hashlib.blake2b(f"{seed}\x1f{example_id}\x1f{purpose}".encode(), digest_size=16).digest()
    return np.random.default_rng(np.frombuffer(digest, dtype=np.uint32))
