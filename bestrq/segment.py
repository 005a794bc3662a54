"""The "segment" stage: decode, cut and pack raw recordings into Whisper-sized windows.

Reads a raw manifest (id, path, transcript, group), writes 16 kHz mono FLAC windows of at most
`max_seconds`, and splits them into train, dev and test by speaker/recording group: no voice is
in two splits, dev and test are drawn from groups with transcripts, and knobs are chosen on dev
so that test reports. Only `transcribed_share` of the transcribed train windows keep their text
(the fine-tune's labelled set); BEST-RQ pre-trains on all of train. Every file of the manifest
ends up in a window or in `skipped.jsonl` with a reason (undecodable, too short, ...); what the
download stage left aside (`raw/skipped.jsonl`) is copied there too.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import re
import shutil
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import chain, groupby
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm
from whisper.audio import N_SAMPLES, SAMPLE_RATE

from bestrq.audio import AudioDecodeError, split_stream, stream_audio, write_audio
from bestrq.jsonl import read_jsonl, write_jsonl
from bestrq.knobs import Ratio, Seed, Workers, check, knob
from bestrq.roles import POOL, ROLES, check_disjoint, role_of
from bestrq.vad import vad_cut_point

__all__ = ["SPLITS", "SegmentConfig", "Unit", "check_splittable", "hide_transcripts", "pack_units",
           "segment_corpus", "split_corpus", "use_labelled_renditions", "validate", "voice_units"]

# Whisper's encoder sees exactly N_SAMPLES (30 s); longer windows would be truncated.
WHISPER_WINDOW_SECONDS = N_SAMPLES / SAMPLE_RATE
SPLITS: tuple[str, ...] = ("train", "dev", "test")
Cutter = Literal["vad", "energy"]


@dataclass
class SegmentConfig:
    """Parameters of the "segment" stage."""

    max_seconds: Annotated[float, knob(
        "longest window, in seconds (at most Whisper's 30)", gt=0,
        le=WHISPER_WINDOW_SECONDS)] = 30.0
    min_seconds: Annotated[float, knob(
        "shorter pieces are dropped", ge=0, lt=WHISPER_WINDOW_SECONDS)] = 0.5
    pack: Annotated[bool, knob(
        "pack short utterances of one group into windows <= max_seconds")] = True
    cutter: Annotated[Cutter, knob(
        "where recordings longer than a window are cut: vad (silero-vad, between utterances) "
        "or energy (the quietest 100 ms frame of the window's last third)")] = "vad"
    dev_fraction: Annotated[float, knob(
        "share of the transcribed windows in dev (of all windows in a corpus without "
        "transcripts), drawn by speaker or recording", gt=0, lt=1)] = 0.1
    test_fraction: Annotated[float, knob("share of the transcribed windows in test, as dev's",
                                         gt=0, lt=1)] = 0.2
    train_transcribed_speakers: Annotated[float, knob(
        "of the speakers with transcripts, the share kept in train for the fine-tune (at "
        "least one; dev and test are drawn from the others)", ge=0, lt=1)] = 0.4
    transcribed_share: Annotated[Ratio, knob(
        "of the transcribed train windows, the share that keeps its text (a seeded draw)")] = 1.0
    seed: Annotated[Seed, knob("the split and the transcribed draw")] = 0
    num_workers: Annotated[Workers, knob(
        "decoding processes; 0: one per CPU core (the output is the same)",
        speed_only=True)] = 1


def validate(cfg: SegmentConfig) -> None:
    """Check every parameter before any work; ValueError names the bad one."""
    check(cfg, "segment.")
    if cfg.min_seconds >= cfg.max_seconds:
        raise ValueError(f"segment.min_seconds: must be < max_seconds ({cfg.max_seconds}), "
                         f"got {cfg.min_seconds}")
    if cfg.dev_fraction + cfg.test_fraction >= 1:
        raise ValueError(f"segment.dev_fraction + segment.test_fraction: must be < 1 (train needs "
                         f"the rest), got {cfg.dev_fraction} + {cfg.test_fraction}")


@dataclass
class Unit:
    """One decodable stretch of audio: a whole utterance or one piece of a long recording."""

    key: str  # unique: the utterance id, with a piece suffix for cut recordings
    source_id: str
    audio: np.ndarray  # (samples,) at SAMPLE_RATE
    transcript: str | None


def pack_units(units: Iterable[Unit], max_samples: int, pack: bool = True
               ) -> Iterator[list[Unit]]:
    """Greedily group consecutive units into windows of at most `max_samples` samples; a window
    is yielded as soon as it is closed, so a long stream of units is never held at once.

    Transcribed and untranscribed units never share a window: the window's transcript would
    have to be dropped (losing the others' text) or would not cover all of its audio."""
    current: list[Unit] = []
    length = 0
    for unit in units:
        n = len(unit.audio)
        labelled = unit.transcript is not None
        if current and (not pack or length + n > max_samples
                        or labelled != (current[0].transcript is not None)):
            yield current
            current, length = [], 0
        current.append(unit)
        length += n
    if current:
        yield current


def _stable_hash(*parts: object) -> float:
    """A float in [0, 1) from sha256: stable across runs and Python processes (unlike hash())."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _seeded_order(keys: Iterable[str], seed: int, salt: str) -> list[str]:
    return sorted(keys, key=lambda k: (_stable_hash(seed, salt, k), k))


def _greedy_set(keys: list[str], sizes: dict[str, int], target: float, limit: int) -> list[str]:
    """At most `limit` keys, taken in the given order, whose total size comes closest to
    `target`; at least one. A key that would take the total further from the target is passed
    over even when none is chosen yet; if none fits, the one closest to the target alone is
    taken (so a dominant speaker first in the order does not fill a small split)."""
    chosen: list[str] = []
    total = 0
    for key in keys:
        if len(chosen) < limit and abs(total + sizes[key] - target) < abs(total - target):
            chosen.append(key)
            total += sizes[key]
    if not chosen and keys:
        chosen.append(min(keys, key=lambda k: (abs(sizes[k] - target), keys.index(k))))
    return chosen


class SplitError(ValueError):
    """The corpus has too few speakers/recordings (or transcribed ones) for three splits."""


def _too_few(groups: int, labelled: int) -> SplitError:
    return SplitError(
        f"segment: the corpus has {groups} speakers/recordings, {labelled} of them with "
        "transcripts; train, dev and test need one each, and when there are transcripts, one "
        "with transcripts each (train's for the fine-tune; no voice is in two splits). Add "
        "speakers (download.num_speakers for the synthetic source; a folder source's speakers "
        "are its folders, one per speaker) or transcripts")


def check_splittable(group_labelled: dict[str, bool], fixed: dict[str, str] | None = None
                     ) -> None:
    """Raise SplitError (one line: the counts, the knobs) unless three speaker-disjoint splits
    exist: >= 3 groups, and >= 3 with transcripts when the corpus has any (dev and test to
    measure WER, train to fine-tune on). `group_labelled` maps each group to whether one of
    its files has a transcript; `fixed` maps the groups of the user's own dev and test sets
    (download.dev, download.test) to their split: each such set needs transcripts, and the
    other groups then need one transcribed group per split still to draw, plus train's.
    Checked on the manifest, before any audio is decoded, and again on the windows."""
    fixed = fixed or {}
    labelled = sum(group_labelled.values())
    if not fixed:
        if len(group_labelled) < 3 or (labelled and labelled < 3):
            raise _too_few(len(group_labelled), labelled)
        return
    for split in sorted(set(fixed.values())):
        if not any(group_labelled[g] for g, s in fixed.items() if s == split):
            raise SplitError(f"download.{split}: none of its files has a transcript; a held-out "
                             "set measures WER and needs them (*.trans.txt, transcripts.tsv or "
                             "a manifest's text)")
    free = [g for g in group_labelled if g not in fixed]
    drawn = [s for s in ("test", "dev") if s not in fixed.values()]
    free_labelled = sum(group_labelled[g] for g in free)
    if free_labelled < len(drawn) + 1:
        raise SplitError(
            f"segment: outside {' and '.join(f'download.{s}' for s in sorted(set(fixed.values())))}"
            f" {free_labelled} speakers/recordings have transcripts; train needs one for the "
            f"fine-tune{' and ' + ' and '.join(drawn) + ' one each' if drawn else ''}: give "
            "download.labelled (transcribed audio of other speakers) or transcripts")


# How far a split's share of the windows may stray from its knob before segment says so.
SHARE_TOLERANCE = 0.05


class SplitShareWarning(UserWarning):
    """A split's share of the windows is off its knob by more than SHARE_TOLERANCE."""


def train_transcribed_groups(labelled: int, share: float) -> int:
    """How many of the `labelled` transcribed speakers train keeps for the fine-tune: `share`
    of them rounded up, at least one, and never so many that dev and test lack one each."""
    return max(1, min(math.ceil(share * labelled), labelled - 2))


def voice_units(groups: Iterable[str], voices: dict[str, str] | None) -> dict[str, str]:
    """Each group's unit of the split: groups that share a voice (`voices`: group -> its
    voice; groups without one stand alone) form one unit, named by its first group in sorted
    order, so that a corpus without shared voices is split exactly as by groups."""
    voices = voices or {}
    members: dict[str, list[str]] = {}
    for group in sorted(groups):
        members.setdefault(voices.get(group, "\x00" + group), []).append(group)
    return {g: names[0] for names in members.values() for g in names}


def split_corpus(windows: list[dict], dev_fraction: float, test_fraction: float, seed: int,
                 train_transcribed: float = 0.4, voices: dict[str, str] | None = None
                 ) -> dict[str, list[dict]]:
    """Window records (with "id", "group", "transcript") split into train, dev and test by a
    seeded hash of the group, so that no group (speaker or recording) is in two splits; the
    groups of one voice (`voices`: group -> its voice, e.g. the synthetic source's espeak
    voice) move together, so that no voice is in two splits either.

    When the corpus has transcripts, dev and test are drawn from the groups with some and
    sized as shares of the *transcribed* windows, so that much untranscribed audio does not
    pull every transcript into dev and test; and train keeps at least `train_transcribed` of
    the transcribed groups (at least one) for the fine-tune. Test, then dev, take the candidate
    groups (in seeded order) whose sizes come closest to their share, at least one group each
    and no more than leaves train its transcribed groups. A
    corpus without any transcripts is split over all groups (only label-free figures). A split
    whose share strays more than SHARE_TOLERANCE from its knob is reported with a
    SplitShareWarning naming the largest speaker."""
    # The user's own held-out sets keep their speakers; the rest is drawn from the others.
    fixed = {w["group"]: role_of(w) for w in windows if role_of(w) in ("dev", "test")}
    # Units of the draw: a group, or the groups of one voice (the held-out sets' stay apart).
    unit = voice_units({w["group"] for w in windows if w["group"] not in fixed}, voices)
    unit |= {g: g for g in fixed}
    sizes = dict(Counter(unit[w["group"]] for w in windows))  # windows per unit
    labelled_groups = {unit[w["group"]] for w in windows if w["transcript"] is not None}
    check_splittable({g: g in labelled_groups for g in sizes}, fixed)
    free = [g for g in sizes if g not in fixed]
    free_labelled = [g for g in free if g in labelled_groups]
    candidates = _seeded_order(free_labelled or free, seed, "split")
    # Train keeps one group when every group is a candidate.
    pool = candidates[:-1] if len(candidates) == len(free) else candidates
    if labelled_groups:
        # Sized in transcribed windows: what dev and test measure WER on.
        sizes = dict(Counter(unit[w["group"]] for w in windows if w["transcript"] is not None))
    base = sum(sizes.get(g, 0) for g in candidates)
    # At most this many candidates go to dev and test together: the rest stay in train.
    room = len(candidates) - (train_transcribed_groups(len(candidates), train_transcribed)
                              if labelled_groups else 0)
    wanted = {s: f for s, f in (("test", test_fraction), ("dev", dev_fraction))
              if s not in fixed.values()}
    test: list[str] = []
    if "test" in wanted:  # leaves one for dev when dev is drawn too
        test = _greedy_set(pool[:-1] if "dev" in wanted else pool, sizes,
                           test_fraction * base, room - ("dev" in wanted))
    dev: list[str] = []
    if "dev" in wanted:
        dev = _greedy_set([g for g in pool if g not in test], sizes, dev_fraction * base,
                          room - len(test))
    of = {**fixed, **{g: "test" for g in test}, **{g: "dev" for g in dev}}
    if wanted:
        together = Counter(unit.values())  # groups per unit
        names = {u: f"the {n} speakers of voice {(voices or {})[u]!r}"
                 for u, n in together.items() if n > 1}
        _check_shares(of, {g: sizes.get(g, 0) for g in candidates}, wanted, names)
    return {split: [w for w in windows if of.get(unit[w["group"]], "train") == split]
            for split in SPLITS}


def _check_shares(of: dict[str, str], sizes: dict[str, int], wanted: dict[str, float],
                  names: dict[str, str] | None = None) -> None:
    """Warn, naming the largest speaker (or `names`' words for a unit of several), about each
    split whose share of the windows counted in `sizes` strays from its knob by more than
    SHARE_TOLERANCE (`of`: group -> split, train for the rest)."""
    base = sum(sizes.values())
    biggest = max(sizes, key=lambda g: (sizes[g], g))
    for split, share in wanted.items():
        got = sum(n for g, n in sizes.items() if of.get(g) == split) / base
        if abs(got - share) <= SHARE_TOLERANCE:
            continue
        warnings.warn(SplitShareWarning(
            f"segment: {split} holds {got:.1%} of the windows, not {share:.1%} "
            f"(segment.{split}_fraction; tolerance {SHARE_TOLERANCE:.0%}): a speaker is never "
            f"split, and {(names or {}).get(biggest, f'speaker {biggest!r}')} alone hold"
            f"{'' if biggest in (names or {}) else 's'} {sizes[biggest] / base:.1%} of them "
            f"(in {of.get(biggest, 'train')})"), stacklevel=3)


def hide_transcripts(train: list[dict], share: float, seed: int) -> int:
    """Keep the text of `share` of the transcribed train windows (a seeded draw; at least one
    when share > 0), so the fine-tune's labelled set is a part of BEST-RQ's pool, as in the
    user's case of much audio and a few transcripts; the others become unlabelled. Windows of
    the user's own labelled set (download.labelled) keep all of theirs. Returns how many were
    hidden."""
    labelled = [w["id"] for w in train if w["transcript"] is not None and role_of(w) == POOL]
    keep = round(share * len(labelled))
    keep = max(keep, 1) if share > 0 and labelled else keep
    kept = set(_seeded_order(labelled, seed, "labelled")[:keep])
    hidden = 0
    for window in train:
        if window["transcript"] is not None and role_of(window) == POOL \
                and window["id"] not in kept:
            window["transcript"] = None
            hidden += 1
    return hidden


def _header_seconds(path: Path) -> float | None:
    """A file's length from its header alone (no decoding); None if the header is unreadable."""
    try:
        info = sf.info(str(path))
    except Exception:  # noqa: BLE001 - the file is decoded (and skipped if bad) later
        return None
    return info.frames / info.samplerate if info.samplerate else None


def plan(entries: list[dict], base: Path, cfg: SegmentConfig) -> list[str]:
    """What segment will do with a raw corpus, said before any audio is decoded: its speakers,
    files and hours (from the files' headers), which speakers dev and test are drawn from, how
    many transcribed ones train keeps for the fine-tune, or that a corpus without transcripts
    gets only the label-free figures."""
    groups = {e["group"] for e in entries}
    labelled = {e["group"] for e in entries if e["transcript"] is not None}
    seconds = [e.get("duration") or _header_seconds(
        Path(e["path"]) if Path(e["path"]).is_absolute() else base / e["path"]) for e in entries]
    known = [x for x in seconds if x is not None]
    unread = f" ({len(seconds) - len(known)} headers unreadable)" if len(known) < len(seconds) \
        else ""
    n_text = sum(e["transcript"] is not None for e in entries)
    lines = [f"segment: plan: {len(groups)} speakers/recordings, {len(entries)} files, "
             f"{sum(known) / 3600:.2f} h{unread}; {len(labelled)} speakers with transcripts "
             f"({n_text} files)"]
    voices = _voices(entries)
    per_voice = Counter(voices.values())  # speakers per voice
    if len(per_voice) < len(voices):
        shared = {v: n for v, n in per_voice.items() if n > 1}
        lines.append(f"segment: plan: {len(voices)} speakers speak with {len(per_voice)} "
                     f"voices ({len(shared)} of them for {sum(shared.values())} speakers); "
                     "the speakers of one voice go to one split, so no voice is in two")
    if not labelled:
        lines.append("segment: no file has a transcript: BEST-RQ pre-trains on all of it and "
                     "the label-free figures are measured; there is no fine-tune and no WER "
                     "(transcripts: LibriSpeech-style *.trans.txt, transcripts.tsv or a "
                     "manifest beside the audio)")
        return lines
    roles = {e["group"]: role_of(e) for e in entries}
    for role in ROLES:  # the user's own sets, whole
        mine = [e for e in entries if role_of(e) == role]
        if mine:
            lines.append(f"segment: plan: download.{role}: {len({e['group'] for e in mine})} "
                         f"speakers, {len(mine)} files, "
                         f"{sum(e['transcript'] is not None for e in mine)} with transcripts: "
                         f"{'train, every transcript kept' if role == 'labelled' else role}")
    drawn = [s for s in ("dev", "test") if s not in roles.values()]
    free = {g for g in labelled if roles[g] not in ("dev", "test")}
    keep = train_transcribed_groups(len(free), cfg.train_transcribed_speakers)
    if drawn:
        share = {"dev": cfg.dev_fraction, "test": cfg.test_fraction}
        lines.append(
            f"segment: plan: {' and '.join(drawn)} drawn from the {len(free)} transcribed "
            f"speakers outside the user's held-out sets, "
            f"{' and '.join(f'{share[s]:.0%}' for s in drawn)} of their transcribed windows "
            f"({', '.join(f'segment.{s}_fraction' for s in drawn)}); train keeps at least "
            f"{keep} of them for the fine-tune (segment.train_transcribed_speakers "
            f"{cfg.train_transcribed_speakers:g})")
    lines.append(f"segment: plan: train: {sum(r == POOL for r in roles.values())} speakers of "
                 f"download.source ({len(groups) - len(labelled)} untranscribed); the text of "
                 f"{cfg.transcribed_share:.0%} of its transcribed windows is kept "
                 f"(segment.transcribed_share)")
    return lines


def _read_manifest(raw_manifest: Path) -> list[dict]:
    """The entries of a raw manifest, in packing order; ValueError naming the line if bad."""
    if not raw_manifest.is_file():
        raise FileNotFoundError(f"raw manifest {raw_manifest} does not exist")
    entries = []
    seen: set[str] = set()
    for n, entry in read_jsonl(raw_manifest):
        missing = {"id", "path"} - entry.keys()
        if missing:
            raise ValueError(f"{raw_manifest}:{n}: missing field(s) {sorted(missing)}")
        if entry["id"] in seen:
            raise ValueError(f"{raw_manifest}:{n}: duplicate id {entry['id']!r}")
        seen.add(entry["id"])
        entry.setdefault("transcript", None)
        entry["group"] = str(entry.get("group") or entry["id"])
        entries.append(entry)
    # Sorting by group then id makes packing independent of manifest order; within a group the
    # transcribed files come first, so they pack together and apart from the untranscribed.
    return sorted(entries, key=lambda e: (e["group"], e["transcript"] is None, e["id"]))


def _read_download_skipped(raw_dir: Path) -> list[dict]:
    """What the download stage left aside (raw_dir/skipped.jsonl), marked as its own."""
    path = raw_dir / "skipped.jsonl"
    if not path.is_file():
        return []
    return [{"stage": "download", **record} for _, record in read_jsonl(path)]


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
# A window's file is <id>.flac in one folder: ids are kept well under a file system's 255-byte
# names (and leave room for the "_" that makes a colliding one unique).
MAX_ID_CHARS = 200


def window_name(key: str) -> str:
    """The file-system-safe id of the window that starts with unit `key`: unsafe characters as
    "_", and a name too long for a file shortened to its start and a stable hash of the whole
    key (so that two long keys with one start stay apart)."""
    name = _UNSAFE.sub("_", key)
    if len(name) <= MAX_ID_CHARS:
        return name
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{name[:MAX_ID_CHARS - 17]}-{digest}"


def _until_error(blocks: Iterator[np.ndarray], errors: list[Exception]
                 ) -> Iterator[np.ndarray]:
    """The blocks a file gives before it breaks; the error is kept for the caller."""
    try:
        yield from blocks
    except Exception as exc:  # noqa: BLE001 - any failure of one file is that file's problem
        errors.append(exc)


def _units_of(entry: dict, blocks: Iterator[np.ndarray], max_samples: int,
              cutter: Cutter = "vad") -> Iterator[Unit]:
    """The recording itself when it fits the window, else its pieces (no transcript), cut while
    it is decoded. A recording that breaks part-way raises its error (AudioDecodeError, or
    whatever else stopped it): one that fits the window gives nothing (its transcript would
    not match), a long one gives every piece it decoded first, the last of them included."""
    errors: list[Exception] = []
    pieces = split_stream(_until_error(blocks, errors), SAMPLE_RATE, max_samples / SAMPLE_RATE,
                          cut_point=vad_cut_point if cutter == "vad" else None)
    first = next(pieces)
    second = next(pieces, None)
    if second is None:
        if errors:
            raise errors[0]
        yield Unit(entry["id"], entry["id"], first[:max_samples], entry["transcript"])
        return
    # split_stream computes lengths from seconds: re-check so a rounding slip never overflows.
    for j, piece in enumerate(chain([first, second], pieces)):
        if len(piece):
            yield Unit(f"{entry['id']}_p{j:03d}", entry["id"], piece[:max_samples], None)
    if errors:
        raise errors[0]


@dataclass
class _Tally:
    """What decoding a corpus left aside."""

    skipped: list[dict] = field(default_factory=list)  # one record per file and problem
    lost: int = 0  # files that gave no window at all
    short: int = 0
    cut: int = 0


def _describe(exc: Exception, path: Path) -> str:
    """One line for a file's failure, naming the file."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, AudioDecodeError) and str(path) in text:
        return text
    return f"cannot decode audio file {path}: {type(exc).__name__}: {text}"


def _decoded_units(entries: Iterable[dict], base: Path, max_samples: int, min_samples: int,
                   tally: _Tally, cutter: Cutter = "vad") -> Iterator[Unit]:
    """Units of every decodable entry, in order. Whatever goes wrong with one file (decoding,
    an absurd header, memory) skips that file only; `tally.skipped` lists it with the reason
    and the seconds kept (a long recording keeps the pieces decoded before it broke), and so
    are files or pieces too short to keep and transcripts of recordings too long to keep."""
    shortest = max(min_samples, 1)
    for entry in entries:
        path = Path(entry["path"])
        path = path if path.is_absolute() else base / path
        kept = 0

        def note(reason: str, kept: int, entry: dict = entry, path: Path = path) -> None:
            tally.skipped.append({"stage": "segment", "id": entry["id"], "path": str(path),
                                  "reason": reason, "kept_seconds": kept / SAMPLE_RATE})

        try:
            # A manifest line may give a span of a longer file (NeMo's offset and duration).
            blocks = stream_audio(path, SAMPLE_RATE, offset=entry.get("offset") or 0.0,
                                  duration=entry.get("duration"))
            for j, unit in enumerate(_units_of(entry, blocks, max_samples, cutter)):
                if j == 1:
                    tally.cut += 1
                    if entry.get("transcript") is not None:
                        note("transcript not used: the recording is longer than the "
                             f"{max_samples / SAMPLE_RATE:g} s window, so it was cut", kept)
                if len(unit.audio) < shortest:
                    tally.short += 1
                    what = "file" if unit.key == unit.source_id else f"piece {unit.key}"
                    note(f"{what} too short: {len(unit.audio) / SAMPLE_RATE:.3f} s < "
                         f"segment.min_seconds {min_samples / SAMPLE_RATE:g}", kept)
                    continue
                kept += len(unit.audio)
                yield unit
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the corpus
            note(_describe(exc, path), kept)
        if kept == 0:
            tally.lost += 1


@dataclass
class _GroupJob:
    """One speaker's or recording's files, segmented on its own (possibly in a worker)."""

    group: str
    entries: list[dict]
    base: Path
    work_dir: Path  # windows go here under provisional names; the caller gives the final ones
    max_samples: int
    min_samples: int
    pack: bool
    role: str = POOL
    cutter: Cutter = "vad"


def _segment_group(job: _GroupJob) -> tuple[list[dict], _Tally]:
    """Write the group's windows to job.work_dir; their records (with "key", the first unit's
    key, to name them by) and what was left aside."""
    torch.set_num_threads(1)  # one process per core does the parallel work
    tally = _Tally()
    records = []
    job.work_dir.mkdir(parents=True, exist_ok=True)
    units = _decoded_units(job.entries, job.base, job.max_samples, job.min_samples, tally,
                           job.cutter)
    # One window at a time: memory holds a window and a decoding block, whatever the length
    # of a recording or of a speaker's total audio.
    for k, window in enumerate(pack_units(units, job.max_samples, job.pack)):
        audio = np.concatenate([u.audio for u in window])  # (samples,)
        provisional = job.work_dir / f"{k:06d}.flac"
        write_audio(provisional, audio, SAMPLE_RATE)
        transcripts = [u.transcript for u in window]
        records.append({
            "key": window[0].key,
            "file": str(provisional),
            "duration": len(audio) / SAMPLE_RATE,
            "transcript": None if any(t is None for t in transcripts)
            else " ".join(str(t).strip() for t in transcripts),
            "sources": list(dict.fromkeys(u.source_id for u in window)),
            "group": job.group,
            # Only a role source's windows say so: a corpus without roles is written as before.
            **({"role": job.role} if job.role != POOL else {}),
        })
    return records, tally


def _run_jobs(jobs: list[_GroupJob], num_workers: int) -> Iterator[tuple[list[dict], _Tally]]:
    """Results of `_segment_group` in job order, from `num_workers` processes (0: one per core)."""
    workers = min(num_workers or os.cpu_count() or 1, len(jobs))
    if workers <= 1:
        yield from map(_segment_group, jobs)
        return
    # spawn, not fork: a forked child of a process that ran torch's thread pools can deadlock.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield from pool.map(_segment_group, jobs, chunksize=1)


def _voices(entries: list[dict]) -> dict[str, str]:
    """Each group's voice where the raw manifest records one (the synthetic source's)."""
    return {e["group"]: str(e["voice"]) for e in entries if e.get("voice")}


def use_labelled_renditions(train: list[dict], entries: list[dict], base: Path, out_dir: Path,
                            max_samples: int, min_samples: int, cutter: Cutter = "vad") -> int:
    """Rebuild each train window of download.source that keeps its text (the fine-tune's
    labelled set) from its utterances' "labelled_path" renditions, where the raw manifest has
    them (the synthetic source with a download.labelled_channel of its own): the labelled
    clips then have their own acoustic condition while BEST-RQ's other windows, dev and test
    keep download.channel's. Only segment knows which windows these are, after the split and
    the transcribed draw. A rendition decodes to the same length (a channel keeps it), so the
    window keeps its duration; ValueError naming the window otherwise. Returns how many
    windows were rebuilt."""
    by_id = {e["id"]: e for e in entries}
    rebuilt = 0
    for window in train:
        if window["transcript"] is None or role_of(window) != POOL:
            continue
        sources = [by_id[i] for i in window["sources"]]
        if not all(e.get("labelled_path") for e in sources):
            continue
        tally = _Tally()
        units = list(_decoded_units([{**e, "path": e["labelled_path"]} for e in sources], base,
                                    max_samples, min_samples, tally, cutter))
        audio = np.concatenate([u.audio for u in units]) if units else np.zeros(0, np.float32)
        if tally.skipped or len(units) != len(sources) \
                or len(audio) != round(window["duration"] * SAMPLE_RATE):
            why = tally.skipped[0]["reason"] if tally.skipped else \
                f"{len(audio)} samples, not {round(window['duration'] * SAMPLE_RATE)}"
            raise ValueError(f"segment: window {window['id']}: its labelled rendition "
                             f"(labelled_path of {', '.join(window['sources'])}) does not "
                             f"match its audio: {why}")
        write_audio(out_dir / window["path"], audio, SAMPLE_RATE)  # (samples,)
        rebuilt += 1
    return rebuilt


def segment_corpus(raw_manifest: Path, out_dir: Path, cfg: SegmentConfig) -> dict[str, float]:
    """Decode, cut, pack and split a raw corpus into `out_dir/{audio/,train,dev,test.jsonl}`.

    Groups (speakers or recordings) are segmented in parallel by `cfg.num_workers` processes;
    the output does not depend on their number. Files that give no window (undecodable, too
    short, ...) and other losses (short pieces, unused transcripts) are listed with a reason in
    `out_dir/skipped.jsonl`, after what the download stage listed. Returns stats: per split
    num_, hours_, speakers_ and transcribed_ (windows with text), num_hidden_transcripts (train
    windows whose text `transcribed_share` hid), num_skipped (files without any window),
    padding_fraction, mean_window_seconds (plus num_dropped_short, num_cut_recordings,
    num_listed: lines of skipped.jsonl). SplitError, before any decoding, when the corpus has
    too few speakers for three splits.
    """
    validate(cfg)
    raw_manifest, out_dir = Path(raw_manifest), Path(out_dir)
    entries = _read_manifest(raw_manifest)
    labelled: dict[str, bool] = {}
    for entry in entries:
        labelled[entry["group"]] = labelled.get(entry["group"], False) \
            or entry["transcript"] is not None
    roles = check_disjoint(entries)  # before any audio is decoded
    check_splittable(labelled, {g: r for g, r in roles.items() if r in ("dev", "test")})
    for line in plan(entries, raw_manifest.parent, cfg):
        tqdm.write(line, file=sys.stderr)
    download_skipped = _read_download_skipped(raw_manifest.parent)
    max_samples = int(round(cfg.max_seconds * SAMPLE_RATE))
    min_samples = int(round(cfg.min_seconds * SAMPLE_RATE))

    audio_dir = out_dir / "audio"
    work_dir = out_dir / ".work"
    for stale in (audio_dir, work_dir):  # windows of an earlier run would linger otherwise
        if stale.exists():
            shutil.rmtree(stale)
    # Manifests of an earlier run would point at the audio just removed if this run stopped
    # part-way; "eval": the two-split layout of earlier versions.
    for name in (*SPLITS, "eval", "skipped"):
        (out_dir / f"{name}.jsonl").unlink(missing_ok=True)
    audio_dir.mkdir(parents=True)

    jobs = [_GroupJob(group, list(members), raw_manifest.parent, work_dir / f"{i:06d}",
                      max_samples, min_samples, cfg.pack, roles[group], cfg.cutter)
            for i, (group, members) in enumerate(groupby(entries, key=lambda e: e["group"]))]
    tally = _Tally()
    windows: list[dict] = []
    used_ids: set[str] = set()
    with tqdm(total=len(entries), desc="segmenting", unit="file") as bar:
        for job, (records, group_tally) in zip(jobs, _run_jobs(jobs, cfg.num_workers),
                                               strict=True):
            bar.update(len(job.entries))
            tally.skipped += group_tally.skipped
            tally.lost += group_tally.lost
            tally.short += group_tally.short
            tally.cut += group_tally.cut
            # Final names are given here, in group order, so they never depend on the workers.
            for record in records:
                window_id = window_name(record.pop("key"))
                while window_id in used_ids:
                    window_id += "_"
                used_ids.add(window_id)
                Path(record.pop("file")).replace(audio_dir / f"{window_id}.flac")
                windows.append({"id": window_id, "path": f"audio/{window_id}.flac", **record})
    shutil.rmtree(work_dir, ignore_errors=True)

    splits = split_corpus(windows, cfg.dev_fraction, cfg.test_fraction, cfg.seed,
                          cfg.train_transcribed_speakers, _voices(entries))
    hidden = hide_transcripts(splits["train"], cfg.transcribed_share, cfg.seed)
    rebuilt = use_labelled_renditions(splits["train"], entries, raw_manifest.parent, out_dir,
                                      max_samples, min_samples, cfg.cutter)
    if rebuilt:
        tqdm.write(f"segment: {rebuilt} labelled train windows rebuilt from their utterances' "
                   "download.labelled_channel rendition", file=sys.stderr)
    for name, records in splits.items():
        # "group" (speaker or recording) stays: features keeps it for speaker-level intervals.
        write_jsonl(out_dir / f"{name}.jsonl", sorted(records, key=lambda r: r["id"]))
    listed = download_skipped + tally.skipped
    write_jsonl(out_dir / "skipped.jsonl", listed)

    seconds = {name: sum(w["duration"] for w in records) for name, records in splits.items()}
    total = sum(seconds.values())
    n_windows = len(windows)
    stats: dict[str, float] = {}
    for name, records in splits.items():
        stats[f"num_{name}"] = len(records)
        stats[f"hours_{name}"] = seconds[name] / 3600
        stats[f"speakers_{name}"] = len({w["group"] for w in records})
        stats[f"transcribed_{name}"] = sum(w["transcript"] is not None for w in records)
    return {
        **stats,
        "num_hidden_transcripts": hidden,
        # Only a corpus with labelled renditions says so: the others are written as before.
        **({"num_labelled_renditions": rebuilt} if rebuilt else {}),
        "num_skipped": tally.lost,
        "num_dropped_short": tally.short,
        "num_cut_recordings": tally.cut,
        "num_listed": len(listed),
        "padding_fraction": 1 - total / (n_windows * cfg.max_seconds) if n_windows else 0.0,
        "mean_window_seconds": total / n_windows if n_windows else 0.0,
    }
