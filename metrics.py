"""The metrics of the whole project, one implementation each: image AUROC, AP, F1-max, the deployable threshold,
pixel AUROC, AUPRO, bootstrap intervals (one AUROC, or the paired difference of two methods on the same images) and
the interval of a difference measured by several training draws (seeds), which carries both the seeds and the images.
classify.py, patchcore.py and evaluate.py all import them from here.

Labels: 0 good, 1 defect. Scores and maps: higher = more anomalous; a sample is flagged at score >= t.

    python metrics.py --scores runs/patchcore/tire/scores.csv          # image AUROC with its 95 % interval, AP, F1
    python metrics.py --scores runs/a/scores.csv --compare runs/b/scores.csv   # paired difference on the same images
    python metrics.py --scores a0/scores.csv a1/scores.csv a2/scores.csv --compare b0/scores.csv b1/scores.csv \
        b2/scores.csv                                # one pair per seed: the interval over seeds and images
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, stats
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

import data

NORMAL_QUANTILE = 0.99  # deployable threshold: at most 1% of held-out normal images score above it
AUPRO_FPR_LIMIT = 0.3   # Bergmann et al. (MVTec AD, IJCV 2021) integrate the PRO curve up to 30% pixel FPR
PIXEL_CHUNK = 1 << 20   # anomalous pixels handled per step in the curve integral: bounds memory at any defect size
BOOTSTRAP_RESAMPLES = 2000  # resamples of the evaluation images behind every interval
CONFIDENCE = 0.95


# ----------------------------------------------------------------------------------------------------------------
# Metrics. Labels: 0 good, 1 defect. Scores and maps: higher = more anomalous; a sample is flagged at score >= t.
# ----------------------------------------------------------------------------------------------------------------
def _binary(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N,) int in {0, 1} and scores (N,) float, checked; both classes must be present."""
    labels, scores = np.asarray(labels).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"got {labels.size} labels but {scores.size} scores; expected one score per image.")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (good) or 1 (defect), got values {np.unique(labels).tolist()}.")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; every image needs a score.")
    if np.unique(labels).size < 2:
        raise ValueError(f"only one class present among {labels.size} labels ({np.unique(labels).tolist()}); "
                         "image metrics need both good and defect images.")
    return labels.astype(np.int64), scores


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image scores (0.5 = chance, 1 = every defect scores above every good image)."""
    labels, scores = _binary(labels, scores)
    return float(roc_auc_score(labels, scores))


def average_precision(labels, scores) -> float:
    """Average precision (area under the precision-recall curve, step-wise as in sklearn)."""
    labels, scores = _binary(labels, scores)
    return float(average_precision_score(labels, scores))


def f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 over all thresholds and the (lowest) threshold reaching it; an oracle bound, since it peeks at labels."""
    labels, scores = _binary(labels, scores)
    precision, recall, thresholds = precision_recall_curve(labels, scores)  # (T+1,), (T+1,), (T,)
    # The last point (precision 1, recall 0) has no threshold; drop it. P + R = 0 (no true positive) gives F1 = 0.
    precision, recall = precision[:-1], recall[:-1]  # (T+1,) -> (T,)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def operating_point(labels, scores, threshold: float) -> dict:
    """Recall (TPR) and false positive rate when images with score >= threshold are flagged as defects."""
    labels, scores = _binary(labels, scores)
    flagged = scores >= threshold
    return {"threshold": float(threshold),
            "recall": float(flagged[labels == 1].mean()),
            "fpr": float(flagged[labels == 0].mean())}


def normal_threshold(normal_scores, quantile: float = NORMAL_QUANTILE) -> float:
    """Deployable threshold from held-out normal images only: just above their `quantile` (an observed score)."""
    # Why this rule: a production line knows good parts, not tomorrow's defects, so the threshold may only use
    # held-out normal images (never test anomalies). We take an observed score (method="higher": no interpolation)
    # and move one float step up, so that with `score >= threshold` at most a fraction 1 - quantile of held-out
    # normal images would be flagged. With up to 100 held-out images, quantile=0.99 is simply their max score: no
    # known-good image is rejected; with more, a single odd normal image can no longer drag the threshold up.
    scores = np.asarray(normal_scores, dtype=np.float64).ravel()
    if scores.size == 0 or not np.isfinite(scores).all():
        raise ValueError(f"need at least one finite held-out normal score, got {scores.size} scores with "
                         f"{int((~np.isfinite(scores)).sum())} not finite.")
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}.")
    return float(np.nextafter(np.quantile(scores, quantile, method="higher"), np.inf))


def _pixels(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """Masks (N, H, W) as bool and maps (N, H, W) as given (float32 keeps 512 px studies small), checked."""
    masks, maps = np.asarray(masks).astype(bool, copy=False), np.asarray(maps)
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} must have the same shape (N, H, W).")
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float32)
    if np.isnan(maps).any():
        raise ValueError("anomaly maps contain NaN; every pixel needs a score.")
    return masks, maps


def _area_under_curve(neg: np.ndarray, pos: np.ndarray, weights: np.ndarray, fpr_limit: float) -> float:
    """Area under y(t) = sum of weights of positives >= t vs FPR(t), for FPR <= fpr_limit; sorts neg in place."""
    # The curve is drawn through one point per distinct threshold t, so tied scores form one straight segment
    # (as sklearn's roc_curve and the MVTec AD evaluation code do), and is cut at exactly FPR = fpr_limit.
    # y is a sum over positives, so the trapezoid area is too: positive i (score s) starts counting at
    # FPR_gt(s) = #neg > s and is fully counted from FPR_ge(s) = #neg >= s (both / n_neg), linearly in between.
    # Its area up to limit L is w * (L - (FPR_gt + FPR_ge) / 2) when FPR_ge <= L (for L = 1 that is the
    # Mann-Whitney U statistic, i.e. the ROC AUC), a triangle when the tie segment crosses L, else 0.
    # Only the normal scores are sorted (once); each positive is located in them by binary search.
    neg.sort()  # (n_neg,) ascending, in place: callers pass a fresh copy, and 39M float32 pixels are 150 MiB
    n_neg, area = neg.size, 0.0
    for start in range(0, pos.size, PIXEL_CHUNK):
        s, w = pos[start:start + PIXEL_CHUNK], weights[start:start + PIXEL_CHUNK]  # (c,), (c,)
        fpr_ge = (n_neg - np.searchsorted(neg, s, side="left")) / n_neg   # (c,) negatives scoring >= s
        fpr_gt = (n_neg - np.searchsorted(neg, s, side="right")) / n_neg  # (c,) negatives scoring > s
        full = fpr_ge <= fpr_limit
        area += float(np.sum(w[full] * (fpr_limit - (fpr_gt[full] + fpr_ge[full]) / 2)))
        part = ~full & (fpr_gt < fpr_limit)  # the tie segment that crosses the limit (possible only with ties)
        area += float(np.sum(w[part] * (fpr_limit - fpr_gt[part]) ** 2 / (2 * (fpr_ge[part] - fpr_gt[part]))))
    return area


def pixel_auroc(masks, maps) -> float:
    """ROC AUC over all pixels of all images (masks (N, H, W) 0/1, maps (N, H, W) float); ties count half."""
    masks, maps = _pixels(masks, maps)
    pos = maps[masks]  # (N, H, W) -> (n_pos,)
    if pos.size == 0 or pos.size == masks.size:
        raise ValueError(f"pixel AUROC needs anomalous and normal pixels, got {pos.size} anomalous "
                         f"of {masks.size}.")
    weights = np.full(pos.size, 1.0 / pos.size)  # (n_pos,) y(t) = TPR(t)
    return _area_under_curve(maps[~masks], pos, weights, fpr_limit=1.0)


def aupro(masks, maps, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
    """Area under the per-region-overlap (PRO) curve up to pixel FPR = fpr_limit, divided by fpr_limit (perfect = 1)."""
    # Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021, Sec. 5.2. PRO(t) = mean over all ground-truth
    # regions of the fraction of the region's pixels scoring >= t; FPR(t) is over the normal pixels of all images.
    # Regions are the connected components of each mask with scipy.ndimage.label's default structure, i.e.
    # 4-connectivity (as the official MVTec AD evaluation code). Since PRO(t) = sum over anomalous pixels p >= t
    # of w_p = 1 / (|region(p)| * n_regions), the PRO curve is the weighted TPR curve of _area_under_curve: exact,
    # every distinct threshold, no threshold grid.
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}.")
    masks, maps = _pixels(masks, maps)
    pos, region_size, n_regions = [], [], 0
    for mask, amap in zip(masks, maps):
        regions, n = ndimage.label(mask)  # (H, W) int: 0 background, 1..n regions
        if n:
            sizes = np.bincount(regions.ravel())  # (n + 1,) pixels per region id
            pos.append(amap[mask])  # (H, W) -> (n_pos_i,) in the same C order as the line below
            region_size.append(sizes[regions[mask]])  # (H, W) -> (n_pos_i,) size of each pixel's region
            n_regions += n
    if n_regions == 0 or masks.all():
        raise ValueError(f"AUPRO needs at least one anomalous region and one normal pixel, got {n_regions} regions "
                         f"and {int((~masks).sum())} normal pixels.")
    pos, region_size = np.concatenate(pos), np.concatenate(region_size)  # (n_pos,), (n_pos,)
    weights = 1.0 / (region_size * float(n_regions))  # (n_pos,) each region's pixels sum to 1 / n_regions
    return _area_under_curve(maps[~masks], pos, weights, fpr_limit) / fpr_limit


def compute_metrics(labels, scores, masks=None, maps=None, has_mask=None) -> dict:
    """The metrics.json dict of classify.py and patchcore.py: image metrics, and pixel metrics where masks exist."""
    # Pixel metrics use only images with a mask: good images (all-zero mask) and defect images whose mask file was
    # found; has_mask (N,) False marks defect images without one (their placeholder mask would call every pixel
    # normal). They are None without masks or maps, or when the kept pixels are all normal (or all anomalous).
    labels, scores = _binary(labels, scores)
    f1, f1_threshold = f1_max(labels, scores)
    pixel, pro, n_pixel_images = None, None, 0
    if masks is not None and maps is not None:
        masks, maps = _pixels(masks, maps)
        keep = np.ones(len(masks), bool) if has_mask is None else np.asarray(has_mask, bool).ravel()  # (N,)
        if not len(masks) == len(keep) == len(labels):
            raise ValueError(f"got {len(labels)} labels, {len(masks)} masks and {len(keep)} has_mask flags; "
                             "expected one of each per image.")
        if not keep.all():
            masks, maps = masks[keep], maps[keep]  # (N, H, W) -> (N_kept, H, W)
        n_pixel_images = int(keep.sum())
        if masks.any() and not masks.all():
            pixel, pro = pixel_auroc(masks, maps), aupro(masks, maps)
    return {"image_auroc": image_auroc(labels, scores),
            "average_precision": average_precision(labels, scores),
            "f1_max": f1,
            "f1_threshold": f1_threshold,
            "pixel_auroc": pixel,
            "aupro": pro,
            "n_images": int(labels.size),
            "n_defects": int(labels.sum()),
            "n_pixel_images": n_pixel_images}


# ----------------------------------------------------------------------------------------------------------------
# Uncertainty: stratified bootstrap over evaluation images (both classes keep their size in every resample, so
# every resample has an AUROC), vectorised through AUROC = mean over (defect, good) pairs of [defect scores higher].
# Resampling the images of a paired comparison once and scoring both methods on each resample gives the paired
# interval of their difference. Resamples are drawn from `seed` alone: the same seed and the same number of
# defects and good images give the same resamples, which is what pairs two methods on identical images.
# ----------------------------------------------------------------------------------------------------------------
def bootstrap_counts(n_pos: int, n_neg: int, seed: int,
                     n_resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """How often each defect (R, n_pos) and each good image (R, n_neg) is drawn in each of R resamples."""
    rng = np.random.default_rng(seed)
    return (rng.multinomial(n_pos, np.full(n_pos, 1 / n_pos), size=n_resamples),
            rng.multinomial(n_neg, np.full(n_neg, 1 / n_neg), size=n_resamples))


def auroc_resamples(labels, scores, counts: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Image AUROC of every resample (R,); counts from bootstrap_counts for these labels' class sizes, or any
    per-image weights (R, P), (R, Q) of these images (each resample's AUROC is over the pairs its weights draw)."""
    labels, scores = _binary(labels, scores)
    pos, neg = scores[labels == 1], scores[labels == 0]  # (P,), (Q,)
    wins = (pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])  # (P, Q) 1, 1/2 on a tie, 0
    c_pos, c_neg = counts  # (R, P), (R, Q)
    if c_pos.shape[1] != pos.size or c_neg.shape[1] != neg.size:
        raise ValueError(f"counts are for {c_pos.shape[1]} defects and {c_neg.shape[1]} good images, "
                         f"got {pos.size} and {neg.size}.")
    pairs = np.maximum(c_pos.sum(1) * c_neg.sum(1), 1)  # (R,) P * Q for bootstrap_counts; never 0 (guarded)
    return np.einsum("rp,pq,rq->r", c_pos, wins, c_neg) / pairs  # (R,)


def interval(resamples: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile interval holding `confidence` of the resampled values."""
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(resamples, [tail, 100 - tail])
    return float(low), float(high)


def auroc_interval(labels, scores, seed: int = 0, n_resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """95 % bootstrap interval of one image AUROC, over its evaluation images."""
    labels = np.asarray(labels).ravel()
    counts = bootstrap_counts(int((labels == 1).sum()), int((labels == 0).sum()), seed, n_resamples)
    return interval(auroc_resamples(labels, scores, counts))


def paired_auroc_difference(labels, scores_a, scores_b, seed: int = 0,
                            n_resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float, float]:
    """(AUROC(a) - AUROC(b), and its 95 % paired bootstrap interval): both methods scored the same images, in the
    same order, and every resample draws the same images for both."""
    labels = np.asarray(labels).ravel()
    counts = bootstrap_counts(int((labels == 1).sum()), int((labels == 0).sum()), seed, n_resamples)
    diff = auroc_resamples(labels, scores_a, counts) - auroc_resamples(labels, scores_b, counts)  # (R,)
    return image_auroc(labels, scores_a) - image_auroc(labels, scores_b), *interval(diff)


def excludes_zero(low: float, high: float) -> bool:
    """A difference counts as real only when its whole interval lies on one side of 0."""
    return low > 0 or high < 0


# ----------------------------------------------------------------------------------------------------------------
# A difference over training draws AND evaluation images (issue 32). Each seed trains its own model and measures the
# paired difference d_s of two methods on (nearly) the same evaluation images, so d_s = mu + tau_s + e_s: tau_s the
# training draw, e_s the images' sampling error, which the seeds largely share. The image bootstrap above sees e
# only; the spread of the d_s sees tau and the part of e that differs between seeds, not the shared part. So the
# interval adds both: var = s^2 / n (the seeds' sample variance of d_s) + v (the bootstrap variance of the seeds'
# mean when the images are resampled, the models fixed; images shared by seeds are drawn together), with Student's
# t at Welch-Satterthwaite's degrees of freedom (the bootstrap term counts as known exactly). Why not a two-level
# percentile bootstrap (draw seeds, then images): with n = 3-5 seeds it undercovers, since a resampled mean of n
# values varies (n - 1) / n as much as the true one and 3 seeds give 10 distinct draws; t over the d_s does not
# (tests/test_metrics.py simulates it). Over several categories every category has its own seeds: the mean over
# categories, each weighted equally, with the seed terms of each. One seed: nothing measures tau, the interval is
# the image bootstrap's and must say so.
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Replicate:
    """One training draw's paired comparison: methods a and b scored the same evaluation images."""
    category: str
    seed: int
    paths: np.ndarray   # (N,) image names: images of one category shared by several seeds are resampled together
    labels: np.ndarray  # (N,) 0 good, 1 defect
    a: np.ndarray       # (N,) method a's scores
    b: np.ndarray       # (N,) method b's scores


def joint_image_resamples(reps: list[Replicate], seed: int, n_resamples: int) -> np.ndarray:
    """AUROC(a) - AUROC(b) of every replicate on R resamples of its category's images (R, n_reps): each image of the
    union of the replicates' images is drawn with one count per resample, stratified by class, so a replicate's
    resampled AUROC weighs its images by their counts, and replicates that share images share the draw."""
    union = {}
    for r in reps:
        union.update(zip(r.paths.tolist(), r.labels.tolist()))
    names = sorted(union)
    label = np.array([union[n] for n in names])
    c_pos, c_neg = bootstrap_counts(int(label.sum()), int((label == 0).sum()), seed, n_resamples)  # (R, P), (R, Q)
    counts = np.zeros((n_resamples, len(names)))  # (R, P + Q) per image of the union
    counts[:, label == 1], counts[:, label == 0] = c_pos, c_neg
    where = {n: i for i, n in enumerate(names)}
    out = np.empty((n_resamples, len(reps)))
    for j, r in enumerate(reps):
        w = counts[:, [where[p] for p in r.paths.tolist()]]  # (R, N) this replicate's images' counts
        w = (w[:, r.labels == 1], w[:, r.labels == 0])  # (R, P_r), (R, Q_r)
        out[:, j] = auroc_resamples(r.labels, r.a, w) - auroc_resamples(r.labels, r.b, w)
    return out


@dataclass
class SeededDifference:
    """A paired difference over seeds and images: the point, its interval, and what it rests on."""
    difference: float
    low: float
    high: float
    per_seed: dict  # {seed: the difference of that seed, mean over the categories that have it}
    n_seeds: dict   # {category: seeds}
    one_draw: bool  # some category has one seed: its training draw is in no interval (image bootstrap only)

    @property
    def real(self) -> bool:
        return excludes_zero(self.low, self.high)


def seeded_difference(reps: list[Replicate], seed: int = 0, n_resamples: int = BOOTSTRAP_RESAMPLES,
                      confidence: float = CONFIDENCE) -> SeededDifference:
    """Mean over categories (each equally) of each category's mean over seeds of AUROC(a) - AUROC(b), with a 95 %
    interval over training draws and evaluation images (see the comment above). Several replicates of one
    (category, seed), e.g. hard's known types, are averaged into that seed's difference first."""
    categories = sorted({r.category for r in reps})
    point, var_seeds, dof_terms, n_seeds, resampled, by_seed = 0.0, 0.0, 0.0, {}, 0.0, {}
    for k, c in enumerate(categories):
        mine = [r for r in reps if r.category == c]
        seeds = sorted({r.seed for r in mine})
        n_seeds[c] = len(seeds)
        diffs = np.array([image_auroc(r.labels, r.a) - image_auroc(r.labels, r.b) for r in mine])  # (n_reps,)
        per_seed = np.array([diffs[[r.seed == s for r in mine]].mean() for s in seeds])  # (n_c,)
        for s, d in zip(seeds, per_seed):
            by_seed.setdefault(s, []).append(d)  # seed -> its difference in each category that has it
        boot = joint_image_resamples(mine, seed + k, n_resamples)  # (R, n_reps)
        boot = np.stack([boot[:, [r.seed == s for r in mine]].mean(1) for s in seeds], 1).mean(1)  # (R,) seeds' mean
        point += per_seed.mean() / len(categories)
        resampled = resampled + boot / len(categories)
        if len(seeds) > 1:
            term = per_seed.var(ddof=1) / len(seeds) / len(categories) ** 2  # this category's seeds, s^2 / n
            var_seeds += term
            dof_terms += term ** 2 / (len(seeds) - 1)
    per_seed_mean = {s: float(np.mean(d)) for s, d in sorted(by_seed.items())
                     if len(d) == len(categories)}  # a seed every category has
    one_draw = min(n_seeds.values()) == 1
    if var_seeds == 0 and one_draw:  # no seed spread measured anywhere: the image bootstrap's percentile interval
        low, high = interval(resampled, confidence)
        return SeededDifference(float(point), low, high, per_seed_mean, n_seeds, True)
    var_images = float(np.var(resampled, ddof=1))
    total = var_seeds + var_images
    dof = total ** 2 / dof_terms if dof_terms > 0 else np.inf  # Welch-Satterthwaite; the bootstrap term: infinite
    half = float(stats.t.ppf(0.5 + confidence / 2, dof)) * np.sqrt(total)
    return SeededDifference(float(point), float(point - half), float(point + half), per_seed_mean, n_seeds, one_draw)


# ----------------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    """Image metrics of one scores.csv, with the AUROC interval; with --compare, the paired difference: over the
    images for one pair of files, over seeds and images for several (one pair per training draw, in order)."""
    paths, labels, _, scores = data.read_scores(args.scores[0])
    out = {"image_auroc": image_auroc(labels, scores), "average_precision": average_precision(labels, scores),
           "f1_max": f1_max(labels, scores)[0]}
    out["image_auroc_low"], out["image_auroc_high"] = auroc_interval(labels, scores, args.seed, args.resamples)
    if args.compare:
        if len(args.compare) != len(args.scores):
            raise data.DataError(f"--compare needs one file per --scores file (one pair per seed), got "
                                 f"{len(args.compare)} and {len(args.scores)}")
        reps = []
        for k, (a, b) in enumerate(zip(args.scores, args.compare)):
            paths, labels, _, scores = data.read_scores(a)
            other = dict(zip(*data.read_scores(b)[::3]))
            if set(paths) != set(other):
                raise data.DataError(f"{b} does not score the same images as {a}")
            reps.append(Replicate("-", k, np.array(paths), np.asarray(labels), np.asarray(scores, float),
                                  np.array([other[p] for p in paths], dtype=float)))
        d = seeded_difference(reps, args.seed, args.resamples)
        out.update(difference=d.difference, difference_low=d.low, difference_high=d.high)
        out.update({f"difference_seed{k}": v for k, v in d.per_seed.items()})
    for key, value in out.items():
        print(f"{key:<22}{value:>10.4f}")
    if args.compare:
        print("reading: " + ("a real difference" if d.real else "not distinguishable") + (
            " (one training draw: the interval covers the evaluation images only)" if d.one_draw else
            f" (interval over {len(reps)} training draws and the evaluation images)"))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores", required=True, nargs="+",
                   help="a scores.csv written by classify.py or patchcore.py (several: one per seed, with --compare)")
    p.add_argument("--compare", default=None, nargs="+",
                   help="a second scores.csv of the same images for each --scores file: the paired difference, over "
                        "the images for one pair, over seeds and images for several")
    p.add_argument("--resamples", type=int, default=BOOTSTRAP_RESAMPLES)
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        return run(args)
    except ValueError as e:  # data.DataError included
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
