"""Seeds derived from a run's seed: every random draw of a run comes from one of these.

Nothing in a run reads the global RNGs' state as it happens to be: the quantizer, the heads,
the data order and each clip's mask get their own generator, seeded from (seed, purpose, ...),
so the same params give the same numbers whatever was constructed, imported or loaded first.
"""

from __future__ import annotations

import numpy as np
import torch


def derived_seed(*keys: int) -> int:
    """A 63-bit seed mixing `keys`: nearby keys give unrelated streams (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
               .astype(np.uint64).view(np.uint64)[0] >> np.uint64(1))


def generator(*keys: int) -> torch.Generator:
    """A CPU torch generator seeded by `derived_seed(*keys)`."""
    return torch.Generator().manual_seed(derived_seed(*keys))
