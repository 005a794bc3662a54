"""Helper for subprocess tests: a small deterministic BEST-RQ training run.

Run as `python tests/_train_worker.py ...` or under torchrun (`-m _train_worker` with tests/ on
PYTHONPATH). Writes each rank's final adapter to OUT/rank<r>.safetensors and prints
"step N" after every update, flushed, so a parent can kill it at a known point.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset
from whisper.model import ModelDimensions

from bestrq.distributed import distributed_session
from bestrq.masking import MaskingConfig
from bestrq.model import BestRQModel
from bestrq.pretraining import BEST_RQ
from bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer
from bestrq.train import TrainConfig, train
from bestrq.whisper_model import random_whisper

# 200 mel frames instead of 3000 keeps CPU runs to a fraction of a second per clip.
SMALL_DIMS = ModelDimensions(n_mels=80, n_audio_ctx=100, n_audio_state=64, n_audio_head=2,
                             n_audio_layer=2, n_vocab=64, n_text_ctx=8, n_text_state=64,
                             n_text_head=2, n_text_layer=1)


class RandomClips(Dataset):
    """Deterministic clips: item i is (mel (n_mels, frames), valid frames), seeded by i.

    Clips in `nan_clips` are all NaN, to provoke non-finite losses.
    """

    def __init__(self, num_clips: int, n_mels: int = 80, frames: int = 200,
                 nan_clips: frozenset[int] = frozenset()) -> None:
        self.num_clips, self.n_mels, self.frames, self.nan_clips = (num_clips, n_mels, frames,
                                                                    nan_clips)

    def __len__(self) -> int:
        return self.num_clips

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + i)
        valid = int(torch.randint(self.frames // 2, self.frames + 1, (), generator=g))
        mel = torch.randn(self.n_mels, self.frames, generator=g) * 0.5  # (n_mels, frames)
        mel[:, valid:] = -1.0  # padding
        if i in self.nan_clips:
            mel.fill_(float("nan"))
        return mel, torch.tensor(valid, dtype=torch.int64)


def small_model(codebook_size: int = 64, num_codebooks: int = 1) -> BestRQModel:
    whisper = random_whisper(SMALL_DIMS, seed=0)
    quantizer = RandomProjectionQuantizer(QuantizerConfig(num_codebooks=num_codebooks,
                                                          codebook_size=codebook_size))
    return BestRQModel(whisper.encoder, quantizer,
                       MaskingConfig(mask_prob=0.05, mask_span_ms=100.0))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--kill-after-step", type=int, default=0,
                        help="SIGKILL this process right after logging this update")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # same reduction order in every run: bitwise comparisons
    with distributed_session() as info:
        run(args, info.rank)


def run(args: argparse.Namespace, rank: int) -> None:
    config = TrainConfig(batch_size=args.batch_size, accumulate_gradients=args.accumulate,
                         max_steps=args.steps, warmup_steps=2,
                         checkpoint_every=args.checkpoint_every, num_workers=args.num_workers,
                         learning_rate=1e-2, weight_decay=0.01,
                         # fp32: bf16 matmuls round differently for other batch shapes, and
                         # these runs compare 2 x 1 clip against 1 x 4 clips to 1e-4
                         precision="fp32")

    def log(step: int, metrics: dict[str, float]) -> None:
        print(f"step {step} loss {metrics['loss']:.6f}", flush=True)
        if step == args.kill_after_step:
            os.kill(os.getpid(), signal.SIGKILL)

    model = small_model()
    result = train(model, RandomClips(args.clips), config, args.ckpt, log, objective=BEST_RQ)
    args.out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.adapter_state_dict().items()}
    save_file(tensors, str(args.out / f"rank{rank}.safetensors"))
    print(f"done {result.step} skipped {result.skipped}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
