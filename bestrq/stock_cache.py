"""The stock encoder's outputs per training clip, kept after their first computation so that the
distillation guard's stock forward runs once per clip rather than once per epoch
(`distill_cache`).

The stock encoder is frozen and a clip's clean log-mel never changes, so its distilled block
outputs are the same every epoch. They are kept in float16 (the values they hold, layer-normed
block outputs, are far inside its range) in an anonymous temporary file, memory-mapped: the
operating system keeps what fits in RAM and pages the rest, and the file's space is given back
when the run's process ends, however it ends. Each training process keeps its own.

The file's blocks are all reserved when it is made (`posix_fallocate`, or zeros written where
the file system cannot): a page of a memory map whose block cannot be allocated ends the
process with SIGBUS and no message, so a disk that fills later must not reach the cache. Every
failure to make, reserve or map the file is a `CacheSpaceError`, one line naming the knob, the
size and the folder.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import tempfile
from typing import IO

import numpy as np
import torch
from torch import Tensor

STORED = np.float16
BYTES_PER_VALUE = np.dtype(STORED).itemsize
ZERO_CHUNK = 1 << 24  # bytes written at a time where the file system cannot fallocate
# What posix_fallocate says where the file system does not support it.
_NO_FALLOCATE = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
# What to do about a disk error, beyond the shared advice, by errno.
_ADVICE = {errno.EFBIG: "raise the file-size limit (ulimit -f) or ",
           errno.EDQUOT: "free space under your quota, ",
           errno.ENOMEM: "free memory or address space (ulimit -v) or "}


class CacheSpaceError(OSError, RuntimeError):
    """The cache's file could not be made, reserved or mapped. An OSError (its `errno` is the
    cause's) and a RuntimeError, which the stages print as one line."""


def cache_bytes(num_clips: int, layers: int, frames: int, d_model: int) -> int:
    """Disk (and page cache) a full cache takes: one float16 value per clip, distilled block,
    encoder frame and channel (tiny: 1,500 x 384 values, 1.15 MB a 30 s window and block)."""
    return num_clips * layers * frames * d_model * BYTES_PER_VALUE


def _size(num_bytes: int) -> str:
    return (f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30
            else f"{num_bytes / 2**20:.2f} MiB")


def reserve(fd: int, size: int) -> None:
    """Allocate the first `size` bytes of the open file `fd`: posix_fallocate, or, where the
    file system does not support it, zeros written over them, so that every block exists
    before the file is mapped."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as err:
            if err.errno not in _NO_FALLOCATE:
                raise
    zeros = memoryview(bytes(min(ZERO_CHUNK, size)))
    done = 0
    while done < size:
        written = os.pwrite(fd, zeros[:min(len(zeros), size - done)], done)
        if written <= 0:  # a regular file that takes nothing: full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += written


class StockCache:
    """Row `clip` holds that clip's stock outputs, (layers, frames, d_model), once `put`.

    The file is made, and its whole size reserved, when the cache is; the free space of the
    temporary folder is checked first, so that a run that would fill the disk stops before any
    work, with a message naming the knob and the folder.
    """

    def __init__(self, num_clips: int, row: tuple[int, int, int],
                 folder: str | None = None) -> None:
        """row: (distilled blocks, encoder frames, d_model) of one clip."""
        if num_clips < 1:
            raise ValueError(f"distill_cache: a cache needs at least one clip, got {num_clips}")
        self.num_clips, self.row = num_clips, tuple(row)
        self.folder = folder or tempfile.gettempdir()
        need = cache_bytes(num_clips, *row)
        try:
            free = shutil.disk_usage(self.folder).free
        except OSError as err:
            raise self._refusal(need, err) from err
        if need > free:
            raise CacheSpaceError(f"distill_cache: the stock outputs of {num_clips} clips need "
                                  f"{need / 2**30:.2f} GiB in {self.folder} (TMPDIR), which has "
                                  f"{free / 2**30:.2f} GiB free: free space, point TMPDIR "
                                  "elsewhere or set distill_cache: false")
        self.filled = torch.zeros(num_clips, dtype=torch.bool)  # (clips,)
        self._file: IO[bytes] | None = None
        self._rows: np.ndarray | None = None
        try:
            # Unlinked at once, so a killed run leaves nothing behind; held open for the run.
            file = tempfile.TemporaryFile(prefix="bestrq-stock-", dir=self.folder)  # noqa: SIM115
            try:
                reserve(file.fileno(), need)
                rows = np.memmap(  # (clips, layers, frames, d_model) float16
                    file, dtype=STORED, mode="r+", shape=(num_clips, *self.row))
            except BaseException:
                file.close()  # its space is given back at once
                raise
        except OSError as err:
            raise self._refusal(need, err) from err
        self._file, self._rows = file, rows

    def _refusal(self, need: int, err: OSError) -> CacheSpaceError:
        """`err`, met making the cache's file, as one line naming the knob, size and folder."""
        code = err.errno
        why = (f"{err.strerror or err} ({errno.errorcode.get(code, code)})" if code
               else str(err))
        refusal = CacheSpaceError(
            f"distill_cache: the stock outputs of {self.num_clips} clips need {_size(need)} in "
            f"{self.folder} (TMPDIR), where its file could not be made: {why}: "
            f"{_ADVICE.get(code, 'free space, ')}point TMPDIR elsewhere or set "
            "distill_cache: false")
        refusal.errno = code
        return refusal

    def missing(self, clips: Tensor) -> Tensor:
        """(batch,) bool: which of `clips` (batch,) int64 have no row yet."""
        return ~self.filled[clips.cpu()]

    def put(self, clips: Tensor, outputs: Tensor) -> None:
        """Store `outputs` (batch, layers, frames, d_model) as the rows of `clips` (batch,)."""
        if self._rows is None:
            raise ValueError("distill_cache: the cache is closed")
        if tuple(outputs.shape[1:]) != self.row:
            raise ValueError(f"distill_cache: rows of shape {self.row} (blocks, frames, "
                             f"d_model) expected, got {tuple(outputs.shape[1:])}: the cache "
                             "holds whole windows of the encoder's context")
        values = outputs.detach().to("cpu", torch.float16)
        if not bool(torch.isfinite(values).all()):
            raise ValueError("distill_cache: a stock encoder output is not finite in float16 "
                             "(beyond +-65504): turn distill_cache off for this model")
        self._rows[clips.cpu().numpy()] = values.numpy()
        self.filled[clips.cpu()] = True

    def get(self, clips: Tensor) -> Tensor:
        """The rows of `clips` (batch,), all filled: (batch, layers, frames, d_model) float16."""
        if self._rows is None or not bool(self.filled[clips.cpu()].all()):
            raise KeyError("distill_cache: a clip was read before its stock outputs were stored")
        return torch.from_numpy(self._rows[clips.cpu().numpy()])

    @property
    def bytes_in_use(self) -> int:
        """Bytes of the rows stored so far."""
        return int(self.filled.sum()) * math.prod(self.row) * BYTES_PER_VALUE

    def close(self) -> None:
        """Give the file's space back now rather than when the process ends."""
        self._rows = None
        if self._file is not None:
            self._file.close()
            self._file = None
        self.filled.zero_()
