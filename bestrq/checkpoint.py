"""Training-state checkpoints in one folder, safe against a kill at any moment, and the policy of
which folder a run may use.

Each file `step-XXXXXXXX.pt` is a fixed header (magic, sha256 and length of the payload) followed
by the `torch.save` payload. It is written to a temporary file in the same folder, flushed and
fsynced, then renamed over its final name, so a reader sees either nothing or a whole file; the
checksum catches what the file system did not (truncation, bit rot). Payloads are loaded with
`weights_only=True`: state dicts, tensors and plain Python values only.

Folder policy (`claim_checkpoints`): a folder is ours when it holds our marker (MARKER: a format
tag and the fingerprint of the run its checkpoints belong to, with the fingerprinted values in
RECORD beside it). Only our folders are ever changed; one made by another run is moved aside
whole, never deleted, with a message naming what changed; a non-empty folder that is not ours
stops the run before any work. One process at a time writes a folder: it holds an exclusive
flock on LOCK for the whole run. Each checkpoint stores the fingerprint it was made under, and
a checkpoint whose fingerprint is not its folder's is skipped on load.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import signal
import struct
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from bestrq.atomic import atomic_write_text, file_mode, fsync_dir

MAGIC = b"BRQCKPT1"
HEADER = struct.Struct("<8s32sQ")  # magic, sha256 of the payload, payload length
NAME = re.compile(r"^step-(\d{8})\.pt$")
TMP_PREFIX = ".tmp-step-"
MARKER = "fingerprint.txt"  # FORMAT_TAG, then the run's fingerprint: the folder is ours
RECORD = "fingerprint.json"  # the fingerprinted values and inputs, to say what changed
LOCK = ".lock"  # flock-ed by the one process writing the folder; holds its pid
FORMAT_TAG = "bestrq-checkpoints/2"
TMP_MARKER_PREFIX = ".tmp-marker-"
STALE_SUFFIX = ".stale"  # <folder>.stale: the checkpoints of the last run made with other values
# Test hook: "<step>:<stage>" kills this process with SIGKILL while writing that step's
# checkpoint; stage "partial" after half the bytes, "written" after the fsync, before the rename.
KILL_ENV = "BESTRQ_CHECKPOINT_KILL"


class CorruptCheckpointError(ValueError):
    """A checkpoint file whose header, length or checksum does not hold."""


class CheckpointFolderError(RuntimeError):
    """A checkpoint folder this run may not use: not ours, written by another run, unmovable."""


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


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any],
                    keep: int = 2, fingerprint: str | None = None) -> Path:
    """Write `state` atomically as the checkpoint of `step`, keeping the newest `keep` files.

    `fingerprint` (default: the folder's, from its marker) is stored with it for `load_latest`.
    Checkpoints of later steps (left by a run that was resumed from an earlier one) and stale
    temporary files are removed: the caller is the folder's one writer (`claim_checkpoints`).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if fingerprint is None:
        fingerprint = folder_fingerprint(directory)
    buffer = io.BytesIO()
    torch.save({"step": step, "state": state, "fingerprint": fingerprint}, buffer)
    payload = buffer.getvalue()
    header = HEADER.pack(MAGIC, hashlib.sha256(payload).digest(), len(payload))
    for stale in directory.glob(TMP_PREFIX + "*"):
        stale.unlink(missing_ok=True)
    final = directory / checkpoint_name(step)
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=directory)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, file_mode())
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
    fsync_dir(directory)
    for other_step, path in list_checkpoints(directory):
        if other_step > step:
            path.unlink(missing_ok=True)
    existing = list_checkpoints(directory)
    for _, path in existing[: max(0, len(existing) - keep)]:
        path.unlink(missing_ok=True)
    return final


def read_checkpoint(path: str | Path) -> tuple[int, dict[str, Any]]:
    """(step, state) of one checkpoint file; CorruptCheckpointError when it does not verify."""
    step, state, _ = _read(Path(path))
    return step, state


def _read(path: Path) -> tuple[int, dict[str, Any], str | None]:
    """(step, state, fingerprint) of one checkpoint file."""
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
    return int(content["step"]), content["state"], content.get("fingerprint")


def load_latest(directory: str | Path,
                fingerprint: str | None = None) -> tuple[int, dict[str, Any]] | None:
    """(step, state) of the newest checkpoint that verifies and was made under `fingerprint`
    (default: the folder's, from its marker; none: any), or None.

    A checkpoint that fails verification or was made under another fingerprint is reported
    with a warning naming it, and the previous one is tried.
    """
    if fingerprint is None:
        fingerprint = folder_fingerprint(directory)
    for step, path in reversed(list_checkpoints(directory)):
        try:
            saved_step, state, made_under = _read(path)
        except (CorruptCheckpointError, OSError, RuntimeError, EOFError, KeyError) as err:
            warnings.warn(f"skipping unreadable checkpoint {path}: {err}", stacklevel=2)
            continue
        if saved_step != step:
            warnings.warn(f"skipping checkpoint {path}: it holds step {saved_step}",
                          stacklevel=2)
            continue
        if fingerprint is not None and made_under != fingerprint:
            warnings.warn(f"skipping checkpoint {path}: made by another run (fingerprint "
                          f"{str(made_under)[:12]}, expected {fingerprint[:12]})", stacklevel=2)
            continue
        return step, state
    return None


def latest_step(directory: str | Path, fingerprint: str | None = None) -> int:
    """Step of the newest valid checkpoint (as `load_latest`), 0 when there is none."""
    latest = load_latest(directory, fingerprint)
    return 0 if latest is None else latest[0]


# ----------------------------------------------------------------------------- folder policy


@dataclass(frozen=True)
class RunSignature:
    """What a run's checkpoints are made with: parameter values and digests of its inputs."""

    values: dict[str, Any]  # flat: dotted name -> value
    inputs: dict[str, str]  # name -> sha256 of a file or bytes the run reads
    # Step limits among `values` that may change without changing the updates already made:
    # a folder made under a lower one is resumed and extended, not replaced...
    extendable: tuple[str, ...] = ()
    # ...when this, given the values the folder's checkpoints were made with (its record;
    # empty when lost) and the step the run would go on from, finds nothing that differs
    # (None); otherwise it says, in a few words, what the earlier updates did differently
    # (a warm-up that is a share of the limit, say), and the run starts afresh. Not part of
    # the fingerprint: it is decided from the values, which are.
    why_not_extend: Callable[[Mapping[str, Any], int], str | None] | None = field(
        default=None, compare=False, repr=False)

    @property
    def fingerprint(self) -> str:
        fixed = {k: v for k, v in self.values.items() if k not in self.extendable}
        blob = json.dumps({"values": fixed, "inputs": self.inputs}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def run_signature(values: Mapping[str, Any], inputs: Mapping[str, Path | bytes] | None = None,
                  extendable: Iterable[str] = (), ignore: Iterable[str] = (),
                  why_not_extend: Callable[[Mapping[str, Any], int], str | None] | None = None
                  ) -> RunSignature:
    """The signature of a run from its parameter `values` (nested mappings become dotted
    names), the files or bytes it starts from (`inputs`, hashed), its `extendable` step limits
    (with `why_not_extend`, the test of each extension: `RunSignature`) and the names (last
    dotted part) of knobs to `ignore` because they change speed only."""
    ignored = set(ignore)
    flat = {k: v for k, v in _flatten(values).items() if k.rsplit(".", 1)[-1] not in ignored}
    digests = {name: hashlib.sha256(item.read_bytes() if isinstance(item, Path) else item)
               .hexdigest() for name, item in (inputs or {}).items()}
    return RunSignature(flat, digests, tuple(k for k in extendable if k in flat), why_not_extend)


def _own_entry(name: str) -> bool:
    return (name in (MARKER, RECORD, LOCK) or bool(NAME.match(name))
            or name.startswith((TMP_PREFIX, TMP_MARKER_PREFIX)))


def folder_fingerprint(directory: str | Path) -> str | None:
    """The fingerprint in `directory`'s marker, or None (no marker, or not of this format)."""
    try:
        lines = (Path(directory) / MARKER).read_text().split()
    except (OSError, UnicodeDecodeError):
        return None
    return lines[1] if len(lines) == 2 and lines[0] == FORMAT_TAG else None


def is_checkpoint_folder(directory: str | Path) -> bool:
    """Whether `directory` carries our marker, so that the policy may move it aside."""
    directory = Path(directory)
    if folder_fingerprint(directory) is not None:
        return True
    try:
        lines = (directory / MARKER).read_text().split()
    except (OSError, UnicodeDecodeError):
        return False
    # Before the format tag the marker was a bare sha256: accepted only beside nothing but
    # checkpoint files, so that a stray fingerprint.txt does not make a folder ours.
    return (len(lines) == 1 and re.fullmatch(r"[0-9a-f]{64}", lines[0]) is not None
            and all(_own_entry(p.name) for p in directory.iterdir()))


@dataclass
class CheckpointClaim:
    """A checkpoint folder this process writes alone until `release` (or its exit)."""

    directory: Path
    start: int  # step of the checkpoint to resume from; 0: a fresh run
    lock: IO[str] | None = field(default=None, repr=False)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()  # closing the file drops the flock
            self.lock = None

    def __enter__(self) -> CheckpointClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def claim_checkpoints(directory: str | Path, signature: RunSignature,
                      report: Callable[[str], None] = _to_stderr) -> CheckpointClaim:
    """Lock `directory` for this run and decide where the run starts; `report` gets what the
    run's owner must know (extended run, checkpoints moved aside).

    - missing, or empty: a fresh run in it;
    - ours, same fingerprint: resume from its newest checkpoint of that fingerprint (a step
      limit raised past it extends the run, and says so, when the signature's
      `why_not_extend` finds the updates already made the same under both limits);
    - ours, other values or inputs (or a step limit now below its newest checkpoint, or one
      whose change would have changed the updates already made): moved
      whole to `<directory>.stale` (replacing an older copy of ours there), with a message
      naming what changed; a fresh run in a new, empty folder;
    - not empty and not ours, or locked by another process: CheckpointFolderError at once,
      with nothing changed.
    """
    directory = Path(directory)
    _refuse_foreign(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = _lock(directory)
    try:
        _refuse_foreign(directory)  # another process may have filled it before we held it
        found = folder_fingerprint(directory)
        old = _read_record(directory) if found is not None else {}
        if found == signature.fingerprint:
            start = latest_step(directory, signature.fingerprint)
            before = old.get("values", {})
            below = [f"{k}: {_show(before[k]) if k in before else '?'} -> "
                     f"{_show(signature.values[k])} is below the newest checkpoint (step "
                     f"{start})" for k in signature.extendable if signature.values[k] < start]
            changes = _changes(old, signature)
            differs = _why_not_extend(signature, before, start)
            if not below and differs is None:
                if start and changes:
                    report(f"checkpoints: {'; '.join(changes)}: continuing the run in "
                           f"{directory} from its checkpoint of step {start} (its updates "
                           "are those this run makes: the same rates under both limits)")
                _write_marker(directory, signature)
                return CheckpointClaim(directory, start, lock)
            changes = below or [f"{'; '.join(changes)}: {differs}" if changes else str(differs)]
        elif found is None and is_checkpoint_folder(directory):
            changes = ["made by an earlier version of this tool, which kept no record of its "
                       "parameters"]
        else:
            changes = _changes(old, signature) or ["values or inputs without a record"]
        if list_checkpoints(directory):
            lock, stale, replaced = _move_aside(directory, lock)
            report(f"checkpoints: {directory} holds checkpoints of another run "
                   f"({'; '.join(changes)}): moved them to {stale}"
                   f"{' (replacing an older copy)' if replaced else ''}; this run starts from "
                   f"step 0. To resume that run instead, restore its values and rename {stale} "
                   f"back; to free the space, delete {stale}.")
        _write_marker(directory, signature)
        return CheckpointClaim(directory, 0, lock)
    except BaseException:
        lock.close()
        raise


def _why_not_extend(signature: RunSignature, before: Mapping[str, Any],
                    start: int) -> str | None:
    """Why the checkpoints, made with the recorded values `before`, cannot go on under
    `signature`'s step limits (None: they can, or nothing was extended)."""
    unset = object()
    if (not start or signature.why_not_extend is None or not signature.extendable
            or all(before.get(k, unset) == signature.values[k] for k in signature.extendable)):
        return None
    return signature.why_not_extend(before, start)


def _refuse_foreign(directory: Path) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise CheckpointFolderError(f"checkpoint folder {directory} is a file: nothing was "
                                    "changed; choose another folder")
    if is_checkpoint_folder(directory):
        return
    # What a first run killed before its marker was in place leaves is no one else's.
    others = sorted(p.name for p in directory.iterdir()
                    if p.name != LOCK and not p.name.startswith(TMP_MARKER_PREFIX))
    if others:
        shown = sorted(others, key=_own_entry)[:3]  # what is plainly not ours first
        raise CheckpointFolderError(
            f"checkpoint folder {directory} is not empty and carries no {MARKER} marker of "
            f"this tool (it holds {len(others)} entries: {', '.join(map(repr, shown))}"
            f"{', ...' if len(others) > 3 else ''}): nothing was deleted. Choose a new or "
            "empty folder (train: --output_dir), or move that one away.")


def _lock(directory: Path) -> IO[str]:
    """The folder's lock file, flock-ed exclusively; CheckpointFolderError when held."""
    f = open(directory / LOCK, "a+")  # noqa: SIM115 - held open for the whole run
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise CheckpointFolderError(
            f"checkpoint folder {directory} is in use by another run"
            f"{f' (pid {holder})' if holder else ''}: two writers would destroy each other's "
            "checkpoints. Wait for it to end, or give this run another folder.") from None
    except BaseException:
        f.close()
        raise
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _move_aside(directory: Path, lock: IO[str]) -> tuple[IO[str], Path, bool]:
    """Rename the folder (one atomic step, so a crash leaves it whole on one side) to its
    stale name and lock a new, empty one: (new lock, stale path, whether an older stale copy
    was replaced)."""
    stale = directory.with_name(directory.name + STALE_SUFFIX)
    replaced = stale.exists() or stale.is_symlink()
    if replaced:
        if stale.is_symlink() or not stale.is_dir() or not is_checkpoint_folder(stale):
            raise CheckpointFolderError(
                f"checkpoint folder {directory} holds checkpoints of another run, to be moved "
                f"aside to {stale}, but {stale} is not a checkpoint folder of this tool: "
                f"nothing was changed. Move {stale} away.")
        shutil.rmtree(stale)
    try:
        os.rename(directory, stale)
    except OSError as err:
        raise CheckpointFolderError(
            f"checkpoint folder {directory} holds checkpoints of another run and could not be "
            f"moved aside to {stale} ({err}): nothing was deleted; move or delete it "
            "yourself") from err
    directory.mkdir()
    try:
        new_lock = _lock(directory)  # before the old one goes: never a moment unlocked
    finally:
        lock.close()
    return new_lock, stale, replaced


def _read_record(directory: Path) -> dict[str, Any]:
    try:
        record = json.loads((directory / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)


def _changes(old: dict[str, Any], new: RunSignature) -> list[str]:
    """"name: old -> new" for every value that differs, "<input> changed" for every input."""
    if not old:
        return []
    # Compared as the record stores them (JSON), so that a tuple equals its list.
    before = old.get("values", {})
    after = json.loads(json.dumps(new.values, default=str))
    unset = object()
    lines = [f"{k}: {_show(before[k]) if k in before else '(unset)'} -> "
             f"{_show(after[k]) if k in after else '(unset)'}"
             for k in sorted(set(before) | set(after))
             if before.get(k, unset) != after.get(k, unset)]
    inputs = old.get("inputs", {})
    lines += [f"{name} changed" for name in sorted(set(inputs) | set(new.inputs))
              if inputs.get(name) != new.inputs.get(name)]
    return lines


def _write_marker(directory: Path, signature: RunSignature) -> None:
    """The marker, then its record: a crash between them leaves a marker without a record
    (what changed is then unknown), never a record that belongs to another marker."""
    (directory / RECORD).unlink(missing_ok=True)
    atomic_write_text(directory / MARKER, f"{FORMAT_TAG}\n{signature.fingerprint}\n",
                      TMP_MARKER_PREFIX)
    record = {"format": FORMAT_TAG, "fingerprint": signature.fingerprint,
              "values": signature.values, "inputs": signature.inputs,
              "extendable": list(signature.extendable)}
    atomic_write_text(directory / RECORD, json.dumps(record, indent=2, default=str) + "\n",
                      TMP_MARKER_PREFIX)
    fsync_dir(directory)
