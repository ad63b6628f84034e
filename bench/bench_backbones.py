"""Which offline backbone answers the question: both methods with EfficientNet-Lite0, Lite1 and Lite2 (weights shipped
with pip) on the same categories, seeds and splits, accuracy beside time and memory.

For every backbone it runs (or resumes) the study's `general` scenario with M = 10 labelled anomalies into
`--out/<backbone>` (evaluate.py, one backbone for both methods), then tabulates per category: PatchCore's image and
pixel AUROC on the whole test set (its open-set run), the classifier's image AUROC at M = 10, and each method's
training seconds and ms per test image (mean ± std over seeds). Timings are only comparable between runs that had
the machine to themselves. Peak RSS is the study process's peak when the classifier run ended: evaluate.py runs
every run in one process, so it is the largest of that process's runs so far, not one run's own.

    python bench/bench_backbones.py --data-root ../shared/data --categories pill,transistor,screw,tire --seeds 0
    python bench/bench_backbones.py --table-only --also results/mvtec,results/tire   # tabulate the saved runs
    python bench/bench_backbones.py --data-root /tmp/s --categories weave --image-size 64 --epochs 1 --out /tmp/b
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import backbones  # noqa: E402
import data  # noqa: E402

LITE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
M = 10  # labelled anomalies of the classifier (DRA's general scenario)
COLUMNS = (("PatchCore image AUROC", "patchcore", "image_auroc", 3), ("PatchCore pixel AUROC", "patchcore",
           "pixel_auroc", 3), (f"classifier M = {M} image AUROC", "classifier", "image_auroc", 3),
           ("PatchCore fit s", "patchcore", "fit_seconds", 0), ("PatchCore ms / image", "patchcore", "ms_per_image", 0),
           ("classifier train s", "classifier", "train_seconds", 0),
           ("classifier ms / image", "classifier", "ms_per_image", 0), ("peak RSS MB", "classifier", "peak_rss_mb", 0))


def run_backbone(backbone: str, args: argparse.Namespace) -> None:
    """The general M = 10 study of one backbone (both methods), resumed where its folder has runs."""
    import evaluate
    evaluate.run(evaluate.parse_args([
        "--data-root", args.data_root, "--categories", args.categories, "--seeds", args.seeds,
        "--scenarios", "general", "--general-m", str(M), "--image-size", str(args.image_size),
        "--epochs", str(args.epochs), "--classifier-backbone", backbone, "--patchcore-backbone", backbone,
        "--device", args.device, "--out-dir", str(Path(args.out) / backbone)]))


def collect(studies: list[Path], seeds: list[int]) -> dict[tuple[str, str, str], list[dict]]:
    """{(category, backbone, method): [metrics.json of each seed]} of the study folders' runs that matter here:
    PatchCore's open-set run (every test image) and the plain classifier's general-M run, of the given seeds, by
    the backbone each run recorded (so the study's own folder can supply a backbone's rows)."""
    found, seen = {}, set()
    for study in studies:
        for run in sorted(study.glob("*/seed*/*/*/study.json")):
            info = json.loads(run.read_text())
            if info["seed"] not in seeds or info.get("synthetic", "none") != "none" or \
                    (info["method"], info["tag"]) not in (("patchcore", "open-set"), ("classifier", f"general-{M}")):
                continue
            metrics = json.loads((run.parent / "metrics.json").read_text())
            key = (info["category"], metrics["args"]["backbone"], info["method"])
            if (key, info["seed"]) not in seen:  # a run copied into two folders counts once
                seen.add((key, info["seed"]))
                found.setdefault(key, []).append(metrics)
    return found


def cell(values: list[float], digits: int) -> str:
    """'0.912 ± 0.011' (std over seeds; the value alone for one seed)."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean = f"{np.mean(values):,.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ± {np.std(values, ddof=1):,.{digits}f}"


def table(studies: list[Path], names: list[str], seeds: list[int]) -> tuple[str, list[dict]]:
    """The markdown table (one row per category and backbone) and its rows for the JSON file."""
    lines = ["| category | backbone | parameters, PatchCore / classifier (M) | seeds | " + " | ".join(c[0] for c in COLUMNS) + " |",
             "|---|---|---|---|" + "---|" * len(COLUMNS)]
    rows = []
    runs = collect(studies, seeds)
    for category in sorted({c for c, _, _ in runs}):
        for name in names:
            pc, cl = runs.get((category, name, "patchcore"), []), runs.get((category, name, "classifier"), [])
            if not pc and not cl:
                continue
            params = [m[0]["params_millions"] if m else None for m in (pc, cl)]
            row = {"category": category, "backbone": name, "params_millions": params, "seeds": max(len(pc), len(cl))}
            for title, method, key, _ in COLUMNS:
                row[title] = [m.get(key) for m in (pc if method == "patchcore" else cl)]
            rows.append(row)
            lines.append(f"| {category} | {name} | {' / '.join('–' if p is None else f'{p:.1f}' for p in params)} | "
                         f"{row['seeds']} | "
                         + " | ".join(cell(row[c[0]], c[3]) for c in COLUMNS) + " |")
    return "\n".join(lines), rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("--data-root", default=None, help="folder holding <category>/train/good, test/, ground_truth/")
    p.add_argument("--categories", default="pill,transistor,screw,tire")
    p.add_argument("--backbones", default=",".join(LITE), help="comma-separated, from " + ", ".join(LITE))
    p.add_argument("--seeds", default="0")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=10, help="classifier training epochs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--table-only", action="store_true", help="only tabulate the runs already in --out (and --also)")
    p.add_argument("--also", default="", help="more study folders to read runs from, comma-separated (e.g. the "
                   "study's own results/mvtec, whose runs of the same settings need not be run twice)")
    p.add_argument("--out", default="results/backbones", help="one study folder per backbone under it")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    names = [b.strip() for b in args.backbones.split(",") if b.strip()]
    try:
        unknown = [b for b in names if b not in backbones.BACKBONES]
        if unknown:
            raise data.DataError(f"unknown backbone(s) {', '.join(unknown)} (expected e.g. {', '.join(LITE)})")
        if not args.table_only:
            if args.data_root is None:
                raise data.DataError("--data-root is needed to run the studies (or pass --table-only)")
            for name in names:
                run_backbone(name, args)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        studies = [Path(args.out) / n for n in names] + [Path(d) for d in args.also.split(",") if d.strip()]
        text, rows = table([d for d in studies if d.is_dir()], names, seeds)
        if not rows:
            raise data.DataError(f"no finished general-{M} runs under {args.out}")
    except data.DataError as e:
        sys.exit(f"error: {e}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    data.write_json(Path(args.out) / "backbones.json", {"m": M, "rows": rows})
    (Path(args.out) / "backbones.md").write_text(text + "\n")
    print(text)
    print(f"wrote {Path(args.out) / 'backbones.md'} and backbones.json")
    return text


if __name__ == "__main__":
    main()
