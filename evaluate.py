"""The study: supervised classifier (classify.py) vs PatchCore (patchcore.py) on the same seeded MVTec-layout splits.

For each category and scenario (all defect types seen, an unseen defect type, few-shot) it calls the public `run()`
of both scripts, then tabulates image AUROC, AP, F1-max, recall/FPR at a threshold fixed on normal images only, and
pixel AUROC / AUPRO, writes results.csv, report.md and plots. The metrics section below is the one implementation of
each metric for the whole project.

    python evaluate.py --demo                                      # synthetic data, reduced study, CPU, ~4 min
    python evaluate.py --data-root ~/mvtec --categories bottle,screw --seeds 0,1,2 --out-dir runs/study   # GPU
    python evaluate.py --runs runs/study                           # rebuild tables and plots from saved runs
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

import data

NORMAL_QUANTILE = 0.99  # deployable threshold: at most 1% of held-out normal images score above it
AUPRO_FPR_LIMIT = 0.3   # Bergmann et al. (MVTec AD, IJCV 2021) integrate the PRO curve up to 30% pixel FPR
PIXEL_CHUNK = 1 << 20   # anomalous pixels handled per step in the curve integral: bounds memory at any defect size


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
# The study. Per category and seed, data.make_split cuts every test folder into a pool (the classifier may learn from
# its defects) and an evaluation part. Every classifier run and every PatchCore run of that (category, seed) is
# scored on evaluation parts only, so both methods are always compared on identical images.
# ----------------------------------------------------------------------------------------------------------------
STUDY_SCENARIOS = ("all-types", "unseen-type", "few-shot")
TABLE_METRICS = ("image_auroc", "average_precision", "f1_max", "recall_at_threshold", "fpr_at_threshold",
                 "pixel_auroc", "aupro")
COST_METRICS = ("n_labelled", "train_seconds", "ms_per_image", "params_millions", "peak_rss_mb")
# The README's first command: synthetic data, EfficientNet-Lite0 for both methods (offline weights), 128 px, CPU.
DEMO = dict(categories="weave,washer", scenarios="all-types,unseen-type,few-shot", seeds="0", k_values="1,2,4",
            few_shot_k="1,2,4", unseen_k=4, image_size=128, classifier_backbone="efficientnet_lite0",
            patchcore_backbone="efficientnet_lite0", epochs=5, batch_size=8, coreset_ratio=0.1)


def parse_k(text: str) -> list[int | None]:
    """'1,5,all' -> [1, 5, None] (None: the whole pool of each defect type)."""
    try:
        return [None if k.strip() == "all" else int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise data.DataError(f"expected comma-separated whole numbers (or 'all'), got '{text}'") from None


def k_tag(k: int | None) -> str:
    return "kall" if k is None else f"k{k}"


def plan_splits(test, category: str, seed: int, args) -> list[dict]:
    """The classifier's splits of one (category, seed); each gets 'tag' and 'role' ('all-types' or 'unseen-type')."""
    ks = set()
    if "all-types" in args.scenarios:
        ks |= set(parse_k(args.k_values))
    if "few-shot" in args.scenarios:
        ks |= set(parse_k(args.few_shot_k))
    if "unseen-type" in args.scenarios:
        ks.add(args.unseen_k)
    splits, seen_sizes = [], set()
    for k in sorted(ks, key=lambda k: float("inf") if k is None else k):
        split = data.make_split(test, category, seed, "all-types", k)
        n = len(split["train_defects"])
        if n in seen_sizes or n == 0:  # k above every pool repeats a smaller k's training set: run it once
            continue
        seen_sizes.add(n)
        splits.append({**split, "tag": k_tag(k), "role": "all-types"})
    types = sorted({s.defect_type for s in test} - {"good"})
    if "unseen-type" in args.scenarios:
        if len(types) < 2:
            print(f"{category}: one defect type only, skipping the unseen-type scenario")
        # The "seen" reference of an unseen-type run: the all-types run with the same k, i.e. the same training
        # images of the other types plus the held-out type's own.
        seen = data.make_split(test, category, seed, "all-types", args.unseen_k)["train_defects"]
        reference = next((s["tag"] for s in splits if s["train_defects"] == seen), None)
        for t in types if len(types) >= 2 else []:
            split = data.make_split(test, category, seed, "unseen-type", args.unseen_k, held_out=t)
            splits.append({**split, "tag": f"unseen-{t}-{k_tag(args.unseen_k)}", "role": "unseen-type",
                           "reference": reference})
    return splits


def run_once(run_dir: Path, info: dict, call) -> None:
    """Run one script unless its results exist (resumable), then record what the run was in study.json."""
    if (run_dir / "metrics.json").is_file() and (run_dir / "study.json").is_file():
        print(f"[skip] {run_dir} exists")
        return
    print(f"\n=== {info['method']} {info['category']} seed {info['seed']} {info['tag']} -> {run_dir}", flush=True)
    call()
    data.write_json(run_dir / "study.json", info)


def run_study(args) -> None:
    """Every run of the study: PatchCore once per (category, seed) plus its unseen-type subsets, the classifier per split."""
    import classify
    import patchcore
    common = ["--data-root", str(args.data_root), "--image-size", str(args.image_size), "--device", args.device,
              "--weights", args.weights]
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    loaded = {c: data.load_category(args.data_root, c) for c in categories}  # bad input fails before any training
    seeds = parse_k(args.seeds)
    if None in seeds:
        raise data.DataError(f"--seeds takes whole numbers, got '{args.seeds}'")
    for category in categories:
        _, test = loaded[category]
        for seed in seeds:
            base = Path(args.out_dir) / category / f"seed{seed}"
            (base / "splits").mkdir(parents=True, exist_ok=True)
            splits = plan_splits(test, category, seed, args)
            for split in splits:
                data.write_split({k: v for k, v in split.items() if k not in ("tag", "role", "reference")},
                                 base / "splits" / f"{split['tag']}.json")
            info = dict(category=category, seed=seed, data_root=str(args.data_root))
            # PatchCore never sees a defect: fit once on train/good, score the all-types evaluation set ...
            pc_all = base / "patchcore" / "all"
            data.write_split(data.make_split(test, category, seed, "all-types", None), base / "splits" / "all.json")
            pc_args = common + ["--category", category, "--backbone", args.patchcore_backbone, "--seed", str(seed),
                                "--coreset-ratio", str(args.coreset_ratio), "--batch-size", str(args.batch_size)]
            run_once(pc_all, {**info, "method": "patchcore", "tag": "all", "role": "all-types", "n_labelled": 0},
                     lambda: patchcore.run(patchcore.parse_args(pc_args + [
                         "--split", str(base / "splits" / "all.json"), "--out-dir", str(pc_all)])))
            # ... and reuse its memory bank on each unseen-type evaluation set (a subset of the same images)
            for split in (s for s in splits if s["role"] == "unseen-type"):
                run_dir = base / "patchcore" / f"unseen-{split['held_out']}"
                run_once(run_dir, {**info, "method": "patchcore", "tag": run_dir.name, "role": "unseen-type",
                                   "held_out": split["held_out"], "n_labelled": 0},
                         lambda: patchcore.run(patchcore.parse_args(pc_args + [
                             "--split", str(base / "splits" / f"{split['tag']}.json"), "--load", str(pc_all),
                             "--out-dir", str(run_dir)])))
            # The classifier: one training run per split
            for split in splits:
                run_dir = base / "classify" / split["tag"]
                run_once(run_dir, {**info, "method": "classifier", "tag": split["tag"], "role": split["role"],
                                   "held_out": split["held_out"], "reference": split.get("reference"),
                                   "n_labelled": len(split["train_defects"])},
                         lambda: classify.run(classify.parse_args(common + [
                             "--category", category, "--backbone", args.classifier_backbone, "--seed", str(seed),
                             "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                             "--split", str(base / "splits" / f"{split['tag']}.json"), "--out-dir", str(run_dir)])))


# ----------------------------------------------------------------------------------------------------------------
# Results: one row per category x scenario x method x seed x metric, recomputed from each run's scores.csv
# ----------------------------------------------------------------------------------------------------------------
def read_scores(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(paths, labels, defect types, scores) of a scores.csv."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return ([r["path"] for r in rows], np.array([int(r["label"]) for r in rows]),
            np.array([r["defect_type"] for r in rows]), np.array([float(r["score"]) for r in rows]))


def image_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> dict:
    """The image-level metrics of one run, from its scores (the same functions as the scripts use)."""
    out = {"image_auroc": image_auroc(labels, scores), "average_precision": average_precision(labels, scores),
           "f1_max": f1_max(labels, scores)[0]}
    if threshold is not None:
        point = operating_point(labels, scores, threshold)
        out.update(recall_at_threshold=point["recall"], fpr_at_threshold=point["fpr"])
    return out


def collect(study_dir: Path) -> list[dict]:
    """Rows (category, scenario, method, seed, tag, held_out, n_labelled, metric, value) of every finished run.

    all-types / few-shot: each classifier run and PatchCore's run on the same evaluation set.
    unseen-type: the held-out type's run. seen-type (for each type that has an unseen-type run): the all-types run
    with the unseen runs' k, restricted to good + that type: the very images of the unseen-type run.
    """
    rows = []
    runs = sorted(study_dir.rglob("study.json"))
    if not runs:
        raise data.DataError(f"no finished runs under {study_dir} (expected <category>/seed<N>/<method>/<tag>/)")
    infos = [(p.parent, json.loads(p.read_text())) for p in runs]
    references = {(i["category"], i["seed"], i["reference"]) for _, i in infos if i.get("reference")}
    held_out = {(i["category"], i["seed"], i["held_out"]) for _, i in infos if i["role"] == "unseen-type"}
    for run_dir, info in infos:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        _, labels, types, scores = read_scores(run_dir / "scores.csv")
        values = image_metrics(labels, scores, metrics.get("threshold"))
        values.update({k: metrics.get(k) for k in ("pixel_auroc", "aupro", "ms_per_image", "params_millions",
                                                    "peak_rss_mb")})
        values["train_seconds"] = metrics.get("train_seconds", metrics.get("fit_seconds"))
        values["n_labelled"] = info["n_labelled"]
        key = dict(category=info["category"], method=info["method"], seed=info["seed"], tag=info["tag"],
                   held_out=info.get("held_out"), n_labelled=info["n_labelled"])
        scenarios = ["unseen-type"] if info["role"] == "unseen-type" else ["all-types", "few-shot"]
        for scenario in scenarios:
            rows += [{**key, "scenario": scenario, "metric": m, "value": v} for m, v in values.items() if v is not None]
        if info["role"] == "all-types" and (info["method"] == "patchcore" or
                                            (info["category"], info["seed"], info["tag"]) in references):
            for t in sorted(t for t in set(types) if (info["category"], info["seed"], t) in held_out):
                keep = (types == "good") | (types == t)
                rows.append({**key, "scenario": "seen-type", "held_out": t, "metric": "image_auroc",
                             "value": image_auroc(labels[keep], scores[keep])})
    return rows


def write_results(rows: list[dict], path: Path) -> None:
    """results.csv, written through a temp file."""
    fields = ["category", "scenario", "method", "seed", "tag", "held_out", "n_labelled", "metric", "value"]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: r.get(k) for k in fields} for r in rows)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Tables: mean ± std over seeds (per category), and over categories (each seed averaged over categories first)
# ----------------------------------------------------------------------------------------------------------------
def select(rows: list[dict], **where) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def per_seed(rows: list[dict], categories: list[str], **where) -> list[float]:
    """One value per seed: the mean over categories of the rows matching `where` (seeds missing a category dropped)."""
    by_seed = {}
    for r in select(rows, **where):
        if r["category"] in categories:
            by_seed.setdefault(r["seed"], {}).setdefault(r["category"], []).append(r["value"])
    return [float(np.mean([np.mean(v) for v in cats.values()])) for cats in by_seed.values()
            if len(cats) == len(categories)]


def fmt(values: list[float], digits: int = 3) -> str:
    """'0.953 ± 0.012' (std over seeds), '0.953' for one seed, '–' for none."""
    if not values:
        return "–"
    if len(values) == 1 or (digits == 0 and np.std(values) == 0):  # counts: no "± 0"
        return f"{np.mean(values):.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in body])


def classifier_ks(rows: list[dict], scenario: str, categories: list[str]) -> list[str]:
    """The classifier's all-types tags (k1, k5, ...) present for every category, by increasing k."""
    tags = None
    for c in categories:
        t = {r["tag"] for r in select(rows, category=c, method="classifier", scenario=scenario)}
        tags = t if tags is None else tags & t
    return sorted(tags or [], key=lambda t: float("inf") if t == "kall" else int(t[1:]))


def tables(rows: list[dict], categories: list[str]) -> dict[str, str]:
    """The report's tables as markdown, keyed by title; `categories` of one category gives its own tables."""
    out = {}
    # 1. All defect types seen: PatchCore vs the classifier at each k, every metric
    body = [["PatchCore", "0"] + [fmt(per_seed(rows, categories, scenario="all-types", method="patchcore",
                                                metric=m)) for m in TABLE_METRICS]]
    for tag in classifier_ks(rows, "all-types", categories):
        n = per_seed(rows, categories, scenario="all-types", method="classifier", tag=tag, metric="n_labelled")
        body.append([f"classifier {tag}", fmt(n, 0)] + [fmt(per_seed(rows, categories, scenario="all-types",
                                                                      method="classifier", tag=tag, metric=m))
                                                         for m in TABLE_METRICS])
    out["All defect types seen (k labelled images per type)"] = markdown(
        ["method", "labelled defects", *TABLE_METRICS], body)
    # 2. Seen vs unseen defect type, image AUROC on identical images (good + that type)
    types = sorted({r["held_out"] for r in select(rows, scenario="unseen-type") if r["category"] in categories})
    body = []
    for t in types + ["mean"]:
        where = {} if t == "mean" else {"held_out": t}
        body.append([t] + [fmt(per_seed(rows, categories, scenario=sc, method=m, metric="image_auroc", **where))
                           for sc, m in (("seen-type", "classifier"), ("unseen-type", "classifier"),
                                         ("unseen-type", "patchcore"))])
    if types:
        out["Seen vs unseen defect type: image AUROC on good + that type"] = markdown(
            ["defect type", "classifier, type seen", "classifier, type unseen", "PatchCore"], body)
    # 3. Few-shot curve
    body = [["0 (PatchCore)", "0", "–", fmt(per_seed(rows, categories, scenario="few-shot", method="patchcore",
                                                       metric="image_auroc"))]]
    for tag in classifier_ks(rows, "few-shot", categories):
        body.append([tag, fmt(per_seed(rows, categories, scenario="few-shot", method="classifier", tag=tag,
                                       metric="n_labelled"), 0),
                     fmt(per_seed(rows, categories, scenario="few-shot", method="classifier", tag=tag,
                                  metric="image_auroc")), "–"])
    out["Few-shot: image AUROC vs labelled defect images"] = markdown(
        ["k per type", "labelled defects", "classifier", "PatchCore"], body)
    # 4. Costs
    body = []
    for name, method in (("PatchCore", "patchcore"), ("classifier", "classifier")):
        body.append([name] + [fmt(per_seed(rows, categories, scenario="all-types", method=method, metric=m),
                                  0 if m == "n_labelled" else 1) for m in COST_METRICS])
    out["Costs (all-types runs; training = PatchCore's fit)"] = markdown(
        ["method", "labelled defects", "training s", "ms / test image", "parameters (M)", "peak RSS (MB)"], body)
    return out


def findings(rows: list[dict], categories: list[str]) -> str:
    """A short paragraph generated from the numbers (never hand-written): who wins where, by how much, the spread."""
    def mean(**where):
        v = per_seed(rows, categories, metric="image_auroc", **where)
        return (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) if v else None

    def say(m):
        return f"{m[0]:.3f}" + (f" ± {m[1]:.3f}" if m[2] > 1 else "")

    n_seeds = len({r["seed"] for r in rows})
    scope = f"mean over {len(categories)} categor{'y' if len(categories) == 1 else 'ies'} and {n_seeds} seed(s)"
    out = []
    pc = mean(scenario="all-types", method="patchcore")
    tags = classifier_ks(rows, "all-types", categories)
    if pc and tags:
        best = tags[-1]
        cl = mean(scenario="all-types", method="classifier", tag=best)
        n = per_seed(rows, categories, scenario="all-types", method="classifier", tag=best, metric="n_labelled")
        winner = "the classifier" if cl[0] > pc[0] else "PatchCore"
        out.append(f"With every defect type seen ({best}, {np.mean(n):.0f} labelled defect images), the classifier "
                   f"reaches image AUROC {say(cl)} against PatchCore's {say(pc)} with no labelled defect ({scope}): "
                   f"{winner} is ahead by {abs(cl[0] - pc[0]):.3f}.")
    seen, unseen = mean(scenario="seen-type", method="classifier"), mean(scenario="unseen-type", method="classifier")
    pc_unseen = mean(scenario="unseen-type", method="patchcore")
    if seen and unseen and pc_unseen:
        out.append(f"On a defect type it never saw, the classifier scores {say(unseen)}, against {say(seen)} on the "
                   f"same images when that type was in its training set (a change of {unseen[0] - seen[0]:+.3f}); "
                   f"PatchCore scores {say(pc_unseen)} on those images, "
                   f"{'above' if pc_unseen[0] > unseen[0] else 'below'} the classifier by "
                   f"{abs(pc_unseen[0] - unseen[0]):.3f}.")
        worst = min((r for r in rows if r["scenario"] == "unseen-type" and r["method"] == "classifier"
                     and r["metric"] == "image_auroc" and r["category"] in categories), key=lambda r: r["value"])
        out.append(f"The classifier's worst unseen type is {worst['category']}/{worst['held_out']} "
                   f"(seed {worst['seed']}): image AUROC {worst['value']:.3f}.")
    curve = [(t, mean(scenario="few-shot", method="classifier", tag=t)) for t in classifier_ks(rows, "few-shot", categories)]
    if pc and curve:
        match = next((t for t, m in curve if m and m[0] >= pc[0]), None)
        out.append("On the few-shot curve the classifier " + (
            f"first matches PatchCore at {match} labelled images per type." if match else
            f"stays below PatchCore at every tested k (best {max(m[0] for _, m in curve):.3f})."))
    return " ".join(out) or "Not enough finished runs for findings."


def plot_all(rows: list[dict], categories: list[str], out: Path) -> list[str]:
    """fewshot.png, seen_unseen.png, roc.png in `out`; returns the file names written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    # Image AUROC vs number of labelled defects, per category
    fig, axes = plt.subplots(1, len(categories), figsize=(4 * len(categories), 3.4), squeeze=False)
    for ax, c in zip(axes[0], categories):
        xs, ys, es = [], [], []
        for tag in classifier_ks(rows, "few-shot", [c]):
            n = per_seed(rows, [c], scenario="few-shot", method="classifier", tag=tag, metric="n_labelled")
            v = per_seed(rows, [c], scenario="few-shot", method="classifier", tag=tag, metric="image_auroc")
            xs.append(np.mean(n)), ys.append(np.mean(v)), es.append(np.std(v))
        ax.errorbar(xs, ys, es, marker="o", capsize=3, label="classifier")
        pc = per_seed(rows, [c], scenario="few-shot", method="patchcore", metric="image_auroc")
        if pc:
            ax.axhline(np.mean(pc), color="C1", ls="--")
            ax.errorbar([0], [np.mean(pc)], [np.std(pc)], marker="s", color="C1", capsize=3, label="PatchCore (0 labels)")
        ax.set(title=c, xlabel="labelled defect images", ylabel="image AUROC")
        ax.legend(fontsize=8)
    fig.tight_layout(), fig.savefig(out / "fewshot.png", dpi=90), plt.close(fig)
    written.append("fewshot.png")
    # Seen vs unseen bars per method, per category (mean over defect types)
    groups = [("classifier, seen", "seen-type", "classifier"), ("classifier, unseen", "unseen-type", "classifier"),
              ("PatchCore", "unseen-type", "patchcore")]
    if select(rows, scenario="unseen-type"):
        fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(categories), 3.4))
        for g, (label, sc, m) in enumerate(groups):
            vals = [per_seed(rows, [c], scenario=sc, method=m, metric="image_auroc") for c in categories]
            ax.bar(np.arange(len(categories)) + (g - 1) * 0.27, [np.mean(v) if v else 0 for v in vals], 0.27,
                   yerr=[np.std(v) if v else 0 for v in vals], capsize=3, label=label)
        ax.set_xticks(np.arange(len(categories)), categories)
        ax.set(ylabel="image AUROC (good + one type)", ylim=(0, 1.05), title="seen vs unseen defect types")
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout(), fig.savefig(out / "seen_unseen.png", dpi=90), plt.close(fig)
        written.append("seen_unseen.png")
    return written


def plot_rocs_and_heatmaps(study_dir: Path, rows: list[dict], categories: list[str], out: Path, device: str) -> list[str]:
    """roc.png (first seed, all-types, largest k) and heatmaps.png (one evaluation image per defect type, both
    methods' maps; each method's maps scaled to [0, 1] over the images shown). Needs the saved models."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve
    import backbones
    import classify
    import patchcore
    written, pairs = [], []
    for c in categories:
        tags = classifier_ks(rows, "all-types", [c])
        seeds = sorted({r["seed"] for r in select(rows, category=c)})
        if tags and seeds:
            base = study_dir / c / f"seed{seeds[0]}"
            pairs.append((c, base / "patchcore" / "all", base / "classify" / tags[-1]))
    if not pairs:
        return written
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.6 * len(pairs), 3.4), squeeze=False)
    for ax, (c, pc_dir, cl_dir) in zip(axes[0], pairs):
        for name, d in (("PatchCore", pc_dir), (f"classifier {cl_dir.name}", cl_dir)):
            _, labels, _, scores = read_scores(d / "scores.csv")
            fpr, tpr, _ = roc_curve(labels, scores)
            ax.plot(fpr, tpr, label=f"{name} ({image_auroc(labels, scores):.3f})")
        ax.plot([0, 1], [0, 1], color="gray", lw=0.5)
        ax.set(title=c, xlabel="false positive rate", ylabel="true positive rate")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout(), fig.savefig(out / "roc.png", dpi=90), plt.close(fig)
    written.append("roc.png")

    dev = backbones.pick_device(device)
    panels = []
    for c, pc_dir, cl_dir in pairs:
        if not (pc_dir / "memory_bank").is_dir() or not (cl_dir / "model.pt").is_file():
            print(f"heatmaps: no saved models for {c}, skipped")
            continue
        info = json.loads((pc_dir / "study.json").read_text())
        _, test = data.load_category(info["data_root"], c)
        paths, _, types, _ = read_scores(pc_dir / "scores.csv")
        first = {}
        for p, t in zip(paths, types):
            first.setdefault(t, p)
        samples = [next(s for s in test if s.path == first[t]) for t in sorted(first) if t != "good"]
        bank = patchcore.MemoryBank.load(pc_dir, dev)
        _, pc_maps, _ = patchcore.score(bank, samples, dev, 8, "heatmaps")
        ckpt = classify.Checkpoint.load(cl_dir / "model.pt")
        model, cam_layer = ckpt.build(dev)
        _, cl_maps = classify.score(model, cam_layer, samples, ckpt.backbone, ckpt.image_size, dev)
        for i, s in enumerate(samples):
            panels.append((c, s, pc_maps[i] / max(pc_maps.max(), 1e-12), cl_maps[i] / max(cl_maps.max(), 1e-12)))
    if panels:
        fig, axes = plt.subplots(len(panels), 4, figsize=(8, 2.1 * len(panels)), squeeze=False)
        for row, (c, s, pc_map, cl_map) in zip(axes, panels):
            image = data.read_image(s.path).resize(pc_map.shape[::-1])
            mask = data.read_mask(s, data.read_image(s.path).size)
            mask = data.mask_to_tensor(mask, pc_map.shape[0])[0].numpy()  # (S, S) as the maps
            row[0].imshow(image), row[1].imshow(mask, cmap="gray")
            row[2].imshow(image), row[2].imshow(pc_map, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            row[3].imshow(image.resize(cl_map.shape[::-1])), row[3].imshow(cl_map, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            row[0].set_ylabel(f"{c}\n{s.defect_type}", fontsize=8)
            for ax, title in zip(row, ("image", "ground truth", "PatchCore", "classifier Grad-CAM")):
                ax.set_xticks([]), ax.set_yticks([]), ax.set_title(title, fontsize=8)
        fig.tight_layout(), fig.savefig(out / "heatmaps.png", dpi=80), plt.close(fig)
        written.append("heatmaps.png")
    return written


def report(study_dir: Path, device: str = "cpu") -> str:
    """results.csv, report.md and the plots of a study folder, from its saved runs; returns the report text."""
    rows = collect(study_dir)
    categories = sorted({r["category"] for r in rows})
    write_results(rows, study_dir / "results.csv")
    plots = plot_all(rows, categories, study_dir) + plot_rocs_and_heatmaps(study_dir, rows, categories, study_dir,
                                                                          device)
    parts = ["# Classifier vs PatchCore: study report", "",
             f"Study folder `{study_dir}`; {len(categories)} categories, seeds "
             f"{sorted({r['seed'] for r in rows})}; every number is mean ± std over seeds. Generated by evaluate.py "
             "from the runs' scores.csv (image metrics) and metrics.json (pixel metrics, costs).", "",
             "## Findings", "", findings(rows, categories), ""]
    scopes = ([("Mean over categories", categories)] if len(categories) > 1 else []) + [(c, [c]) for c in categories]
    for scope, cats in scopes:
        parts += [f"## {scope}", ""]
        for title, table in tables(rows, cats).items():
            parts += [f"### {title}", "", table, ""]
    parts += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    text = "\n".join(parts)
    tmp = study_dir / "report.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, study_dir / "report.md")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("--demo", action="store_true", help="synthetic data + a reduced study on the CPU (README)")
    p.add_argument("--runs", default=None, help="only rebuild results.csv, report.md and plots of this study folder")
    p.add_argument("--data-root", default=None, help="folder holding <category>/train/good, test/, ground_truth/")
    p.add_argument("--categories", default=None, help="comma-separated, e.g. bottle,screw")
    p.add_argument("--scenarios", default=",".join(STUDY_SCENARIOS), help="comma-separated subset of "
                   + ", ".join(STUDY_SCENARIOS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--k-values", default="1,5,10", help="all-types: labelled defects per type ('all' = whole pool)")
    p.add_argument("--few-shot-k", default="1,2,5,10,all", help="few-shot curve: labelled defects per type")
    p.add_argument("--unseen-k", type=int, default=10, help="unseen-type: labelled defects per other type")
    p.add_argument("--classifier-backbone", choices=backbones_names(), default="efficientnet_b1")
    p.add_argument("--patchcore-backbone", choices=backbones_names(), default="wide_resnet50_2")
    p.add_argument("--weights", default="imagenet", help="imagenet or none (random init, for tests)")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--epochs", type=int, default=30, help="classifier training epochs")
    p.add_argument("--batch-size", type=int, default=8, help="both methods (classifier training and scoring)")
    p.add_argument("--coreset-ratio", type=float, default=0.1)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out-dir", default=None, help="default: runs/study (runs/demo with --demo)")
    args = p.parse_args(argv)
    if args.demo:
        for k, v in DEMO.items():
            setattr(args, k, v)
    return args


def backbones_names() -> tuple[str, ...]:
    import backbones
    return backbones.BACKBONES


def run(args: argparse.Namespace) -> str:
    """Run (or resume) the study, then write results.csv, report.md and the plots; returns the report."""
    if args.runs:
        study_dir = Path(args.runs)
        if not study_dir.is_dir():
            raise data.DataError(f"study folder {study_dir} does not exist")
    else:
        study_dir = Path(args.out_dir or ("runs/demo" if args.demo else "runs/study"))
        args.out_dir = study_dir
        if args.demo:
            args.data_root = study_dir / "data"
            if not (args.data_root / "washer").is_dir():
                data.generate_synthetic(args.data_root, size=128, seed=0)
        if args.data_root is None or args.categories is None:
            raise data.DataError("a study needs --data-root and --categories (or --demo, or --runs FOLDER)")
        args.scenarios = [s.strip() for s in args.scenarios.split(",")]
        unknown = set(args.scenarios) - set(STUDY_SCENARIOS)
        if unknown:
            raise data.DataError(f"unknown scenario(s) {', '.join(sorted(unknown))} (expected {', '.join(STUDY_SCENARIOS)})")
        run_study(args)
    text = report(study_dir, args.device)
    print("\n" + text.split("## Plots")[0])
    print(f"wrote {study_dir / 'results.csv'} and {study_dir / 'report.md'}")
    return text


def main(argv=None) -> str:
    args = parse_args(argv)
    try:
        return run(args)
    except data.DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
