"""The study: supervised classifier (classify.py) vs PatchCore (patchcore.py) on the same seeded MVTec-layout splits.

For each category and scenario (all defect types seen, an unseen defect type, few-shot) it calls the public `run()`
of both scripts, then tabulates image AUROC, AP, F1-max, recall/FPR at a threshold fixed on normal images only, and
pixel AUROC / AUPRO (all from metrics.py), writes results.csv, report.md and plots. It is the only file that
imports the two methods.

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
import time
from pathlib import Path

import numpy as np

import backbones
import classify
import data
import metrics
import patchcore


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


def run_study(args) -> None:
    """Every run of the study: PatchCore once per (category, seed), the classifier once per split. PatchCore's
    unseen-type results are its all-types scores restricted to the same images (collect), not another pass."""
    common = ["--data-root", str(args.data_root), "--image-size", str(args.image_size), "--device", args.device,
              "--weights", args.weights]
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    loaded = {c: data.load_category(args.data_root, c) for c in categories}  # bad input fails before any training
    seeds = parse_k(args.seeds)
    if None in seeds:
        raise data.DataError(f"--seeds takes whole numbers, got '{args.seeds}'")
    jobs = []  # (run folder, study.json info, the call), planned first so that progress can be estimated
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
            # PatchCore never sees a defect: fit once on train/good, score the all-types evaluation set
            data.write_split(data.make_split(test, category, seed, "all-types", None), base / "splits" / "all.json")
            pc_args = common + ["--category", category, "--backbone", args.patchcore_backbone, "--seed", str(seed),
                                "--coreset-ratio", str(args.coreset_ratio), "--batch-size", str(args.batch_size),
                                "--split", str(base / "splits" / "all.json"), "--out-dir", str(base / "patchcore" / "all")]
            jobs.append((base / "patchcore" / "all",
                         {**info, "method": "patchcore", "tag": "all", "role": "all-types", "n_labelled": 0},
                         lambda a=pc_args: patchcore.run(patchcore.parse_args(a))))
            # The classifier: one training run per split
            for split in splits:
                run_dir = base / "classify" / split["tag"]
                cl_args = common + ["--category", category, "--backbone", args.classifier_backbone, "--seed",
                                    str(seed), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                                    "--split", str(base / "splits" / f"{split['tag']}.json"), "--out-dir", str(run_dir)]
                jobs.append((run_dir, {**info, "method": "classifier", "tag": split["tag"], "role": split["role"],
                                       "held_out": split["held_out"], "reference": split.get("reference"),
                                       "n_labelled": len(split["train_defects"])},
                             lambda a=cl_args: classify.run(classify.parse_args(a))))
    seconds = {}  # method -> durations of the runs done in this call, for the estimate of the time left
    for i, (run_dir, info, call) in enumerate(jobs):
        if (run_dir / "metrics.json").is_file() and (run_dir / "study.json").is_file():
            print(f"[skip] {run_dir} exists")  # resumable: finished runs are kept
            continue
        left = [j[1]["method"] for j in jobs[i:] if not (j[0] / "study.json").is_file()]
        print(f"\n=== [{i + 1}/{len(jobs)}] {info['method']} {info['category']} seed {info['seed']} {info['tag']} "
              f"-> {run_dir}{time_left(left, seconds)}", flush=True)
        t0 = time.perf_counter()
        call()
        data.write_json(run_dir / "study.json", info)
        seconds.setdefault(info["method"], []).append(time.perf_counter() - t0)


def time_left(methods: list[str], seconds: dict[str, list[float]]) -> str:
    """'; about 1 h 20 min left': the runs still to do, each at the mean duration of its method's finished runs."""
    done = [t for ts in seconds.values() for t in ts]
    if not done:
        return ""
    left = sum(np.mean(seconds.get(m, done)) for m in methods)
    return f"; about {int(left // 3600)} h {int(left % 3600 // 60)} min left" if left >= 3600 else \
        f"; about {int(left // 60)} min {int(left % 60)} s left"


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
    out = {"image_auroc": metrics.image_auroc(labels, scores),
           "average_precision": metrics.average_precision(labels, scores),
           "f1_max": metrics.f1_max(labels, scores)[0]}
    if threshold is not None:
        point = metrics.operating_point(labels, scores, threshold)
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
        saved = json.loads((run_dir / "metrics.json").read_text())
        _, labels, types, scores = read_scores(run_dir / "scores.csv")
        values = image_metrics(labels, scores, saved.get("threshold"))
        values.update({k: saved.get(k) for k in ("pixel_auroc", "aupro", "ms_per_image", "params_millions",
                                                  "peak_rss_mb")})
        values["train_seconds"] = saved.get("train_seconds", saved.get("fit_seconds"))
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
                             "value": metrics.image_auroc(labels[keep], scores[keep])})
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
            ax.plot(fpr, tpr, label=f"{name} ({metrics.image_auroc(labels, scores):.3f})")
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
    p.add_argument("--classifier-backbone", choices=backbones.BACKBONES, default="efficientnet_b1")
    p.add_argument("--patchcore-backbone", choices=backbones.BACKBONES, default="wide_resnet50_2")
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
