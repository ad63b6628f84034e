"""Benchmark PatchCore's phases on synthetic data: feature extraction, coreset, index build, scoring, peak memory.

Each configuration runs in its own process, so its peak RSS is its own. Timings depend on the machine; nothing here
is asserted by the tests.

    python bench/bench_patchcore.py                          # Lite0, 256 and 512 px, coreset 0.1 and 0.01
    python bench/bench_patchcore.py --sizes 128 --ratios 0.1 --n-train 10 --n-test 4   # a quick look
    python bench/bench_patchcore.py --wrn50                  # also the paper's WideResNet-50 (random weights)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import backbones  # noqa: E402
import data  # noqa: E402
import patchcore  # noqa: E402


def one(args: argparse.Namespace) -> dict:
    """Time the phases of one configuration in this process; return one result row."""
    torch.manual_seed(0)
    device = backbones.pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        data.generate_synthetic(tmp, size=args.size, seed=0, n_train=args.n_train, n_test_good=args.n_test,
                                n_defect=1, categories=("weave",))
        train, test = data.load_category(tmp, "weave")
        test = test[:args.n_test]
        s = patchcore.Settings(args.backbone, args.weights, backbones.default_layers(args.backbone), args.size,
                               None, 3, 1024, 1024, args.ratio, False, 9, 0)
        t = {}
        t0 = time.perf_counter()
        features, z = patchcore.extract_features(train, s, device, args.batch_size)
        t["features_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        idx = patchcore.greedy_coreset(z, s.coreset_ratio, s.seed)
        t["coreset_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        bank = patchcore.MemoryBank(s, patchcore.NearestNeighbours(features[idx].float().numpy(), device))
        t["index_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        patchcore.score(bank, test, device, args.batch_size)
        t["ms_per_image"] = 1000 * (time.perf_counter() - t0) / len(test)
    return {"backbone": args.backbone, "weights": args.weights, "size": args.size, "ratio": args.ratio,
            "patches": len(features), "bank": len(bank.nn), **t, "peak_rss_mb": data.peak_rss_mb()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("--sizes", default="256,512")
    p.add_argument("--ratios", default="0.1,0.01")
    p.add_argument("--n-train", type=int, default=40, help="synthetic train/good images")
    p.add_argument("--n-test", type=int, default=8, help="test images scored")
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
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(one(args)))
        return
    configs = [("efficientnet_lite0", "imagenet")] + [("wide_resnet50_2", "none")] * args.wrn50
    rows = []
    header = (f"{'backbone':<20}{'size':>5}{'ratio':>6}{'patches':>9}{'bank':>7}{'features s':>11}"
              f"{'coreset s':>10}{'index s':>8}{'ms/image':>9}{'peak MB':>8}")
    print(header)
    for backbone, weights in configs:
        for size in map(int, args.sizes.split(",")):
            for ratio in map(float, args.ratios.split(",")):
                cmd = [sys.executable, __file__, "--one", "--backbone", backbone, "--weights", weights,
                       "--size", str(size), "--ratio", str(ratio), "--n-train", str(args.n_train),
                       "--n-test", str(args.n_test), "--batch-size", str(args.batch_size), "--device", args.device]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"error: {backbone} {size} px ratio {ratio} failed: {out.stderr.strip().splitlines()[-1]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(r)
                print(f"{backbone:<20}{size:>5}{ratio:>6}{r['patches']:>9}{r['bank']:>7}{r['features_s']:>11.1f}"
                      f"{r['coreset_s']:>10.1f}{r['index_s']:>8.2f}{r['ms_per_image']:>9.0f}{r['peak_rss_mb']:>8.0f}",
                      flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    data.write_json(args.out, {"device": str(backbones.pick_device(args.device)), "torch_threads":
                               torch.get_num_threads(), "n_train": args.n_train, "n_test": args.n_test, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
