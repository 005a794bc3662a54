"""Roles of a corpus's sources: the pool BEST-RQ learns from (`download.source`), and the
optional transcribed sets a user brings of their own: `labelled` (the fine-tune's clips; also
in-domain audio for BEST-RQ), `dev` (where knobs are chosen) and `test` (what reports).

A raw-manifest entry of a role source carries `"role"`; the pool's carry none, so a corpus
without roles is written as before. A speaker (the entry's group) is in one role only: checked
on the manifests, before any audio is decoded.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["POOL", "ROLES", "RoleOverlapError", "check_disjoint", "role_of"]

POOL = "pool"
ROLES: tuple[str, ...] = ("labelled", "dev", "test")


class RoleOverlapError(ValueError):
    """A speaker's files come from two roles (e.g. download.labelled and download.test)."""


def role_of(entry: dict) -> str:
    """The role of a raw-manifest entry or window record: its "role", else the pool."""
    return entry.get("role") or POOL


def check_disjoint(entries: Iterable[dict]) -> dict[str, str]:
    """Each group's role; RoleOverlapError, one line naming the speakers (at most five) and
    their roles, when a group has files in two roles."""
    roles: dict[str, set[str]] = {}
    for entry in entries:
        roles.setdefault(str(entry["group"]), set()).add(role_of(entry))
    both = {g: sorted(r) for g, r in roles.items() if len(r) > 1}
    if both:
        shown = ", ".join(f"{g!r} ({' and '.join(_source(r) for r in rs)})"
                          for g, rs in sorted(both.items())[:5])
        more = f" and {len(both) - 5} more" if len(both) > 5 else ""
        raise RoleOverlapError(
            f"download: {len(both)} speaker(s) in two roles: {shown}{more}; a speaker must be "
            "in one role only, or the held-out figures would be measured on voices the model "
            "was trained on")
    return {g: next(iter(r)) for g, r in roles.items()}


def _source(role: str) -> str:
    return "download.source" if role == POOL else f"download.{role}"
