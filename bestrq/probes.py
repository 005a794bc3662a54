"""Label-free probes of an encoder's representation (Whetten et al. 2025, arXiv 2501.05966:
rank and cluster quality of the embeddings on a small unlabelled set predict downstream results
better than the pre-training loss).

- `effective_rank`: RankMe (Garrido et al. 2023, arXiv 2210.02885), exp of the entropy of the
  normalised singular values of the (frames, dim) embedding matrix: how many directions the
  representation really uses (at most min(frames, dim)). A collapsing encoder loses rank.
- `davies_bouldin`: Davies-Bouldin index of a seeded k-means clustering of the frames: the mean
  over clusters of the worst ratio of within-cluster spread to between-centroid distance.
  Lower is better separated.
Both are computed on the encoder's output for the same clean eval frames, for stock and adapted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ProbeConfig:
    max_frames: int = 20_000  # encoder frames sampled from the eval clips (seeded)
    clusters: int = 32  # k of the k-means behind the Davies-Bouldin index
    iterations: int = 30  # Lloyd iterations
    seed: int = 0


def effective_rank(x: Tensor, eps: float = 1e-7) -> float:
    """RankMe of embeddings (frames, dim): exp(-sum p_k log p_k), p_k = s_k / sum(s) + eps, over
    the singular values s_k of the (uncentred) matrix, in float64."""
    s = torch.linalg.svdvals(x.double())  # (min(frames, dim),)
    p = s / s.sum().clamp_min(1e-300) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def kmeans(x: Tensor, k: int, iterations: int, seed: int) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means of (frames, dim), started from k distinct frames drawn with `seed`.
    Returns (centroids (k, dim), assignment (frames,)); an emptied cluster keeps its centroid."""
    x = x.double()
    gen = torch.Generator().manual_seed(seed)
    k = min(k, x.shape[0])
    centroids = x[torch.randperm(x.shape[0], generator=gen)[:k].to(x.device)].clone()  # (k, dim)
    assign = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for _ in range(iterations):
        assign = torch.cdist(x, centroids).argmin(dim=1)  # (frames,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)  # (k, dim)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)  # (k,)
        filled = counts > 0
        new = centroids.clone()
        new[filled] = sums[filled] / counts[filled, None]
        if torch.equal(new, centroids):
            break
        centroids = new
    assign = torch.cdist(x, centroids).argmin(dim=1)
    return centroids, assign


def davies_bouldin(x: Tensor, assign: Tensor) -> float:
    """Davies-Bouldin index of embeddings (frames, dim) under a clustering `assign` (frames,):
    mean over non-empty clusters i of max_{j != i} (S_i + S_j) / |c_i - c_j|, with c the
    clusters' means and S their members' mean distance to them. Needs two clusters."""
    x = x.double()
    labels = torch.unique(assign)
    if labels.numel() < 2:
        return math.nan
    centroids = torch.stack([x[assign == c].mean(0) for c in labels])  # (k, dim)
    spread = torch.stack([(x[assign == c] - centroids[i]).norm(dim=1).mean()
                          for i, c in enumerate(labels)])  # (k,)
    gap = torch.cdist(centroids, centroids)  # (k, k)
    ratio = (spread[:, None] + spread[None, :]) / gap
    ratio.fill_diagonal_(-math.inf)
    return float(ratio.max(dim=1).values.mean())


def probe(frames: Tensor, config: ProbeConfig) -> dict[str, float]:
    """`effective_rank` and `davies_bouldin` (k-means with `config`) of (frames, dim)."""
    _, assign = kmeans(frames, config.clusters, config.iterations, config.seed)
    return {"effective_rank": effective_rank(frames), "davies_bouldin": davies_bouldin(
        frames, assign)}


def sample_frames(outputs: list[Tensor], max_frames: int, seed: int) -> Tensor:
    """At most `max_frames` rows, drawn without replacement with `seed`, of the concatenated
    (frames_i, dim) outputs; the same rows for every encoder given the same frame counts."""
    x = torch.cat(outputs)  # (frames, dim)
    if x.shape[0] <= max_frames:
        return x
    pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    return x[pick[:max_frames].sort().values.to(x.device)]
