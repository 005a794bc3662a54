"""How much of BEST-RQ's targets follow the recording level, and how much of its own input a
predicted target still sees: the measurements behind the defaults `quantizer_norm` and
`mask_target_share` (README: "BEST-RQ defaults on real corpora").

1. Label agreement under gain: every clip of a segment manifest is read, scaled by a uniform
   +3 / +6 / +12 dB gain (in float, so nothing clips), turned into Whisper's log-mel, and
   labelled by the quantizer with global statistics (the features stage's stats.json) and with
   per-utterance statistics. Printed: the share of valid targets whose label is unchanged by the
   gain, per normalisation, and how often the two normalisations agree at 0 dB.
2. Masked-target rule: with the run's masking (mask_prob 0.01, 400 ms spans), the share of
   predicted targets that still see one of their own frames unmasked, or an unmasked frame
   within Whisper's conv stem's reach, for each `mask_target_share`.

    python bench/label_agreement.py --manifest data/segments/train.jsonl \
        --stats data/features/stats.json --max-clips 64
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from whisper.audio import N_SAMPLES

from bestrq.features import load_clip, load_stats, log_mel_batch, num_valid_frames, read_manifest
from bestrq.masking import MaskingConfig, span_mask, target_exposure, target_valid
from bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer

GAINS_DB = (3.0, 6.0, 12.0)


def clips(manifest: Path, max_clips: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Audio (clips, N_SAMPLES) padded or cut to 30 s, and valid mel frames (clips,)."""
    audio, frames = [], []
    for clip in read_manifest(manifest)[:max_clips]:
        wav = torch.from_numpy(load_clip(clip.path))[:N_SAMPLES]
        frames.append(num_valid_frames(wav.shape[0]))
        audio.append(torch.nn.functional.pad(wav, (0, N_SAMPLES - wav.shape[0])))
    return torch.stack(audio), torch.tensor(frames)


def labels_of(q: RandomProjectionQuantizer, audio: torch.Tensor, frames: torch.Tensor,
              n_mels: int, batch: int = 8) -> torch.Tensor:
    """Labels (clips, N, targets) of every clip."""
    out = []
    for i in range(0, audio.shape[0], batch):
        mel = log_mel_batch(audio[i:i + batch], n_mels)  # (b, n_mels, frames)
        out.append(q(q.label_input(mel, frames[i:i + batch])))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", type=Path, default=Path("data/segments/train.jsonl"))
    ap.add_argument("--stats", type=Path, default=Path("data/features/stats.json"))
    ap.add_argument("--max-clips", type=int, default=64)
    ap.add_argument("--num-codebooks", type=int, default=1)
    ap.add_argument("--n-mels", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    audio, frames = clips(args.manifest, args.max_clips)
    mean, std = load_stats(args.stats.parent)
    stack = QuantizerConfig().stack_frames
    valid = target_valid(frames, audio.shape[1] // 160 // stack, stack)  # (clips, targets)
    print(f"{audio.shape[0]} clips, {int(valid.sum())} valid targets, "
          f"{args.num_codebooks} codebook(s)\n")
    base: dict[str, torch.Tensor] = {}
    rows = []
    for norm in ("global", "utterance"):
        q = RandomProjectionQuantizer(QuantizerConfig(
            n_mels=args.n_mels, num_codebooks=args.num_codebooks, seed=args.seed,
            quantizer_norm=norm),
            mean, std)
        base[norm] = labels_of(q, audio, frames, args.n_mels)
        same = []
        for db in GAINS_DB:
            gained = labels_of(q, audio * 10 ** (db / 20), frames, args.n_mels)
            same.append((gained == base[norm]).transpose(1, 2)[valid].float().mean().item())
        rows.append((norm, same))
    print("| quantizer_norm | " + " | ".join(f"+{db:g} dB" for db in GAINS_DB) + " |")
    print("|---|" + "---|" * len(GAINS_DB))
    for norm, same in rows:
        print(f"| {norm} | " + " | ".join(f"{100 * s:.1f}%" for s in same) + " |")
    both = (base["global"] == base["utterance"]).transpose(1, 2)[valid].float().mean().item()
    print(f"\nglobal and utterance labels agree on {100 * both:.1f}% of valid targets at 0 dB\n")

    masking = MaskingConfig()
    g = torch.Generator().manual_seed(args.seed)
    draws = frames.repeat(16)  # 16 mask draws per clip
    mask = span_mask(draws, audio.shape[1] // 160, masking.mask_prob, masking.span_frames, g)
    print("| mask_target_share | predicted targets | own frame unmasked | "
          "unmasked frame in conv reach |")
    print("|---|---|---|---|")
    for share in (0.5, 1.0):
        e = target_exposure(mask, draws, stack, share)
        print(f"| {share:g} | {int(e['targets'])} | {100 * e['own_frame']:.1f}% | "
              f"{100 * e['receptive_field']:.1f}% |")


if __name__ == "__main__":
    main()
