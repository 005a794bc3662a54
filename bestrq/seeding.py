"""Seeds derived from a run's seed: every random draw of a run comes from one of these.

Nothing in a run reads the global RNGs' state as it happens to be: the quantizer, the heads,
the data order and each clip's mask get their own generator, seeded from (seed, purpose, ...),
so the same params give the same numbers whatever was constructed, imported or loaded first.
"""

from __future__ import annotations

import numpy as np
import torch

# The named streams: the last key of each draw, so that two purposes never share numbers. The
# values spell their names in ASCII; they are part of every committed result (changing one
# changes that draw).
MASK_STREAM = 0x6D61736B  # "mask": each clip's mask and noise, per epoch
ORDER_STREAM = 0x6F72646572  # "order": the data order of each epoch
HEADS_STREAM = 0x6865616473  # "heads": the BEST-RQ heads' initialisation
LABELS_STREAM = 0x6C6162656C  # "label": which transcribed clips a fine-tune may use
FALLBACK_STREAM = 0x66616C6C  # "fall": the sampled re-decodings of the fallback decoding
STREAMS = {"mask": MASK_STREAM, "order": ORDER_STREAM, "heads": HEADS_STREAM,
           "labels": LABELS_STREAM, "fallback": FALLBACK_STREAM}


def derived_seed(*keys: int) -> int:
    """A 63-bit seed mixing `keys`: nearby keys give unrelated streams (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
               .astype(np.uint64).view(np.uint64)[0] >> np.uint64(1))


def generator(*keys: int) -> torch.Generator:
    """A CPU torch generator seeded by `derived_seed(*keys)`."""
    return torch.Generator().manual_seed(derived_seed(*keys))
