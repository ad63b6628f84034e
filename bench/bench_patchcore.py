"""Benchmark PatchCore's phases, and the fast greedy coreset beside the plain loop, on synthetic or real data.

For every (image size, coreset ratio) it extracts the features once, then times the fast coreset (patchcore.py's)
and the plain loop (the readable reference: one pass over all N points per chosen point), says whether they chose
the same points in the same order, then builds the index and scores a few test images. Each configuration runs in
its own process, so its peak RSS is its own. Timings depend on the machine; nothing here is asserted by the tests.

    python bench/bench_patchcore.py                                        # synthetic weave, 256 and 512 px
    python bench/bench_patchcore.py --data-root ../shared/data --category tire --sizes 256 --ratios 0.01,0.1
    python bench/bench_patchcore.py --data-root ../shared/data --category tire --sizes 512 --ratios 0.1 \\
        --plain-limit 2000                       # the plain loop on its first 2000 points only, then extrapolated
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import backbones  # noqa: E402
import data  # noqa: E402
import patchcore  # noqa: E402


def same_order(fast: np.ndarray, plain: np.ndarray) -> tuple[bool, int, bool]:
    """(identical, positions that differ, same set) of two selections, over the plain loop's length."""
    fast = fast[:len(plain)]
    return bool(np.array_equal(fast, plain)), int((fast != plain).sum()), set(fast.tolist()) == set(plain.tolist())


def one(args: argparse.Namespace) -> dict:
    """Time the phases of one configuration in this process; return one result row."""
    torch.manual_seed(0)
    device = backbones.pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root, category = args.data_root, args.category
        if root is None:
            root, category = tmp, "weave"
            data.generate_synthetic(tmp, size=args.size, seed=0, n_train=args.n_train, n_test_good=args.n_test,
                                    n_defect=1, categories=("weave",))
        train, test = data.load_category(root, category)
        test = test[:args.n_test]
        s = patchcore.Settings(args.backbone, args.weights, backbones.default_layers(args.backbone), args.size,
                               None, 3, 1024, 1024, args.ratio, False, 9, 0)
        t = {}
        t0 = time.perf_counter()
        features, z = patchcore.extract_features(train, s, device, args.batch_size)
        t["features_s"] = time.perf_counter() - t0
        stats = {}
        t0 = time.perf_counter()
        idx = patchcore.greedy_coreset(z, s.coreset_ratio, s.seed, stats=stats)
        t["fast_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        plain = patchcore.greedy_coreset_plain(z, s.coreset_ratio, s.seed, limit=args.plain_limit)
        t["plain_s"] = (time.perf_counter() - t0) * len(idx) / len(plain)  # extrapolated when limited
        identical, n_diff, same_set = same_order(idx.cpu().numpy(), plain.cpu().numpy())
        t0 = time.perf_counter()
        bank = patchcore.MemoryBank(s, patchcore.NearestNeighbours(features[idx.cpu()].float().numpy(), device))
        t["index_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        patchcore.score(bank, test, device, args.batch_size)
        t["ms_per_image"] = 1000 * (time.perf_counter() - t0) / len(test)
    return {"backbone": args.backbone, "weights": args.weights, "category": category, "size": args.size,
            "ratio": args.ratio, "patches": len(features), "bank": len(bank.nn), **t, "blocks": stats["blocks"],
            "plain_measured": len(plain), "identical": identical, "positions_differing": n_diff,
            "same_set": same_set, "peak_rss_mb": data.peak_rss_mb()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("--data-root", default=None, help="real data in the MVTec layout (default: synthetic weave)")
    p.add_argument("--category", default=None)
    p.add_argument("--sizes", default="256,512")
    p.add_argument("--ratios", default="0.1,0.01")
    p.add_argument("--n-train", type=int, default=40, help="synthetic train/good images")
    p.add_argument("--n-test", type=int, default=8, help="test images scored")
    p.add_argument("--plain-limit", type=int, default=None,
                   help="run the plain loop for this many points only; its time is extrapolated linearly")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--wrn50", action="store_true", help="also benchmark wide_resnet50_2 with random weights")
    p.add_argument("--out", default="runs/bench/patchcore.json")
    # internal: one configuration in a child process
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backbone", default="efficientnet_lite0", help=argparse.SUPPRESS)
    p.add_argument("--weights", default="imagenet", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--ratio", type=float, default=0.1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if (args.data_root is None) != (args.category is None):
        p.error("--data-root and --category go together")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(one(args)))
        return
    configs = [("efficientnet_lite0", "imagenet")] + [("wide_resnet50_2", "none")] * args.wrn50
    rows = []
    print(f"{'backbone':<19}{'size':>5}{'ratio':>6}{'patches':>9}{'bank':>7}{'features s':>11}{'plain s':>10}"
          f"{'fast s':>8}{'speed-up':>9}{'passes plain/fast':>18}{'identical':>10}{'index s':>8}{'ms/image':>9}"
          f"{'peak MB':>8}")
    for backbone, weights in configs:
        for size in map(int, args.sizes.split(",")):
            for ratio in map(float, args.ratios.split(",")):
                cmd = [sys.executable, __file__, "--one", "--backbone", backbone, "--weights", weights,
                       "--size", str(size), "--ratio", str(ratio), "--n-train", str(args.n_train),
                       "--n-test", str(args.n_test), "--batch-size", str(args.batch_size), "--device", args.device]
                cmd += ["--data-root", args.data_root, "--category", args.category] if args.data_root else []
                cmd += ["--plain-limit", str(args.plain_limit)] if args.plain_limit else []
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"error: {backbone} {size} px ratio {ratio} failed: "
                             f"{(out.stderr.strip().splitlines() or ['?'])[-1]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(r)
                partial = r["plain_measured"] < r["bank"]
                plain = f"{'~' if partial else ''}{r['plain_s']:.1f}"  # ~: extrapolated from the measured part
                speed_up = r["plain_s"] / r["fast_s"]
                same = ("yes" if r["identical"] else f"{r['positions_differing']} pos.") + ("*" if partial else "")
                print(f"{backbone:<19}{size:>5}{ratio:>6}{r['patches']:>9}{r['bank']:>7}{r['features_s']:>11.1f}"
                      f"{plain:>10}{r['fast_s']:>8.1f}{speed_up:>8.{0 if speed_up >= 10 else 1}f}x"
                      f"{r['bank']:>11}/{r['blocks']:<6}{same:>10}{r['index_s']:>8.2f}{r['ms_per_image']:>9.0f}"
                      f"{r['peak_rss_mb']:>8.0f}", flush=True)
    if any(r["plain_measured"] < r["bank"] for r in rows):
        print("~ plain loop time extrapolated from its first --plain-limit points; * compared over those points")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    data.write_json(args.out, {"device": str(backbones.pick_device(args.device)), "torch_threads":
                               torch.get_num_threads(), "data": args.data_root or "synthetic", "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
