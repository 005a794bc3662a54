"""Where the audio comes from: synthetic speech, a folder/glob, a URL, a LibriSpeech preset, or
a NeMo-style JSONL manifest (`nemo_manifest`).

`acquire` gathers the recordings of one source into a raw directory and indexes them in
`raw_dir/manifest.jsonl` (id, path, transcript, group; speaker and chapter for LibriSpeech's
folder layout; size and sha256 for files left in place). What it leaves aside (files that are
not audio, archive members that are not regular files, transcript lines that match no file,
unreadable transcript files) is listed with a reason in `raw_dir/skipped.jsonl`. A URL source
is downloaded into a cache outside `raw_dir` and described in `raw_dir/download.json` (its
sha256 included); an archive is extracted, safely, into `raw_dir/download`.

Each kind has its own module: `folder_source` (folders and globs), `url_source` (downloads
and their cache), `archive` (safe extraction) and `synth` (espeak speech); this one holds the
parameters, their validation and the entry point.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import Field
from tqdm import tqdm

from bestrq.archive import ArchiveError, extract_archive
from bestrq.audio import is_audio_file, write_audio
from bestrq.channel import ChannelConfig, apply_channel, validate_channel
from bestrq.files import is_within, real_path, remove_path
from bestrq.folder_source import (
    GLOB_CHARS,
    MANIFEST_NAME,
    DigestCache,
    glob_files,
    glob_root,
    index_folder,
)
from bestrq.jsonl import write_jsonl
from bestrq.knobs import Seed, Text, check, knob
from bestrq.nemo_manifest import is_manifest, read_nemo_manifest
from bestrq.roles import ROLES, check_disjoint
from bestrq.url_source import (
    DOWNLOAD_DIR,
    DOWNLOAD_RECORD,
    ChecksumError,
    Download,
    DownloadTooLargeError,
    UnverifiedDownloadWarning,
    acquire_url,
    check_url_scheme,
    download_file,
    fetch,
    parse_checksum,
)

__all__ = [
    "LIBRISPEECH_SUBSETS",
    "ArchiveError",
    "ChecksumError",
    "Download",
    "DownloadTooLargeError",
    "SourceConfig",
    "UnverifiedDownloadWarning",
    "acquire",
    "check_watch",
    "download_file",
    "extract_archive",
    "fetch",
    "index_folder",
    "parse_checksum",
    "source_kind",
    "validate",
]

SKIPPED_NAME = "skipped.jsonl"

_OPENSLR = "https://www.openslr.org/resources/12"
# sha256 digests as published in torchaudio.datasets.librispeech._CHECKSUMS.
LIBRISPEECH_SUBSETS: dict[str, tuple[str, str]] = {
    "dev-clean": (
        f"{_OPENSLR}/dev-clean.tar.gz",
        "sha256:76f87d090650617fca0cac8f88b9416e0ebf80350acb97b343a85fa903728ab3",
    ),
    "dev-other": (
        f"{_OPENSLR}/dev-other.tar.gz",
        "sha256:12661c48e8c3fe1de2c1caa4c3e135193bfb1811584f11f569dd12645aa84365",
    ),
    "test-clean": (
        f"{_OPENSLR}/test-clean.tar.gz",
        "sha256:39fde525e59672dc6d1551919b1478f724438a95aa55f874b576be21967e6c23",
    ),
    "test-other": (
        f"{_OPENSLR}/test-other.tar.gz",
        "sha256:d09c181bba5cf717b3dee7d4d592af11a3ee3a09e08ae025c5506f6ebe961c29",
    ),
    "train-clean-100": (
        f"{_OPENSLR}/train-clean-100.tar.gz",
        "sha256:d4ddd1d5a6ab303066f14971d768ee43278a5f2a0aa43dc716b0e64ecbbbf6e2",
    ),
    "train-clean-360": (
        f"{_OPENSLR}/train-clean-360.tar.gz",
        "sha256:146a56496217e96c14334a160df97fffedd6e0a04e66b9c5af0d40be3c792ecf",
    ),
    "train-other-500": (
        f"{_OPENSLR}/train-other-500.tar.gz",
        "sha256:ddb22f27f96ec163645d53215559df6aa36515f26e01dd70798188350adcb6d2",
    ),
}


@dataclass
class SourceConfig(ChannelConfig):
    """Which audio to acquire (the "download" stage's parameters; the synthetic source's
    acoustic condition is declared beside its code, in `bestrq.channel`)."""

    source: Annotated[Text, knob(
        "synthetic | a folder | a glob ('audio/**/*.flac') | a URL | librispeech:<subset> | a "
        "NeMo manifest (.json or .jsonl)")] = \
        "synthetic"
    num_utterances: Annotated[int, knob(
        "synthetic: how many sentences", ge=1, le=10**7)] = 240
    num_speakers: Annotated[int, knob(
        "synthetic: speakers, each an espeak voice with its own rate and pitch (beyond the 54 "
        "voices they share voices, and segment keeps a voice's speakers in one split)",
        ge=1, le=10**4)] = 8
    seed: Annotated[Seed, knob("synthetic: the sentences, voices and their order")] = 0
    checksum: Annotated[str, knob(
        "sha256:<hex> or md5:<hex> of a URL source's download (presets carry their own)")] = ""
    # For a folder or glob source the folder holding its audio (so that edited audio re-runs the
    # pipeline); for the other sources the stage's own code, already a dependency.
    watch: Annotated[Text, knob(
        "the path dvc.yaml makes a dependency of the download stage")] = "stages/download.py"
    max_extract_gb: Annotated[float, knob(
        "an archive that extracts to more is refused", gt=0, le=10**6)] = 200.0
    max_ratio: Annotated[float, knob(
        "... and one that expands more than this many times its size (a zip bomb)",
        ge=1, le=10**6)] = 100.0
    max_download_gb: Annotated[Annotated[float, Field(gt=0, le=10**6)] | None, knob(
        "a download (URL, file://) passing this is stopped; null: max_extract_gb")] = None
    # Sets of the user's own, by role (bestrq.roles): any kind of source but synthetic.
    labelled: Annotated[Text | None, knob(
        "transcribed audio for the fine-tune (it joins BEST-RQ's pool too); null: drawn from "
        "download.source's transcribed speakers")] = None
    dev: Annotated[Text | None, knob(
        "a transcribed held-out set where knobs are chosen; null: drawn from the transcribed "
        "speakers (segment.dev_fraction)")] = None
    test: Annotated[Text | None, knob(
        "a transcribed held-out set that reports; null: drawn from the transcribed speakers "
        "(segment.test_fraction)")] = None


def source_kind(source: str) -> str:
    """Classify a source string: "synthetic", "librispeech", "url", "manifest" (a NeMo-style
    .json/.jsonl file), "glob" or "folder"."""
    if source == "synthetic":
        return "synthetic"
    if source.startswith("librispeech:"):
        return "librispeech"
    if "://" in source:
        return "url"
    if is_manifest(source) and not any(c in source for c in GLOB_CHARS):
        return "manifest"
    if any(c in source for c in GLOB_CHARS):
        return "glob"
    return "folder"


def sources(cfg: SourceConfig) -> dict[str, str]:
    """The sources a corpus is read from, by knob: download.source, then each role given."""
    out = {"source": cfg.source}
    out.update({role: value for role in ROLES if (value := getattr(cfg, role)) is not None})
    return out


def validate(cfg: SourceConfig) -> None:
    """Check every parameter before any work; ValueError names the bad one."""
    check(cfg, "download.")
    validate_channel(cfg, "download.")
    if source_kind(cfg.source) != "synthetic":
        for name in ("channel", "labelled_channel"):
            if getattr(cfg, name) not in (None, "clean"):
                raise ValueError(f"download.{name}: is {getattr(cfg, name)!r}, but only the "
                                 "synthetic source is passed through a channel (the audio "
                                 f"of download.source {cfg.source} is used as it is)")
    if cfg.checksum:
        parse_checksum(cfg.checksum)
    for name, source in sources(cfg).items():
        _check_source(f"download.{name}", source)


def _check_source(name: str, source: str) -> None:
    """ValueError naming the knob `name` unless `source` can be read."""
    kind = source_kind(source)
    if kind == "synthetic" and name != "download.source":
        raise ValueError(f"{name}: synthetic speech is only for download.source (its voices "
                         "would repeat); give a folder, glob, URL, preset or manifest")
    if kind == "librispeech":
        subset = source.split(":", 1)[1]
        if subset not in LIBRISPEECH_SUBSETS:
            raise ValueError(
                f"{name}: unknown librispeech subset {subset!r}; "
                f"choose one of {', '.join(LIBRISPEECH_SUBSETS)}"
            )
    elif kind == "url":
        check_url_scheme(source)
    elif kind == "manifest":
        if not Path(source).expanduser().is_file():
            raise ValueError(f"{name}: manifest {source} is not a file")
    elif kind == "glob":
        if not any(is_audio_file(p) for p in glob_files(source, [])):
            raise ValueError(f"{name}: glob {source} matches no audio files")
    elif kind == "folder":
        path = Path(source).expanduser()
        if not path.exists():
            raise ValueError(f"{name}: folder {path} does not exist")
        if not path.is_dir() and not is_audio_file(path):
            raise ValueError(f"{name}: {path} is neither a folder nor an audio file")


def _watched_path(source: str) -> Path | None:
    """What a folder, glob or manifest source reads: the folder, the one file, the glob's fixed
    root, the manifest; None for the others."""
    kind = source_kind(source)
    if kind == "glob":
        return glob_root(source)
    if kind in ("folder", "manifest"):
        return Path(source).expanduser()
    return None


def check_watch(cfg: SourceConfig) -> None:
    """ValueError unless `download.watch` holds what every local source reads (download.source
    and each role's folder, glob or manifest).

    dvc.yaml makes `download.watch` a dependency of the download stage; DVC hashes it, so
    added, removed or edited audio there re-runs download and what follows. Without this
    check a folder source would silently be a constant to DVC. DVC cannot take a list there
    (`${...}` interpolates a single path), so sources by role share one folder above them."""
    targets = {name: t for name, source in sources(cfg).items()
               if (t := _watched_path(source)) is not None}
    if not targets:
        return
    watch = Path(cfg.watch).expanduser()
    outside = [name for name, t in targets.items()
               if not (watch.exists() and is_within(real_path(t), real_path(watch)))]
    if not outside:
        return
    if len(targets) == 1:
        (target,) = targets.values()
        raise ValueError(
            f"download.watch: is {cfg.watch!r}, which does not hold the audio of "
            f"download.source; set it to {target} so that `dvc repro` re-runs download when "
            f"that audio changes (e.g. dvc exp run -S download.source=... -S "
            f"download.watch={target})")
    common = Path(os.path.commonpath([os.path.abspath(t) for t in targets.values()]))
    raise ValueError(
        f"download.watch: is {cfg.watch!r}, which does not hold what "
        f"{', '.join(f'download.{n}' for n in outside)} read(s); set it to a folder holding "
        f"every local source (here {common}) so that `dvc repro` re-runs download when that "
        "audio changes")


# --- manifest ----------------------------------------------------------------------------


def _write_manifest(raw_dir: Path, entries: list[dict], skipped: list[dict]) -> dict[str, float]:
    entries = sorted(entries, key=lambda e: e["id"])
    write_jsonl(raw_dir / MANIFEST_NAME, entries)
    write_jsonl(raw_dir / SKIPPED_NAME, skipped)
    return {
        "num_files": len(entries),
        "num_with_transcript": sum(e["transcript"] is not None for e in entries),
        "num_groups": len({e["group"] for e in entries}),
        "num_skipped": len(skipped),
    }


# --- synthetic ---------------------------------------------------------------------------


def _acquire_synthetic(cfg: SourceConfig, raw_dir: Path) -> list[dict]:
    """Speak the seeded sentences, each through `cfg.channel`; with a `labelled_channel` of
    its own, also through that one into synthetic/labelled/ (the entry's "labelled_path"), for
    segment to use in the windows it keeps transcribed for the fine-tune (only segment knows
    which). An entry records its speaker's espeak "voice", and the channel's draw when the
    channel is not clean."""
    from bestrq.synth import EspeakSynthesizer, generate_sentences, make_speakers, voice_sharing

    synth = EspeakSynthesizer()
    speakers = make_speakers(cfg.num_speakers, cfg.seed)
    if (shared := voice_sharing(speakers)) is not None:
        tqdm.write(f"download: {shared}", file=sys.stderr)
    sentences = generate_sentences(cfg.num_utterances, cfg.seed)
    labelled = cfg.labelled_channel if cfg.labelled_channel not in (None, cfg.channel) else None
    out_root = raw_dir / "synthetic"
    (out_root).mkdir(parents=True, exist_ok=True)
    with open(out_root / "speakers.json", "w", encoding="utf-8") as f:
        json.dump([s.__dict__ for s in speakers], f, indent=2)
    entries = []
    for i, text in enumerate(tqdm(sentences, desc="synthesising", unit="utt")):
        spk = speakers[i % len(speakers)]
        utt_id = f"{spk.name}-{i:05d}"
        audio, rate = synth.synthesize(text, voice=spk.voice, rate=spk.rate, pitch=spk.pitch)
        shifted, drawn = apply_channel(audio, rate, cfg.channel, cfg, cfg.seed, utt_id)
        path = out_root / spk.name / f"{utt_id}.flac"
        write_audio(path, shifted, rate)  # native rate: resampling happens in the segment stage
        entry = {
            "id": utt_id,
            "path": path.relative_to(raw_dir).as_posix(),
            "transcript": text,
            "group": spk.name,
            "voice": spk.voice,
        }
        if cfg.channel != "clean":  # a clean corpus is written as before channels existed
            entry.update(drawn)
        if labelled is not None:
            # Its own draw (another key): the labelled copy is another recording of the line.
            clip, drawn = apply_channel(audio, rate, labelled, cfg, cfg.seed, f"{utt_id}/labelled")
            copy = out_root / "labelled" / spk.name / f"{utt_id}.flac"
            write_audio(copy, clip, rate)
            entry["labelled_path"] = copy.relative_to(raw_dir).as_posix()
            entry.update({f"labelled_{k}": v for k, v in drawn.items()})
        entries.append(entry)
    return entries


# --- entry point -------------------------------------------------------------------------


def _clear_stale(raw_dir: Path, kind: str) -> None:
    """Remove what an earlier run of another source (or of this code's older versions) left in
    raw_dir, which the DVC output would otherwise carry along."""
    stale = [raw_dir / "synthetic", raw_dir / "archive"]  # archive: where old versions kept it
    if kind not in ("url", "librispeech"):
        stale += [raw_dir / DOWNLOAD_DIR, raw_dir / DOWNLOAD_RECORD]
    stale += list(raw_dir.glob(f".{DOWNLOAD_DIR}.*"))  # folders of an interrupted extraction
    for path in stale:
        remove_path(path)


def _acquire_one(name: str, source: str, checksum: str, cfg: SourceConfig, raw_dir: Path,
                 cache_dir: Path) -> tuple[list[dict], list[dict], dict[str, float | str]]:
    """The entries of one source gathered under `raw_dir`, what was left aside, and the
    download's stats (URL sources)."""
    kind = source_kind(source)
    watched = _watched_path(source)
    if watched is not None and (is_within(real_path(watched), real_path(raw_dir))
                                or is_within(real_path(raw_dir), real_path(watched))):
        raise ValueError(f"download.{name}: {source} overlaps the output folder {raw_dir}, "
                         "which the download stage rewrites; use a folder outside it")
    raw_dir.mkdir(parents=True, exist_ok=True)
    _clear_stale(raw_dir, kind)
    extra: dict[str, float | str] = {}
    skipped: list[dict] = []
    if kind == "synthetic":
        entries = _acquire_synthetic(cfg, raw_dir)
    elif kind in ("librispeech", "url"):
        url = source
        if kind == "librispeech":
            url, preset = LIBRISPEECH_SUBSETS[source.split(":", 1)[1]]
            checksum = checksum or preset
        entries, skipped, extra = acquire_url(url, checksum, raw_dir, cache_dir,
                                               cfg.max_extract_gb, cfg.max_ratio,
                                               cfg.max_download_gb)
    else:
        digests = DigestCache(cache_dir / "digests.json")
        path = Path(source).expanduser()
        if kind == "manifest":
            entries, skipped = read_nemo_manifest(path, digests)
        elif kind == "glob":
            unlisted: list[dict] = []
            files = glob_files(source, unlisted)
            entries, skipped = index_folder(glob_root(source), raw_dir, files, digests)
            skipped = unlisted + skipped
        elif path.is_file():
            entries, skipped = index_folder(path.parent, raw_dir, [path], digests)
        else:
            entries, skipped = index_folder(path, raw_dir, digests=digests)
        digests.save()
    if not entries:
        raise ValueError(f"download.{name}: {source} gave no audio files")
    return entries, skipped, extra


def acquire(cfg: SourceConfig, raw_dir: Path, cache_dir: Path | None = None
            ) -> dict[str, float | str]:
    """Gather the audio of `cfg.source` under `raw_dir`, and that of each role given
    (download.labelled, dev, test) under `raw_dir/<role>`; write `raw_dir/manifest.jsonl`
    (a role's entries carry "role" and ids prefixed `<role>-`) and `raw_dir/skipped.jsonl`
    (what was left aside, with reasons). A speaker in two roles stops it (RoleOverlapError).

    Downloads and the sha256 of in-place files are cached under `cache_dir` (default: a
    "cache" folder beside raw_dir). Returns stats: num_files, num_with_transcript, num_groups,
    num_skipped, and per role given <role>_files, <role>_with_transcript, <role>_groups; for
    URL sources also download_sha256, download_bytes and download_verified (0 without a
    checksum, when an UnverifiedDownloadWarning is issued too; a role's prefixed <role>_).
    """
    validate(cfg)
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir is not None else raw_dir.parent / "cache"
    entries, skipped, extra = _acquire_one("source", cfg.source, cfg.checksum, cfg, raw_dir,
                                           cache_dir)
    for role in ROLES:
        source = getattr(cfg, role)
        if source is None:
            remove_path(raw_dir / role)  # an earlier run's set for a role no longer given
            continue
        found, left, stats = _acquire_one(role, source, "", cfg, raw_dir / role, cache_dir)
        for entry in found:
            path = Path(entry["path"])
            entry.update(id=f"{role}-{entry['id']}", role=role,
                         path=str(path) if path.is_absolute() else f"{role}/{entry['path']}")
        entries += found
        skipped += [{"role": role, **record} for record in left]
        extra |= {f"{role}_{k}": v for k, v in stats.items()}
        extra |= {f"{role}_files": len(found),
                  f"{role}_with_transcript": sum(e["transcript"] is not None for e in found),
                  f"{role}_groups": len({e["group"] for e in found})}
    check_disjoint(entries)  # before any audio is decoded
    return {**_write_manifest(raw_dir, entries, skipped), **extra}
