"""GPU check of the study's defaults (issue 17): a short evaluate.py study (every scenario, EfficientNet-B1 classifier,
WideResNet-50 PatchCore, synthetic 512 px images) run on the GPU and on the CPU, both in strict float32, must give the
same images and the same scores within float32 rounding. Then, measured only: the drift of --precision mixed
(TF32/bfloat16) against float32 on the GPU, and epoch time, fit time, ms per image and GPU memory (FAISS included).
Tables on stdout and in runs/gpu_check/gpu_check.{json,md}; exit status 1 if a strict check fails or CUDA is unusable.

    python bench/gpu_check.py                                                # on the GPU machine, over 9 minutes
    python bench/gpu_check.py --timings-only                                 # the timings alone, no strict checks
    python bench/gpu_check.py --device cpu --image-size 64 --n-images 16    # dry run, CPU against CPU, < 1 min
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import backbones  # noqa: E402
import classify  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import patchcore  # noqa: E402
import synthetic  # noqa: E402

CPU = torch.device("cpu")
STUDY_IMAGES = dict(n_train=8, n_test_good=4, n_defect=4)  # per folder: pools of 2 per test folder, k <= 2
STUDY_TYPES = 2  # defect types kept: the fewest that unseen-type and hard need (4 would double their runs)
STUDY_FLAGS = ["--categories", "weave", "--scenarios", ",".join(evaluate.STUDY_SCENARIOS), "--seeds", "0",
               "--epochs", "1", "--k-values", "1", "--few-shot-k", "1,2", "--unseen-k", "1", "--general-m", "1",
               "--hard-m", "1", "--weights", "none"]
# Tolerances of the strict checks, from float32 against float64 on a CPU at 512 px (this study's data and weights):
# WideResNet-50 PatchCore features differ by 4e-7 relative, image scores by 1.2e-6 of the largest score, and the
# coreset keeps the same patches (11% of the positions are swapped ties); EfficientNet-B1 after its epoch: log-odds
# (-1.5 to 79) by 8e-5, 1e-6 of the largest, Grad-CAM maps by 3e-6 (2.8e-5 untrained) of their largest value. GPU
# against CPU is two such errors plus cuDNN's kernel choice (benchmark=True may pick Winograd or FFT kernels), so
# each tolerance leaves ~100x headroom, yet stays below what TF32 (10-bit mantissa, ~5e-4 per operation) would give,
# so TF32 or autocast leaking into a float32 run fails the check.
SCORE_RTOL = 1e-4                          # PatchCore image scores, relative to the largest score of the run
LOG_ODDS_ATOL, LOG_ODDS_RTOL = 1e-4, 1e-4  # classifier log-odds: |d_gpu - d_cpu| <= atol + rtol |d_cpu|
MAP_RTOL = 1e-3                            # Grad-CAM maps, relative to the largest value (a sum of terms that cancel)


# ----------------------------------------------------------------------------------------------------------------
# Data and weights
# ----------------------------------------------------------------------------------------------------------------
def study_data(root: Path, size: int) -> Path:
    """The study's synthetic tree: weave with 8 train/good, 4 test/good and 4 images of each of 2 defect types."""
    synthetic.generate_synthetic(root, size=size, seed=0, categories=("weave",), **STUDY_IMAGES)
    for t in synthetic.SYNTH_DEFECTS[STUDY_TYPES:]:
        shutil.rmtree(root / "weave" / "test" / t), shutil.rmtree(root / "weave" / "ground_truth" / t)
    return root


def calibrated_weights(backbone: str, samples: list[data.Sample], image_size: int, path: Path) -> Path:
    """A state-dict file of `backbone` with random weights and batch-norm statistics measured on `samples` (every
    image of the study: calibrated on train/good alone, a defect image drives the log-odds to +-500 at 64 px, where
    float32 itself is no longer reproducible).

    Why not --weights none: EfficientNet's activations vanish in eval mode (the fan-out init of a depthwise conv
    scales the variance by ~2/C, and batch norm's running statistics start at mean 0, variance 1), so every image
    gets the head's bias as log-odds (measured: -0.00709 on every image, Grad-CAM maps ~1e-16) and the comparison
    would pass whatever the GPU computes. One pass in train mode with cumulative averages (momentum None) gives
    unit-scale activations, as pretrained weights would, with nothing to download. Both devices load this file.
    """
    torch.manual_seed(0)
    model = backbones.build_model(backbone, "none").eval()  # eval: no dropout, no stochastic depth
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
            m.train()  # normalises by the batch's statistics and keeps them
    batch = next(iter(data.make_loader(samples, image_size, *backbones.normalization(backbone), len(samples))))
    with torch.no_grad():
        model(batch["image"])  # (N, 3, S, S): every running statistic becomes this batch's
    torch.save(model.state_dict(), path)
    return path


def run_study(root: Path, out: Path, device: str, precision: str, weights: Path, args) -> Path:
    """One evaluate.py study of every scenario, one seed, one epoch, from scratch (evaluate resumes finished runs)."""
    shutil.rmtree(out, ignore_errors=True)
    print(f"\n##### study on {device}, --precision {precision} -> {out}", flush=True)
    evaluate.main(["--data-root", str(root), *STUDY_FLAGS, "--image-size", str(args.image_size),
                   "--classifier-backbone", args.classifier_backbone, "--patchcore-backbone", args.patchcore_backbone,
                   "--classifier-weights", str(weights), "--batch-size", str(args.batch_size), "--device", device,
                   "--precision", precision, "--workers", str(args.workers), "--out-dir", str(out)])
    return out


# ----------------------------------------------------------------------------------------------------------------
# Comparisons
# ----------------------------------------------------------------------------------------------------------------
def is_patchcore(run: str) -> bool:
    return "patchcore" in Path(run).parts


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to the largest |a|."""
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))


def compare_studies(first: Path, second: Path) -> tuple[list[str], list[str], dict[str, float]]:
    """(run folders, files whose image lists differ, {run: max score difference}) of two studies: PatchCore's relative
    to its largest score, the classifier's in defect probability (scores.csv's: log-odds beyond ~23 all read 1.0)."""
    runs = sorted({str(p.parent.relative_to(d)) for d in (first, second) for p in d.rglob("scores.csv")})
    differ, diffs = [], {}
    for run in runs:
        for name in ("scores.csv", "heldout_scores.csv"):
            a, b = first / run / name, second / run / name
            if a.is_file() != b.is_file():
                differ.append(f"{run}/{name}")
            if not (a.is_file() and b.is_file()):
                continue
            (pa, la, _, sa), (pb, lb, _, sb) = data.read_scores(a), data.read_scores(b)
            if pa != pb or not np.array_equal(la, lb):
                differ.append(f"{run}/{name}")
            elif name == "scores.csv":
                diffs[run] = rel_diff(sa, sb) if is_patchcore(run) else float(np.abs(sa - sb).max())
    return runs, differ, diffs


def rescore(cpu_dir: Path, root: Path, gpu: torch.device, args) -> dict:
    """The CPU study's saved models (model.pt, memory_bank) scored again on the CPU and the GPU in float32 and on the
    GPU in mixed precision; returns the worst differences over all runs."""
    train, test = data.load_category(root, "weave")
    by_rel = {s.rel: s for s in train + test}  # scores.csv names images relative to the category
    w = dict(log_odds=0.0, log_odds_excess=-np.inf, maps=0.0, pc=0.0, log_odds_mixed=0.0, pc_mixed=0.0, search_gpu=True)
    torch.backends.cudnn.benchmark = gpu.type == "cuda"  # as in the GPU study (classify.run sets it)
    for run in sorted(str(p.parent.relative_to(cpu_dir)) for p in cpu_dir.rglob("scores.csv")):
        paths, _, _, cpu_scores = data.read_scores(cpu_dir / run / "scores.csv")
        samples = [by_rel[p] for p in paths]
        if is_patchcore(run):
            bank = patchcore.MemoryBank.load(cpu_dir / run, gpu)
            w["search_gpu"] &= gpu.type == "cpu" or bank.nn.engine in ("torch-cuda", "faiss-gpu")
            scored = {}
            for precision in ("float32", "mixed"):
                backbones.set_precision(precision)
                scored[precision] = patchcore.score(bank, samples, gpu, args.batch_size, workers=args.workers)[0]
            w["pc"] = max(w["pc"], rel_diff(cpu_scores, scored["float32"]))
            w["pc_mixed"] = max(w["pc_mixed"], rel_diff(scored["float32"], scored["mixed"]))
            continue
        ckpt = classify.Checkpoint.load(cpu_dir / run / "model.pt")
        out = {}
        for name, device, precision in (("cpu", CPU, "float32"), ("gpu", gpu, "float32"), ("mixed", gpu, "mixed")):
            backbones.set_precision(precision)
            model, cam_layer = ckpt.build(device)
            out[name] = classify.predict(model, samples, ckpt.backbone, ckpt.image_size, device, args.batch_size,
                                         cam_layer, precision, args.workers)[:2]  # (N,) log-odds, (N, S, S) maps
        (d, maps), (d_gpu, maps_gpu) = out["cpu"], out["gpu"]
        w["log_odds"] = max(w["log_odds"], float(np.abs(d_gpu - d).max()))
        w["log_odds_excess"] = max(w["log_odds_excess"], float((np.abs(d_gpu - d) - LOG_ODDS_RTOL * np.abs(d)).max()))
        w["maps"] = max(w["maps"], rel_diff(maps, maps_gpu))
        w["log_odds_mixed"] = max(w["log_odds_mixed"], float(np.abs(out["mixed"][0] - d_gpu).max()))
    backbones.set_precision("float32")
    return w


def strict_rows(cpu_dir: Path, gpu_dir: Path, w: dict, device: torch.device) -> list[dict]:
    """The table of the GPU against the CPU: strict checks (pass/FAIL) and one measurement."""
    runs, differ, diffs = compare_studies(cpu_dir, gpu_dir)
    pc = max((v for r, v in diffs.items() if is_patchcore(r)), default=np.nan)
    cl = max((v for r, v in diffs.items() if not is_patchcore(r)), default=np.nan)

    def row(what, value, tol, ok):
        result = "measured" if ok is None else "pass" if ok else "FAIL"
        return dict(what=what, value=value, tolerance=tol, result=result)
    return [
        row(f"image lists of the {len(runs)} run folders (scores.csv, heldout_scores.csv)", f"{len(differ)} differ",
            "0 differ", bool(runs) and not differ),
        row("PatchCore fitted and scored on each device: image scores (rel. to largest)", pc, f"{SCORE_RTOL:g}",
            pc <= SCORE_RTOL),
        row("PatchCore, the CPU's memory banks scored on the GPU: image scores (rel.)", w["pc"], f"{SCORE_RTOL:g}",
            w["pc"] <= SCORE_RTOL),
        row("PatchCore: the nearest-neighbour search ran on the GPU (torch or FAISS)", "CPU run" if device.type == "cpu"
            else "yes" if w["search_gpu"] else "no", "yes", w["search_gpu"]),
        row("classifier, the CPU's model.pt scored on the GPU: |log-odds diff|", w["log_odds"],
            f"{LOG_ODDS_ATOL:g} + {LOG_ODDS_RTOL:g}|d|", w["log_odds_excess"] <= LOG_ODDS_ATOL),
        row("classifier, the CPU's model.pt scored on the GPU: Grad-CAM maps (rel.)", w["maps"], f"{MAP_RTOL:g}",
            w["maps"] <= MAP_RTOL),
        # Not a check: training draws dropout and stochastic-depth masks from the CUDA generator on the GPU and from
        # the CPU generator on the CPU, so the two devices train different models from the same seed.
        row("classifier trained on each device (different dropout draws): |p(defect) diff|", cl, "-", None),
    ]


def auroc(run_dir: Path) -> float | None:
    """The run's image AUROC from its metrics.json."""
    return json.loads((run_dir / "metrics.json").read_text()).get("image_auroc")


def drift_rows(gpu_dir: Path, mixed_dir: Path, w: dict) -> list[dict]:
    """The table of --precision mixed against float32 on the GPU, per run folder of the study, then the same models."""
    _, _, diffs = compare_studies(gpu_dir, mixed_dir)
    rows = [dict(what=f"{r}: {'max rel. score diff' if is_patchcore(r) else 'max |p(defect) diff|'}", value=v,
                 auroc_float32=auroc(gpu_dir / r), auroc_mixed=auroc(mixed_dir / r)) for r, v in diffs.items()]
    return rows + [dict(what="classifier, the same model.pt scored mixed vs float32: max |log-odds diff|",
                        value=w["log_odds_mixed"], auroc_float32=None, auroc_mixed=None),
                   dict(what="PatchCore, the same memory bank scored TF32 vs float32: max rel. score diff",
                        value=w["pc_mixed"], auroc_float32=None, auroc_mixed=None)]


# ----------------------------------------------------------------------------------------------------------------
# Timings (measurements): synchronised, after one untimed warm-up; GPU memory from torch and from the driver
# ----------------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory(device: torch.device) -> tuple[float, float]:
    """(MB in use on the device by every allocator: torch's cache, FAISS, CUDA contexts (total - free from the driver);
    torch's peak allocated MB since the last reset). FAISS allocates with cudaMalloc, outside torch's allocator, so
    only the first number includes its index and its temporary memory (up to 1.5 GiB, reserved when the GPU index is
    made). It is a snapshot: FAISS's transient allocations beyond that reserve, if any, are not seen."""
    if device.type != "cuda":
        return np.nan, np.nan
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 2 ** 20, torch.cuda.max_memory_allocated(device) / 2 ** 20


def fresh(device: torch.device) -> None:
    """Release what earlier phases left (torch's cache, FAISS indexes) and restart torch's peak counter."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_classifier(root: Path, weights: Path, device: torch.device, args) -> list[tuple[str, float]]:
    """Epoch seconds of classify.fit (without and with loader workers) and Grad-CAM ms per image."""
    train, test = data.load_category(root, "weave")
    n_defects = max(1, args.n_images // 8)
    samples = train[:args.n_images - n_defects] + [s for s in test if s.label == 1][:n_defects]
    val = [s for s in test if s.label == 0][:2]
    rows = []
    for workers in sorted({0, args.workers}):
        a = classify.parse_args(["--data-root", str(root), "--category", "weave", "--backbone",
                                 args.classifier_backbone, "--weights", str(weights), "--image-size",
                                 str(args.image_size), "--epochs", "2", "--batch-size", str(args.batch_size),
                                 "--precision", args.precision, "--workers", str(workers)])
        backbones.set_precision(a.precision)
        torch.backends.cudnn.benchmark = device.type == "cuda"  # as classify.run
        model, cam_layer = backbones.classifier(a.backbone, a.weights, num_classes=2)
        model.to(device, memory_format=classify.MEMORY_FORMAT)
        fresh(device)
        # Epoch 1 is the untimed warm-up (cuDNN's kernel timing, the image cache, worker start). fit's epoch timer
        # stops after the validation log-odds (2 images) are copied to the host, i.e. after the GPU has finished.
        _, history = classify.fit(model, samples, val, a, device)
        used, peak = memory(device)
        what = f"classifier {a.backbone} {a.image_size} px, {len(samples)} images, batch {a.batch_size}"
        rows += [(f"{what}, {workers} workers: epoch s", history[-1]["seconds"])]
    classify.warm_up(model, cam_layer, a.batch_size, a.image_size, device, a.precision)
    sync(device)
    t0 = time.perf_counter()
    classify.predict(model, test, a.backbone, a.image_size, device, a.batch_size, cam_layer, a.precision, a.workers)
    sync(device)
    ms = 1000 * (time.perf_counter() - t0) / len(test)
    return rows + [(f"classifier: Grad-CAM scoring ms per image ({len(test)} images)", ms),
                   ("classifier training: torch peak allocated MB", peak),
                   ("classifier training: device memory in use MB (driver)", used)]


def time_patchcore(root: Path, device: torch.device, args) -> list[tuple[str, float]]:
    """PatchCore (the study's settings, random weights) fit seconds, ms per image, device memory with FAISS."""
    train, test = data.load_category(root, "weave")
    a = patchcore.parse_args(["--data-root", str(root), "--category", "weave", "--backbone", args.patchcore_backbone,
                              "--weights", "none", "--image-size", str(args.image_size)])
    s = patchcore.Settings(a.backbone, a.weights, backbones.default_layers(a.backbone), a.image_size, a.center_crop,
                           a.patch_size, a.pretrain_dim, a.target_dim, a.coreset_ratio, a.reweight, a.reweight_k,
                           a.seed, a.search, patchcore.NPROBE)
    backbones.set_precision(args.precision)
    warm = patchcore.fit(train[:args.batch_size], s, device, args.batch_size, args.workers)  # untimed warm-up
    patchcore.score(warm, test[:args.batch_size], device, args.batch_size, workers=args.workers)
    del warm
    fresh(device)
    sync(device)
    before, _ = memory(device)
    t0 = time.perf_counter()
    bank = patchcore.fit(train, s, device, args.batch_size, args.workers)
    sync(device)
    fit_s = time.perf_counter() - t0
    after_fit, peak_fit = memory(device)
    fresh(device)
    t0 = time.perf_counter()
    patchcore.score(bank, test, device, args.batch_size, workers=args.workers)
    sync(device)
    ms = 1000 * (time.perf_counter() - t0) / len(test)
    after_score, peak_score = memory(device)
    what = f"PatchCore {s.backbone} {s.image_size} px"
    return [(f"{what}: fit s ({len(train)} images, {len(bank.nn)}-patch bank)", fit_s),
            (f"{what}: ms per test image ({len(test)} images)", ms),
            ("PatchCore: device memory in use MB before fit (context, cached models)", before),
            ("PatchCore: device memory in use MB after fit (+ features, FAISS index)", after_fit),
            ("PatchCore: device memory in use MB after scoring", after_score),
            ("PatchCore: torch peak allocated MB, fit / scoring", f"{peak_fit:.0f} / {peak_score:.0f}"),
            ("PatchCore: what searched (search_engine), at GFLOP/s", f"{bank.nn.engine}, {bank.nn.gflops() or 0:.0f}")]


# ----------------------------------------------------------------------------------------------------------------
def fmt(v) -> str:
    return "-" if v is None else f"{v:.2e}" if isinstance(v, float) and abs(v) < 0.01 and v != 0 else \
        f"{v:.4g}" if isinstance(v, float) else str(v)


def tables(result: dict) -> tuple[str, str]:
    """The three tables, aligned for the terminal and as Markdown."""
    parts = [("Strict checks: GPU vs CPU, --precision float32", ["what", "max difference", "tolerance", "result"],
              [[r["what"], fmt(r["value"]), r["tolerance"], r["result"]] for r in result["strict"]]),
             ("Measurement: --precision mixed vs float32 on the GPU", ["what", "max difference", "AUROC float32",
                                                                       "AUROC mixed"],
              [[r["what"], fmt(r["value"]), fmt(r["auroc_float32"]), fmt(r["auroc_mixed"])] for r in result["drift"]]),
             (f"Measurement: timings and memory (--precision {result['args']['precision']})", ["what", "value"],
              [[what, fmt(v)] for what, v in result["timing"]])]
    text, md = [], [f"# GPU check\n\n{result['device']}; FAISS {faiss.__version__}\n\n`{result['command']}`\n"]
    for title, header, body in parts:
        widths = [max(len(x) for x in col) for col in zip(header, *body)]
        text += [f"\n{title}", "  ".join(h.ljust(w) for h, w in zip(header, widths))]
        text += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in body]
        md += [f"\n## {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in body]
    return "\n".join(text), "\n".join(md) + "\n"


def command(args: argparse.Namespace) -> str:
    """The command line that reruns this check, every flag spelled out."""
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None]
    return "python bench/gpu_check.py " + " ".join(flags)


def save(result: dict, out: Path) -> str:
    """Write gpu_check.json and gpu_check.md (after every phase: a run cut short keeps what it found); returns the
    aligned tables."""
    result["passed"] = all(r["result"] != "FAIL" for r in result["strict"])
    text, md = tables(result)
    out.mkdir(parents=True, exist_ok=True)
    data.write_json(out / "gpu_check.json", result)
    (out / "gpu_check.md.tmp").write_text(md)
    os.replace(out / "gpu_check.md.tmp", out / "gpu_check.md")
    return text


def run(args: argparse.Namespace) -> dict:
    """Run the studies, compare them, time both methods, write the tables; returns the result."""
    if args.device.startswith("cuda") and backbones.cuda_problem() is not None:
        raise data.DataError(f"gpu_check needs a CUDA GPU, but {backbones.cuda_problem()}; run it on the GPU "
                             f"machine, or pass --device cpu for a dry run of the script")
    device = backbones.pick_device(args.device)
    info = backbones.describe_device(backbones.device_info(device, faiss_gpu=faiss.get_num_gpus() > 0))
    print(info)
    out = Path(args.out_dir)
    result = dict(device=info, command=command(args), args=vars(args), strict=[], drift=[], timing=[])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        # Data: the study's tree, calibrated classifier weights, the timing tree
        root = study_data(work / "data", args.image_size)
        train, test = data.load_category(root, "weave")
        weights = calibrated_weights(args.classifier_backbone, train + test, args.image_size,
                                     work / f"{args.classifier_backbone}_bn_calibrated.pt")
        timing_root = synthetic.generate_synthetic(work / "timing", size=args.image_size, seed=1,
                                                   n_train=args.n_images, n_test_good=args.n_images // 4,
                                                   n_defect=max(1, args.n_images // 8), categories=("weave",))
        # Strict: the study on the GPU (first: a broken GPU path fails in seconds) and on the CPU, the CPU's models
        # scored again on both devices
        dirs = {}
        studies = () if args.timings_only else (("gpu", args.device, "float32"), ("cpu", "cpu", "float32"),
                                                ("gpu-mixed", args.device, "mixed"))
        for name, dev, precision in studies:
            t0 = time.perf_counter()
            dirs[name] = run_study(root, work / f"study-{name}", dev, precision, weights, args)
            result["timing"].append((f"the study on {dev}, --precision {precision}: wall s", time.perf_counter() - t0))
            if name == "cpu":
                w = rescore(dirs["cpu"], root, device, args)
                result["strict"] = strict_rows(dirs["cpu"], dirs["gpu"], w, device)
                save(result, out)
        # Measured: mixed against float32 on the GPU; timings and memory
        if dirs:
            result["drift"] = drift_rows(dirs["gpu"], dirs["gpu-mixed"], w)
            save(result, out)
        result["timing"] += time_classifier(timing_root, weights, device, args)
        save(result, out)
        result["timing"] += time_patchcore(timing_root, device, args)
    print(save(result, out))
    print(f"\nwrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("--device", default="cuda", help="the device compared with the CPU: cuda, cuda:N (cpu: a dry run)")
    p.add_argument("--image-size", type=int, default=512, help="of every synthetic image, study and timings")
    p.add_argument("--n-images", type=int, default=64, help="timing set: classifier epoch and PatchCore fit images")
    p.add_argument("--classifier-backbone", choices=backbones.BACKBONES, default="efficientnet_b1")
    p.add_argument("--patchcore-backbone", choices=backbones.BACKBONES, default="wide_resnet50_2")
    p.add_argument("--batch-size", type=int, default=8, help="both methods, study and timings")
    p.add_argument("--precision", choices=backbones.PRECISIONS, default="mixed", help="of the timings (the study's "
                   "default); the strict comparison always runs float32")
    p.add_argument("--workers", type=int, default=data.default_workers(),
                   help="loader workers of the studies and of the timings (which also time 0)")
    p.add_argument("--timings-only", action="store_true", help="skip the three studies (the strict checks and the "
                   "drift of mixed precision): only the timings and memory")
    p.add_argument("--work-dir", default=None, help="keep the data and the three studies here (default: a temp dir)")
    p.add_argument("--out-dir", default="runs/gpu_check", help="gpu_check.json and gpu_check.md")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        result = run(args)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    if not result["passed"]:
        sys.exit(f"gpu_check: a strict check failed (see the table in {Path(args.out_dir) / 'gpu_check.md'})")
    return result


if __name__ == "__main__":
    main()
