"""The study: supervised classifier (classify.py) vs PatchCore (patchcore.py) on the same seeded MVTec-layout splits.

For each category and scenario (all defect types seen, an unseen defect type, few-shot, and DRA's open-set general
and hard protocol) it calls the public `run()` of both scripts; report.py then tabulates image AUROC, AP, F1-max,
recall/FPR at a threshold fixed on normal images only, and pixel AUROC / AUPRO (all from metrics.py) into
results.csv, report.md and plots. It is the only file that imports the two methods. With --synthetic none,cutpaste
the open-set scenarios also train the classifier with CutPaste synthetic defects (classify.py --synthetic
cutpaste) on the same splits, with M = 0 real labels too: the study's third arm, "classifier + CutPaste".

    python evaluate.py --demo                                      # synthetic data, every scenario, CPU, ~3 min
    python evaluate.py --data-root ~/mvtec --categories bottle,screw --seeds 0,1,2 --out-dir runs/study   # GPU
    python evaluate.py --data-root ~/mvtec --categories pill --scenarios general,hard --out-dir runs/dra   # DRA's
    python evaluate.py ... --scenarios general,hard --synthetic none,cutpaste --general-m 0,1,10   # + CutPaste arm
    python evaluate.py ... --out-dir runs/study --shard 2/4        # the 2nd of 4 parts (one per GPU or task)
    python evaluate.py ... --plan                                  # print every run's command, run nothing
    python evaluate.py --runs runs/study                           # rebuild tables and plots from saved runs
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

import backbones
import classify
import data
import patchcore
import report
import splits
import synthetic


# ----------------------------------------------------------------------------------------------------------------
# The study. Pool protocol (all-types, unseen-type, few-shot): per category and seed, splits.make_split cuts every test
# folder into a pool (the classifier may learn from its defects) and an evaluation part, and every run of that
# (category, seed) is scored on evaluation parts only. Open-set protocol (general, hard; DRA's, the protocol of the
# published tables): splits.open_set_split draws M labelled anomalies and evaluates every other test image it keeps.
# Either way PatchCore is scored on exactly the classifier's evaluation images. The classifier's arms (--synthetic):
# "none", labelled anomalies only, and "cutpaste", the same split plus CutPaste synthetic defects made from its normal
# images (issue 21); an arm's run folder is the split's tag plus "-cutpaste", and it reads the same split file.
# ----------------------------------------------------------------------------------------------------------------
STUDY_SCENARIOS = ("all-types", "unseen-type", "few-shot", *splits.OPEN_SET_SCENARIOS)
SYNTHETIC = ("none", "cutpaste")  # classify.py --synthetic
# The README's first command: synthetic data, EfficientNet-Lite0 for both methods (offline weights), 128 px, CPU.
DEMO = dict(categories="weave,washer", scenarios=",".join(STUDY_SCENARIOS), seeds="0", k_values="1,2,4",
            few_shot_k="1,2,4", unseen_k=4, general_m="0,4", hard_m="4", synthetic="none,cutpaste", image_size=128,
            classifier_backbone="efficientnet_lite0", patchcore_backbone="efficientnet_lite0", epochs=5,
            batch_size=8, coreset_ratio=0.1)


class Run(NamedTuple):
    """One planned run of the study: the folder it writes, what its study.json records, the split it reads and that
    split's file, and the argv of its script (patchcore.py or classify.py), which is all it needs to run alone."""
    run_dir: Path
    info: dict
    split: dict
    split_file: Path
    argv: list[str]

    @property
    def script(self):
        """patchcore or classify, the module that makes this run."""
        return patchcore if self.info["method"] == "patchcore" else classify

    def command(self, recorded: bool = False) -> str:
        """This run as a command line: python3 patchcore.py ... / python3 classify.py ... (recorded: for a committed
        file, an absolute path shortened as data.portable does)."""
        argv = [str(data.portable(a)) if recorded else str(a) for a in self.argv]
        return shlex.join(["python3", f"{self.script.__name__}.py", *argv])

    def call(self) -> dict:
        """Make the run: the script's own run() on its argv, as the command line would."""
        return self.script.run(self.script.parse_args(self.argv))


def split_command(split: dict, data_root: str, path: Path) -> str:
    """The splits.py command line that writes the split file of a planned split (the same draw, the same file)."""
    argv = ["python3", "splits.py", "--data-root", str(data_root), "--category", split["category"],
            "--seed", str(split["seed"]), "--scenario", split["scenario"]]
    argv += ["--k", str(split["k"])] if split["k"] is not None and split["scenario"] != "open-set" else []
    held = split["held_out"]  # hard: the known type; unseen-type: the type left out
    argv += ["--held-out", held] if held else []
    return shlex.join([*argv, "--out", str(path)])


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
    planned, seen_sizes = [], set()
    for k in sorted(ks, key=lambda k: float("inf") if k is None else k):
        split = splits.make_split(test, category, seed, "all-types", k)
        n = len(split["train_defects"])
        if n in seen_sizes or n == 0:  # k above every pool repeats a smaller k's training set: run it once
            continue
        seen_sizes.add(n)
        planned.append({**split, "tag": k_tag(k), "role": "all-types"})
    types = sorted({s.defect_type for s in test} - {"good"})
    if "unseen-type" in args.scenarios:
        if len(types) < 2:
            print(f"{category}: one defect type only, skipping the unseen-type scenario")
        # The "seen" reference of an unseen-type run: the all-types run with the same k, i.e. the same training
        # images of the other types plus the held-out type's own.
        seen = splits.make_split(test, category, seed, "all-types", args.unseen_k)["train_defects"]
        reference = next((s["tag"] for s in planned if s["train_defects"] == seen), None)
        for t in types if len(types) >= 2 else []:
            split = splits.make_split(test, category, seed, "unseen-type", args.unseen_k, held_out=t)
            planned.append({**split, "tag": f"unseen-{t}-{k_tag(args.unseen_k)}", "role": "unseen-type",
                           "reference": reference})
    return planned


def parse_m(text: str, flag: str, zero: bool = False) -> list[int]:
    """'1,10' -> [1, 10] for --general-m / --hard-m: positive whole numbers (0 too if `zero`), or one sentence."""
    try:
        values = [int(m) for m in str(text).split(",") if m.strip()]
    except ValueError:
        values = []
    if not values or any(m < (0 if zero else 1) for m in values):
        kind = "whole numbers (0 or more)" if zero else "positive whole numbers"
        why = " (M = 0, no labelled anomaly, trains the CutPaste arm only: add --synthetic none,cutpaste)" \
            if flag == "--general-m" and 0 in values and not zero else ""
        raise data.DataError(f"{flag} takes {kind} of labelled anomalies (e.g. 1,10), got '{text}'{why}")
    return values


def parse_synthetic(text: str) -> list[str]:
    """'none,cutpaste' -> ['none', 'cutpaste']: the classifier's arms (classify.py --synthetic), or one sentence."""
    arms = [a.strip() for a in str(text).split(",") if a.strip()]
    if not arms or set(arms) - set(SYNTHETIC):
        raise data.DataError(f"--synthetic takes a comma list of {', '.join(SYNTHETIC)} (e.g. none,cutpaste), "
                             f"got '{text}'")
    return [a for a in SYNTHETIC if a in arms]


def plan_open_set(train, test, category: str, seed: int, args) -> list[dict]:
    """The classifier's splits of DRA's open-set protocol for one (category, seed): general-<M> for every M of
    --general-m, hard-<type> for every defect type (M = --hard-m, fewer if the type has fewer). Each split lists
    the arms (--synthetic) trained on it: general-0 has no labelled anomaly, so only the CutPaste arm."""
    planned, arms = [], parse_synthetic(args.synthetic)
    if "general" in args.scenarios:
        for m in sorted(set(parse_m(args.general_m, "--general-m", zero="cutpaste" in arms))):
            split = splits.open_set_split(train, test, category, seed, "general", m)
            planned.append({**split, "tag": f"general-{m}", "role": "general",
                           "arms": [a for a in arms if m > 0 or a != "none"]})
    if "hard" in args.scenarios:
        m = parse_m(args.hard_m, "--hard-m")
        if len(m) != 1:
            raise data.DataError(f"--hard-m takes one number (labelled anomalies of the known type), got '{args.hard_m}'")
        for t in sorted({s.defect_type for s in test} - {"good"}):
            split = splits.open_set_split(train, test, category, seed, "hard", m[0], known=t)
            planned.append({**split, "tag": f"hard-{t}", "role": "hard", "arms": arms})  # its held_out is t
    return planned


def parse_shard(text: str | None) -> tuple[int, int]:
    """'2/4' -> (2, 4): this process runs the 2nd of 4 parts; None -> (1, 1), every run."""
    if text is None:
        return 1, 1
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        k = n = 0
    if not 1 <= k <= n:
        raise data.DataError(f"--shard takes K/N with 1 <= K <= N (e.g. 1/4 for the first of four parts), got '{text}'")
    return k, n


def plan_study(args) -> list[Run]:
    """Every run of the study, in a fixed order (Run: run folder, study.json info, its split, the split's file, the
    script's argv). PatchCore once per (category, seed) and protocol, the classifier once per split and arm (the arms of a
    split one after the other); PatchCore's unseen-type, general and hard results are its scores of the same images
    in its one run of that protocol (report.collect). Bad input (folders, --seeds, --general-m, --hard-m,
    --synthetic) ends in one sentence here, before any folder is written."""
    device = str(backbones.pick_device(args.device))  # resolved once: 'auto' without CUDA says why, once
    common = ["--data-root", str(args.data_root), "--image-size", str(args.image_size), "--device", device,
              "--precision", args.precision] + (["--workers", str(args.workers)] if args.workers is not None else [])
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    loaded = {c: data.load_category(args.data_root, c) for c in categories}
    seeds = parse_k(args.seeds)
    if None in seeds:
        raise data.DataError(f"--seeds takes whole numbers, got '{args.seeds}'")
    pool = [s for s in args.scenarios if s not in splits.OPEN_SET_SCENARIOS]
    open_set = [s for s in args.scenarios if s in splits.OPEN_SET_SCENARIOS]
    if pool and "none" not in parse_synthetic(args.synthetic):
        raise data.DataError(f"the CutPaste arm runs in the open-set scenarios only; {', '.join(pool)} train the "
                             f"plain classifier, so --synthetic must include none")
    jobs = []
    for category in categories:
        train, test = loaded[category]
        for seed in seeds:
            base = Path(args.out_dir) / category / f"seed{seed}"
            info = dict(category=category, seed=seed)  # no data root: study folders are committed and moved
            # PatchCore never sees a defect: fit once on train/good, score every evaluation image of the protocol
            # (pool: the all-types evaluation set; open-set: every test image, its held-out normals from train/good)
            pc_splits = ([("all", "all-types", splits.make_split(test, category, seed, "all-types", None))] if pool else []) + \
                ([("open-set", "open-set", splits.open_set_patchcore_split(train, test, category, seed))] if open_set else [])
            for tag, role, split in pc_splits:
                pc_args = common + ["--category", category, "--backbone", args.patchcore_backbone, "--seed", str(seed),
                                    "--weights", args.patchcore_weights or args.weights, "--search", args.search,
                                    "--coreset-ratio", str(args.coreset_ratio), "--batch-size", str(args.batch_size),
                                    "--split", str(base / "splits" / f"{tag}.json"), "--out-dir", str(base / "patchcore" / tag)]
                pc_args += ["--nprobe", str(args.nprobe)] if args.nprobe is not None else []
                jobs.append(Run(base / "patchcore" / tag,
                                {**info, "method": "patchcore", "tag": tag, "role": role, "n_labelled": 0},
                                split, base / "splits" / f"{tag}.json", pc_args))
            # The classifier: one training run per split and arm, every arm reading the split's one file
            cl_splits = (plan_splits(test, category, seed, args) if pool else []) + \
                plan_open_set(train, test, category, seed, args)
            for split in cl_splits:
                for arm in split.get("arms", ["none"]):  # the pool protocol: the plain classifier only
                    tag = split["tag"] + ("" if arm == "none" else f"-{arm}")  # general-10, general-10-cutpaste
                    run_dir = base / "classify" / tag
                    cl_args = common + ["--category", category, "--backbone", args.classifier_backbone, "--seed",
                                        str(seed), "--weights", args.classifier_weights or args.weights,
                                        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                                        "--split", str(base / "splits" / f"{split['tag']}.json"),
                                        "--out-dir", str(run_dir)]
                    cl_args += ["--synthetic", arm] if arm != "none" else []
                    jobs.append(Run(run_dir, {**info, "method": "classifier", "synthetic": arm, "tag": tag,
                                              "role": split["role"], "held_out": split["held_out"],
                                              "reference": split.get("reference"),
                                              "n_labelled": len(split["train_defects"])},
                                    {k: v for k, v in split.items() if k not in ("tag", "role", "reference", "arms")},
                                    base / "splits" / f"{split['tag']}.json", cl_args))
    return jobs


def shard_jobs(planned: list[Run], k: int, n: int) -> list[Run]:
    """The K-th of N disjoint parts of the planned runs: every N-th split file from the K-th, with every run that
    reads it (a split's arms), so each split file is written by one process only. One run per split file (no
    CutPaste arm): every N-th run, as before the arms."""
    by_split = {}
    for job in planned:
        by_split.setdefault(job.split_file, []).append(job)  # the runs of one split are consecutive in the plan
    return [job for jobs in list(by_split.values())[k - 1::n] for job in jobs]


def run_study(args) -> None:
    """Run (or resume) this process's share of the planned runs. With --shard K/N it takes every N-th run from the
    K-th: N processes (one per GPU, or the tasks of a cluster job array) share one study folder, and no two ever
    write the same run folder or split file (each split file belongs to one process: the runs of its arms)."""
    k, n = parse_shard(args.shard)
    planned = plan_study(args)
    jobs = shard_jobs(planned, k, n)
    if n > 1:
        print(f"shard {k}/{n}: {len(jobs)} of the study's {len(planned)} runs")
    seconds = {}  # method (classifier+cutpaste apart) -> durations of the runs done in this call, for the time left
    for i, job in enumerate(jobs):
        if (job.run_dir / "metrics.json").is_file() and (job.run_dir / "study.json").is_file():
            print(f"[skip] {job.run_dir} exists")  # resumable: finished runs are kept
            continue
        method = report.method_of(job.info)
        left = [report.method_of(j.info) for j in jobs[i:] if not (j.run_dir / "study.json").is_file()]
        print(f"\n=== [{i + 1}/{len(jobs)}] {method} {job.info['category']} seed {job.info['seed']} "
              f"{job.info['tag']} -> {job.run_dir}{time_left(left, seconds)}", flush=True)
        t0 = time.perf_counter()
        job.split_file.parent.mkdir(parents=True, exist_ok=True)
        splits.write_split(job.split, job.split_file)  # the seeded draw, listing every labelled and evaluation image
        job.call()
        seconds.setdefault(method, []).append(time.perf_counter() - t0)
        # study.json: what the report needs of the run, and the command that makes it alone (from the study folder's
        # parent, with its split file)
        data.write_json(job.run_dir / "study.json", {**job.info, "wall_seconds": seconds[method][-1],
                                                     "command": job.command(recorded=True)})


def print_plan(args) -> None:
    """--plan: every command of the study (with --shard K/N: that shard's), in the order it runs them, nothing run
    or written. Each split file first (splits.py writes the draw the study writes), then the runs that read it."""
    k, n = parse_shard(args.shard)
    jobs = shard_jobs(plan_study(args), k, n)
    print(f"# {len(jobs)} runs" + (f" (shard {k}/{n})" if n > 1 else "") + "; finished ones are skipped by "
          f"evaluate.py, each line below makes one alone")
    written = set()
    for job in jobs:
        if job.split_file not in written:
            written.add(job.split_file)
            print(split_command(job.split, args.data_root, job.split_file))
        print(job.command())


def time_left(methods: list[str], seconds: dict[str, list[float]]) -> str:
    """'; about 1 h 20 min left': the runs still to do, each at the mean duration of its method's finished runs."""
    done = [t for ts in seconds.values() for t in ts]
    if not done:
        return ""
    left = sum(np.mean(seconds.get(m, done)) for m in methods)
    return f"; about {int(left // 3600)} h {int(left % 3600 // 60)} min left" if left >= 3600 else \
        f"; about {int(left // 60)} min {int(left % 60)} s left"


# ----------------------------------------------------------------------------------------------------------------
# The report (report.py) draws everything from saved scores; the heatmaps need the methods, so they are drawn here.
# ----------------------------------------------------------------------------------------------------------------
def plot_heatmaps(study_dir: Path, shown: list[tuple[str, int, str, str]], data_root: str | None,
                  device: str) -> list[str]:
    """heatmaps.png: one evaluation image per defect type of each shown run, with both methods' maps (each method's
    maps scaled to [0, 1] over the images shown). Needs the images (data_root) and the saved models (memory bank,
    model.pt), which a committed study folder does not hold."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if data_root is None:
        print("heatmaps: no --data-root given, skipped")
        return []
    dev = backbones.pick_device(device)
    panels = []
    for c, seed, scenario, tag in shown:
        base = study_dir / c / f"seed{seed}"
        pc_dir = base / "patchcore" / ("open-set" if scenario in splits.OPEN_SET_SCENARIOS else "all")
        cl_dir = base / "classify" / tag
        if not cl_dir.is_dir():  # a split trained by the CutPaste arm only (general-0, or --synthetic cutpaste)
            cl_dir = base / "classify" / f"{tag}-cutpaste"
        if not (pc_dir / "memory_bank").is_dir() or not (cl_dir / "model.pt").is_file():
            print(f"heatmaps: no saved models for {c}, skipped")
            continue
        _, test = data.load_category(data_root, c)
        paths, _, types, _ = data.read_scores(cl_dir / "scores.csv")  # the classifier run's evaluation images
        first = {}
        for p, t in zip(paths, types):
            first.setdefault(t, p)
        samples = [next(s for s in test if s.rel == first[t]) for t in sorted(first) if t != "good"]
        bank = patchcore.MemoryBank.load(pc_dir, dev)
        _, pc_maps, _ = patchcore.score(bank, samples, dev, 8, "heatmaps")
        ckpt = classify.Checkpoint.load(cl_dir / "model.pt")
        model, cam_layer = ckpt.build(dev)
        _, cl_maps = classify.score(model, cam_layer, samples, ckpt.backbone, ckpt.image_size, dev)
        for i, s in enumerate(samples):
            panels.append((c, s, pc_maps[i] / max(pc_maps.max(), 1e-12), cl_maps[i] / max(cl_maps.max(), 1e-12)))
    if not panels:
        return []
    fig, axes = plt.subplots(len(panels), 4, figsize=(8, 2.1 * len(panels)), squeeze=False)
    for row, (c, s, pc_map, cl_map) in zip(axes, panels):
        original = data.read_image(s.path)
        image = original.resize(pc_map.shape[::-1])
        mask = data.mask_to_tensor(data.read_mask(s, original.size), pc_map.shape[0])[0].numpy()  # (S, S)
        row[0].imshow(image), row[1].imshow(mask, cmap="gray")
        row[2].imshow(image), row[2].imshow(pc_map, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        row[3].imshow(image.resize(cl_map.shape[::-1])), row[3].imshow(cl_map, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        row[0].set_ylabel(f"{c}\n{s.defect_type}", fontsize=8)
        for ax, title in zip(row, ("image", "ground truth", "PatchCore", "classifier Grad-CAM")):
            ax.set_xticks([]), ax.set_yticks([]), ax.set_title(title, fontsize=8)
    fig.tight_layout(), fig.savefig(study_dir / "heatmaps.png", dpi=80), plt.close(fig)
    return ["heatmaps.png"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("--demo", action="store_true", help="synthetic data + a reduced study on the CPU (README)")
    p.add_argument("--runs", default=None, help="only rebuild results.csv, report.md and plots of this study folder "
                   "(heatmaps too when --data-root is given and the folder holds the saved models)")
    p.add_argument("--data-root", default=None, help="folder holding <category>/train/good, test/, ground_truth/")
    p.add_argument("--categories", default=None, help="comma-separated, e.g. bottle,screw")
    p.add_argument("--scenarios", default=",".join(STUDY_SCENARIOS), help="comma-separated subset of "
                   + ", ".join(STUDY_SCENARIOS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--k-values", default="1,5,10", help="all-types: labelled defects per type ('all' = whole pool)")
    p.add_argument("--few-shot-k", default="1,2,5,10,all", help="few-shot curve: labelled defects per type")
    p.add_argument("--unseen-k", type=int, default=10, help="unseen-type: labelled defects per other type")
    p.add_argument("--general-m", default="1,10", help="general (DRA): labelled anomalies drawn from all defect images")
    p.add_argument("--hard-m", default="10", help="hard (DRA): labelled anomalies of the one known defect type")
    p.add_argument("--synthetic", default="none",
                   help="the classifier's arms in general and hard, comma-separated: none (labelled anomalies only), "
                        "cutpaste (+ CutPaste synthetic defects, classify.py --synthetic cutpaste; its run folders "
                        "end in -cutpaste; --general-m may then hold 0, trained by this arm only)")
    p.add_argument("--classifier-backbone", choices=backbones.BACKBONES, default="efficientnet_b1")
    p.add_argument("--patchcore-backbone", choices=backbones.BACKBONES, default="wide_resnet50_2")
    p.add_argument("--weights", default="imagenet",
                   help="both backbones: imagenet or none (random init, for tests); see the two flags below")
    p.add_argument("--classifier-weights", default=None,
                   help="the classifier's trunk: imagenet, none or a state-dict file (offline hosts); default --weights")
    p.add_argument("--patchcore-weights", default=None,
                   help="PatchCore's backbone: imagenet, none or a state-dict file; default --weights")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--epochs", type=int, default=30, help="classifier training epochs")
    p.add_argument("--batch-size", type=int, default=8, help="both methods (classifier training and scoring)")
    p.add_argument("--coreset-ratio", type=float, default=0.1)
    p.add_argument("--search", choices=patchcore.SEARCHES, default="exact", help="PatchCore's nearest-neighbour search")
    p.add_argument("--nprobe", type=int, default=None,
                   help=f"IVF lists searched (--search ivf; default {patchcore.NPROBE}, at most the bank's lists)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=backbones.PRECISIONS, default="mixed",
                   help="mixed: autocast/TF32 on a GPU; float32: none, for a strict comparison with the CPU")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers of both methods (default: theirs)")
    p.add_argument("--shard", default=None, help="K/N: run only the K-th of N disjoint parts of the planned runs "
                   "(one per GPU or cluster task, into one shared --out-dir); then report with --runs")
    p.add_argument("--plan", action="store_true", help="print the study's commands (splits.py, patchcore.py, "
                   "classify.py; with --shard K/N that shard's) and run nothing")
    p.add_argument("--out-dir", default=None, help="default: runs/study (runs/demo with --demo)")
    args = p.parse_args(argv)
    if args.demo:
        for k, v in DEMO.items():
            setattr(args, k, v)
    return args


def run(args: argparse.Namespace) -> str:
    """Run (or resume) the study, then write results.csv, report.md and the plots; returns the report."""
    data.code_version()  # every run of this process records the commit it started with, not a later one
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
                synthetic.generate_synthetic(args.data_root, size=128, seed=0)
        if args.data_root is None or args.categories is None:
            raise data.DataError("a study needs --data-root and --categories (or --demo, or --runs FOLDER)")
        args.scenarios = [s.strip() for s in args.scenarios.split(",")]
        if args.nprobe is not None and args.search != "ivf":
            raise data.DataError("--nprobe applies to --search ivf only; exact search probes no lists")
        unknown = set(args.scenarios) - set(STUDY_SCENARIOS)
        if unknown:
            raise data.DataError(f"unknown scenario(s) {', '.join(sorted(unknown))} (expected {', '.join(STUDY_SCENARIOS)})")
        if args.plan:
            print_plan(args)
            return ""
        run_study(args)
        if args.shard is not None and parse_shard(args.shard)[1] > 1:
            print(f"shard {args.shard} done; when every shard is, build the report with: python evaluate.py --runs "
                  f"{study_dir}")
            return ""
    text = report.write(study_dir, lambda shown: plot_heatmaps(study_dir, shown, args.data_root, args.device))
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
