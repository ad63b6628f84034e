"""Benchmark PatchCore's phases, and the fast greedy coreset beside the plain loop, on synthetic or real data.

For every (image size, coreset ratio) it extracts the features once, then times the fast coreset (patchcore.py's)
and the plain loop (the readable reference: one pass over all N points per chosen point), says whether they chose
the same points in the same order, then builds the index and scores a few test images. Each configuration runs in
its own process, so its peak RSS is its own. Timings depend on the machine; nothing here is asserted by the tests.
With --search-only it times the nearest-neighbour search alone instead (issue 16): exact (torch matrix products, and
FAISS's IndexFlatL2: issue 35) against IVF at each --nprobes value, on the test images' patches, and how far each
one's neighbours and scores are from the exact torch search's.

    python bench/bench_patchcore.py                                        # synthetic weave, 256 and 512 px
    python bench/bench_patchcore.py --data-root ../shared/data --category tire --sizes 256 --ratios 0.01,0.1
    python bench/bench_patchcore.py --data-root ../shared/data --category tire --sizes 512 --ratios 0.1 \\
        --plain-limit 2000                       # the plain loop on its first 2000 points only, then extrapolated
    python bench/bench_patchcore.py --search-only --sizes 256 --ratios 0.1       # exact vs IVF search, synthetic
    python bench/bench_patchcore.py --search-only --data-root ../shared/data --category tire \
        --bank runs/patchcore/tire/<tag> --n-test 32     # a saved memory bank, searched with 32 test images' patches
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import backbones  # noqa: E402
import data  # noqa: E402
import patchcore  # noqa: E402
import synthetic  # noqa: E402


def same_order(fast: np.ndarray, plain: np.ndarray) -> tuple[bool, int, bool]:
    """(identical, positions that differ, same set) of two selections, over the plain loop's length."""
    fast = fast[:len(plain)]
    return bool(np.array_equal(fast, plain)), int((fast != plain).sum()), set(fast.tolist()) == set(plain.tolist())


def category_data(args: argparse.Namespace, tmp: str) -> tuple[list, list, str]:
    """(train, the first --n-test test samples, category): the real category, or a synthetic weave made in tmp."""
    root, category = args.data_root, args.category
    if root is None:
        root, category = tmp, "weave"
        synthetic.generate_synthetic(tmp, size=args.size, seed=0, n_train=args.n_train, n_test_good=args.n_test,
                                     n_defect=1, categories=("weave",))
    train, test = data.load_category(root, category)
    return train, test[:args.n_test], category


def one(args: argparse.Namespace) -> dict:
    """Time the phases of one configuration in this process; return one result row."""
    torch.manual_seed(0)
    device = backbones.pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        train, test, category = category_data(args, tmp)
        s = patchcore.Settings(args.backbone, args.weights, backbones.default_layers(args.backbone), args.size,
                               None, 3, 1024, 1024, args.ratio, False, 9, 0)
        t = {}
        t0 = time.perf_counter()
        features, z = patchcore.extract_features(train, s, device, args.batch_size)
        t["features_s"] = time.perf_counter() - t0
        stats = {}
        t0 = time.perf_counter()
        idx = patchcore.greedy_coreset_fast(z, s.coreset_ratio, s.seed, stats=stats)
        t["fast_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        plain = patchcore.greedy_coreset(z, s.coreset_ratio, s.seed, limit=args.plain_limit)
        t["plain_s"] = (time.perf_counter() - t0) * len(idx) / len(plain)  # extrapolated when limited
        identical, n_diff, same_set = same_order(idx.cpu().numpy(), plain.cpu().numpy())
        t0 = time.perf_counter()
        bank = patchcore.MemoryBank(s, patchcore.NearestNeighbours(features[idx.cpu()].float().numpy(), device))
        t["index_s"] = time.perf_counter() - t0
        t0, laps = time.perf_counter(), patchcore.Laps()
        patchcore.score(bank, test, device, args.batch_size, laps=laps)
        t["ms_per_image"] = 1000 * (time.perf_counter() - t0) / len(test)
        t["ms_by_phase"] = {k: 1000 * v / len(test) for k, v in laps.seconds.items()}  # read, features, search, maps
    return {"backbone": args.backbone, "weights": args.weights, "category": category, "size": args.size,
            "ratio": args.ratio, "patches": len(features), "bank": len(bank.nn), **t, "blocks": stats["blocks"],
            "plain_measured": len(plain), "identical": identical, "positions_differing": n_diff,
            "same_set": same_set, "peak_rss_mb": data.peak_rss_mb()}


# ---- --search-only: the nearest-neighbour search alone, exact vs IVF (issue 16) -----------------------------------
def test_patches(s: patchcore.Settings, test: list, device: torch.device, batch_size: int) -> list[np.ndarray]:
    """The test images' patch features, one array per batch as score() searches them: [(B, H*W, D)]."""
    extractor = patchcore.extractor_for(s.backbone, s.weights, s.layers, device)
    loader = data.make_loader(test, s.image_size, *backbones.normalization(s.backbone), batch_size, s.center_crop,
                              device=device)
    return [patchcore.embed(extractor, batch["image"].to(device), s)[0].cpu().numpy() for batch in loader]


def timed_search(nn: patchcore.NearestNeighbours, batches: list[np.ndarray]) -> tuple[float, np.ndarray, np.ndarray]:
    """(seconds, distances (Q,), indices (Q,)) of every test patch's nearest bank row, one search per batch as in
    score(), after one untimed search (thread pool, GPU kernels)."""
    nn.search(batches[0].reshape(-1, batches[0].shape[-1]), 1)
    t0 = time.perf_counter()
    found = [nn.search(b.reshape(-1, b.shape[-1]), 1) for b in batches]  # [((B*H*W, 1), (B*H*W, 1))]
    seconds = time.perf_counter() - t0
    return seconds, np.concatenate([d[:, 0] for d, _ in found]), np.concatenate([i[:, 0] for _, i in found])


def compare(dist: np.ndarray, idx: np.ndarray, exact_dist: np.ndarray, exact_idx: np.ndarray, n_images: int) -> dict:
    """How far a search is from the exact one, patch by patch (Q,) and image by image: the image score is the
    largest patch distance (s* of Eq. 6), so a missed neighbour matters when it is the worst patch's."""
    rel = np.abs(dist - exact_dist) / np.maximum(exact_dist, 1e-12)  # (Q,)
    image, image_exact = dist.reshape(n_images, -1).max(1), exact_dist.reshape(n_images, -1).max(1)  # (n,), (n,)
    image_rel = np.abs(image - image_exact) / np.maximum(image_exact, 1e-12)  # (n,)
    return {"same_neighbour": float((idx == exact_idx).mean()), "max_patch_rel_err": float(rel.max()),
            "max_image_rel_err": float(image_rel.max()), "median_image_rel_diff": float(np.median(image_rel))}


def nprobe_values(spec: str, n_lists: int) -> list[int]:
    """'1,2,4,8,16,all' -> the values up to n_lists, 'all' being n_lists (IVF then compares with every row)."""
    values = {n_lists if v.strip() == "all" else int(v) for v in spec.split(",")}
    return sorted(v for v in values if 1 <= v <= n_lists)


def search_one(args: argparse.Namespace) -> dict:
    """Exact and IVF search alone, on one memory bank (fitted here, or --bank) and the test images' patches."""
    torch.manual_seed(0)
    device = backbones.pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        train, test, category = category_data(args, tmp)
        if args.bank:
            bank = patchcore.MemoryBank.load(args.bank, device)
            s, vectors = bank.settings, bank.nn.vectors(np.arange(len(bank.nn)))  # (M, D)
        else:
            s = patchcore.Settings(args.backbone, args.weights, backbones.default_layers(args.backbone), args.size,
                                   None, 3, 1024, 1024, args.ratio, False, 9, 0)
            features, z = patchcore.extract_features(train, s, device, args.batch_size)  # (N, D), (N, 128)
            idx = patchcore.greedy_coreset_fast(z, s.coreset_ratio, s.seed)  # (M,)
            vectors = features[idx.cpu()].float().numpy()  # (M, D)
        batches = test_patches(s, test, device, args.batch_size)
    searches = []
    for engine in patchcore.EXACT_ENGINES:  # torch first: the reference of every row
        t0 = time.perf_counter()
        exact = patchcore.NearestNeighbours(vectors, device, engine=engine)
        build_s = time.perf_counter() - t0
        seconds, dist, idx = timed_search(exact, batches)
        if engine == "torch":
            exact_dist, exact_idx = dist, idx
        searches.append({"search": f"exact ({exact.engine})", "nprobe": None, "ms_per_image": 1000 * seconds / len(test),
                         "build_s": build_s, "gflops": exact.gflops(), **compare(dist, idx, exact_dist, exact_idx, len(test))})
    t0 = time.perf_counter()
    ivf = patchcore.NearestNeighbours(vectors, device, "ivf", seed=s.seed)  # k-means on the bank: its build time
    build_s = time.perf_counter() - t0
    for nprobe in nprobe_values(args.nprobes, ivf.n_lists):
        ivf.set_nprobe(nprobe)
        seconds, dist, idx = timed_search(ivf, batches)
        searches.append({"search": "ivf", "nprobe": nprobe, "ms_per_image": 1000 * seconds / len(test),
                         "build_s": build_s, **compare(dist, idx, exact_dist, exact_idx, len(test))})
    return {"backbone": s.backbone, "weights": s.weights, "category": category, "size": s.image_size,
            "ratio": s.coreset_ratio, "bank": len(vectors), "lists": ivf.n_lists, "images": len(test),
            "query_patches": len(exact_dist), "searches": searches}


def print_search(r: dict) -> None:
    """One configuration's exact-vs-IVF table."""
    print(f"{r['backbone']} {r['size']} px, ratio {r['ratio']}: {r['bank']} patches in the bank, {r['lists']} IVF "
          f"lists, {r['query_patches']} query patches of {r['images']} images")
    print(f"{'search':<20}{'nprobe':>7}{'ms/image':>10}{'GFLOP/s':>8}{'x exact':>8}{'same NN %':>10}{'max patch err %':>16}"
          f"{'max image err %':>16}{'median image diff %':>20}{'build s':>8}")
    exact_ms = r["searches"][0]["ms_per_image"]
    for x in r["searches"]:
        gflops = f"{x['gflops']:.0f}" if x.get("gflops") else "-"
        print(f"{x['search']:<20}{x['nprobe'] or '-':>7}{x['ms_per_image']:>10.1f}{gflops:>8}"
              f"{x['ms_per_image'] / exact_ms:>8.2f}"
              f"{100 * x['same_neighbour']:>10.2f}{100 * x['max_patch_rel_err']:>16.3f}"
              f"{100 * x['max_image_rel_err']:>16.3f}{100 * x['median_image_rel_diff']:>20.4f}{x['build_s']:>8.2f}",
              flush=True)


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
    p.add_argument("--search-only", action="store_true",
                   help="time the nearest-neighbour search alone: exact vs IVF at each --nprobes value")
    p.add_argument("--nprobes", default="1,2,4,8,16,32,all", help="with --search-only; all: every IVF list")
    p.add_argument("--bank", default=None,
                   help="with --search-only: a saved memory_bank (or run) folder instead of fitting one per size/ratio")
    p.add_argument("--out", default=None, help="default: runs/bench/patchcore.json, with --search-only "
                                               "runs/bench/patchcore_search.json")
    # internal: one configuration in a child process
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backbone", default="efficientnet_lite0", help=argparse.SUPPRESS)
    p.add_argument("--weights", default="imagenet", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--ratio", type=float, default=0.1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if (args.data_root is None) != (args.category is None):
        p.error("--data-root and --category go together")
    if args.bank and not (args.search_only and args.data_root):
        p.error("--bank goes with --search-only and the --data-root and --category of its test images")
    args.out = args.out or f"runs/bench/patchcore{'_search' if args.search_only else ''}.json"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(search_one(args) if args.search_only else one(args)))
        return
    configs = [("efficientnet_lite0", "imagenet")] + [("wide_resnet50_2", "none")] * args.wrn50
    rows = []
    if not args.search_only:
        print(f"{'backbone':<19}{'size':>5}{'ratio':>6}{'patches':>9}{'bank':>7}{'features s':>11}{'plain s':>10}"
              f"{'fast s':>8}{'speed-up':>9}{'passes plain/fast':>18}{'identical':>10}{'index s':>8}{'ms/image':>9}"
              f"{'peak MB':>8}")
    grid = [(backbone, weights, size, ratio) for backbone, weights in configs
            for size in map(int, args.sizes.split(",")) for ratio in map(float, args.ratios.split(","))]
    for backbone, weights, size, ratio in grid[:1] if args.bank else grid:  # a saved bank: its own size and ratio
        cmd = [sys.executable, __file__, "--one", "--backbone", backbone, "--weights", weights,
               "--size", str(size), "--ratio", str(ratio), "--n-train", str(args.n_train),
               "--n-test", str(args.n_test), "--batch-size", str(args.batch_size), "--device", args.device]
        cmd += ["--data-root", args.data_root, "--category", args.category] if args.data_root else []
        cmd += ["--plain-limit", str(args.plain_limit)] if args.plain_limit else []
        cmd += ["--search-only", "--nprobes", args.nprobes] if args.search_only else []
        cmd += ["--bank", args.bank] if args.bank else []
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"error: {backbone} {size} px ratio {ratio} failed: "
                     f"{(out.stderr.strip().splitlines() or ['?'])[-1]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        if args.search_only:
            print_search(r)
            continue
        partial = r["plain_measured"] < r["bank"]
        plain = f"{'~' if partial else ''}{r['plain_s']:.1f}"  # ~: extrapolated from the measured part
        speed_up = r["plain_s"] / r["fast_s"]
        same = ("yes" if r["identical"] else f"{r['positions_differing']} pos.") + ("*" if partial else "")
        print(f"{backbone:<19}{size:>5}{ratio:>6}{r['patches']:>9}{r['bank']:>7}{r['features_s']:>11.1f}"
              f"{plain:>10}{r['fast_s']:>8.1f}{speed_up:>8.{0 if speed_up >= 10 else 1}f}x"
              f"{r['bank']:>11}/{r['blocks']:<6}{same:>10}{r['index_s']:>8.2f}{r['ms_per_image']:>9.0f}"
              f"{r['peak_rss_mb']:>8.0f}", flush=True)
        print("    ms per test image: " + ", ".join(f"{k} {v:.1f}" for k, v in r["ms_by_phase"].items()), flush=True)
    if not args.search_only and any(r["plain_measured"] < r["bank"] for r in rows):
        print("~ plain loop time extrapolated from its first --plain-limit points; * compared over those points")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    data.write_json(args.out, {"device": str(backbones.pick_device(args.device)), "torch_threads":
                               torch.get_num_threads(), "faiss": faiss.__version__, "faiss_threads":
                               faiss.omp_get_max_threads(), "data": args.data_root or "synthetic", "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
