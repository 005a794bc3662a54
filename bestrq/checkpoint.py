"""Training-state checkpoints in one folder, safe against a kill at any moment.

Each file `step-XXXXXXXX.pt` is a fixed header (magic, sha256 and length of the payload) followed
by the `torch.save` payload. It is written to a temporary file in the same folder, flushed and
fsynced, then renamed over its final name, so a reader sees either nothing or a whole file; the
checksum catches what the file system did not (truncation, bit rot). Payloads are loaded with
`weights_only=True`: state dicts, tensors and plain Python values only.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

MAGIC = b"BRQCKPT1"
HEADER = struct.Struct("<8s32sQ")  # magic, sha256 of the payload, payload length
NAME = re.compile(r"^step-(\d{8})\.pt$")
TMP_PREFIX = ".tmp-step-"
# Test hook: "<step>:<stage>" kills this process with SIGKILL while writing that step's
# checkpoint; stage "partial" after half the bytes, "written" after the fsync, before the rename.
KILL_ENV = "BESTRQ_CHECKPOINT_KILL"


class CorruptCheckpointError(ValueError):
    """A checkpoint file whose header, length or checksum does not hold."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every file named like a checkpoint, oldest first; temp files excluded."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := NAME.match(p.name)) and p.is_file()]
    return sorted(found)


def _kill_point(step: int, stage: str) -> bool:
    return os.environ.get(KILL_ENV) == f"{step}:{stage}"


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write `state` atomically as the checkpoint of `step`, keeping the newest `keep` files.

    Checkpoints of later steps (left by a run that was resumed from an earlier one) and stale
    temporary files are removed: a single writer owns the folder.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"step": step, "state": state}, buffer)
    payload = buffer.getvalue()
    header = HEADER.pack(MAGIC, hashlib.sha256(payload).digest(), len(payload))
    for stale in directory.glob(TMP_PREFIX + "*"):
        stale.unlink(missing_ok=True)
    final = directory / checkpoint_name(step)
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=directory)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide checkpoints from other users
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            if _kill_point(step, "partial"):
                f.write(payload[: len(payload) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if _kill_point(step, "written"):
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    for other_step, path in list_checkpoints(directory):
        if other_step > step:
            path.unlink(missing_ok=True)
    existing = list_checkpoints(directory)
    for _, path in existing[: max(0, len(existing) - keep)]:
        path.unlink(missing_ok=True)
    return final


def read_checkpoint(path: str | Path) -> tuple[int, dict[str, Any]]:
    """(step, state) of one checkpoint file; CorruptCheckpointError when it does not verify."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < HEADER.size:
        raise CorruptCheckpointError(f"{path}: truncated header ({len(data)} bytes)")
    magic, digest, length = HEADER.unpack_from(data)
    payload = data[HEADER.size:]
    if magic != MAGIC:
        raise CorruptCheckpointError(f"{path}: not a BEST-RQ checkpoint (bad magic)")
    if len(payload) != length:
        raise CorruptCheckpointError(f"{path}: payload has {len(payload)} bytes, header says "
                                     f"{length} (truncated?)")
    if hashlib.sha256(payload).digest() != digest:
        raise CorruptCheckpointError(f"{path}: sha256 mismatch (corrupted)")
    content = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    return int(content["step"]), content["state"]


def load_latest(directory: str | Path) -> tuple[int, dict[str, Any]] | None:
    """(step, state) of the newest checkpoint that verifies, or None.

    A checkpoint that fails verification is reported with a warning naming it, and the previous
    one is tried.
    """
    for step, path in reversed(list_checkpoints(directory)):
        try:
            saved_step, state = read_checkpoint(path)
        except (CorruptCheckpointError, OSError, RuntimeError, EOFError, KeyError) as err:
            warnings.warn(f"skipping unreadable checkpoint {path}: {err}", stacklevel=2)
            continue
        if saved_step != step:
            warnings.warn(f"skipping checkpoint {path}: it holds step {saved_step}",
                          stacklevel=2)
            continue
        return step, state
    return None


def latest_step(directory: str | Path) -> int:
    """Step of the newest valid checkpoint, 0 when there is none."""
    latest = load_latest(directory)
    return 0 if latest is None else latest[0]
