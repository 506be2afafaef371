"""Per-sample random generators, so that a sample's noise never depends on the batch or process that draws it."""

from __future__ import annotations

import numpy as np
import torch


def image_generator(seed: int, index: int) -> torch.Generator:
    """The generator for sample `index` of a run seeded `seed`: an image never depends on the batch it is in."""
    state = int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] % (2**63))
    return torch.Generator().manual_seed(state)
