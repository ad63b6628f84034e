"""Benchmark predict.py (issue 33): images per second of scoring a folder with a saved PatchCore model folder, against
the run's own scoring time (patchcore.py's ms_per_image on the same images), at each image size, on the CPU or a GPU.

Per size: a synthetic weave at that size, PatchCore fitted with test/ present (so the run times its own scoring,
reading + network + search + maps, after its fit has warmed the network), then predict.py twice over the same test
images (reading and converting + the same scoring + overlays + predictions.csv and index.html): "cold", as a fresh
process meets a small folder (the network's first calls at this shape included), and "warm", the same process again,
as every batch after the first of a large folder. predict.py times its overlays itself; warm predict.py minus its
overlays is what it adds to the run's own scoring. Timings depend on the machine and on what else runs on it;
nothing here is asserted by the tests.

    python bench/bench_predict.py --sizes 256                               # Lite0, CPU, ~2 minutes
    python bench/bench_predict.py --sizes 256,512 --backbone wide_resnet50_2 --device cuda
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import patchcore  # noqa: E402
import predict  # noqa: E402
import synthetic  # noqa: E402


def one_size(size: int, args: argparse.Namespace, tmp: Path) -> dict:
    """Fit at `size`, then predict the test images; the run's and predict.py's seconds per image."""
    root = synthetic.generate_synthetic(tmp / f"data{size}", size=size, seed=0, n_train=args.n_train,
                                        n_test_good=args.n_test_good, n_defect=args.n_defect)
    common = ["--backbone", args.backbone, "--device", args.device, "--batch-size", str(args.batch_size)]
    run = patchcore.main(["--data-root", str(root), "--category", "weave", "--image-size", str(size), *common,
                          "--out-dir", str(tmp / f"run{size}")])
    out = {"image_size": size, "backbone": args.backbone, "device": args.device,
           "run_ms_per_image": run["ms_per_image"]}
    for when in ("cold", "warm"):
        t0 = time.perf_counter()
        result = predict.main(["--model", str(tmp / f"run{size}"), "--images", str(root / "weave" / "test"),
                               "--out", str(tmp / f"pred{size}"), "--device", args.device, "--overwrite",
                               "--batch-size", str(args.batch_size)])
        out[f"{when}_seconds_with_loading"] = time.perf_counter() - t0  # model loading included
        out[f"{when}_ms_per_image"] = 1000 * result["seconds_per_image"]
        out[f"{when}_overlay_ms_per_image"] = 1000 * result["overlay_seconds_per_image"]
    out["images"] = len(result["rows"])
    out["warm_images_per_second"] = 1000 / out["warm_ms_per_image"]
    out["added_ms_per_image"] = out["warm_ms_per_image"] - out["warm_overlay_ms_per_image"] - run["ms_per_image"]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("--sizes", default="256,512", help="image sizes, comma-separated")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-train", type=int, default=20)
    p.add_argument("--n-test-good", type=int, default=24)
    p.add_argument("--n-defect", type=int, default=10, help="per defect type (4 types)")
    p.add_argument("--out", default=None, help="JSON file for the results (default: print only)")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            results.append(one_size(size, args, Path(tmp)))
    print(f"\n{'size':>6}{'images':>8}{'run ms/img':>12}{'cold ms/img':>13}{'warm ms/img':>13}"
          f"{'overlays ms':>13}{'images/s':>10}{'added ms':>10}")
    for r in results:
        print(f"{r['image_size']:>6}{r['images']:>8}{r['run_ms_per_image']:>12.1f}{r['cold_ms_per_image']:>13.1f}"
              f"{r['warm_ms_per_image']:>13.1f}{r['warm_overlay_ms_per_image']:>13.1f}"
              f"{r['warm_images_per_second']:>10.2f}{r['added_ms_per_image']:>10.1f}")
    if args.out:
        data.write_json(args.out, {"results": results, "run_info": data.run_info()})
    return results


if __name__ == "__main__":
    main()
