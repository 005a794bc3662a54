import math

import pytest
import torch

from bestrq.evaluate import EvaluateConfig, probe_encoders
from bestrq.masking import MaskingConfig
from bestrq.model import BestRQModel
from bestrq.probes import ProbeConfig, davies_bouldin, effective_rank, kmeans, sample_frames
from bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer


def test_effective_rank_by_hand():
    # singular values 3, 1 (diagonal): p = (0.75, 0.25) + eps
    x = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    p = torch.tensor([0.75, 0.25], dtype=torch.float64) + 1e-7
    assert effective_rank(x) == pytest.approx(math.exp(-float((p * p.log()).sum())), rel=1e-12)
    # equal singular values: the full rank; one direction: rank one
    assert effective_rank(torch.eye(5) * 2) == pytest.approx(5.0, rel=1e-5)
    assert effective_rank(torch.outer(torch.arange(1.0, 7.0), torch.ones(4))) == pytest.approx(
        1.0, rel=1e-5)


def test_davies_bouldin_by_hand():
    # two clusters on a line: {0, 2} (centre 1, spread 1) and {10, 14} (centre 12, spread 2)
    x = torch.tensor([[0.0], [2.0], [10.0], [14.0]])
    assign = torch.tensor([0, 0, 1, 1])
    assert davies_bouldin(x, assign) == pytest.approx((1 + 2) / 11)
    # three clusters: each takes its worst neighbour
    x3 = torch.tensor([[0.0], [2.0], [10.0], [14.0], [30.0], [30.0]])
    a3 = torch.tensor([0, 0, 1, 1, 2, 2])
    r01, r12, r02 = 3 / 11, (2 + 0) / 18, (1 + 0) / 29
    assert davies_bouldin(x3, a3) == pytest.approx((max(r01, r02) + max(r01, r12)
                                                    + max(r02, r12)) / 3)
    assert math.isnan(davies_bouldin(x, torch.zeros(4, dtype=torch.long)))


def test_kmeans_finds_separated_blobs_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = centres.repeat_interleave(50, 0) + 0.3 * torch.randn(150, 2, generator=g)
    _, assign = kmeans(x, 3, 50, seed=1)
    # every blob is one cluster
    groups = {tuple(sorted(set(assign[i * 50:(i + 1) * 50].tolist()))) for i in range(3)}
    assert len(groups) == 3 and all(len(gr) == 1 for gr in groups)
    assert torch.equal(kmeans(x, 3, 50, seed=1)[1], assign)
    assert davies_bouldin(x, assign) < 0.1


def test_sample_frames_is_seeded_and_bounded():
    parts = [torch.arange(10.0)[:, None], torch.arange(10.0, 25.0)[:, None]]
    a, b = sample_frames(parts, 8, 3), sample_frames(parts, 8, 3)
    assert a.shape == (8, 1) and torch.equal(a, b) and len(set(a[:, 0].tolist())) == 8
    assert torch.equal(sample_frames(parts, 100, 3), torch.cat(parts))


class Clips(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.mel = torch.randn(3, 80, 3000, generator=torch.Generator().manual_seed(5)) * 0.5
        self.frames = torch.tensor([3000, 2000, 999])

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int):
        return self.mel[i], self.frames[i]


def test_stock_and_adapted_probes_on_the_same_frames(tiny_whisper):
    q = RandomProjectionQuantizer(QuantizerConfig(codebook_size=16))
    model = BestRQModel(tiny_whisper.encoder, q, MaskingConfig())
    cfg = EvaluateConfig(batch_size=2, probe_frames=500, probe_clusters=4)
    same = probe_encoders(model, Clips(), cfg, torch.device("cpu"), progress=False)
    # vectors at one: the adapted encoder is the stock one
    assert same["delta/effective_rank"] == 0.0 and same["delta/davies_bouldin"] == 0.0
    assert 1.0 < same["stock/effective_rank"] <= 64.0
    with torch.no_grad():
        for name, p in model.encoder.named_parameters():
            if name.endswith(".scale"):
                p.mul_(0.0).add_(torch.linspace(0.2, 1.8, p.numel()))
    moved = probe_encoders(model, Clips(), cfg, torch.device("cpu"), progress=False)
    assert moved["stock/effective_rank"] == same["stock/effective_rank"]
    assert moved["adapted/effective_rank"] != same["adapted/effective_rank"]
    assert moved["delta/effective_rank"] == pytest.approx(
        moved["adapted/effective_rank"] - moved["stock/effective_rank"])
    # by hand: the valid frames only (1500 + 1000 + 500), sampled to 500 rows
    enc = model.encoder
    from bestrq.adapters.ia3 import ia3_disabled
    with torch.no_grad(), ia3_disabled(enc):
        h = enc(Clips().mel)
    parts = [h[0, :1500], h[1, :1000], h[2, :500]]
    frames = sample_frames(parts, 500, cfg.seed)
    assert moved["stock/effective_rank"] == pytest.approx(effective_rank(frames), rel=1e-6)
    assert ProbeConfig(max_frames=500, clusters=4, seed=cfg.seed) == cfg.probe_config()
