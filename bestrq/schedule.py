"""Learning-rate schedules as multipliers of the peak rate, for `torch.optim.lr_scheduler.LambdaLR`.

The scheduler is stepped once per optimiser update, so the multiplier's argument `s` is the number
of updates already made and update `n = s + 1` (1-based) uses `lambda(s)`: the first update
already trains (no update at rate zero) and the peak is reached at update `warmup_steps`.

Lengths (`warmup_steps`, `heads_only_steps`) are given either in updates (a whole number >= 1)
or as a share of the run (a number below 1), so that a schedule sized for a 20-update demo
still makes sense at 100k updates (`updates`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

Schedule = Literal["inverse_sqrt", "cosine", "constant"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)


def updates(value: float, max_steps: int, name: str) -> int:
    """A length in optimiser updates: `value` updates when it is >= 1 (a whole number), else
    that share of `max_steps`, rounded half up."""
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if value >= 1:
        if value != int(value):
            raise ValueError(f"{name} must be a share of max_steps (below 1) or a whole number "
                             f"of updates, got {value}")
        return int(value)
    return math.floor(value * max_steps + 0.5)


def frozen_for(steps: int, schedule: Callable[[int], float]) -> Callable[[int], float]:
    """A multiplier that is 0 for the first `steps` updates and then `schedule` counted from
    there, warm-up included, as if the run began at update `steps + 1`."""

    def multiplier(s: int) -> float:
        return 0.0 if s < steps else schedule(s - steps)

    return multiplier


def lr_lambda(kind: str, warmup_steps: int, max_steps: int,
              min_ratio: float = 0.0) -> Callable[[int], float]:
    """Multiplier of the peak rate for update `s + 1`.

    inverse_sqrt: Noam / Transformer schedule (used by BEST-RQ): n / w during warm-up, then
        sqrt(w / n); never below `min_ratio`.
    cosine: linear warm-up, then half a cosine from 1 at update w to `min_ratio` at `max_steps`.
    constant: linear warm-up, then 1.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if kind == "inverse_sqrt" and warmup_steps < 1:
        raise ValueError("warmup_steps must be >= 1 for the inverse_sqrt schedule")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_ratio}")

    def warmup(n: int) -> float:
        return 1.0 if warmup_steps == 0 else min(1.0, n / warmup_steps)

    def inverse_sqrt(s: int) -> float:
        n = s + 1
        return max(min_ratio, min(n / warmup_steps, math.sqrt(warmup_steps / n)))

    def cosine(s: int) -> float:
        n = s + 1
        if n <= warmup_steps:
            return warmup(n)
        progress = min(1.0, (n - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def constant(s: int) -> float:
        return warmup(s + 1)

    return {"inverse_sqrt": inverse_sqrt, "cosine": cosine, "constant": constant}[kind]
