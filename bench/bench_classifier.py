"""Benchmark the classifier's training epoch: loader worker processes against none (issue 17), on synthetic or real data.

Each configuration trains classify.py for a few epochs in its own process (so each has its own image cache and
peak memory) and reports the first epoch (which decodes every image into the cache) apart from the later ones
(cached images: augmentation, forward, backward), and of those the seconds spent waiting for images (reading and
augmenting) and validating, where the checkout records them. `--before DIR` adds a run of an older checkout of the
project (e.g. a `git worktree` of the commit before loader workers) with the same flags, minus those it does not know.
Timings depend on the machine and on what else runs on it; nothing here is asserted by the tests.

    python bench/bench_classifier.py                                         # synthetic weave, 128 px, workers 0 and 1
    python bench/bench_classifier.py --data-root ../shared/data --category tire --image-size 256 --workers 0,1
    python bench/bench_classifier.py --data-root ../shared/data --category tire --image-size 256 --before OLD_CHECKOUT
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import synthetic  # noqa: E402


def one(code: Path, args: argparse.Namespace, workers: int | None, out: Path) -> dict:
    """Train once with `code`'s classify.py in a fresh process; its per-epoch seconds and peak RSS."""
    cmd = [sys.executable, str(code / "classify.py"), "--data-root", str(args.data_root), "--category", args.category,
           "--backbone", args.backbone, "--image-size", str(args.image_size), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--device", "cpu", "--out-dir", str(out)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    saved = json.loads((out / "metrics.json").read_text())
    later = saved["history"][1:]
    seconds = [h["seconds"] for h in saved["history"]]  # train epoch + validation scoring, per epoch

    def mean_later(key: str) -> float | None:  # None: one epoch only, or a checkout that does not record the part
        return float(np.mean([h[key] for h in later])) if later and all(key in h for h in later) else None

    return {"code": str(code), "workers": workers, "first_epoch_s": seconds[0], "later_epoch_s": mean_later("seconds"),
            "later_read_s": mean_later("read_seconds"), "later_validation_s": mean_later("validation_seconds"),
            "n_train_images": saved["n_train_images"], "peak_rss_mb": saved["peak_rss_mb"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("--data-root", default=None, help="default: a synthetic tree in a temporary folder")
    p.add_argument("--category", default="weave")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="the first fills the image cache; the rest are averaged")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", default="0,1", help="comma-separated worker counts to compare")
    p.add_argument("--before", default=None, help="an older checkout of the project to time with the same flags")
    p.add_argument("--out", default="runs/bench/classifier_epoch.json")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.data_root is None:
            args.data_root = synthetic.generate_synthetic(tmp / "data", size=args.image_size, seed=0)
        configs = ([(Path(args.before), None)] if args.before else []) + \
            [(ROOT, int(w)) for w in args.workers.split(",") if w.strip()]
        rows = [one(code, args, workers, tmp / f"run{i}") for i, (code, workers) in enumerate(configs)]
    print(f"\n{'code':<28}{'workers':>8}{'train images':>14}{'epoch 1 s':>11}{'later epochs s':>16}"
          f"{'of which reading s':>20}{'validation s':>14}{'peak MB':>9}")
    for r in rows:
        later, read, val = ("–" if r[k] is None else f"{r[k]:.1f}"
                            for k in ("later_epoch_s", "later_read_s", "later_validation_s"))
        print(f"{Path(r['code']).name[:27]:<28}{'–' if r['workers'] is None else r['workers']:>8}"
              f"{r['n_train_images']:>14}{r['first_epoch_s']:>11.1f}{later:>16}{read:>20}{val:>14}"
              f"{r['peak_rss_mb']:>9.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    data.write_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
