"""The study's report: every table, interval, finding and plot, recomputed from the saved runs of a study folder.

evaluate.py runs the study and calls write(); this file only reads finished runs (scores.csv, heldout_scores.csv,
metrics.json, study.json), so a report can be rebuilt, or a study shared between machines reported, at any time.

    python evaluate.py --runs runs/study       # rebuild results.csv, differences.csv, report.md and the plots
    python report.py runs/study                # the same, without the heatmaps (which need the saved models)

It reads from its entry point down: write() first, then what it calls in that order (the runs, the result files,
the plots, the findings, the tables), then the helpers they share.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

import data
import metrics
import splits

TABLE_METRICS = ("image_auroc", "average_precision", "f1_max", "recall_at_threshold", "fpr_at_threshold",
                 "pixel_auroc", "aupro")
COST_METRICS = ("n_labelled", "train_seconds", "ms_per_image", "params_millions", "peak_rss_mb")
# Every method of the report, in the order of its tables, with its name there. The classifier's arms (evaluate.py
# --synthetic): the plain classifier, and the same split trained with CutPaste synthetic defects too (classify.py
# --synthetic cutpaste). The CutPaste run scored as the CutPaste paper scores it (issue 32): the Mahalanobis distance
# of its pooled features to the Gaussian of its training normals (classify.py's density_scores.csv), a method of its
# own. Each trained method is fused with PatchCore into a fused detector of its own (fuse).
DENSITY = "cutpaste-density"
METHODS = {"patchcore": "PatchCore", "classifier": "classifier", "classifier+cutpaste": "classifier + CutPaste",
           DENSITY: "classifier + CutPaste, density", "fused": "fused", "fused+cutpaste": "fused + CutPaste",
           f"fused+{DENSITY}": "fused + CutPaste, density"}
CLASSIFIERS = ("classifier", "classifier+cutpaste")  # the classifier's output scores (probabilities)
TRAINED = (*CLASSIFIERS, DENSITY)  # every score of a trained network, each against PatchCore and the plain classifier
FUSED = tuple(m for m in METHODS if m.startswith("fused"))
TRAINED_FIRST = (*TRAINED, "patchcore", *FUSED)  # the order of the hard table's columns and of the plots' bars


def label(method: str) -> str:
    """A method's name in the report's tables: 'classifier + CutPaste' for classifier+cutpaste."""
    return METHODS.get(method, method)


def method_of(info: dict) -> str:
    """The method of a run from its study.json: patchcore, classifier, or classifier+cutpaste (a classifier run with
    synthetic defects; study.json before the arms has no 'synthetic': the plain classifier)."""
    synthetic = info.get("synthetic", "none")
    return info["method"] if synthetic == "none" else f"{info['method']}+{synthetic}"


@dataclass
class Scored:
    """One method's scores on one evaluation set of one (category, seed): what a table row is computed from."""
    category: str
    seed: int
    scenario: str           # all-types, few-shot, unseen-type, seen-type; general, hard, open-set (DRA's protocol)
    method: str             # one of METHODS: patchcore, classifier, classifier+cutpaste, cutpaste-density, fused...
    tag: str                # the classifier's split (k5, unseen-hole-k5, general-10, hard-crack; the run folder
                            # general-10-cutpaste is general-10 of classifier+cutpaste); PatchCore: all, open-set,
                            # or in general/hard the tag of the classifier split whose images these are
    held_out: str | None    # seen-type / unseen-type: the defect type of the set (good + that type); hard: the one
                            # known type (the set is good + every other type)
    n_labelled: int
    paths: np.ndarray       # (N,) image paths: they pair the methods on identical images
    labels: np.ndarray      # (N,) 0 good, 1 defect
    types: np.ndarray       # (N,) defect type
    scores: np.ndarray      # (N,) higher = more anomalous
    threshold: float | None = None  # the deployable threshold, from held-out normal images
    extra: dict = field(default_factory=dict)  # pixel metrics and costs, for a run's own evaluation set only

    def on(self, paths: np.ndarray, **change) -> "Scored":
        """The same scores, for the images `paths` only, in that order (each must be among self.paths)."""
        where = {p: i for i, p in enumerate(self.paths)}
        missing = [p for p in paths if p not in where]
        if missing:
            raise data.DataError(f"{self.method} run of {self.category} seed {self.seed} has no score for {missing[0]}")
        i = np.array([where[p] for p in paths], dtype=int)
        return replace(self, paths=self.paths[i], labels=self.labels[i], types=self.types[i], scores=self.scores[i],
                       extra={}, **change)


def image_set_seed(paths: np.ndarray) -> int:
    """The bootstrap seed of a set of images: identical images (two methods compared) resample identically."""
    return zlib.crc32("\n".join(sorted(paths)).encode())


# A paired comparison: ((first method, second method), first's Scored, second's Scored), on identical images
Pairs = list[tuple[tuple[str, str], "Scored", "Scored"]]


# ----------------------------------------------------------------------------------------------------------------
# The entry point: every result file of a study folder, from its saved runs
# ----------------------------------------------------------------------------------------------------------------
def write(study_dir: Path, heatmaps: Callable[[list[tuple[str, int, str, str]]], list[str]] | None = None) -> str:
    """results.csv, differences.csv, report.md and the plots of a study folder, from its saved runs; returns the
    report text. `heatmaps(shown)` (evaluate.py: it needs the methods) draws the maps of the shown runs."""
    scored = collect(study_dir)
    rows = result_rows(scored)
    categories = sorted({s.category for s in scored})
    write_csv(rows, ["category", "scenario", "method", "seed", "tag", "held_out", "n_labelled", "metric", "value"],
              study_dir / "results.csv")
    pairs = comparisons(scored)  # every paired comparison, once: differences.csv, findings and tables read them
    write_csv(difference_rows(pairs), ["category", "scenario", "seed", "tag", "held_out", "comparison",
                                        "difference", "low", "high", "real"], study_dir / "differences.csv")
    shown = shown_runs(rows, categories)
    plots = plot_all(rows, categories, study_dir) + plot_roc(scored, shown, study_dir) + \
        (heatmaps(shown) if heatmaps else [])
    parts = ["# Classifier vs PatchCore: study report", "",
             f"Study folder `{data.portable(study_dir)}`; {count(len(categories), 'category', 'categories')}, "
             f"seeds {sorted({s.seed for s in scored})}. "
             "Every number is mean ± std over seeds. A method's interval is a 95 % stratified bootstrap interval "
             f"over the evaluation images ({metrics.BOOTSTRAP_RESAMPLES} resamples, pooled over seeds and "
             "categories). A paired difference of two methods on the same images has a 95 % interval over the "
             "training draws and the images: Student's t over the per-seed differences (shown beside it), their "
             "variance plus the image bootstrap's (metrics.seeded_difference; docs/statistics.md); with one seed "
             "the interval covers the images only and the reading says so. The fused detector is the larger of the "
             "two methods' scores, each in standard deviations of its held-out normal scores. " +
             ("Classifier + CutPaste is the same classifier trained on the same split with CutPaste synthetic "
              "defects made from its normal images (classify.py --synthetic cutpaste; general-0: no real label); "
              "fused + CutPaste fuses it with PatchCore the same way. " if select(scored, method="classifier+cutpaste")
              else "") +
             ("Classifier + CutPaste, density scores the same CutPaste runs as the CutPaste paper does: the "
              "Mahalanobis distance of the network's pooled features to a Gaussian fitted on its training normals "
              "(Ledoit-Wolf covariance), never its output. " if select(scored, method=DENSITY) else "") +
             "Generated by report.py from the runs' scores.csv (image metrics) and metrics.json (pixel metrics, "
             "costs).", "",
             "## Findings", "", findings(rows, pairs, categories), ""]
    scopes = ([("Mean over categories", categories)] if len(categories) > 1 else []) + [(c, [c]) for c in categories]
    for scope, cats in scopes:
        parts += [f"## {scope}", ""]
        for title, table in tables(rows, scored, pairs, cats).items():
            parts += [f"### {title}", "", table, ""]
    parts += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    text = "\n".join(parts)
    tmp = study_dir / "report.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, study_dir / "report.md")
    return text


# ----------------------------------------------------------------------------------------------------------------
# 1. The runs: one Scored per method and evaluation set, the fused detector among them
# ----------------------------------------------------------------------------------------------------------------
def collect(study_dir: Path) -> list[Scored]:
    """Every Scored of a study folder, from its finished runs.

    all-types / few-shot: each classifier run, PatchCore's run (the same evaluation images) and their fusion.
    unseen-type: each classifier run trained without one type, on good + that type; PatchCore's all-types scores of
    those very images (no second scoring pass) and their fusion. seen-type: the classifier run with the same k that
    did see the type, on the same images, and its fusion. general / hard: each classifier run (either arm), PatchCore's
    open-set scores of its images (once per split, however many arms read it) and their fusion.
    """
    folders = [p.parent for p in sorted(study_dir.rglob("study.json"))]
    runs = [load_run(f) for f in folders]
    runs += [d for f, (info, run, _) in zip(folders, list(runs)) if (d := load_density(f, info, run))]
    if not runs:
        raise data.DataError(f"no finished runs under {study_dir} (expected <category>/seed<N>/<method>/<tag>/)")
    # PatchCore's run of each protocol: "all-types" (pool) or "open-set" (DRA)
    pcs = {(r.category, r.seed, info["role"]): (r, h) for info, r, h in runs if r.method == "patchcore"}
    references = {}  # (category, seed, tag) of an all-types run -> the types held out from its unseen twins
    for info, r, _ in runs:
        if info.get("reference"):
            references.setdefault((r.category, r.seed, info["reference"]), []).append(r.held_out)
    out, pc_sets = [], set()  # pc_sets: the (category, seed, scenario, tag, held_out) PatchCore already has a set of
    for info, run, heldout in runs:
        if run.method == "patchcore":
            # open-set: every test image, the set PatchCore's published numbers are measured on
            out += [replace(run, scenario=s) for s in (("open-set",) if info["role"] == "open-set" else
                                                       ("all-types", "few-shot"))]
            continue
        if info["role"] in ("unseen-type", *splits.OPEN_SET_SCENARIOS):
            sets = [replace(run, scenario=info["role"])]
        else:
            sets = [replace(run, scenario=s) for s in ("all-types", "few-shot")]
            for t in sorted(references.get((run.category, run.seed, run.tag), [])):
                keep = run.paths[(run.types == "good") | (run.types == t)]
                sets.append(run.on(keep, scenario="seen-type", held_out=t))
        out += sets
        protocol = "open-set" if info["role"] in splits.OPEN_SET_SCENARIOS else "all-types"
        pc, pc_normals = pcs.get((run.category, run.seed, protocol), (None, {}))
        for cl in sets if pc is not None else []:
            key = (cl.category, cl.seed, cl.scenario, cl.tag, cl.held_out)  # a split's arms share its images
            if cl.scenario in ("unseen-type", "seen-type") and key not in pc_sets:
                out.append(pc.on(cl.paths, scenario=cl.scenario, held_out=cl.held_out))
            elif cl.scenario in splits.OPEN_SET_SCENARIOS and key not in pc_sets:  # tagged as the split's runs
                out.append(pc.on(cl.paths, scenario=cl.scenario, held_out=cl.held_out, tag=cl.tag))
            pc_sets.add(key)
            fused = fuse(pc, pc_normals, cl, heldout)
            if fused is not None:
                out.append(fused)
    return out


def load_run(run_dir: Path) -> tuple[dict, Scored, dict[str, float]]:
    """(study.json, the run's Scored, its held-out normal scores by path) of one finished run."""
    info = json.loads((run_dir / "study.json").read_text())
    saved = json.loads((run_dir / "metrics.json").read_text())
    paths, labels, types, scores = data.read_scores(run_dir / "scores.csv")
    heldout = dict(zip(*data.read_scores(run_dir / "heldout_scores.csv")[::3])) \
        if (run_dir / "heldout_scores.csv").is_file() else {}
    extra = {k: saved.get(k) for k in ("pixel_auroc", "aupro", "ms_per_image", "params_millions", "peak_rss_mb")}
    extra["train_seconds"] = saved.get("train_seconds", saved.get("fit_seconds"))
    method, synthetic = method_of(info), info.get("synthetic", "none")
    tag = info["tag"].removesuffix(f"-{synthetic}") if synthetic != "none" else info["tag"]  # the split's tag
    run = Scored(info["category"], info["seed"], info["role"], method, tag, info.get("held_out"),
                 info["n_labelled"], np.array(paths), labels, types, scores, saved.get("threshold"), extra)
    return info, run, heldout


def load_density(run_dir: Path, info: dict, run: Scored) -> tuple[dict, Scored, dict[str, float]] | None:
    """The CutPaste run's density scores as a run of their own (method DENSITY), None for a run without them."""
    if not (run_dir / "density_scores.csv").is_file():
        return None
    paths, _, _, scores = data.read_scores(run_dir / "density_scores.csv")
    heldout = dict(zip(*data.read_scores(run_dir / "density_heldout_scores.csv")[::3]))
    threshold = json.loads((run_dir / "metrics.json").read_text())["density"]["threshold"]
    return info, replace(run.on(np.array(paths)), method=DENSITY, scores=scores, threshold=threshold), heldout


# The fused detector: PatchCore and the classifier together, with no training of its own. Each method's score is
# first calibrated on the held-out normal images that method never trained on (z: how many standard deviations of
# those normal scores above their mean; the classifier's probability as log-odds, where normal scores spread), and
# the fused score is the larger of the two: an image is as suspicious as the more alarmed of the two methods (the
# "either one flags it" rule of a line that runs both). Its threshold: the same rule as each method's, on the fused
# scores of the held-out normals both methods scored. The CutPaste classifier is fused with PatchCore the same way,
# into a second detector, "fused+cutpaste".
def calibrated(method: str, scores: np.ndarray, normal_scores: np.ndarray) -> np.ndarray:
    """Scores in standard deviations above the mean of held-out normal scores: (N,), (M,) -> (N,). Needs M >= 2."""
    if method in CLASSIFIERS:  # probabilities -> log-odds
        scores, normal_scores = (np.log(p) - np.log1p(-p) for p in
                                 (np.clip(x, 1e-12, 1 - 1e-12) for x in (scores, normal_scores)))
    spread = max(float(np.std(normal_scores, ddof=1)), 1e-12)
    return (scores - np.mean(normal_scores)) / spread


def fused_arm(method: str) -> str:
    """The suffix of a trained method's fused detector: fused, fused+cutpaste, fused+cutpaste-density."""
    return "+" + method if method == DENSITY else method.removeprefix("classifier")


def fuse(pc: Scored, pc_normals: dict[str, float], cl: Scored, cl_normals: dict[str, float]) -> Scored | None:
    """The fused detector on the classifier's evaluation images (None without 2+ held-out normals per method):
    'fused' of the plain classifier, 'fused+cutpaste' of the CutPaste one."""
    if min(len(pc_normals), len(cl_normals)) < 2:
        return None
    pc_on = pc.on(cl.paths)  # PatchCore's scores of the very same images, in the same order

    def z(paths_pc, scores_pc, scores_cl):
        return np.maximum(calibrated("patchcore", scores_pc, np.array(list(pc_normals.values()))),
                          calibrated(cl.method, scores_cl, np.array(list(cl_normals.values()))))
    both = sorted(set(pc_normals) & set(cl_normals))  # held-out normals scored by both methods
    threshold = metrics.normal_threshold(z(both, np.array([pc_normals[p] for p in both]),
                                           np.array([cl_normals[p] for p in both]))) if both else None
    return replace(cl, method="fused" + fused_arm(cl.method), threshold=threshold, extra={},
                   scores=z(cl.paths, pc_on.scores, cl.scores))


# ----------------------------------------------------------------------------------------------------------------
# 2. results.csv (every metric of every Scored) and differences.csv (every paired comparison)
# ----------------------------------------------------------------------------------------------------------------
def result_rows(scored: list[Scored]) -> list[dict]:
    """Rows (category, scenario, method, seed, tag, held_out, n_labelled, metric, value) of results.csv."""
    rows = []
    for s in scored:
        values = {**image_metrics(s), **s.extra, "n_labelled": s.n_labelled}
        key = dict(category=s.category, scenario=s.scenario, method=s.method, seed=s.seed, tag=s.tag,
                   held_out=s.held_out, n_labelled=s.n_labelled)
        rows += [{**key, "metric": m, "value": v} for m, v in values.items() if v is not None]
    return rows


def image_metrics(s: Scored) -> dict:
    """The image-level metrics of one Scored (the same functions as the scripts use) and the AUROC interval."""
    out = {"image_auroc": metrics.image_auroc(s.labels, s.scores),
           "average_precision": metrics.average_precision(s.labels, s.scores),
           "f1_max": metrics.f1_max(s.labels, s.scores)[0]}
    out["image_auroc_low"], out["image_auroc_high"] = metrics.auroc_interval(s.labels, s.scores,
                                                                             image_set_seed(s.paths))
    if s.threshold is not None:
        point = metrics.operating_point(s.labels, s.scores, s.threshold)
        out.update(recall_at_threshold=point["recall"], fpr_at_threshold=point["fpr"])
    return out


def comparisons(scored: list[Scored]) -> Pairs:
    """Every paired comparison of the study, once: ((first method, second method), a, b) on identical images. Every
    classifier set against PatchCore and the fused detector against both; per unseen type, the classifier without
    the type against the classifier with it (key ('classifier', 'classifier')). The CutPaste classifier against
    PatchCore and against the plain classifier of its split (what synthetic defects add at the same M), its fused
    detector against PatchCore; its density score the same way, and against its output score."""
    out = []
    for c in (s for s in scored if s.method in TRAINED
              and s.scenario in ("all-types", "unseen-type", *splits.OPEN_SET_SCENARIOS)):
        pc = partner(scored, c, "patchcore")
        fused_method = "fused" + fused_arm(c.method)  # fused, fused+cutpaste or fused+cutpaste-density
        fused = partner(scored, c, fused_method, tag=c.tag)
        pairs = [((c.method, "patchcore"), c, pc), ((fused_method, "patchcore"), fused, pc)]
        pairs += [((c.method, "classifier"), c, partner(scored, c, "classifier", tag=c.tag, held_out=c.held_out))] \
            if c.method != "classifier" else [(("fused", "classifier"), fused, c)]
        pairs += [((c.method, "classifier+cutpaste"), c, partner(scored, c, "classifier+cutpaste", tag=c.tag,
                                                                 held_out=c.held_out))] if c.method == DENSITY else []
        out += [(key, a, b) for key, a, b in pairs if a is not None and b is not None]
        if c.scenario == "unseen-type":
            seen = partner(scored, c, "classifier", held_out=c.held_out, scenario="seen-type")
            out += [(("classifier", "classifier"), c, seen)] if seen is not None else []
    return out


def comparison_name(key: tuple[str, str]) -> str:
    """A comparison as differences.csv names it: 'classifier - PatchCore', 'classifier unseen - seen'."""
    first, second = key
    if first == second:  # the classifier without a defect type against the classifier with it
        return f"{first} unseen - seen"
    return f"{first} - {'PatchCore' if second == 'patchcore' else second}"


def shown_name(key: tuple[str, str]) -> str:
    """A comparison's name in the tables: 'classifier + CutPaste - PatchCore' for classifier+cutpaste - patchcore."""
    return " - ".join(map(label, key))


def partner(scored: list[Scored], s: Scored, method: str, **where) -> Scored | None:
    """Another Scored on exactly the images of s (same category and seed; the same scenario unless `where` names
    one), reordered as s, or None."""
    where = {"scenario": s.scenario, **where}
    for o in scored:
        if (o.method == method and o.category == s.category and o.seed == s.seed
                and all(getattr(o, k) == v for k, v in where.items()) and set(o.paths) == set(s.paths)):
            return o.on(s.paths)
    return None


def difference_rows(pairs: Pairs) -> list[dict]:
    """Rows of differences.csv: per pair of methods on identical images, the AUROC difference and its paired
    95 % bootstrap interval."""
    rows = []
    for key, a, b in pairs:
        diff, low, high = metrics.paired_auroc_difference(a.labels, a.scores, b.scores, image_set_seed(a.paths))
        rows.append(dict(category=a.category, seed=a.seed, scenario=a.scenario, tag=a.tag, held_out=a.held_out,
                         comparison=comparison_name(key), difference=diff, low=low, high=high,
                         real=metrics.excludes_zero(low, high)))
    return rows


def write_csv(rows: list[dict], fields: list[str], path: Path) -> None:
    """A CSV of rows, written through a temp file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: r.get(k) for k in fields} for r in rows)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# 3. The plots
# ----------------------------------------------------------------------------------------------------------------
def shown_runs(rows: list[dict], categories: list[str]) -> list[tuple[str, int, str, str]]:
    """(category, first seed, scenario, classifier tag) of the run each figure shows: all-types with the largest k,
    else general with the largest M (the open-set protocol)."""
    out = []
    for c in categories:
        seeds = sorted({r["seed"] for r in select(rows, category=c)})
        for scenario in ("all-types", "general"):
            tags = classifier_ks(rows, scenario, [c])
            if tags and seeds:
                out.append((c, seeds[0], scenario, tags[-1]))
                break
    return out


def plot_all(rows: list[dict], categories: list[str], out: Path) -> list[str]:
    """fewshot.png, seen_unseen.png and open_set.png in `out` (those the runs allow); returns the names written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    if select(rows, scenario="few-shot"):  # an open-set study has no few-shot curve
        # Image AUROC vs number of labelled defects, per category: the classifier and the fused detector
        fig, axes = plt.subplots(1, len(categories), figsize=(4 * len(categories), 3.4), squeeze=False)
        for ax, c in zip(axes[0], categories):
            for method, marker in (("classifier", "o"), ("fused", "^")):
                xs, ys, es = [], [], []
                for tag in classifier_ks(rows, "few-shot", [c]):
                    v = per_seed(rows, [c], scenario="few-shot", method=method, tag=tag, metric="image_auroc")
                    if v:
                        n = per_seed(rows, [c], scenario="few-shot", method="classifier", tag=tag, metric="n_labelled")
                        xs.append(np.mean(n)), ys.append(np.mean(v)), es.append(np.std(v))
                if xs:
                    ax.errorbar(xs, ys, es, marker=marker, capsize=3, label=method)
            pc = per_seed(rows, [c], scenario="few-shot", method="patchcore", metric="image_auroc")
            if pc:
                ax.axhline(np.mean(pc), color="C2", ls="--")
                ax.errorbar([0], [np.mean(pc)], [np.std(pc)], marker="s", color="C2", capsize=3, label="PatchCore (0 labels)")
            ax.set(title=c, xlabel="labelled defect images", ylabel="image AUROC")
            ax.legend(fontsize=8)
        fig.tight_layout(), fig.savefig(out / "fewshot.png", dpi=90), plt.close(fig)
        written.append("fewshot.png")
    # Seen vs unseen bars per method, per category (mean over defect types)
    groups = [("classifier, seen", "seen-type", "classifier"), ("classifier, unseen", "unseen-type", "classifier"),
              ("PatchCore", "unseen-type", "patchcore"), ("fused, unseen", "unseen-type", "fused")]
    if select(rows, scenario="unseen-type"):
        fig, ax = plt.subplots(figsize=(2.4 + 2 * len(categories), 3.4))
        width = 0.8 / len(groups)
        for g, (name, sc, m) in enumerate(groups):
            vals = [per_seed(rows, [c], scenario=sc, method=m, metric="image_auroc") for c in categories]
            ax.bar(np.arange(len(categories)) + (g - (len(groups) - 1) / 2) * width,
                   [np.mean(v) if v else 0 for v in vals], width, yerr=[np.std(v) if v else 0 for v in vals],
                   capsize=3, label=name)
        ax.set_xticks(np.arange(len(categories)), categories)
        ax.set(ylabel="image AUROC (good + one type)", ylim=(0, 1.05), title="seen vs unseen defect types")
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout(), fig.savefig(out / "seen_unseen.png", dpi=90), plt.close(fig)
        written.append("seen_unseen.png")
    # DRA's open-set protocol: the methods (the CutPaste arm and its fusion too, if run) per general-M and hard,
    # per category
    settings = [(t, dict(scenario="general", tag=t)) for t in classifier_ks(rows, "general", categories)] + \
        ([("hard", dict(scenario="hard"))] if select(rows, scenario="hard") else [])
    methods = [m for m in TRAINED_FIRST if m in ("classifier", "patchcore", "fused") or select(rows, method=m)]
    if settings:
        width = 0.8 / len(methods)
        wide = 1.2 + 0.55 * len(methods) * len(settings) * len(categories)  # ~1.6 per setting of 3 methods
        fig, axes = plt.subplots(1, len(categories), figsize=(wide, 3.4), squeeze=False)
        for ax, c in zip(axes[0], categories):
            for g, method in enumerate(methods):
                vals = [per_seed(rows, [c], method=method, metric="image_auroc", **where) for _, where in settings]
                ax.bar(np.arange(len(settings)) + (g - (len(methods) - 1) / 2) * width,
                       [np.mean(v) if v else 0 for v in vals], width,
                       yerr=[np.std(v) if v else 0 for v in vals], capsize=3, label=label(method))
            ax.set_xticks(np.arange(len(settings)), [name for name, _ in settings])
            ax.set(title=c, ylabel="image AUROC", ylim=(0, 1.05))
            ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout(), fig.savefig(out / "open_set.png", dpi=90), plt.close(fig)
        written.append("open_set.png")
    return written


def plot_roc(scored: list[Scored], shown: list[tuple[str, int, str, str]], out: Path) -> list[str]:
    """roc.png: the methods' ROC curves on the images of each shown run (with the CutPaste arm's, if run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve
    if not shown:
        return []
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.4), squeeze=False)
    for ax, (c, seed, scenario, tag) in zip(axes[0], shown):
        for name, method in [("PatchCore", "patchcore")] + [(f"{label(m)} {tag}", m) for m in list(METHODS)[1:]]:
            where = {} if (method, scenario) == ("patchcore", "all-types") else {"tag": tag}
            for s in select(scored, category=c, seed=seed, scenario=scenario, method=method, **where):
                fpr, tpr, _ = roc_curve(s.labels, s.scores)
                ax.plot(fpr, tpr, label=f"{name} ({metrics.image_auroc(s.labels, s.scores):.3f})")
        ax.plot([0, 1], [0, 1], color="gray", lw=0.5)
        ax.set(title=f"{c}, seed {seed}, {scenario}", xlabel="false positive rate", ylabel="true positive rate")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout(), fig.savefig(out / "roc.png", dpi=90), plt.close(fig)
    return ["roc.png"]


# ----------------------------------------------------------------------------------------------------------------
# 4. The findings: generated from the numbers, never hand-written
# ----------------------------------------------------------------------------------------------------------------
def findings(rows: list[dict], pairs: Pairs, categories: list[str]) -> str:
    """A short paragraph generated from the numbers (never hand-written): who wins where, by how much, and whether
    the paired 95 % interval of the difference excludes 0 ("not distinguishable" when it does not)."""
    def mean(**where):
        v = per_seed(rows, categories, metric="image_auroc", **where)
        return (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) if v else None

    def say(m):
        return f"{m[0]:.3f}" + (f" ± {m[1]:.3f}" if m[2] > 1 else "")

    def compare(key: tuple[str, str], first: str, second: str, **where) -> str:
        d = paired(pairs, categories, key, **where)
        if d is None:
            return ""
        read = verdict(d, first, second).replace(" ahead", " is ahead") + (f" ({ONE_DRAW})" if d.one_draw else "")
        return f"{fmt_diff(d.difference)}, 95 % interval {fmt_interval((d.low, d.high))}: {read}"

    n_seeds = len({r["seed"] for r in rows})
    scope = f"mean over {count(len(categories), 'category', 'categories')} and {count(n_seeds, 'seed', 'seeds')}"
    out = []
    pc = mean(scenario="all-types", method="patchcore")
    tags = classifier_ks(rows, "all-types", categories)
    if pc and tags:
        best = tags[-1]
        cl = mean(scenario="all-types", method="classifier", tag=best)
        n = per_seed(rows, categories, scenario="all-types", method="classifier", tag=best, metric="n_labelled")
        out.append(f"With every defect type seen ({best}, {np.mean(n):.0f} labelled defect images), the classifier "
                   f"reaches image AUROC {say(cl)} against PatchCore's {say(pc)} with no labelled defect ({scope}); "
                   f"classifier - PatchCore on the same images: "
                   f"{compare(('classifier', 'patchcore'), 'the classifier', 'PatchCore', scenario='all-types', tag=best)}.")
        fused = mean(scenario="all-types", method="fused", tag=best)
        if fused:
            out.append(f"The fused detector scores {say(fused)}: against PatchCore "
                       f"{compare(('fused', 'patchcore'), 'the fused detector', 'PatchCore', scenario='all-types', tag=best)}; "
                       f"against the classifier "
                       f"{compare(('fused', 'classifier'), 'the fused detector', 'the classifier', scenario='all-types', tag=best)}.")
    if pc and tags:
        pc_pixel, cl_pixel = (per_seed(rows, categories, scenario="all-types", metric="pixel_auroc", **where)
                              for where in ({"method": "patchcore"}, {"method": "classifier", "tag": tags[-1]}))
        out.append(f"Where the defect is (pixel AUROC): PatchCore {fmt(pc_pixel)}, the classifier's Grad-CAM "
                   f"({tags[-1]}) {fmt(cl_pixel)}" + (", below chance: its maps point away from the defects."
                                                      if cl_pixel and np.mean(cl_pixel) < 0.5 else "."))
    seen, unseen = mean(scenario="seen-type", method="classifier"), mean(scenario="unseen-type", method="classifier")
    pc_unseen = mean(scenario="unseen-type", method="patchcore")
    if seen and unseen and pc_unseen:
        out.append(f"On a defect type it never saw, the classifier scores {say(unseen)}, against {say(seen)} on the "
                   f"same images when that type was in its training set "
                   f"({compare(('classifier', 'classifier'), 'the classifier without it', 'the classifier with it', scenario='unseen-type')}); "
                   f"PatchCore scores {say(pc_unseen)} on those images (classifier - PatchCore "
                   f"{compare(('classifier', 'patchcore'), 'the classifier', 'PatchCore', scenario='unseen-type')}).")
        fused_unseen = mean(scenario="unseen-type", method="fused")
        if fused_unseen:
            out.append(f"Fused, on the unseen types: {say(fused_unseen)} (fused - PatchCore "
                       f"{compare(('fused', 'patchcore'), 'the fused detector', 'PatchCore', scenario='unseen-type')}).")
        worst = min((r for r in rows if r["scenario"] == "unseen-type" and r["method"] == "classifier"
                     and r["metric"] == "image_auroc" and r["category"] in categories), key=lambda r: r["value"])
        out.append(f"The classifier's worst unseen type is {worst['category']}/{worst['held_out']} "
                   f"(seed {worst['seed']}): image AUROC {worst['value']:.3f}.")
    curve = classifier_ks(rows, "few-shot", categories)
    if pc and curve:
        reads = {}
        for t in curve:
            d = paired(pairs, categories, ("classifier", "patchcore"), scenario="all-types", tag=t)
            if d:
                read = verdict(d, "above", "below").replace(" ahead", " PatchCore")
                reads.setdefault(read.replace("not distinguishable", "not distinguishable from PatchCore"),
                                 []).append(t)
        out.append("On the few-shot curve the classifier is " + "; ".join(
            f"{read} at {', '.join(ts)}" for read, ts in reads.items()) + " (paired 95 % intervals).")

    def open_set(**where) -> tuple[str, str]:
        """'classifier 0.8, ..., fused 0.9' and 'classifier - PatchCore +0.1, ...' of one open-set setting: the
        methods and differences the study has (general-0: PatchCore and the CutPaste arm only)."""
        values = {m: mean(method=m, **where) for m in TRAINED_FIRST}
        said = ", ".join(f"{label(m)} {say(v) if v else '–'}" + (" on the same images" if m == "patchcore" else "")
                         for m, v in values.items() if v or (m == "fused" and values["classifier"]))
        diffs = [(key, compare(key, first, second, **where)) for key, first, second in (
            (("classifier", "patchcore"), "the classifier", "PatchCore"),
            (("classifier+cutpaste", "patchcore"), "the classifier + CutPaste", "PatchCore"),
            (("classifier+cutpaste", "classifier"), "the classifier + CutPaste", "the plain classifier"),
            ((DENSITY, "patchcore"), "CutPaste's density", "PatchCore"),
            ((DENSITY, "classifier+cutpaste"), "CutPaste's density", "its output score"))]
        return said, "; ".join(f"{shown_name(key)} {text}" for key, text in diffs if text)
    for tag in classifier_ks(rows, "general", categories):  # DRA's general setting, per M
        said, diffs = open_set(scenario="general", tag=tag)
        out.append(f"Open-set general, {tag} (M labelled anomalies drawn from every type): {said}; {diffs}.")
    arms = [m for m in CLASSIFIERS if mean(scenario="hard", method=m)]
    if arms:  # DRA's hard setting: every evaluated defect type is unseen
        said, diffs = open_set(scenario="hard")
        worst = min((r for r in rows if r["scenario"] == "hard" and r["method"] == arms[0]
                     and r["metric"] == "image_auroc" and r["category"] in categories), key=lambda r: r["value"])
        out.append(f"Open-set hard (labelled anomalies of one known type, evaluated on the other types): {said} (mean "
                   f"over known types); {diffs}; the {label(arms[0])}'s worst known type is "
                   f"{worst['category']}/{worst['held_out']} (seed {worst['seed']}): {worst['value']:.3f}.")
    per_category = [labels_needed(pairs, c, classifier_ks(rows, "general", [c])) for c in categories]
    return "\n\n".join([" ".join(out) or "Not enough finished runs for findings.", *filter(None, per_category)])


def labels_needed(pairs: Pairs, category: str, tags: list[str]) -> str:
    """One category's answer, from paired 95 % intervals only: the fewest real labelled anomalies (open-set general,
    the M of `tags`) from which each classifier arm is ahead of PatchCore at every M run, what CutPaste adds at the
    same M, and whether it helps on the types never labelled (hard). '' without open-set classifier runs."""
    def read(key: tuple[str, str], first: str = "first", second: str = "second",
             **where) -> tuple[str, str, bool] | None:
        """('+0.012 [0.004, 0.020]', 'first ahead' or 'not distinguishable', first ahead?) of a paired difference."""
        d = paired(pairs, [category], key, **where)
        if d is None:
            return None
        return f"{fmt_diff(d.difference)} {fmt_interval((d.low, d.high))}" + (" (one seed)" if d.one_draw else ""), \
            verdict(d, first, second), verdict(d) == "first ahead"
    ms = {tag: int(tag_order(tag)) for tag in tags}  # general-10 -> 10
    needs = []
    for method, how in (("classifier", "without synthetic defects"), ("classifier+cutpaste", "with CutPaste defects"),
                        (DENSITY, "with CutPaste defects, scored by their density")):
        reads = {ms[t]: r for t in tags if (r := read((method, "patchcore"), scenario="general", tag=t))}
        if reads:
            run = sorted(reads)
            ahead = [m for m in run if all(reads[n][2] for n in run if n >= m)]  # ahead at m and every larger M run
            if ahead:
                need = f"M = {ahead[0]}" + (", no real label" if ahead[0] == 0 else "")
            elif any(reads[m][2] for m in run):  # ahead at some M, not at a larger one: no count settles it
                need = f"no M run settles it, ahead at M = {', '.join(str(m) for m in run if reads[m][2])} only"
            else:
                need = f"more than M = {run[-1]}, ahead at no M run"
            needs.append(f"{how}, {need} ({'; '.join(f'M = {m}: {reads[m][0]}' for m in run)})")
    out = [f"{category}: the real labelled anomalies a classifier needs to be ahead of PatchCore in open-set general "
           f"(classifier - PatchCore on the same images, its paired 95 % interval above 0): {'; '.join(needs)}."] \
        if needs else []
    added = [f"M = {ms[t]}: {r[0]}, {r[1]}" for t in tags if (r := read(
        ("classifier+cutpaste", "classifier"), "CutPaste", "the plain classifier", scenario="general", tag=t))]
    if added:
        out.append(f"What CutPaste defects add at the same M (classifier + CutPaste - classifier): {'; '.join(added)}.")
    hard = read(("classifier+cutpaste", "classifier"), scenario="hard")
    if hard:
        helps = {"first ahead": "synthetic defects help",
                 "second ahead": "synthetic defects hurt"}.get(hard[1], hard[1])
        out.append(f"On the defect types never labelled (hard, every known type) classifier + CutPaste - classifier is "
                   f"{hard[0]}: {helps}.")
    return " ".join(out)


# ----------------------------------------------------------------------------------------------------------------
# 5. The tables, one function each, in the report's order
# ----------------------------------------------------------------------------------------------------------------
def tables(rows: list[dict], scored: list[Scored], pairs: Pairs, categories: list[str]) -> dict[str, str]:
    """The report's tables as markdown, keyed by title, in the report's order; `categories` of one category gives
    its own tables. A table the study has no runs for is left out."""
    out = {}
    for table in (table_all_types, table_seen_unseen, table_few_shot, table_differences, table_general, table_hard,
                  table_open_set_differences, table_costs):
        made = table(rows, scored, pairs, categories)
        if made is not None:
            out[made[0]] = made[1]
    return out


def auroc_cells(rows: list[dict], scored: list[Scored], categories: list[str], **where) -> list[str]:
    """Image AUROC mean ± std over seeds, and the pooled interval."""
    return [fmt(per_seed(rows, categories, metric="image_auroc", **where)),
            fmt_interval(scope_interval(scored, categories, **where))]


def table_all_types(rows, scored, pairs, categories) -> tuple[str, str] | None:
    """1. All defect types seen: PatchCore vs the classifier and the fused detector at each k, every metric."""
    if not in_scope(scored, categories, scenario="all-types"):  # pool protocol (an open-set study has none)
        return None
    tags = classifier_ks(rows, "all-types", categories)
    specs = [("PatchCore", dict(method="patchcore"))] + [(f"{m} {t}", dict(method=m, tag=t)) for m in
                                                          ("classifier", "fused") for t in tags]
    body = []
    for name, where in specs:
        n = per_seed(rows, categories, scenario="all-types", metric="n_labelled", **where)
        body.append([name, fmt(n, 0) if n else "0"] + auroc_cells(rows, scored, categories, scenario="all-types",
                                                                  **where) +
                    [fmt(per_seed(rows, categories, scenario="all-types", metric=m, **where)) for m in TABLE_METRICS[1:]])
    return "All defect types seen (k labelled images per type)", markdown(
        ["method", "labelled defects", "image AUROC", "95 % interval", *TABLE_METRICS[1:]], body)


def table_seen_unseen(rows, scored, pairs, categories) -> tuple[str, str] | None:
    """2. Seen vs unseen defect type, image AUROC on identical images (good + that type)."""
    types = sorted({s.held_out for s in in_scope(scored, categories, scenario="unseen-type")})
    if not types:
        return None
    body = []
    for t in types + ["mean"]:
        where = {} if t == "mean" else {"held_out": t}
        body.append([t] + [fmt(per_seed(rows, categories, scenario=sc, method=m, metric="image_auroc", **where))
                           for sc, m in (("seen-type", "classifier"), ("unseen-type", "classifier"),
                                         ("unseen-type", "patchcore"), ("unseen-type", "fused"))])
    return "Seen vs unseen defect type: image AUROC on good + that type", markdown(
        ["defect type", "classifier, type seen", "classifier, type unseen", "PatchCore", "fused, type unseen"], body)


def table_few_shot(rows, scored, pairs, categories) -> tuple[str, str] | None:
    """3. The few-shot curve: image AUROC against the number of labelled defect images."""
    if not in_scope(scored, categories, scenario="few-shot"):
        return None
    body = [["0 (PatchCore)", "0", "–", "–", fmt(per_seed(rows, categories, scenario="few-shot", method="patchcore",
                                                             metric="image_auroc"))]]
    for tag in classifier_ks(rows, "few-shot", categories):
        body.append([tag, fmt(per_seed(rows, categories, scenario="few-shot", method="classifier", tag=tag,
                                       metric="n_labelled"), 0)] +
                    [fmt(per_seed(rows, categories, scenario="few-shot", method=m, tag=tag, metric="image_auroc"))
                     for m in ("classifier", "fused")] + ["–"])
    return "Few-shot: image AUROC vs labelled defect images", markdown(
        ["k per type", "labelled defects", "classifier", "fused", "PatchCore"], body)


def table_differences(rows, scored, pairs, categories) -> tuple[str, str] | None:
    """4. The pool protocol's paired differences on identical images: all types seen (per k), one type unseen."""
    body = []
    for tag in classifier_ks(rows, "all-types", categories):
        for key in (("classifier", "patchcore"), ("fused", "patchcore"), ("fused", "classifier")):
            d = paired(pairs, categories, key, scenario="all-types", tag=tag)
            shown = comparison_name(key).replace("classifier", f"classifier {tag}").replace("fused", f"fused {tag}")
            body += [[shown, "all types seen", *difference_cells(d, *shown.split(" - "))]] if d else []
    for key in (("classifier", "patchcore"), ("fused", "patchcore"), ("classifier", "classifier")):
        d = paired(pairs, categories, key, scenario="unseen-type")
        name = comparison_name(key)
        first, second = ("type unseen", "type seen") if name.endswith("seen") else name.split(" - ")
        body += [[name, "one type unseen (every type)", *difference_cells(d, first, second)]] if d else []
    if not body:
        return None
    return "Paired differences in image AUROC (same images; 95 % interval over seeds and images)", markdown(
        ["first - second", "scenario", "difference", "95 % interval", "reading", "per seed"], body)


def table_general(rows, scored, pairs, categories) -> tuple[str, str] | None:
    """5. DRA's open-set general: M labelled anomalies drawn from every type, evaluated on all other test images;
    PatchCore's row of each M is its scores of exactly those images. Its whole-test-set row is the number the
    PatchCore paper publishes."""
    body = []
    whole = dict(scenario="open-set", method="patchcore")
    if in_scope(scored, categories, **whole):
        body.append(["PatchCore, whole test set", "0"] + auroc_cells(rows, scored, categories, **whole) +
                    [fmt(per_seed(rows, categories, metric=m, **whole)) for m in TABLE_METRICS[1:]])
    for tag in classifier_ks(rows, "general", categories):  # general-0: PatchCore and the CutPaste arm only
        for method in METHODS:
            where = dict(scenario="general", method=method, tag=tag)
            if method != "patchcore" and not per_seed(rows, categories, metric="image_auroc", **where):
                continue  # an arm this study did not run at this M
            n = per_seed(rows, categories, metric="n_labelled", **where)
            body.append([f"{label(method)}, {tag}", fmt(n, 0) if n else "0"] +
                        auroc_cells(rows, scored, categories, **where) +
                        [fmt(per_seed(rows, categories, metric=m, **where)) for m in TABLE_METRICS[1:]])
    if len(body) <= 1:
        return None
    return "Open-set, general (DRA): M labelled anomalies drawn from all types, evaluated on every other test image", \
        markdown(["method", "labelled defects", "image AUROC", "95 % interval", *TABLE_METRICS[1:]], body)


def table_hard(rows, scored, pairs, categories) -> tuple[str, str] | None:
    """6. DRA's open-set hard: M anomalies of one known type, evaluated on good + every other type (all unseen);
    per known type every category in scope has (over several categories: only the mean row, types differ)."""
    if not in_scope(scored, categories, scenario="hard"):
        return None
    types = sorted(set.intersection(*[{s.held_out for s in in_scope(scored, [c], scenario="hard")}
                                      for c in categories]))
    methods = [m for m in TRAINED_FIRST
               if m in ("classifier", "patchcore", "fused") or in_scope(scored, categories, scenario="hard", method=m)]
    with_interval = [m for m in methods if m in ("patchcore", *TRAINED)]
    body = []
    for t in types + ["mean"]:
        where = {"scenario": "hard"} if t == "mean" else {"scenario": "hard", "held_out": t}
        n = next((v for m in CLASSIFIERS if (v := per_seed(rows, categories, method=m, metric="n_labelled", **where))),
                 None)
        body.append([t, fmt(n, 0) if n else "–"] + [fmt(per_seed(rows, categories, method=m, metric="image_auroc", **where))
                                                   for m in methods] +
                    [fmt_interval(scope_interval(scored, categories, method=m, **where)) for m in with_interval])
    return "Open-set, hard (DRA): labelled anomalies of one known type, evaluated on good + every other type", \
        markdown(["known type", "labelled", *map(label, methods), *(f"{label(m)} 95 % interval" for m in with_interval)],
                 body)


# The open-set paired differences, in the tables' order (a study without the CutPaste arm has none of its rows)
OPEN_SET_COMPARISONS = (("classifier", "patchcore"), ("fused", "patchcore"), ("fused", "classifier"),
                        ("classifier+cutpaste", "patchcore"), ("classifier+cutpaste", "classifier"),
                        ("fused+cutpaste", "patchcore"), (DENSITY, "patchcore"), (DENSITY, "classifier"),
                        (DENSITY, "classifier+cutpaste"), (f"fused+{DENSITY}", "patchcore"))


def table_open_set_differences(rows, scored, pairs, categories) -> tuple[str, str] | None:
    """7. The open-set paired differences on identical images: general per M, hard over every known type."""
    body = []
    for tag in classifier_ks(rows, "general", categories):
        for key in OPEN_SET_COMPARISONS:
            d = paired(pairs, categories, key, scenario="general", tag=tag)
            body += [[shown_name(key), tag, *difference_cells(d, *map(label, key))]] if d else []
    for key in OPEN_SET_COMPARISONS:
        d = paired(pairs, categories, key, scenario="hard")
        body += [[shown_name(key), "hard (every known type)", *difference_cells(d, *map(label, key))]] if d else []
    if not body:
        return None
    return "Open-set paired differences in image AUROC (same images; 95 % interval over seeds and images)", \
        markdown(["first - second", "scenario", "difference", "95 % interval", "reading", "per seed"], body)


def table_costs(rows, scored, pairs, categories) -> tuple[str, str]:
    """8. Costs: one row per run kind, with that run's own training time (never averaged over different k)."""
    body = []
    for name, where in [("PatchCore (pool protocol)", dict(scenario="all-types", method="patchcore")),
                        ("PatchCore (open-set protocol)", dict(scenario="open-set", method="patchcore"))] + \
            [(f"classifier {t}", dict(scenario="all-types", method="classifier", tag=t))
             for t in classifier_ks(rows, "all-types", categories)] + \
            [(f"{label(m)} {t}", dict(scenario="general", method=m, tag=t))
             for m in CLASSIFIERS for t in classifier_ks(rows, "general", categories)] + \
            [(f"{label(m)}, hard (mean over known types)", dict(scenario="hard", method=m)) for m in CLASSIFIERS]:
        values = [per_seed(rows, categories, metric=m, **where) for m in COST_METRICS]
        if any(values[1:]):
            body.append([name] + [fmt(v, 0 if m == "n_labelled" else 1) for m, v in zip(COST_METRICS, values)])
    return "Costs (one row per run kind; training = PatchCore's fit; the fused detector runs both)", markdown(
        ["run", "labelled defects", "training s", "ms / test image", "parameters (M)", "peak RSS (MB)"], body)


# ----------------------------------------------------------------------------------------------------------------
# Shared by the tables and findings: mean ± std over seeds (per category; over categories, each seed
# averaged over categories first); a method's pooled 95 % bootstrap interval (every run's images resampled on
# their own, the mean taken per resample); paired differences over seeds and images; formatting
# ----------------------------------------------------------------------------------------------------------------
def select(rows: list, **where) -> list:
    """The rows (dicts) or Scored whose fields match `where`."""
    get = (lambda r, k: r.get(k)) if rows and isinstance(rows[0], dict) else getattr
    return [r for r in rows if all(get(r, k) == v for k, v in where.items())]


def per_seed(rows: list[dict], categories: list[str], **where) -> list[float]:
    """One value per seed: the mean over categories of the rows matching `where` (seeds missing a category dropped)."""
    by_seed = {}
    for r in select(rows, **where):
        if r["category"] in categories:
            by_seed.setdefault(r["seed"], {}).setdefault(r["category"], []).append(r["value"])
    return [float(np.mean([np.mean(v) for v in cats.values()])) for cats in by_seed.values()
            if len(cats) == len(categories)]


def in_scope(scored: list[Scored], categories: list[str], **where) -> list[Scored]:
    return [s for s in select(scored, **where) if s.category in categories]


def scope_interval(scored: list[Scored], categories: list[str], **where) -> tuple[float, float] | None:
    """The pooled interval of the runs matching `where`; None unless every category in scope has one (as its mean)."""
    sets = in_scope(scored, categories, **where)
    return pooled_interval(sets) if {s.category for s in sets} == set(categories) else None


def paired(pairs: Pairs, categories: list[str], key: tuple[str, str], **where) -> metrics.SeededDifference | None:
    """The pooled paired difference key = (first, second) (see comparisons) over the matching sets of the
    categories; None unless every category has such a pair (as a mean over categories)."""
    found = [(a, b) for k, a, b in pairs if k == key and a.category in categories
             and all(getattr(a, f) == v for f, v in where.items())]
    return pooled_difference(found) if {a.category for a, _ in found} == set(categories) else None


def pooled_difference(pairs: list[tuple[Scored, Scored]]) -> metrics.SeededDifference | None:
    """Mean AUROC(a) - AUROC(b) over pairs on identical images, categories weighted equally, with its 95 % interval
    over training draws (the seeds of each category) and evaluation images (metrics.seeded_difference)."""
    if not pairs:
        return None
    reps = [metrics.Replicate(a.category, a.seed, a.paths, a.labels, a.scores, b.scores) for a, b in pairs]
    return metrics.seeded_difference(reps, image_set_seed(np.unique(np.concatenate([a.paths for a, _ in pairs]))))


def pooled_interval(sets: list[Scored]) -> tuple[float, float] | None:
    """95 % bootstrap interval of the mean image AUROC of several runs, categories weighted equally (None for none)."""
    if not sets:
        return None
    return metrics.interval(category_mean([resamples(s) for s in sets], [s.category for s in sets]))


def resamples(s: Scored) -> np.ndarray:
    """The AUROC of every bootstrap resample of s's images (R,)."""
    counts = metrics.bootstrap_counts(int(s.labels.sum()), int((s.labels == 0).sum()), image_set_seed(s.paths))
    return metrics.auroc_resamples(s.labels, s.scores, counts)


def category_mean(values: list[np.ndarray], categories: list[str]) -> np.ndarray:
    """The mean over categories of each category's mean: every category weighs the same, as in the tables' mean
    rows (a category with 7 defect types or 3 seeds does not outweigh one with 4 types or 1 seed)."""
    by_category = {}
    for v, c in zip(values, categories):
        by_category.setdefault(c, []).append(v)
    return np.mean([np.mean(vs, axis=0) for vs in by_category.values()], axis=0)


def classifier_ks(rows: list[dict], scenario: str, categories: list[str]) -> list[str]:
    """The classifier's tags of a scenario (k1, k5, ... or general-0, general-1, general-10; either arm) present for
    every category, by increasing number of labelled defects."""
    tags = None
    for c in categories:
        t = {r["tag"] for r in select(rows, category=c, scenario=scenario) if r["method"] in CLASSIFIERS}
        tags = t if tags is None else tags & t
    return sorted(tags or [], key=tag_order)


def tag_order(tag: str) -> float:
    """Sort key of a classifier tag by its number of labelled defects: k1 < k5 < kall, general-1 < general-10."""
    digits = tag.rsplit("-", 1)[-1].lstrip("k")
    return float("inf") if digits == "all" else float(digits) if digits.isdigit() else float("nan")


def fmt(values: list[float], digits: int = 3) -> str:
    """'0.953 ± 0.012' (std over seeds), '0.953' for one seed, '–' for none."""
    if not values:
        return "–"
    if len(values) == 1 or (digits == 0 and np.std(values) == 0):  # counts: no "± 0"
        return f"{np.mean(values):.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def fmt_interval(iv: tuple[float, float] | None) -> str:
    return "–" if iv is None else f"[{iv[0]:.3f}, {iv[1]:.3f}]"


def fmt_diff(d: float) -> str:
    """'+0.012': a signed difference, with no '-0.000'."""
    return f"{round(d, 3) + 0.0:+.3f}"


ONE_DRAW = "one training draw: the interval covers the evaluation images only"


def verdict(d: metrics.SeededDifference, first: str = "first", second: str = "second") -> str:
    """How the report reads a paired difference first - second: real only when its interval excludes 0."""
    if not d.real:
        return "not distinguishable"
    return f"{first if d.difference > 0 else second} ahead"


def difference_cells(d: metrics.SeededDifference, first: str, second: str) -> list[str]:
    """The cells of a paired-difference row: difference, interval, reading (saying when one seed is all it has),
    and the per-seed differences (each seed's mean over the categories in scope)."""
    reading = verdict(d, first, second) + (f" ({ONE_DRAW})" if d.one_draw else "")
    return [fmt_diff(d.difference), fmt_interval((d.low, d.high)), reading,
            ", ".join(fmt_diff(v) for v in d.per_seed.values()) or "–"]


def count(n: int, one: str, many: str) -> str:
    """'1 category', '3 categories'."""
    return f"{n} {one if n == 1 else many}"


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in body])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("runs", help="study folder written by evaluate.py (one or many shards)")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    try:
        if not Path(args.runs).is_dir():
            raise data.DataError(f"study folder {args.runs} does not exist")
        text = write(Path(args.runs))
    except data.DataError as e:
        sys.exit(f"error: {e}")
    print(text.split("## Plots")[0])
    return text


if __name__ == "__main__":
    main()
