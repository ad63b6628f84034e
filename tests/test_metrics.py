"""The metric functions of metrics.py: hand-computed cases, sklearn cross-checks, and a brute-force AUPRO."""
import json

import numpy as np
import pytest
from scipy import ndimage, stats
from sklearn.metrics import roc_auc_score

import metrics

LABELS = [0, 0, 1, 1]
SCORES = [0.1, 0.4, 0.35, 0.8]


def reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """Slow textbook AUPRO: threshold at every distinct score, per-region overlap, interpolate, trapezoid."""
    regions = []  # one (N, H, W) bool array per connected region (4-connectivity, per image)
    for i, mask in enumerate(masks):
        lab, n = ndimage.label(mask)
        for r in range(1, n + 1):
            region = np.zeros_like(masks)
            region[i] = lab == r
            regions.append(region)
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        flagged = maps >= t
        fpr.append((flagged & ~masks).sum() / (~masks).sum())
        pro.append(np.mean([(flagged & r).sum() / r.sum() for r in regions]))
    fpr, pro = np.array(fpr), np.array(pro)
    cut = int(np.argmax(fpr >= fpr_limit))  # first point at or past the limit
    x0, x1, y0, y1 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
    y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
    x, y = np.append(fpr[:cut], fpr_limit), np.append(pro[:cut], y_limit)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / fpr_limit)


# --- image metrics ------------------------------------------------------------------------------------------------
def test_image_auroc_by_hand():
    # Defect/good pairs: (0.35 > 0.1) yes, (0.35 > 0.4) no, (0.8 > 0.1) yes, (0.8 > 0.4) yes -> 3 of 4.
    assert metrics.image_auroc(LABELS, SCORES) == pytest.approx(0.75)


def test_image_auroc_perfect_inverted_and_ties():
    assert metrics.image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.image_auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert metrics.image_auroc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts half


def test_single_class_raises():
    with pytest.raises(ValueError, match="only one class"):
        metrics.image_auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only one class"):
        metrics.average_precision([0, 0], [0.1, 0.2])


def test_average_precision_by_hand():
    # Ranked: 0.8 (defect, P=1, R=.5), 0.4 (good), 0.35 (defect, P=2/3, R=1): AP = .5*1 + .5*2/3.
    assert metrics.average_precision(LABELS, SCORES) == pytest.approx(0.5 + 1 / 3)


def test_f1_max_by_hand():
    # t=0.1: P=2/4 R=1 F1=.667; t=0.35: P=2/3 R=1 F1=.8; t=0.4: P=1/2 R=1/2 F1=.5; t=0.8: P=1 R=1/2 F1=.667.
    f1, threshold = metrics.f1_max(LABELS, SCORES)
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.35)


@pytest.mark.filterwarnings("error")  # precision = recall = 0 at t=0.9 must not divide by zero
def test_f1_max_zero_precision_and_recall():
    f1, threshold = metrics.f1_max([1, 0], [0.1, 0.9])  # t=0.9: P=0 R=0 -> F1 0; t=0.1: P=1/2 R=1 -> 2/3
    assert f1 == pytest.approx(2 / 3)
    assert threshold == pytest.approx(0.1)


def test_operating_point_by_hand():
    at_04 = metrics.operating_point(LABELS, SCORES, 0.4)  # flagged: 0.4 (good), 0.8 (defect)
    assert at_04["recall"] == 0.5 and at_04["fpr"] == 0.5
    at_035 = metrics.operating_point(LABELS, SCORES, 0.35)  # score >= t: the defect at 0.35 is flagged too
    assert at_035["recall"] == 1.0 and at_035["fpr"] == 0.5


def test_normal_threshold_flags_no_held_out_normal_below_100_images():
    normal = np.random.default_rng(0).normal(size=50)
    t = metrics.normal_threshold(normal)
    assert t > normal.max() and t == pytest.approx(normal.max())
    assert metrics.operating_point([0] * 50 + [1], np.append(normal, normal.max()), t)["fpr"] == 0.0


def test_normal_threshold_quantile_bounds_held_out_fpr():
    normal = np.random.default_rng(1).normal(size=1000)
    t = metrics.normal_threshold(normal, quantile=0.99)
    assert np.mean(normal >= t) <= 0.01
    assert np.mean(normal >= t) > 0.005  # ... and is not simply the max
    with pytest.raises(ValueError, match="quantile"):
        metrics.normal_threshold(normal, quantile=0.0)


# --- pixel metrics ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_pixel_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    masks = rng.random((3, 9, 11)) < 0.2
    maps = np.round(rng.random((3, 9, 11)) + 0.3 * masks, 1).astype(np.float32)  # rounding makes many ties
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_chunks_agree(monkeypatch):
    rng = np.random.default_rng(7)
    masks, maps = rng.random((2, 16, 16)) < 0.3, np.round(rng.random((2, 16, 16)), 2)
    whole = metrics.pixel_auroc(masks, maps)
    monkeypatch.setattr(metrics, "PIXEL_CHUNK", 5)
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(whole, abs=1e-12)


def two_regions() -> np.ndarray:
    """One 4x4 mask: region A = 2 px at the top left, region B = the 2x2 block at the bottom right; 10 normal px."""
    mask = np.zeros((1, 4, 4), bool)
    mask[0, 0, :2] = True
    mask[0, 2:, 2:] = True
    return mask


def test_aupro_by_hand_partial_region():
    masks = two_regions()
    maps = np.full((1, 4, 4), 0.5)  # all 10 normal pixels at 0.5
    maps[0, 0, :2] = 0.9            # A fully detected before any false positive
    maps[0, 2, 2:] = 0.8            # half of B too ...
    maps[0, 3, 2:] = 0.0            # ... the other half only after every normal pixel
    # Curve (FPR, PRO): (0,0) -> t=.9 (0, 1/2) -> t=.8 (0, 3/4) -> t=.5 (1, 3/4) -> t=0 (1, 1).
    # Up to FPR 0.3 the PRO is 3/4 throughout: area 0.3 * 0.75, normalised by 0.3 -> 0.75.
    assert metrics.aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.75)


def test_aupro_by_hand_tie_segment_crosses_limit():
    masks = two_regions()
    maps = np.full((1, 4, 4), 0.1)
    maps[0, 0, :2] = 0.9                   # A fully detected first
    maps[0, 2, 2:] = 0.8                   # half of B
    maps[0, 3, 2:] = 0.5                   # the other half of B tied with 5 of the 10 normal pixels
    maps[0, 1, :] = maps[0, 2, 0] = 0.5    # those 5 normal pixels
    # Curve: (0,0) -> (0,1/2) -> (0,3/4) -> t=.5: (0.5, 1) -> t=.1: (1, 1). The tie segment (0,.75)-(.5,1) crosses
    # FPR 0.3 at PRO .75 + .25 * .3/.5 = .9; area = .3 * (.75 + .9) / 2 = .2475; / .3 -> 0.825.
    assert metrics.aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.825)
    assert metrics.aupro(masks, maps, fpr_limit=0.3) == pytest.approx(reference_aupro(masks, maps, 0.3))


def test_aupro_perfect_and_inverted():
    masks = two_regions()
    assert metrics.aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert metrics.aupro(masks, 1.0 - masks) == pytest.approx(0.0, abs=1e-12)  # every normal pixel ranks first


@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 12, 12), bool)
    for i in range(3):  # a few rectangles per image, some touching (one region), some diagonal (two regions)
        for _ in range(rng.integers(0, 3)):
            y, x, h, w = rng.integers(0, 10), rng.integers(0, 10), rng.integers(1, 4), rng.integers(1, 4)
            masks[i, y:y + h, x:x + w] = True
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: two regions with 4-connectivity
    maps = np.round(rng.random(masks.shape) + 0.5 * masks, 1)  # ties between normal and anomalous pixels
    for limit in (0.05, 0.3, 1.0):
        assert metrics.aupro(masks, maps, limit) == pytest.approx(reference_aupro(masks, maps, limit), abs=1e-12)


def test_aupro_weights_regions_not_pixels():
    # A big region detected, a 1-px region missed: pixel recall is high but PRO is 1/2 (mean over regions).
    masks = np.zeros((1, 8, 8), bool)
    masks[0, :4, :4] = True
    masks[0, 7, 7] = True
    maps = np.where(masks, 1.0, 0.5)
    maps[0, 7, 7] = 0.0  # below every normal pixel (a tie with them would give a sloped segment instead)
    assert metrics.aupro(masks, maps) == pytest.approx(0.5)
    assert metrics.pixel_auroc(masks, maps) > 0.9


def test_pixel_metrics_need_both_classes():
    with pytest.raises(ValueError, match="anomalous"):
        metrics.pixel_auroc(np.zeros((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4)))
    with pytest.raises(ValueError, match="region"):
        metrics.aupro(np.zeros((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4)))
    with pytest.raises(ValueError, match="normal pixel"):
        metrics.aupro(np.ones((1, 4, 4)), np.random.default_rng(0).random((1, 4, 4)))


# --- the metrics.json dict ----------------------------------------------------------------------------------------
def test_compute_metrics_skips_images_without_mask():
    rng = np.random.default_rng(0)
    labels, scores = [0, 0, 1, 1], [0.1, 0.2, 0.9, 0.8]
    masks = np.zeros((4, 8, 8), bool)
    masks[2, 2:5, 2:5] = True                      # image 2: a defect with its mask
    maps = rng.random((4, 8, 8)) * 0.5
    maps[2][masks[2]] += 0.5
    maps[3] += 0.6                                 # image 3: a defect whose mask file is missing (placeholder zeros)
    has_mask = [True, True, True, False]
    m = metrics.compute_metrics(labels, scores, masks, maps, has_mask)
    assert m["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(masks[:3], maps[:3]))
    assert m["aupro"] == pytest.approx(metrics.aupro(masks[:3], maps[:3]))
    assert m["pixel_auroc"] == 1.0  # counting image 3's pixels as normal would have lowered it
    assert metrics.pixel_auroc(masks, maps) < 0.9
    assert (m["n_images"], m["n_defects"], m["n_pixel_images"]) == (4, 2, 3)
    assert m["image_auroc"] == 1.0 and m["f1_max"] == 1.0 and m["f1_threshold"] == pytest.approx(0.8)


def test_compute_metrics_without_masks_is_json_ready():
    m = metrics.compute_metrics(LABELS, SCORES)
    assert m["pixel_auroc"] is None and m["aupro"] is None
    assert m["image_auroc"] == pytest.approx(0.75)
    assert all(type(v) in (float, int) for k, v in m.items() if v is not None)
    assert json.loads(json.dumps(m)) == m


def test_compute_metrics_no_anomalous_pixel_gives_none():
    masks, maps = np.zeros((4, 4, 4), bool), np.random.default_rng(0).random((4, 4, 4))
    m = metrics.compute_metrics(LABELS, SCORES, masks, maps, has_mask=[True, True, False, False])
    assert m["pixel_auroc"] is None and m["aupro"] is None and m["n_pixel_images"] == 2


# ---- bootstrap intervals -------------------------------------------------------------------------------------
def test_bootstrap_resamples_are_the_auroc_of_the_resampled_images():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(7, int), np.ones(11, int)]
    scores = np.round(rng.normal(size=18) + labels, 1)  # rounded: ties occur and must count half
    counts = metrics.bootstrap_counts(11, 7, seed=3, n_resamples=50)
    fast = metrics.auroc_resamples(labels, scores, counts)
    pos, neg = scores[labels == 1], scores[labels == 0]
    for r in range(50):  # the slow way: build each resample explicitly
        s = np.r_[np.repeat(pos, counts[0][r]), np.repeat(neg, counts[1][r])]
        y = np.r_[np.ones(11, int), np.zeros(7, int)]
        assert fast[r] == pytest.approx(roc_auc_score(y, s))
    assert counts[0].sum(1).tolist() == [11] * 50 and counts[1].sum(1).tolist() == [7] * 50  # stratified


def test_auroc_interval_holds_the_estimate_and_is_seeded():
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(13, int), np.ones(45, int)]
    scores = rng.normal(size=58) + 1.2 * labels
    low, high = metrics.auroc_interval(labels, scores, seed=0)
    assert low < metrics.image_auroc(labels, scores) < high and high - low > 0.05
    assert metrics.auroc_interval(labels, scores, seed=0) == (low, high)
    assert metrics.auroc_interval(labels, np.where(labels == 1, 2.0, 1.0), seed=0) == (1.0, 1.0)


def test_paired_difference_of_equal_methods_contains_zero():
    # Two methods of the same quality, each with its own noise, on ~40 images: no real difference to find
    rng = np.random.default_rng(2)
    labels = np.r_[np.zeros(12, int), np.ones(28, int)]
    a, b = rng.normal(size=40) + labels, rng.normal(size=40) + labels
    diff, low, high = metrics.paired_auroc_difference(labels, a, b, seed=0)
    assert low < 0 < high and low < diff < high and not metrics.excludes_zero(low, high)
    assert metrics.paired_auroc_difference(labels, a, a, seed=0) == (0.0, 0.0, 0.0)


def test_paired_difference_of_a_clearly_better_method_excludes_zero():
    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(12, int), np.ones(28, int)]
    good, chance = labels + 0.1 * rng.normal(size=40), rng.normal(size=40)  # AUROC 1.0 vs about 0.5
    diff, low, high = metrics.paired_auroc_difference(labels, good, chance, seed=0)
    assert 0 < low < diff < high and metrics.excludes_zero(low, high)
    assert metrics.excludes_zero(*metrics.paired_auroc_difference(labels, chance, good, seed=0)[1:])


# ---- intervals over seeds and images (issue 32) -----------------------------------------------------------------
def simulated_study(rng, n_seeds: int, mu: float, sigma_seed: float, n_good: int = 40, n_defect: int = 40,
                    base: float = 0.75) -> list:
    """One simulated study with known truth: method b's scores are fixed (a PatchCore: no training draw), method a
    is retrained per seed; a's expected AUROC on seed s is base + mu + tau_s, tau_s ~ N(0, sigma_seed^2), so the
    per-seed difference is drawn from N(mu, sigma_seed^2) and the finite evaluation set adds its image-level noise
    on top: one set of images for every seed (as the study's), each image with a difficulty both methods see."""
    labels = np.r_[np.zeros(n_good, int), np.ones(n_defect, int)]
    hard = rng.normal(size=labels.size)  # (N,) shared by both methods and every seed
    noise = lambda: 0.6 * hard + 0.8 * rng.normal(size=labels.size)  # unit variance: AUROC = Phi(sep / sqrt 2)
    sep = lambda auroc: np.sqrt(2) * stats.norm.ppf(np.clip(auroc, 0.51, 0.99))
    b = labels * sep(base) + noise()
    paths = np.array([f"img{i:03d}.png" for i in range(labels.size)])
    return [metrics.Replicate("c", s, paths, labels, labels * sep(base + mu + rng.normal(0, sigma_seed)) + noise(), b)
            for s in range(n_seeds)]


def image_only_interval(reps: list, n_resamples: int) -> tuple[float, float]:
    """Today's interval before issue 32: every run's images resampled, each run's model held fixed, mean over seeds."""
    diffs = [metrics.auroc_resamples(r.labels, r.a, c) - metrics.auroc_resamples(r.labels, r.b, c)
             for r in reps for c in [metrics.bootstrap_counts(int(r.labels.sum()), int((r.labels == 0).sum()),
                                                              1000 + r.seed, n_resamples)]]
    return metrics.interval(np.mean(diffs, axis=0))


@pytest.mark.parametrize("n_seeds", [3, 5])
def test_seed_and_image_interval_keeps_its_coverage_where_the_image_interval_does_not(n_seeds):
    """mu = 0 with the training draw's spread (0.1) large against the images' (~0.03): the seed-aware interval
    excludes 0 in at most 10 of 100 simulated studies, the image-only interval far more often."""
    rng = np.random.default_rng(n_seeds)
    ours = image_only = 0
    for _ in range(100):
        reps = simulated_study(rng, n_seeds, mu=0.0, sigma_seed=0.1)
        d = metrics.seeded_difference(reps, seed=0, n_resamples=300)
        assert not d.one_draw and sorted(d.per_seed) == list(range(n_seeds))
        ours += d.real
        image_only += metrics.excludes_zero(*image_only_interval(reps, 300))
    assert ours <= 10 and image_only >= 30  # 9 vs 41 (3 seeds), 4 vs 39 (5 seeds) when written


def test_seed_and_image_interval_finds_a_difference_of_three_seed_spreads():
    """mu = 3 sigma_seed with 5 seeds: the difference is found (the interval above 0) in most studies."""
    rng = np.random.default_rng(7)
    found = sum(metrics.seeded_difference(simulated_study(rng, 5, mu=0.15, sigma_seed=0.05), n_resamples=300).low > 0
                for _ in range(100))
    assert found >= 80


def test_seeded_difference_per_seed_values_categories_and_one_draw():
    """Per-seed values are each seed's paired AUROC difference (the mean over its replicates, e.g. hard's types);
    over categories every category weighs the same; one seed says so and keeps the image bootstrap interval."""
    rng = np.random.default_rng(3)
    reps = simulated_study(rng, 3, mu=0.1, sigma_seed=0.05)
    by_hand = [metrics.image_auroc(r.labels, r.a) - metrics.image_auroc(r.labels, r.b) for r in reps]
    d = metrics.seeded_difference(reps, n_resamples=200)
    np.testing.assert_allclose([d.per_seed[s] for s in range(3)], by_hand)
    assert d.difference == pytest.approx(np.mean(by_hand)) and d.low < d.difference < d.high
    twice = reps + [metrics.Replicate("c", r.seed, r.paths, r.labels, r.b, r.a) for r in reps]  # a second "type"
    assert metrics.seeded_difference(twice, n_resamples=200).per_seed == pytest.approx({0: 0.0, 1: 0.0, 2: 0.0})
    other = [metrics.Replicate("d", r.seed, r.paths, r.labels, r.b, r.a) for r in reps]  # -diff in a 2nd category
    both = metrics.seeded_difference(reps + other, n_resamples=200)
    assert both.difference == pytest.approx(0.0, abs=1e-12) and both.n_seeds == {"c": 3, "d": 3}
    one = metrics.seeded_difference(reps[:1], n_resamples=200)
    assert one.one_draw and one.per_seed == {0: pytest.approx(by_hand[0])}
    c = metrics.bootstrap_counts(int(reps[0].labels.sum()), int((reps[0].labels == 0).sum()), 0, 200)
    same = metrics.interval(metrics.auroc_resamples(reps[0].labels, reps[0].a, c) -
                            metrics.auroc_resamples(reps[0].labels, reps[0].b, c))
    assert (one.low, one.high) == pytest.approx(same)  # one seed: exactly the paired image bootstrap


def test_compare_over_seeds_on_the_command_line(tmp_path, capsys):
    """metrics.py --scores a0 a1 --compare b0 b1: the per-seed differences and the seed-aware interval."""
    import csv
    rng = np.random.default_rng(0)
    reps = simulated_study(rng, 2, mu=0.1, sigma_seed=0.02)
    files = {}
    for r in reps:
        for name, scores in (("a", r.a), ("b", r.b)):
            path = tmp_path / f"{name}{r.seed}.csv"
            with open(path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["path", "label", "defect_type", "score"])
                order = rng.permutation(len(scores))  # the files need not list the images in the same order
                w.writerows([r.paths[i], r.labels[i], "bad" if r.labels[i] else "good", scores[i]] for i in order)
            files[name, r.seed] = str(path)
    out = metrics.main(["--scores", files["a", 0], files["a", 1], "--compare", files["b", 0], files["b", 1]])
    d = metrics.seeded_difference(reps)
    assert out["difference"] == pytest.approx(d.difference) and out["difference_low"] == pytest.approx(d.low)
    assert out["difference_seed1"] == pytest.approx(d.per_seed[1])
    assert "interval over 2 training draws" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="one file per --scores file"):
        metrics.main(["--scores", files["a", 0], files["a", 1], "--compare", files["b", 0]])
