"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022), step by step.

Fit on normal images only: mid-level patch features of a pretrained CNN -> greedy coreset memory bank. Score a test
image by the distance of each of its patches to the nearest patch in the bank; the image score is the largest.
The paper's steps come first, in its order (Sec. 3.1 features, 3.2 coreset, 3.3 scoring, then fit and score); what
makes them fast or durable (the fast twins, the search index, saving, the command line) follows a banner.

    python synthetic.py --out /tmp/s --size 128
    python patchcore.py --data-root /tmp/s --category weave --backbone efficientnet_lite0 --image-size 128
    python patchcore.py --data-root ~/mvtec --category bottle        # the paper's WideResNet-50, 512 px
    python patchcore.py --data-root ~/parts --category new_part      # only train/good: fit + model.json (predict.py)
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TypeVar

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

import backbones
import data
import splits
from metrics import compute_metrics, normal_threshold, operating_point

PROJECTION_DIM = 128  # Sec. 3.2: coreset distances are computed on a random projection to this many dimensions
N_STARTS = 10  # the approximate greedy coreset starts from the mean distance to this many random points


@dataclass(frozen=True)
class Settings:
    """Everything needed to rebuild the feature pipeline of a fitted memory bank, and how the bank is searched."""
    backbone: str
    weights: str
    layers: tuple[str, ...]
    image_size: int
    center_crop: int | None
    patch_size: int
    pretrain_dim: int
    target_dim: int
    coreset_ratio: float
    reweight: bool
    reweight_k: int
    seed: int
    search: str = "exact"  # banks saved before issue 16 have neither field: they were searched exactly
    nprobe: int | None = None  # IVF lists searched per query (ivf only; None: min(NPROBE, lists))
    engine: str = "torch"  # what runs an exact search (EXACT_ENGINES); banks saved before issue 35 have none


# ================================================================================================================
# PatchCore as the paper gives it (Sec. 3): features, coreset, scoring; fit and score
# ================================================================================================================
# ----------------------------------------------------------------------------------------------------------------
# Sec. 3.1: locally aware patch features
# ----------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def extractor_for(backbone: str, weights: str, layers: tuple[str, ...], device: torch.device) -> backbones.FeatureExtractor:
    """The frozen feature extractor, built once per process and device (channels-last: ~30% faster on a CPU)."""
    return backbones.feature_extractor(backbone, weights, layers).to(device, memory_format=torch.channels_last)


def patchify(feature: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The p x p neighbourhood N_p of every position (Sec. 3.1): (B, C, h, w) -> (B, h, w, C, p, p), zero-padded."""
    b, c, h, w = feature.shape
    x = F.unfold(feature, patch_size, padding=(patch_size - 1) // 2)  # (B, C*p*p, h*w)
    x = x.view(b, c, patch_size, patch_size, h, w)  # (B, C, p, p, h, w)
    return x.permute(0, 4, 5, 1, 2, 3)  # (B, h, w, C, p, p)


def resize_patches(patches: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bring a deeper layer's patches to the first layer's grid, bilinearly: (B, h, w, C, p, p) -> (B, H, W, C, p, p)."""
    b, h, w, c, p, _ = patches.shape
    x = patches.permute(0, 3, 4, 5, 1, 2).reshape(b, c * p * p, h, w)  # (B, C*p*p, h, w)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # (B, C*p*p, H, W)
    return x.view(b, c, p, p, *size).permute(0, 4, 5, 1, 2, 3)  # (B, H, W, C, p, p)


def pool_dim(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sec. 3.1's dimension reduction (and its f_agg): adaptive average pooling along the feature axis,
    (N, D_in) -> (N, dim)."""
    return F.adaptive_avg_pool1d(x[:, None], dim)[:, 0]  # (N, 1, D_in) -> (N, 1, dim) -> (N, dim)


def aggregate(layers: list[torch.Tensor], s: Settings) -> torch.Tensor:
    """Sec. 3.1, local neighbourhood aggregation, step by step: every layer's p x p neighbourhoods, brought to the
    first layer's grid and pooled to pretrain_dim, then stacked and pooled to target_dim:
    [(B, C_l, h_l, w_l)] -> (B, H*W, target_dim)."""
    b, grid = layers[0].shape[0], tuple(layers[0].shape[-2:])
    per_layer = []
    for feature in layers:
        patches = patchify(feature, s.patch_size)  # (B, h_l, w_l, C_l, p, p)
        if tuple(patches.shape[1:3]) != grid:
            patches = resize_patches(patches, grid)  # (B, H, W, C_l, p, p)
        flat = patches.reshape(-1, patches[0, 0, 0].numel())  # (B*H*W, C_l*p*p)
        per_layer.append(pool_dim(flat, s.pretrain_dim))  # (B*H*W, pretrain_dim)
    stacked = torch.stack(per_layer, dim=1).flatten(1)  # (B*H*W, L*pretrain_dim)
    return pool_dim(stacked, s.target_dim).view(b, -1, s.target_dim)  # (B, H*W, target_dim)


def embed(extractor: backbones.FeatureExtractor, images: torch.Tensor, s: Settings) -> tuple[torch.Tensor, tuple]:
    """Sec. 3.1, the locally aware patch features of a batch: (B, 3, S, S) -> (B, H*W, target_dim) on the first
    layer's (H, W) grid (the pretrained network's layers, each patch aggregated over its neighbourhood)."""
    with torch.no_grad():
        layers = extractor(images.contiguous(memory_format=torch.channels_last))  # [(B, C_l, h_l, w_l)]
        # aggregate_by_convolution computes aggregate's result as one convolution per layer, faster where it can;
        # proven by tests/test_patchcore.py::test_aggregation_as_convolution_equals_the_papers_steps
        kernels = aggregation_kernels(tuple(f.shape[1] for f in layers), s)
        features = aggregate(layers, s) if kernels is None else aggregate_by_convolution(layers, kernels, s)
    return features, tuple(layers[0].shape[-2:])


# ----------------------------------------------------------------------------------------------------------------
# Sec. 3.2: the memory bank and its coreset (Algorithm 1)
# ----------------------------------------------------------------------------------------------------------------
def random_projection(dim_in: int, dim_out: int, seed: int) -> torch.Tensor:
    """A seeded Gaussian random projection (Johnson-Lindenstrauss): (dim_in, dim_out)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim_in, dim_out, generator=g) / dim_out ** 0.5


def extract_features(train: Sequence[data.Sample], s: Settings, device: torch.device,
                     batch_size: int, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch features of every training image (N, D) float16 on CPU, and their random projection (N, 128) on device."""
    extractor = extractor_for(s.backbone, s.weights, s.layers, device)
    loader = data.make_loader(train, s.image_size, *backbones.normalization(s.backbone), batch_size, s.center_crop,
                              device=device, workers=workers)
    projection = random_projection(s.target_dim, PROJECTION_DIM, s.seed).to(device)
    # Memory: a 400-image category at 512 px gives ~1.6M patches x 1024 dims. Kept as float32 that is 6.7 GB; we
    # keep float16 on the CPU (3.4 GB; the rounding, ~1e-3 relative, is far below patch-to-patch distances) and
    # project each batch to 128 dims on the fly for the coreset (0.8 GB), both written into arrays allocated once
    # (no concatenation copy), so fitting stays well under 12 GB.
    features = projected = None
    for batch in tqdm(loader, desc="features", disable=None, leave=False):
        f, _ = embed(extractor, batch["image"].to(device, non_blocking=True), s)  # (B, H*W, D)
        start = batch["index"][0].item() * f.shape[1]  # the loader does not shuffle: image i -> rows i*H*W...
        f = f.flatten(0, 1)  # (B*H*W, D)
        if features is None:
            n = len(train) * len(f) // len(batch["index"])  # every image has the same H*W patches
            features = torch.empty(n, s.target_dim, dtype=torch.float16)  # (N, D) on the CPU
            projected = torch.empty(n, PROJECTION_DIM, device=device)  # (N, 128)
        # float16 on the device, then the copy: half the bytes cross to the host (f.to("cpu", torch.float16) would
        # copy float32 and convert on the CPU)
        features[start:start + len(f)] = f.half().cpu()
        projected[start:start + len(f)] = f @ projection  # (B*H*W, D) -> (B*H*W, 128)
    return features, projected


def coreset_start(z: torch.Tensor, ratio: float, seed: int, n_starts: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(number of points to select, starting distance (N,), squared norms (N,)) of the approximate greedy coreset.

    The official code's approximation: every point starts at its mean distance to `n_starts` random points, instead
    of its distance to a first chosen point, so the N x N distance matrix is never needed.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randperm(len(z), generator=g)[:n_starts].to(z.device)
    min_dist = torch.cdist(z, z[starts]).mean(1)  # (N, n_starts) -> (N,)
    return max(1, int(len(z) * ratio)), min_dist, (z * z).sum(1)


def distances_to(z: torch.Tensor, sq_norms: torch.Tensor, q: torch.Tensor, sq_q: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """||z_i - q|| of every row, expanded as sqrt(|z_i|^2 - 2<z_i, q> + |q|^2): (N, d), (d,) -> (N,)."""
    out = torch.mv(z, q, out=out)  # (N,) <z_i, q>; in place: ~4x faster on CPU than fresh tensors
    return out.mul_(-2).add_(sq_norms).add_(sq_q).clamp_min_(0).sqrt_()


def greedy_coreset(z: torch.Tensor, ratio: float, seed: int, n_starts: int = N_STARTS,
                   limit: int | None = None) -> torch.Tensor:
    """Algorithm 1 (as in the official code): indices of ratio*N rows of z (N, d), each the farthest from those
    chosen so far. One pass over all N points per chosen point; fit runs greedy_coreset_fast, its fast twin.
    `limit` stops after that many points (benchmarks time a part of a long run).
    """
    n_select, min_dist, sq_norms = coreset_start(z, ratio, seed, n_starts)
    if ratio == 1:
        return torch.arange(len(z), device=z.device)
    n_select = min(n_select, limit or n_select)
    chosen = torch.empty(n_select, dtype=torch.long, device=z.device)  # on z's device: no host sync per point
    dist = torch.empty_like(min_dist)
    for i in tqdm(range(n_select), desc="coreset (plain)", disable=None, leave=False):
        j = torch.argmax(min_dist, 0, keepdim=True)  # (1,) the farthest point (the first one on ties)
        chosen[i:i + 1] = j  # (1,) indices, never 0-d ones: indexing with a 0-d CUDA tensor syncs with the host
        distances_to(z, sq_norms, z[j][0], sq_norms[j], out=dist)  # (N,)
        torch.minimum(min_dist, dist, out=min_dist)  # distance of every point to its nearest chosen point
    return chosen


# ----------------------------------------------------------------------------------------------------------------
# Sec. 3.3: anomaly detection with PatchCore: nearest patch, image score, anomaly map
# ----------------------------------------------------------------------------------------------------------------
def nearest_patch_distances(nn: NearestNeighbours, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each test patch's distance to its nearest memory-bank patch, and which bank patch that is:
    (B, P, D) -> (B, P), (B, P)."""
    dist, idx = nn.search(f.reshape(-1, f.shape[-1]), 1)  # (B*P, 1)
    return dist.reshape(f.shape[:2]), idx.reshape(f.shape[:2])  # (B, P), (B, P)


def image_score(nn: NearestNeighbours, f: np.ndarray, dist: np.ndarray, idx: np.ndarray, s: Settings) -> list[float]:
    """Eq. 6: s* = max over an image's test patches of the distance to the nearest bank patch ([B] from (B, P));
    with --reweight, Eq. 7 of it (off by default, as in the official code)."""
    worst = dist.argmax(1)  # (B,) m_test,*: the test patch farthest from the bank; m* = its nearest bank patch
    return [reweight(nn, f[b, j], dist[b, j], idx[b, j], s.reweight_k) if s.reweight else float(dist[b, j])
            for b, j in enumerate(worst)]


def reweight(nn: NearestNeighbours, query: np.ndarray, dist: float, idx: int, k: int) -> float:
    """Eq. 7: s = (1 - exp||m_test - m*|| / sum_{m in N_b(m*)} exp||m_test - m||) * s*, for the image's worst patch.

    m* is the bank neighbour of the worst test patch m_test; N_b(m*) are the k bank patches nearest to m*. A test patch
    whose neighbour m* lies in a sparse region of the bank (far from its own neighbours) keeps more of its score.
    """
    m_star = nn.vectors(np.array([idx]))  # (1, D)
    _, support = nn.search(m_star, k)  # (1, k): N_b(m*), m* itself included
    d = np.linalg.norm(nn.vectors(support[0]) - query[None], axis=1)  # (k,) distances from m_test to N_b(m*)
    weights = np.exp(np.concatenate([[dist], d]) - max(dist, d.max()))  # softmax, shifted for stability
    return float((1 - weights[0] / weights[1:].sum()) * dist)


SIGMA = 4  # Gaussian blur of the upsampled anomaly map, in pixels (Sec. 3.3 / official code)


def upsample_and_blur(dist: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> list[np.ndarray]:
    """The anomaly map: patch scores (B, H*W) on their (H, W) grid, upsampled bilinearly to the image's (S, S) and
    smoothed by a Gaussian of SIGMA pixels: [(S, S)]."""
    patch_map = torch.from_numpy(dist).view(-1, 1, *grid)  # (B, 1, H, W)
    up = F.interpolate(patch_map, size=size, mode="bilinear", align_corners=False)  # (B, 1, S, S)
    return [gaussian_filter(m, sigma=SIGMA) for m in up[:, 0].numpy()]


def anomaly_maps(bank: MemoryBank, f: np.ndarray, grid: tuple[int, int], size: tuple[int, int],
                 laps: Laps | None = None) -> tuple[list[float], list[np.ndarray]]:
    """Sec. 3.3, for a batch's patch features f (B, H*W, D): image scores [B] and anomaly maps [(S, S)]."""
    laps = laps or Laps()
    dist, idx = nearest_patch_distances(bank.nn, f)  # (B, H*W), (B, H*W)
    scores = image_score(bank.nn, f, dist, idx, bank.settings)  # [B]
    laps.lap("search")
    maps = upsample_and_blur(dist, grid, size)  # [(S, S)]
    laps.lap("maps")
    return scores, maps


# ----------------------------------------------------------------------------------------------------------------
# Fit (train/good -> memory bank) and score (images -> image scores and maps)
# ----------------------------------------------------------------------------------------------------------------
def fit(train: Sequence[data.Sample], s: Settings, device: torch.device, batch_size: int,
        workers: int = 0, laps: Laps | None = None) -> MemoryBank:
    """Sec. 3.2: the patch features of every training image, and a greedy coreset of them as the memory bank M."""
    laps = laps or Laps()
    features, z = extract_features(train, s, device, batch_size, workers)  # (N, D), (N, 128)
    laps.lap("features")
    # greedy_coreset_fast picks the points greedy_coreset (Algorithm 1) picks, many times faster; proven by
    # tests/test_patchcore.py::test_fast_coreset_selects_what_the_plain_loop_selects_*
    idx = greedy_coreset_fast(z, s.coreset_ratio, s.seed)  # (M,)
    laps.lap("coreset")
    nn = NearestNeighbours(features[idx.cpu()].float().numpy(), device, s.search, s.nprobe, s.seed, s.engine)
    laps.lap("index")
    return MemoryBank(replace(s, nprobe=nn.cpu.nprobe if nn.kind == "ivf" else None), nn)  # the nprobe used


def score_batch(bank: MemoryBank, extractor: backbones.FeatureExtractor, images: torch.Tensor,
                laps: Laps | None = None) -> tuple[list[float], list[np.ndarray]]:
    """Image scores [B] and blurred anomaly maps [(S, S)] of one batch of images (B, 3, S, S) on the device."""
    laps = laps or Laps()
    f, grid = embed(extractor, images, bank.settings)  # (B, H*W, D)
    f = f.cpu().numpy()
    laps.lap("features")
    return anomaly_maps(bank, f, grid, tuple(images.shape[-2:]), laps)


def score(bank: MemoryBank, samples: Sequence[data.Sample], device: torch.device, batch_size: int,
          desc: str = "scoring", workers: int = 0, laps: Laps | None = None
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image scores (N,), anomaly maps (N, S, S) and ground-truth masks (N, S, S) bool of samples (all zero for good
    images and missing masks). Every image is scored on its own: batch-independent. laps, if given, receives the
    seconds spent waiting for images (read), in the network (features), searching (search) and on maps (maps)."""
    s = bank.settings
    extractor = extractor_for(s.backbone, s.weights, s.layers, device)
    loader = data.make_loader(samples, s.image_size, *backbones.normalization(s.backbone), batch_size, s.center_crop,
                              device=device, workers=workers)
    scores, maps, masks = [], [], []
    laps = laps or Laps()
    for batch in tqdm(prefetched(loader), desc=desc, total=len(loader), disable=None, leave=False):
        laps.lap("read")
        batch_scores, batch_maps = score_batch(bank, extractor, batch["image"].to(device, non_blocking=True), laps)
        scores += batch_scores
        maps += batch_maps
        masks.append(batch["mask"][:, 0].numpy() > 0)  # (B, 1, S, S) -> (B, S, S)
    return np.array(scores, dtype=np.float64), np.stack(maps).astype(np.float32), np.concatenate(masks)


# ================================================================================================================
# Not in the paper: the fast twins, the search index, saving and loading, timing, the command line
# ================================================================================================================
# ----------------------------------------------------------------------------------------------------------------
# The aggregation as one convolution per layer (equal to aggregate: test_aggregation_as_convolution_...)
# ----------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def aggregation_kernels(channels: tuple[int, ...], s: Settings) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The same aggregation as one convolution per layer, or None where that would cost more than the steps.

    Every step of aggregate is linear (neighbourhood, bilinear resize, average pooling), so each layer's share of
    the final feature is a fixed p x p convolution of that layer, resized: its weights are the two poolings applied
    to the one-hot patch vectors (entry c*p*p + i*p + j is channel c at offset (i, j), F.unfold's order, which is
    a convolution kernel's). When C_l*p*p <= pretrain_dim (Lite0, EfficientNet-B0/B1) the pooling only repeats or
    averages pairs of values, and unfold + pool takes several times longer than the convolution; for wide layers
    (ResNets: C_l*p*p >> pretrain_dim) the steps are cheaper. Returns [(kernel (K_l, C_l, p, p), columns (K_l,))].
    """
    p, n_layers = s.patch_size, len(channels)
    if any(c * p * p > s.pretrain_dim for c in channels):
        return None
    kernels = []
    for l, c in enumerate(channels):
        pooled = pool_dim(torch.eye(c * p * p), s.pretrain_dim)  # (C_l*p*p, pretrain_dim)
        stacked = torch.zeros(c * p * p, n_layers, s.pretrain_dim)  # the other layers contribute zeros
        stacked[:, l] = pooled
        w = pool_dim(stacked.flatten(1), s.target_dim)  # (C_l*p*p, target_dim) weight of each entry in each output
        cols = torch.nonzero(w.abs().sum(0)).flatten()  # (K_l,) the outputs this layer feeds
        kernels.append((w[:, cols].T.reshape(len(cols), c, p, p).contiguous(), cols))
    return kernels


def aggregate_by_convolution(layers: list[torch.Tensor], kernels: list[tuple[torch.Tensor, torch.Tensor]],
                             s: Settings) -> torch.Tensor:
    """aggregate's result through aggregation_kernels: [(B, C_l, h_l, w_l)] -> (B, H*W, target_dim)."""
    grid = tuple(layers[0].shape[-2:])
    features = layers[0].new_zeros(layers[0].shape[0], s.target_dim, *grid)  # (B, target_dim, H, W)
    for feature, (kernel, cols) in zip(layers, kernels):
        y = F.conv2d(feature, kernel.to(feature.device), padding=(s.patch_size - 1) // 2)  # (B, K_l, h_l, w_l)
        if tuple(y.shape[-2:]) != grid:  # resizing after the pooling: the same linear map, on fewer channels
            y = F.interpolate(y, size=grid, mode="bilinear", align_corners=False)  # (B, K_l, H, W)
        features[:, cols.to(feature.device)] += y
    return features.flatten(2).transpose(1, 2)  # (B, target_dim, H, W) -> (B, H*W, target_dim)


# ----------------------------------------------------------------------------------------------------------------
# The exact greedy coreset in blocks (equal to greedy_coreset: test_fast_coreset_selects_...)
# ----------------------------------------------------------------------------------------------------------------
TOP_CANDIDATES = 4096  # fast coreset: points whose distances are kept exact inside a block (greedy_within)
CHECK_EVERY = 64  # fast coreset: steps between two host reads of the block's stop condition
PAIR_CHUNK = 1 << 21  # fast coreset: (point, chosen point) distances per matrix product in apply_chosen (CPU)
PAIR_CHUNK_CUDA = 1 << 26  # the same on a GPU: a 256 MB (r, B) block, ~100 products per update instead of ~3,000


def top_candidates(min_dist: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the `top` farthest points, sorted by index (T,); theta, the largest distance among all other points).

    The bound behind greedy_coreset: distances only ever shrink, so no point outside T can be farther than theta
    from the chosen set, whatever is chosen next. While some point of T is farther than theta, the farthest point
    of all is in T, and the greedy loop needs exact distances for T alone.
    """
    if top >= len(min_dist):
        return torch.arange(len(min_dist), device=min_dist.device), min_dist.new_tensor(float("-inf"))
    values, idx = torch.topk(min_dist, top + 1)  # (top + 1,) largest first
    return idx[:top].sort().values, values[top]  # sorted: argmax then takes the lowest index on ties, as the plain loop


def greedy_within(z: torch.Tensor, sq_norms: torch.Tensor, min_dist: torch.Tensor, cand: torch.Tensor,
                  theta: torch.Tensor, first: torch.Tensor, budget: int) -> torch.Tensor:
    """The plain loop restricted to the candidates cand (T,): the points it chooses, in order, while it provably
    chooses inside T (the farthest candidate is farther than theta), at most `budget`. `first` (the farthest point
    of all) is always chosen. Host sync only every CHECK_EVERY steps."""
    z_c, sq_c, dist_c = z[cand], sq_norms[cand], min_dist[cand]  # (T, d), (T,), (T,) exact for T
    chosen, valid = [first], []
    torch.minimum(dist_c, distances_to(z_c, sq_c, z[first][0], sq_norms[first]), out=dist_c)
    for step in range(1, min(budget, len(cand) + 1)):
        j = torch.argmax(dist_c, 0, keepdim=True)  # (1,) a position in cand
        ok = dist_c[j] > theta  # (1,) once False it stays False: dist_c is then left unchanged
        chosen.append(cand[j])
        valid.append(ok)
        dist_c = torch.where(ok, torch.minimum(dist_c, distances_to(z_c, sq_c, z_c[j][0], sq_c[j])), dist_c)
        if step % CHECK_EVERY == 0 and not ok:  # one host read per CHECK_EVERY steps (a sync on CUDA)
            break
    n_valid = 1 + (int(torch.cat(valid).long().cumprod(0).sum()) if valid else 0)  # the leading True steps
    return torch.cat(chosen[:n_valid])


def pair_chunk(device: torch.device) -> int:
    """(point, chosen point) distances per matrix product in apply_chosen. On a CPU a block that stays in cache;
    on a GPU PAIR_CHUNK would split each update of 1.6M points x 4096 chosen into ~3,000 products too small to fill
    it (each also launches 5 more kernels), so the block is 32x larger there."""
    return PAIR_CHUNK_CUDA if device.type == "cuda" else PAIR_CHUNK


def apply_chosen(z: torch.Tensor, sq_norms: torch.Tensor, min_dist: torch.Tensor, chosen: torch.Tensor) -> None:
    """min_dist <- min(min_dist, distance to each chosen point), for all N points at once, as matrix products:
    (N, d) x (d, B) in chunks, the same expanded distance as distances_to."""
    centres, sq_c = z[chosen].T.contiguous(), sq_norms[chosen]  # (d, B), (B,)
    rows = max(1, pair_chunk(z.device) // len(chosen))
    for s in range(0, len(z), rows):
        d2 = torch.addmm(sq_norms[s:s + rows, None], z[s:s + rows], centres, alpha=-2).add_(sq_c)  # (r, B)
        nearest = d2.amin(1).clamp_min_(0).sqrt_()  # min of sqrt = sqrt of min: clamp and sqrt are monotone
        torch.minimum(min_dist[s:s + rows], nearest, out=min_dist[s:s + rows])


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """float32 matrix products at full precision inside: TF32 (GPU) or bfloat16 (some CPUs), allowed by
    torch.set_float32_matmul_precision("high"), would round distances far more than the plain loop does."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def greedy_coreset_fast(z: torch.Tensor, ratio: float, seed: int, n_starts: int = N_STARTS,
                        top: int = TOP_CANDIDATES, stats: dict | None = None) -> torch.Tensor:
    """The points greedy_coreset (Algorithm 1) selects, in the same order, many times faster (same distances, same
    argmax).

    The plain loop spends one pass over all N points per chosen point, memory-bound. Here the loop runs in blocks:
    take the `top` farthest points T and the largest distance theta outside them (top_candidates); run the plain
    loop on T alone for as long as it provably picks inside T (greedy_within); then bring every point's distance up
    to date with all of the block's chosen points in one set of matrix products (apply_chosen), which a CPU or GPU
    computes many times faster per distance than one pass per point. Only the BLAS kernel summing the d products
    differs from the plain loop, so a distance may differ in its last bit: two points whose distances agree to
    float32 precision (a tie) can be taken in either order. `stats`, if given, receives the number of blocks.
    """
    n_select, min_dist, sq_norms = coreset_start(z, ratio, seed, n_starts)
    if ratio == 1:
        return torch.arange(len(z), device=z.device)
    chosen = torch.empty(n_select, dtype=torch.long, device=z.device)
    done = 0
    with full_float32(), tqdm(total=n_select, desc="coreset", disable=None, leave=False) as bar:
        while done < n_select:
            cand, theta = top_candidates(min_dist, top)  # (T,), ()
            first = torch.argmax(min_dist, 0, keepdim=True)  # (1,) the farthest point of all
            block = greedy_within(z, sq_norms, min_dist, cand, theta, first, n_select - done)  # (B,)
            chosen[done:done + len(block)] = block
            apply_chosen(z, sq_norms, min_dist, block)
            done += len(block)
            bar.update(len(block))
            if stats is not None:
                stats["blocks"] = stats.get("blocks", 0) + 1
    return chosen


# ----------------------------------------------------------------------------------------------------------------
# Nearest-neighbour search: exact (torch products or FAISS flat) or FAISS inverted-file (issues 16, 35)
# ----------------------------------------------------------------------------------------------------------------
GPU_MAX_K = 2048  # FAISS's largest k on a GPU (and largest nprobe of a GPU IVF index)
SEARCHES = ("exact", "ivf")  # every bank row compared, or FAISS IndexIVFFlat: only the nprobe nearest k-means lists
# Exact search runs as torch matrix products (TorchSearch) at the machine's GEMM rate: FAISS's flat index reaches
# 20 GFLOP/s on some Intel hosts where the same product runs at 111 (its bundled OpenBLAS picks a generic kernel on a
# CPU it does not know; issue 35, docs/search.md). "faiss" keeps FAISS's IndexFlatL2 for comparison; on a GPU a FAISS
# build that sees it searches there, else torch does.
EXACT_ENGINES = ("torch", "faiss")
SEARCH_ROWS = 1024  # query patches per block of TorchSearch (one 256 px image; a quarter of a 512 px one)
SEARCH_BLOCK = 1 << 21  # (query, bank) distances per block on a CPU: 8 MB of float32, bounded, read back from cache
# (blocks of 4, 8 and 16M distances ran 4 %, 10 % and 15 % slower on an AVX-512 Xeon: bench/bench_search.py)
SEARCH_BLOCK_CUDA = 1 << 26  # the same on a GPU: 256 MB, products large enough to fill it
NPROBE = 32  # issue 16: on tire/pill/transistor (256 px) and tire (512 px) nprobe 32 left every image AUROC as exact
# search's to 4 decimals (nprobe 8 moved it by up to 0.007) at 0.20x (512 px) to 0.40x (256 px) its time per image
POINTS_PER_LIST = 39  # FAISS k-means warns below 39 training points per centroid (min_points_per_centroid)
# --load: a saved bank fixes its feature pipeline and coreset (these flags may not be given with it, see check_flags);
# what only the scoring reads may change without refitting (these flags act on it, see load_bank)


def ivf_lists(n: int) -> int:
    """Number of IVF lists (k-means centroids) for a bank of n patches: about 4 sqrt(n), FAISS's rule of thumb (a
    query then compares itself with 4 sqrt(n) centroids plus nprobe lists of ~sqrt(n)/4 rows each), but at most
    n / 39 so that k-means trains every centroid on the 39 points FAISS asks for."""
    return min(round(4 * n ** 0.5), n // POINTS_PER_LIST)


def ivf_index(bank: np.ndarray, seed: int) -> faiss.IndexIVFFlat:
    """An IndexIVFFlat holding bank (M, D): seeded k-means splits it into ivf_lists(M) lists of full vectors.

    A bank too small for two lists ends the run with one sentence rather than falling back to exact search: the
    user asked for ivf, metrics.json must record the index that ran, and a bank that small is searched exactly in
    no time anyway (--search exact).
    """
    n_lists = ivf_lists(len(bank))
    if n_lists < 2:
        raise data.DataError(f"--search ivf needs a memory bank of at least {2 * POINTS_PER_LIST} patches to train "
                             f"its lists, this one has {len(bank)}; use --search exact")
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(bank.shape[1]), bank.shape[1], n_lists, faiss.METRIC_L2)
    index.cp.seed = seed  # FAISS k-means draws its starting centroids (and any training subsample) with this seed
    index.train(bank)
    index.add(bank)
    return index


class TorchSearch:
    """Exact L2 search of a bank (M, D) as matrix products on any torch device: the squared distance expanded as
    |q|^2 - 2 q.b + |b|^2 (what FAISS's flat index computes for large batches too), the bank in blocks so that no
    more than SEARCH_BLOCK distances exist at once, the k smallest kept per query across blocks."""

    def __init__(self, bank: np.ndarray | torch.Tensor, device: torch.device):
        self.bank = torch.as_tensor(bank, dtype=torch.float32).to(device)  # (M, D); on the CPU a view, no copy
        self.sq_norms = (self.bank * self.bank).sum(1)  # (M,)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(distances, indices) of the k nearest bank rows: (Q, D) -> (Q, k), (Q, k). True L2, not squared."""
        q = torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32)).to(self.bank.device)  # (Q, D)
        rows = max(1, min(len(q), SEARCH_ROWS))
        cols = max(k, (SEARCH_BLOCK_CUDA if q.is_cuda else SEARCH_BLOCK) // rows)
        dists, idxs = [], []
        with full_float32():  # no TF32 / bfloat16 products: the distances of the plain float32 sum
            for r in range(0, len(q), rows):
                best_d = best_i = None
                for c in range(0, len(self.bank), cols):
                    d2 = torch.addmm(self.sq_norms[None, c:c + cols], q[r:r + rows], self.bank[c:c + cols].T,
                                     alpha=-2)  # (r, c) |b|^2 - 2 q.b: |q|^2 is the same along a row, added last
                    d, i = d2.topk(k, dim=1, largest=False) if k > 1 else d2.min(1, keepdim=True)  # (r, k)
                    i = i + c
                    if best_d is not None:  # merge with the earlier blocks' k nearest
                        d, j = torch.cat([best_d, d], 1).topk(k, dim=1, largest=False, sorted=True) if k > 1 else \
                            torch.cat([best_d, d], 1).min(1, keepdim=True)  # (r, k); ties keep the earlier block
                        i = torch.cat([best_i, i], 1).gather(1, j)
                    best_d, best_i = d, i
                sq_q = (q[r:r + rows] * q[r:r + rows]).sum(1, keepdim=True)  # (r, 1)
                dists.append(best_d.add_(sq_q).clamp_min_(0).sqrt_().cpu())
                idxs.append(best_i.cpu())
        return torch.cat(dists).numpy(), torch.cat(idxs).numpy()


class NearestNeighbours:
    """L2 search over a memory bank (M, D), exact (every row compared: TorchSearch, or FAISS's IndexFlatL2) or
    approximate (FAISS's IndexIVFFlat: only the nprobe lists whose centroids are nearest to a query are searched); on
    the GPU when the device is CUDA (FAISS's GPU index where FAISS sees the GPU, else torch for exact search).
    The FAISS index is always kept on the CPU: it is what is saved, and it returns bank rows by index."""

    def __init__(self, bank: np.ndarray, device: torch.device, search: str = "exact", nprobe: int | None = None,
                 seed: int = 0, engine: str = "torch"):
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got '{search}'")
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if search == "ivf":
            index = ivf_index(bank, seed)
        else:
            index = faiss.IndexFlatL2(bank.shape[1])
            index.add(bank)
        self._place(index, device, nprobe, engine)

    def _place(self, index: faiss.Index, device: torch.device, nprobe: int | None, engine: str = "torch") -> None:
        """Keep the CPU index (save, reconstructing rows) and choose what searches: for exact search torch products
        over the index's own rows (engine "torch"; on a CUDA device without a FAISS GPU build as well), else FAISS,
        on a GPU copy if asked and possible; an IVF index searches nprobe lists (None: NPROBE, or every list of an
        index with fewer)."""
        if engine not in EXACT_ENGINES:
            raise ValueError(f"engine must be one of {', '.join(EXACT_ENGINES)}, got '{engine}'")
        self.cpu, self.index, self.torch = index, index, None
        self.queries, self.seconds = 0, 0.0  # searched so far, for the search's GFLOP/s (gflops)
        faiss_gpu = device.type == "cuda" and faiss.get_num_gpus() > 0
        if self.kind == "ivf":
            nprobe = min(NPROBE, self.n_lists) if nprobe is None else nprobe
            index.make_direct_map()  # id -> (list, offset), for reconstruct_batch in vectors(): IVF stores rows by list
            self.set_nprobe(nprobe)  # before the copy: index_cpu_to_gpu takes nprobe along
        elif engine == "torch" or (device.type == "cuda" and not faiss_gpu):
            rows = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d)  # the index's rows, shared, not copied
            self.torch = TorchSearch(np.asarray(rows).reshape(index.ntotal, index.d), device)  # (M, D)
            return
        if device.type == "cuda":
            if not faiss_gpu:
                print("note: FAISS sees no GPU (a CPU-only faiss build?); the IVF search runs on the CPU",
                      file=sys.stderr)
                return
            self.resources = faiss.StandardGpuResources()  # must live as long as the GPU index
            self.index = faiss.index_cpu_to_gpu(self.resources, device.index or 0, index)
            if self.kind == "ivf":
                self.set_nprobe(nprobe)

    @property
    def kind(self) -> str:
        """'exact' or 'ivf', from the index itself."""
        return "ivf" if isinstance(self.cpu, faiss.IndexIVF) else "exact"

    @property
    def engine(self) -> str:
        """What searches, as metrics.json records it: 'torch-cpu', 'torch-cuda', 'faiss-cpu' or 'faiss-gpu'."""
        if self.torch is not None:
            return f"torch-{self.torch.bank.device.type}"
        return "faiss-cpu" if self.index is self.cpu else "faiss-gpu"

    @property
    def n_lists(self) -> int | None:
        """Number of IVF lists, None for exact search."""
        return self.cpu.nlist if self.kind == "ivf" else None

    def set_nprobe(self, nprobe: int) -> None:
        """Search the nprobe lists nearest to each query (ivf only): more is slower and nearer to exact."""
        if self.kind != "ivf":
            raise ValueError("nprobe applies to an ivf index only, this one searches exactly")
        if not 1 <= nprobe <= self.n_lists:
            raise data.DataError(f"--nprobe must be between 1 and the {self.n_lists} IVF lists of this "
                                 f"{len(self)}-patch memory bank, got {nprobe}")
        if nprobe > GPU_MAX_K and self.index is not self.cpu:
            raise ValueError(f"nprobe={nprobe} is more than FAISS searches on a GPU ({GPU_MAX_K}); use --device cpu")
        self.cpu.nprobe = self.index.nprobe = nprobe  # GpuIndexIVF has nprobe too (faiss.IndexIVFInterface)

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(distances, indices) of the k nearest bank rows: (Q, D) -> (Q, k), (Q, k). True L2, not squared."""
        if k > len(self):
            raise ValueError(f"k={k} is larger than the memory bank ({len(self)} patches)")
        if k > GPU_MAX_K and self.index is not self.cpu:
            raise ValueError(f"k={k} is more than FAISS searches on a GPU ({GPU_MAX_K}); use --device cpu")
        t0 = time.perf_counter()
        if self.torch is not None:
            dist, idx = self.torch.search(queries, k)  # returns on the host: a GPU's work is done when it returns
        else:
            sq, idx = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
            dist = np.sqrt(np.maximum(sq, 0))
        self.queries, self.seconds = self.queries + len(queries), self.seconds + time.perf_counter() - t0
        if (idx[:, -1] < 0).any():  # FAISS pads with -1 (and a huge distance) when the probed lists hold < k rows
            raise data.DataError(f"with nprobe={self.cpu.nprobe} the IVF lists searched hold fewer than k={k} patches "
                                 f"for some queries; use a larger --nprobe")
        return dist, idx

    def gflops(self) -> float | None:
        """The exact search's rate so far: 2 x queries x bank rows x dimensions multiply-adds over its seconds (the
        product that decides its cost; issue 35). None for IVF search (it compares each query with a few lists)."""
        if self.kind != "exact" or self.seconds == 0:
            return None
        return 2.0 * self.queries * len(self) * self.cpu.d / self.seconds / 1e9

    def vectors(self, idx: np.ndarray) -> np.ndarray:
        """Bank rows by index, from the CPU index (no copy of a GPU index): (...,) -> (..., D)."""
        rows = self.cpu.reconstruct_batch(np.ascontiguousarray(idx.ravel(), dtype=np.int64))  # (n, D)
        return rows.reshape(*idx.shape, -1)

    def rebuilt(self, search: str, device: torch.device, nprobe: int | None, seed: int,
                engine: str = "torch") -> "NearestNeighbours":
        """The same bank rows in a new index searched as `search` asks (ivf: the seeded k-means lists of fit time,
        so exact and IVF search can be compared on one bank). IVF stores full vectors: no row changes."""
        return NearestNeighbours(self.vectors(np.arange(len(self))), device, search, nprobe, seed, engine)  # (M, D)

    def save(self, path: Path) -> None:
        faiss.write_index(self.cpu, str(path))

    @classmethod
    def load(cls, path: Path, device: torch.device, nprobe: int | None = None,
             engine: str = "torch") -> "NearestNeighbours":
        """A saved index; an IVF one searches nprobe lists, by default as many as when it was saved."""
        index = faiss.read_index(str(path))
        nn = cls.__new__(cls)
        nn._place(index, device, getattr(index, "nprobe", None) if nprobe is None else nprobe, engine)
        return nn


# ----------------------------------------------------------------------------------------------------------------
# The fitted model (settings + search index), saved and loaded; reading ahead; timing
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class MemoryBank:
    """Fitted PatchCore: the settings of its feature pipeline and the nearest-neighbour index of its bank."""
    settings: Settings
    nn: NearestNeighbours

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.nn.save(folder / "index.faiss")
        data.write_json(folder / "settings.json", asdict(self.settings))

    @classmethod
    def load(cls, folder: str | Path, device: torch.device, nprobe: int | None = None,
             search: str | None = None, engine: str | None = None) -> "MemoryBank":
        """A saved bank with its saved settings. nprobe, if given, replaces the saved one (IVF search only); search,
        if given and not the saved one, rebuilds the index from the bank's rows with the bank's seed; engine, if
        given, replaces what runs an exact search (the index is the same)."""
        folder = Path(folder)
        if (folder / "memory_bank").is_dir():  # a run's out dir was given
            folder = folder / "memory_bank"
        if not (folder / "index.faiss").is_file() or not (folder / "settings.json").is_file():
            raise data.DataError(f"no memory bank in {folder} (expected index.faiss and settings.json)")
        raw = json.loads((folder / "settings.json").read_text())
        s = Settings(**{**raw, "layers": tuple(raw["layers"])})  # no search, nprobe (before issue 16): exact
        search = search or s.search
        if nprobe is not None and search != "ivf":
            raise data.DataError(f"--nprobe applies to IVF search only, and the memory bank in {folder} is searched "
                                 f"exactly here (--search ivf builds IVF lists from its patches)")
        engine = engine or s.engine
        keep = search == s.search  # else the saved index is only read for its rows, on the CPU
        nn = NearestNeighbours.load(folder / "index.faiss", device if keep else torch.device("cpu"),
                                    s.nprobe if nprobe is None else nprobe, engine if keep else "faiss")
        if nn.kind != s.search:
            raise data.DataError(f"{folder}: settings.json says search '{s.search}' but index.faiss is {nn.kind}")
        if not keep:
            nn = nn.rebuilt(search, device, nprobe, s.seed, engine)
        return cls(replace(s, search=search, nprobe=nn.cpu.nprobe if nn.kind == "ivf" else None, engine=engine),
                   nn)  # the settings used


T = TypeVar("T")


def prefetched(items: Iterable[T]) -> Iterator[T]:
    """The items in order, the next one read by a background thread while the caller works on this one (issue 16).

    For a loader: decoding and resizing the next images (PIL and torch release the GIL) overlap with the network
    and the search, with or without worker processes. An error in the thread is raised here, at its position; when
    the caller stops early the thread stops after the item it is reading.
    """
    ahead: queue.Queue = queue.Queue(maxsize=1)  # one item ahead: ("item", x), ("error", e) or ("end", None)
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():  # a timeout, not a blocking put: the caller may have gone
            try:
                ahead.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def read() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
        except BaseException as e:  # handed to the caller, who raises it
            put(("error", e))
            return
        put(("end", None))

    thread = threading.Thread(target=read, daemon=True, name="prefetch")
    thread.start()
    try:
        while True:
            what, item = ahead.get()
            if what == "error":
                raise item
            if what == "end":
                return
            yield item
    finally:
        stop.set()
        thread.join()


class Laps:
    """Where a loop's time goes: lap(name) adds the seconds since the previous lap (or since creation) to name.
    On a GPU the work is asynchronous: a lap then counts when the host waited, not when the kernels ran."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


# ----------------------------------------------------------------------------------------------------------------
# The model folder (issue 33): memory_bank/ + model.json, all predict.py needs to score new images like the run
# ----------------------------------------------------------------------------------------------------------------
BANK_WEIGHTS = "backbone_weights.pt"  # a --weights file travels with the model folder, under this name


def save_model(folder: Path, bank: MemoryBank, calib: dict | None, category: str) -> None:
    """model.json beside the memory_bank/ folder that bank.save wrote in folder; a --weights file is copied in."""
    s = bank.settings
    if s.weights not in ("imagenet", "none"):
        import shutil
        shutil.copyfile(s.weights, folder / BANK_WEIGHTS)
    mean, std = backbones.normalization(s.backbone)
    model = {**asdict(s), "weights": s.weights if s.weights in ("imagenet", "none") else BANK_WEIGHTS,
             "normalization": {"mean": list(mean), "std": list(std)}, "memory_bank_size": len(bank.nn),
             "map_blur_sigma": SIGMA}
    data.write_model_json(folder, "patchcore", {"memory_bank": "memory_bank"}, model, calib, category)


def load_model(folder: str | Path, device: torch.device) -> tuple[MemoryBank, dict]:
    """(the memory bank, model.json) of a model folder, checked against each other; one sentence if they disagree.
    Nothing from the folder runs: JSON and FAISS's read_index."""
    info = data.read_model_json(folder)
    if info["kind"] != "patchcore":
        raise data.DataError(f"{folder} holds a {info['kind']} model, not a PatchCore memory bank")
    bank = MemoryBank.load(Path(folder) / info["files"].get("memory_bank", "memory_bank"), device)
    saved = {k: v for k, v in info["model"].items() if k in Settings.__dataclass_fields__}
    mine = asdict(bank.settings)
    differ = [k for k in mine if k != "weights" and k in saved and
              (tuple(saved[k]) if isinstance(saved[k], list) else saved[k]) != mine[k]]
    if differ or set(saved) != set(mine) or bank.settings.backbone not in backbones.BACKBONES:
        raise data.DataError(f"{folder}: model.json and its memory bank disagree on "
                             f"{', '.join(differ or sorted(set(saved) ^ set(mine)) or ['backbone'])} "
                             f"(a folder assembled from two runs or another version); refit it")
    if bank.nn.cpu.d != bank.settings.target_dim:
        raise data.DataError(f"{folder}: the memory bank holds {bank.nn.cpu.d}-dim patches but its settings say "
                             f"{bank.settings.target_dim}")
    if info["model"]["weights"] == BANK_WEIGHTS:
        bank = replace(bank, settings=replace(bank.settings, weights=str(Path(folder) / BANK_WEIGHTS)))
    return bank, info


# ----------------------------------------------------------------------------------------------------------------
# The flags: none is silently ignored, and the files record the settings that ran
# ----------------------------------------------------------------------------------------------------------------
FIXED_BY_BANK = ("backbone", "weights", "layers", "image_size", "center_crop", "patch_size", "pretrain_dim",
                 "target_dim", "coreset_ratio", "seed")
SET_AT_LOAD = ("search", "nprobe", "engine", "reweight", "reweight_k")
TABLE_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "threshold", "recall_at_threshold",
              "fpr_at_threshold", "fit_seconds", "ms_per_image", "peak_rss_mb", "memory_bank_size")  # final table


def flag(name: str) -> str:
    """The command-line flag of an argument's name: image_size -> --image-size."""
    return "--" + name.replace("_", "-")


def check_flags(args: argparse.Namespace) -> None:
    """End the run, before it reads or writes anything, on a flag given on the command line that would not act:
    with --load one that the bank fixes (FIXED_BY_BANK), without it --nprobe or --reweight-k that the search or
    the scoring would not use. (With --load those two are checked against the bank: MemoryBank.load, load_bank.)"""
    if args.load:
        fixed = [flag(k) for k in FIXED_BY_BANK if k in args.explicit]
        if fixed:
            raise data.DataError(f"{', '.join(fixed)} cannot be given with --load: the memory bank in {args.load} "
                                 f"fixes {'it' if len(fixed) == 1 else 'them'} (fit a new bank instead)")
        return
    if args.nprobe is not None and args.search != "ivf":
        raise data.DataError("--nprobe applies to --search ivf only; exact search probes no lists")
    if "engine" in args.explicit and args.search != "exact":
        raise data.DataError("--engine applies to --search exact only; IVF search is FAISS's")
    if "reweight_k" in args.explicit and not args.reweight:
        raise data.DataError("--reweight-k applies with --reweight only (the Eq. 7 neighbourhood)")


def load_bank(args: argparse.Namespace, device: torch.device) -> MemoryBank:
    """--load: the saved bank, with the settings that only the scoring reads (SET_AT_LOAD) from the flags given:
    --search rebuilds its index from its rows, --nprobe sets the IVF lists searched, --reweight and --reweight-k
    switch on Eq. 7 (applied to each image score, see score); the others keep their saved values."""
    search = args.search if "search" in args.explicit else None  # None: the saved search
    bank = MemoryBank.load(args.load, device, args.nprobe, search, args.engine if "engine" in args.explicit else None)
    reweighting = {k: getattr(args, k) for k in ("reweight", "reweight_k") if k in args.explicit}
    s = replace(bank.settings, **reweighting)
    if "reweight_k" in args.explicit and not s.reweight:
        raise data.DataError(f"--reweight-k applies with --reweight only, and the memory bank in {args.load} "
                             f"was fitted without it")
    return replace(bank, settings=s)


def used_args(args: argparse.Namespace, s: Settings) -> argparse.Namespace:
    """args as the run used them, for args.json and metrics.json: every flag the bank's settings stand for holds
    the value that ran (with --load the saved ones, not the parser's defaults; after a fit the default layers and
    nprobe resolved)."""
    return argparse.Namespace(**{**vars(args), **asdict(s)})


# ----------------------------------------------------------------------------------------------------------------
# The run: fit or load, score, write
# ----------------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    """Fit (or --load) a memory bank, score the test or evaluation images, write the result files; return metrics."""
    check_flags(args)
    data.code_version()  # the commit of the code this process loaded, read before anything long runs
    torch.manual_seed(args.seed)
    device = backbones.pick_device(args.device)
    print(backbones.describe_device(backbones.device_info(device)))
    backbones.set_precision(args.precision)
    # No --split: the category may hold normal images only (a new product; issue 33), and a seeded 10 % of
    # train/good, kept out of the bank, sets the deployable threshold and the maps' colour scale (as the study does)
    train, test = data.load_category(args.data_root, args.category, defects_optional=not args.split)
    heldout_good = []
    if args.split:  # the shared evaluation set of evaluate.py's protocol (PatchCore never uses the defects)
        split = splits.read_split(args.split)
        if split["category"] != args.category:
            raise data.DataError(f"split file {args.split} is for category '{split['category']}', not '{args.category}'")
        _, heldout_good, test = splits.apply_split(test, split, train)
        train = splits.without_heldout(train, heldout_good)  # open-set protocol: its normals held out of train/good
    elif not args.load:
        heldout_good = splits.heldout_train_good(train, args.seed)
        train = splits.without_heldout(train, heldout_good)
    out_dir = Path(args.out_dir or f"runs/patchcore/{args.category}")

    with data.atomic_dir(out_dir) as tmp:
        # Fit: features of train/good -> coreset memory bank (or reuse a saved one)
        t0, fit_laps = time.perf_counter(), Laps()
        if args.load:  # its feature pipeline is fixed (check_flags); --search, --nprobe, --reweight(-k) may act
            bank = load_bank(args, device)
            if not args.split:  # the images a bank fitted without --split held out, by its own seed
                heldout_good = splits.heldout_train_good(train, bank.settings.seed)
            print(f"loaded memory bank of {len(bank.nn)} patches from {args.load} ({bank.settings.backbone}, "
                  f"{bank.settings.image_size} px)")
        else:
            settings = Settings(args.backbone, args.weights, tuple(args.layers or ()) or backbones.default_layers(args.backbone),
                                args.image_size, args.center_crop, args.patch_size, args.pretrain_dim,
                                args.target_dim, args.coreset_ratio, args.reweight, args.reweight_k, args.seed,
                                args.search, args.nprobe, args.engine)
            bank = fit(train, settings, device, args.batch_size, args.workers, fit_laps)
        fit_seconds = time.perf_counter() - t0
        args = used_args(args, bank.settings)  # recorded below: the settings that ran, not the parser's defaults
        print(f"fit: {len(bank.nn)} patches in the memory bank, {fit_seconds:.1f} s, search {bank.nn.kind} "
              f"({bank.nn.engine})"
              + (f" ({bank.nn.n_lists} lists, nprobe {bank.settings.nprobe})" if bank.nn.kind == "ivf" else ""))

        # Score: every test (or evaluation) image, then the metrics shared with classify.py
        t0, laps = time.perf_counter(), Laps()
        scores, maps, masks = score(bank, test, device, args.batch_size, workers=args.workers, laps=laps) if test \
            else (np.zeros(0), None, None)
        ms_per_image = 1000 * (time.perf_counter() - t0) / len(test) if test else None  # None: nothing scored
        s = bank.settings
        labels = np.array([x.label for x in test])
        labelled = len(set(labels.tolist())) == 2
        metrics = compute_metrics(labels, scores, masks, maps, np.array([x.has_mask for x in test])) if labelled \
            else {key: None for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max")}
        if not labelled:
            print(f"{args.category} has no labelled test images (test/good and test/<defect_type>): no accuracy is "
                  f"measured; the model folder and its threshold from {len(heldout_good)} held-out normals are saved")
        # A deployable threshold needs normal images that are neither in the bank nor evaluated: the split's pool,
        # or without a split the seeded 10 % of train/good held out of the bank
        threshold, calib = None, None
        if heldout_good:
            heldout_scores, heldout_maps, _ = score(bank, heldout_good, device, args.batch_size, "held-out good",
                                                    args.workers)
            threshold = normal_threshold(heldout_scores)
            calib = data.calibration([x.rel for x in heldout_good], heldout_scores, heldout_maps, threshold,
                                     normal_threshold(heldout_maps.reshape(len(heldout_maps), -1).max(1)),
                                     "the split's held-out good images" if args.split else
                                     f"a seeded {splits.HELDOUT_TRAIN_FRACTION:.0%} of train/good held out of the bank")
        if heldout_good and labelled:
            op = operating_point(labels, scores, threshold)
            metrics.update(recall_at_threshold=op["recall"], fpr_at_threshold=op["fpr"])
        metrics.update(threshold=threshold, fit_seconds=fit_seconds, ms_per_image=ms_per_image,
                       params_millions=backbones.count_params(extractor_of(s)) / 1e6,
                       peak_rss_mb=data.peak_rss_mb(), memory_bank_size=len(bank.nn), settings=asdict(s),
                       n_train_images=None if args.load else len(train),
                       args=data.recorded_args(args), run_info=data.run_info(),
                       device_info=backbones.device_info(device, faiss_gpu=bank.nn.index is not bank.nn.cpu))
        metrics["ivf_lists"] = bank.nn.n_lists  # beside settings' search and nprobe; None for exact search
        metrics["search_engine"] = bank.nn.engine  # what ran the search, and its rate: a slow BLAS shows here
        metrics["search_gflops"] = bank.nn.gflops()
        if metrics["search_gflops"] is not None:
            print(f"search: exact on {bank.nn.engine}, {metrics['search_gflops']:.1f} GFLOP/s "
                  f"({bank.nn.queries} query patches x {len(bank.nn)} bank patches x {bank.nn.cpu.d} dims in "
                  f"{bank.nn.seconds:.1f} s)")
        metrics["ms_per_image_by_phase"] = {k: 1000 * v / len(test) for k, v in laps.seconds.items()}
        metrics["fit_seconds_by_phase"] = fit_laps.seconds or None  # features, coreset, index (None: --load)

        # Write: scores.csv (and the held-out normals' heldout_scores.csv), metrics.json, the model folder (memory
        # bank + model.json), overlays
        data.write_scores(tmp / "scores.csv", test, scores)
        if heldout_good:  # evaluate.py calibrates the fused detector on them
            data.write_scores(tmp / "heldout_scores.csv", heldout_good, heldout_scores)
        data.write_json(tmp / "metrics.json", metrics)
        bank.save(tmp / "memory_bank")
        save_model(tmp, bank, calib, args.category)
        for rank, i in enumerate(np.argsort(-scores)[:args.save_maps]):
            (tmp / "maps").mkdir(exist_ok=True)
            data.save_overlay(tmp / "maps" / f"{rank:02d}_{test[i].defect_type}_{Path(test[i].path).stem}.png",
                              data.read_image(test[i].path), maps[i], masks[i], f"{test[i].rel}  score {scores[i]:.3f}")
    data.print_table(metrics, TABLE_KEYS, out_dir)
    return metrics


def extractor_of(s: Settings) -> torch.nn.Module:
    """The part of the backbone that runs (stem up to the deepest feature layer), for the parameter count."""
    extractor = backbones.feature_extractor(s.backbone, "none", s.layers)
    ran = set()
    for module in extractor.model.modules():
        if not list(module.children()):
            module.register_forward_hook(lambda m, i, o: ran.add(m))
    extractor(torch.zeros(1, 3, 64, 64))
    return torch.nn.ModuleList(ran)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("--data-root", required=True, help="folder holding <category>/train/good, test/, ground_truth/")
    p.add_argument("--category", required=True)
    p.add_argument("--backbone", choices=backbones.BACKBONES, default="wide_resnet50_2")
    p.add_argument("--weights", default="imagenet", help="imagenet, none (random init) or a state-dict file")
    p.add_argument("--layers", nargs="+", default=None, help="feature layers (default: the stride-8 and -16 blocks)")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--center-crop", type=int, default=None, help="e.g. 224 with --image-size 256, as in the paper")
    p.add_argument("--patch-size", type=int, default=3, help="neighbourhood aggregated around each patch")
    p.add_argument("--pretrain-dim", type=int, default=1024, help="per-layer feature dimension after pooling")
    p.add_argument("--target-dim", type=int, default=1024, help="final patch feature dimension")
    p.add_argument("--coreset-ratio", type=float, default=0.1, help="fraction of patches kept in the memory bank")
    p.add_argument("--reweight", action="store_true", help="Eq. 7 image-score reweighting (off, as the official code)")
    p.add_argument("--reweight-k", type=int, default=9, help="size of the neighbourhood N_b(m*) in Eq. 7")
    p.add_argument("--search", choices=SEARCHES, default="exact",
                   help="nearest-neighbour search: exact, or FAISS IVF lists (approximate; faster on large banks); "
                        "with --load the saved one, or if given an index of that kind rebuilt from the bank's patches")
    p.add_argument("--engine", choices=EXACT_ENGINES, default="torch",
                   help="what runs --search exact: torch matrix products at the machine's matrix-multiply rate "
                        "(on a GPU too), or FAISS's flat index (its own BLAS; FAISS's GPU index where it sees one); "
                        "the same neighbours to float32 rounding")
    p.add_argument("--nprobe", type=int, default=None,
                   help=f"IVF lists searched per query (--search ivf only; default {NPROBE}, at most the bank's lists; "
                        "with --load the saved value unless given)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=backbones.PRECISIONS, default="mixed",
                   help="mixed: cuDNN may run the backbone's float32 convolutions in TF32 on a GPU (PyTorch's "
                        "default); float32: no TF32, for a strict comparison with the CPU")
    p.add_argument("--workers", type=int, default=data.default_workers(),
                   help="DataLoader worker processes (default for this machine: 0 on <= 2 cores, else "
                        "min(8, cores - 1)); the same seed gives the same results for any number")
    p.add_argument("--split", default=None, help="split JSON from splits.py: score only its evaluation images")
    p.add_argument("--load", default=None,
                   help="memory_bank folder (or run folder) to reuse instead of fitting; its settings fix "
                        f"{' '.join(map(flag, FIXED_BY_BANK))}, which may then not be given; "
                        f"{' '.join(map(flag, SET_AT_LOAD))} act on it")
    p.add_argument("--save-maps", type=int, default=0, help="save overlays of the N highest-scoring images")
    p.add_argument("--out-dir", default=None, help="default: runs/patchcore/<category>")
    args = p.parse_args(argv)
    # The names of the flags given on the command line (check_flags): argparse fills in a default only for a name
    # the namespace lacks, so a second parse into one that holds every name with a marker leaves the others marked.
    unset = object()
    given = p.parse_args(argv, argparse.Namespace(**{k: unset for k in vars(args)}))
    args.explicit = sorted(k for k, v in vars(given).items() if v is not unset)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        if not 0 < args.coreset_ratio <= 1:
            raise data.DataError(f"--coreset-ratio must be in (0, 1], got {args.coreset_ratio}")
        if args.nprobe is not None and args.nprobe < 1:  # its upper bound, the number of lists, needs the bank
            raise data.DataError(f"--nprobe must be at least 1, got {args.nprobe}")
        return run(args)
    except data.DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
