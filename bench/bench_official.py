"""Our PatchCore beside the official amazon-science/patchcore-inspection code, run unmodified, on the same images.

Each side runs in a process of its own (so its peak RSS is its own) with the same data loader (data.py's resize and
normalisation), the same backbone module (EfficientNet-Lite0 `_blocks.4` + `_blocks.10` by default), the same
settings, and both are scored by metrics.py. The official code is not part of this project: fetch it yourself.

    git clone https://github.com/amazon-science/patchcore-inspection /tmp/official && pip install timm
    python bench/bench_official.py --official /tmp/official --data-root ../shared/data --category tire
    python bench/bench_official.py --official /tmp/official --data-root /tmp/s --category weave --image-size 128

Seeds already in --out from a run with the same settings are read back, not run again, and kept.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import backbones  # noqa: E402
import data  # noqa: E402
import metrics  # noqa: E402

TARGETS = {"fit_seconds": 0.5, "ms_per_image": 0.5, "peak_rss_mb": 0.5}  # ours / official at most (issue 9)
AUROC_SLACK = 0.005  # ours may be at most this much below the official image and pixel AUROC


class WithAnomalyFlag(torch.utils.data.Dataset):
    """Our dataset's items plus the key the official predict() reads the labels from."""

    def __init__(self, base: data.MVTecDataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        return {**item, "is_anomaly": item["label"]}


def welch_interval(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(mean(a) - mean(b), its 95 % Welch t interval) of two independent sets of runs (nan for one run each)."""
    from scipy import stats
    a, b = np.asarray(a), np.asarray(b)
    diff = float(a.mean() - b.mean())
    if min(len(a), len(b)) < 2:
        return diff, float("nan"), float("nan")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return diff, diff, diff
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    half = float(stats.t.ppf(0.975, df) * np.sqrt(va + vb))
    return diff, diff - half, diff + half


def loader(samples, args) -> torch.utils.data.DataLoader:
    """The same loader for both sides: resized to --image-size square, normalised for the backbone."""
    ds = data.MVTecDataset(samples, args.image_size, *backbones.normalization(args.backbone))
    return torch.utils.data.DataLoader(WithAnomalyFlag(ds), batch_size=args.batch_size, num_workers=0)


def ours(args, train, test) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(fit s, score s, image scores, maps) of this project's patchcore.py."""
    import patchcore
    s = patchcore.Settings(args.backbone, "imagenet", backbones.default_layers(args.backbone), args.image_size, None,
                           3, 1024, 1024, args.coreset_ratio, False, 9, args.seed)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    bank = patchcore.fit(train, s, device, args.batch_size)
    t1 = time.perf_counter()
    scores, maps, _ = patchcore.score(bank, test, device, args.batch_size)
    return t1 - t0, time.perf_counter() - t1, scores, maps


def official(args, train, test) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(fit s, score s, image scores, maps) of the official code, through its own API, unmodified."""
    sys.path.insert(0, str(Path(args.official) / "src"))  # its package is also called patchcore
    import patchcore.common
    import patchcore.patchcore
    import patchcore.sampler
    import patchcore.utils
    device = torch.device(args.device)
    patchcore.utils.fix_seeds(args.seed, device)
    t0 = time.perf_counter()  # from here as ours: building the backbone (loading its weights) counts as fitting
    model = backbones.build_model(args.backbone, "imagenet")
    model.name = args.backbone
    sampler = patchcore.sampler.ApproximateGreedyCoresetSampler(args.coreset_ratio, device)
    nn_method = patchcore.common.FaissNN(False, torch.get_num_threads())  # one FAISS thread per core, as ours
    pc = patchcore.patchcore.PatchCore(device)
    pc.load(backbone=model, layers_to_extract_from=list(backbones.default_layers(args.backbone)), device=device,
            input_shape=(3, args.image_size, args.image_size), pretrain_embed_dimension=1024,
            target_embed_dimension=1024, patchsize=3, featuresampler=sampler, anomaly_score_num_nn=1,
            nn_method=nn_method)
    pc.fit(loader(train, args))
    t1 = time.perf_counter()
    scores, maps, _, _ = pc.predict(loader(test, args))
    return t1 - t0, time.perf_counter() - t1, np.array(scores), np.stack(maps)


def one_side(args) -> dict:
    """Fit, score and evaluate one side in this process; the result row."""
    train, test = data.load_category(args.data_root, args.category)
    fit_s, score_s, scores, maps = (ours if args.side == "ours" else official)(args, train, test)
    labels = np.array([s.label for s in test])
    masks = np.stack([data.mask_to_tensor(data.read_mask(s, data.read_image(s.path).size), args.image_size)[0].numpy()
                      for s in test])  # (N, S, S) as the maps
    m = metrics.compute_metrics(labels, scores, masks, maps, np.array([s.has_mask for s in test]))
    return {"side": args.side, "fit_seconds": fit_s, "ms_per_image": 1000 * score_s / len(test),
            "peak_rss_mb": data.peak_rss_mb(), "image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"],
            "aupro": m["aupro"], "n_train": len(train), "n_test": len(test)}


def saved_runs(args) -> dict[str, dict[int, dict]]:
    """The rows per side and seed already in --out from a run with the same settings (the bench resumes)."""
    saved = {"official": {}, "ours": {}}
    if Path(args.out).is_file():
        previous = json.loads(Path(args.out).read_text())
        ignore = {"seeds", "out", "side", "seed"}
        if all(previous["args"].get(k) == v for k, v in vars(args).items() if k not in ignore):
            for side in saved:
                saved[side] = {r["seed"]: r for r in previous["runs"][side]}
    return saved


def kept(runs: dict[str, list[dict]], saved: dict[str, dict[int, dict]]) -> dict[str, list[dict]]:
    """This run's rows plus the saved rows of seeds it did not ask for, by seed: a shorter rerun loses nothing."""
    return {side: sorted(rows + [r for seed, r in saved[side].items() if seed not in {x["seed"] for x in rows}],
                         key=lambda r: r["seed"]) for side, rows in runs.items()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("--official", required=True, help="a checkout of amazon-science/patchcore-inspection")
    p.add_argument("--data-root", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--backbone", choices=backbones.BACKBONES, default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=256, help="resized square, no crop")
    p.add_argument("--coreset-ratio", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9",
                   help="coreset seeds: at 1 %% the random projection and starting points move image AUROC by a "
                        "few hundredths (sd 0.026 on tire), so both sides are compared on their mean over seeds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/bench/official.json")
    p.add_argument("--side", choices=("ours", "official"), default=None, help=argparse.SUPPRESS)  # a child process
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # the child's seed
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.side:
        print(json.dumps(one_side(args)))
        return
    if not (Path(args.official) / "src" / "patchcore" / "patchcore.py").is_file():
        sys.exit(f"error: no official PatchCore code in {args.official} (expected src/patchcore/patchcore.py; "
                 "git clone https://github.com/amazon-science/patchcore-inspection)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    saved = saved_runs(args)
    runs = {"official": [], "ours": []}
    for seed in [int(x) for x in args.seeds.split(",")]:
        for side in runs:  # one process per side and seed: its peak RSS is its own
            if seed in saved[side]:
                runs[side].append(saved[side][seed])
            else:
                cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--side", side,
                       "--seed", str(seed)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"error: the {side} run failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
                runs[side].append({**json.loads(out.stdout.strip().splitlines()[-1]), "seed": seed})
                data.write_json(args.out, {"args": vars(args), "runs": kept(runs, saved)})  # a rerun resumes here
            r = runs[side][-1]
            name = side + (" (saved)" if seed in saved[side] else "")
            print(f"seed {seed} {name:<17} fit {r['fit_seconds']:6.1f} s  {r['ms_per_image']:6.1f} ms/image  "
                  f"peak {r['peak_rss_mb']:6.0f} MB  image AUROC {r['image_auroc']:.4f}  pixel AUROC "
                  f"{r['pixel_auroc']:.4f}  AUPRO {r['aupro']:.4f}", flush=True)
    o, u = ({k: float(np.mean([r[k] for r in runs[side]])) for k in runs[side][0] if k != "side"} for side in runs)
    print(f"\n{args.category}, {args.backbone}, {args.image_size} px, no crop, coreset {args.coreset_ratio}, "
          f"{int(o['n_train'])} training / {int(o['n_test'])} test images, {torch.get_num_threads()} threads, "
          f"mean over seeds {args.seeds}")
    print(f"{'':<14}{'official':>10}{'ours':>10}{'ours/official':>15}{'target':>10}")
    ok = True
    for key, target in TARGETS.items():
        ratio = u[key] / o[key]
        ok &= ratio <= target
        print(f"{key:<14}{o[key]:>10.1f}{u[key]:>10.1f}{ratio:>15.2f}{'<= ' + str(target):>10}")
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        diff, low, high = welch_interval([r[key] for r in runs["ours"]], [r[key] for r in runs["official"]])
        ok &= key == "aupro" or diff >= -AUROC_SLACK
        print(f"{key:<14}{o[key]:>10.4f}{u[key]:>10.4f}{diff:>+15.4f}"
              f"{'' if key == 'aupro' else '>= -' + str(AUROC_SLACK):>10}   95 % interval [{low:+.4f}, {high:+.4f}]")
    print("all targets met" if ok else "some targets missed")
    data.write_json(args.out, {"args": vars(args), "runs": kept(runs, saved), "official": o, "ours": u,
                               "targets_met": ok})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
