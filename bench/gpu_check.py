"""GPU check: PatchCore and the classifier give the same scores on the GPU as on the CPU, then WideResNet-50 PatchCore
at 512 px is timed on the GPU with the FAISS GPU index. One table; the exit status is 0 only if every check passes.
Without CUDA it says so in one sentence and exits 1.

    python bench/gpu_check.py                               # about 5 minutes on one GPU
    python bench/gpu_check.py --n-train 40 --n-test 10      # a shorter timing run
    python bench/gpu_check.py --device cpu                  # dry run of the script itself: CPU against CPU
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import backbones  # noqa: E402
import classify  # noqa: E402
import data  # noqa: E402
import metrics  # noqa: E402
import patchcore  # noqa: E402

CPU = torch.device("cpu")
# Tolerances. cuDNN convolutions use TF32 on Ampere and newer GPUs by default (10-bit mantissa inputs), so PatchCore
# features, hence scores, agree with the CPU's to about 1e-3, not 1e-6. The classifier runs in bfloat16 autocast on
# the GPU (8-bit mantissa): log-odds agree to a few hundredths.
SCORE_RTOL = 5e-3      # PatchCore image scores, relative to the largest score
LOG_ODDS_ATOL = 0.1    # classifier log-odds, absolute, plus LOG_ODDS_RTOL * |log-odds|
LOG_ODDS_RTOL = 0.03
AUROC_ATOL = 0.02      # image AUROC, either method


def patchcore_check(root: Path, gpu: torch.device, args) -> list[tuple]:
    """Lite0 PatchCore: one memory bank (fitted on the CPU), scored on both devices; the fast coreset on the GPU
    against the plain loop; returns table rows (check, value, tolerance, ok)."""
    train, test = data.load_category(root, "weave")
    labels = np.array([s.label for s in test])
    s = patchcore.Settings("efficientnet_lite0", "imagenet", backbones.default_layers("efficientnet_lite0"), 128,
                           None, 3, 1024, 1024, 0.1, False, 9, 0)
    bank = patchcore.fit(train, s, CPU, 8)
    cpu_scores = patchcore.score(bank, test, CPU, 8)[0]
    bank_gpu = patchcore.MemoryBank(s, patchcore.NearestNeighbours(bank.nn.vectors(np.arange(len(bank.nn))), gpu))
    gpu_scores = patchcore.score(bank_gpu, test, gpu, 8)[0]
    worst = float(np.abs(gpu_scores - cpu_scores).max() / np.abs(cpu_scores).max())
    auroc = (metrics.image_auroc(labels, cpu_scores), metrics.image_auroc(labels, gpu_scores))
    _, z = patchcore.extract_features(train, s, CPU, 8)
    z = z.to(gpu)
    plain = patchcore.greedy_coreset_plain(z, 0.1, 0).cpu()
    fast = patchcore.greedy_coreset(z, 0.1, 0).cpu()
    differ = int((plain != fast).sum())
    on_gpu = "GPU" if bank_gpu.nn.index is not bank_gpu.nn.cpu else "CPU"
    return [("PatchCore: image scores, GPU vs CPU (max rel. diff)", f"{worst:.1e}", f"<= {SCORE_RTOL}", worst <= SCORE_RTOL),
            ("PatchCore: image AUROC, CPU / GPU", f"{auroc[0]:.4f} / {auroc[1]:.4f}", f"+-{AUROC_ATOL}",
             abs(auroc[0] - auroc[1]) <= AUROC_ATOL),
            ("PatchCore: FAISS index used for the GPU run", on_gpu, "GPU", on_gpu == "GPU" or gpu.type == "cpu"),
            (f"coreset on {gpu.type}: fast vs plain, positions differing of {len(plain)}", str(differ),
             "0 (or swapped ties)", set(plain.tolist()) == set(fast.tolist()))]


def classifier_check(root: Path, gpu: torch.device, args, out: Path) -> list[tuple]:
    """Lite0 classifier trained briefly on the CPU, the same checkpoint scored on both devices (bfloat16 autocast on
    the GPU), and one short training on the GPU to exercise mixed precision; returns table rows."""
    common = ["--data-root", str(root), "--category", "weave", "--backbone", "efficientnet_lite0",
              "--image-size", "128", "--epochs", "2", "--batch-size", "8"]
    classify.main(common + ["--device", "cpu", "--out-dir", str(out / "cpu")])
    ckpt = classify.Checkpoint.load(out / "cpu" / "model.pt")
    _, test = data.load_category(root, "weave")
    d = {}
    for name, device in (("cpu", CPU), ("gpu", gpu)):
        model, cam_layer = ckpt.build(device)
        d[name], maps, _ = classify.predict(model, test, ckpt.backbone, ckpt.image_size, device, 8, cam_layer)
        d[name + "_maps"] = maps
    err = np.abs(d["gpu"] - d["cpu"]) - LOG_ODDS_RTOL * np.abs(d["cpu"])
    corr = float(np.corrcoef(d["cpu_maps"].ravel(), d["gpu_maps"].ravel())[0, 1])
    trained = classify.main(common + ["--device", str(gpu), "--out-dir", str(out / "gpu")])
    return [("classifier: log-odds, GPU vs CPU (max abs. diff)", f"{np.abs(d['gpu'] - d['cpu']).max():.3f}",
             f"<= {LOG_ODDS_ATOL} + {LOG_ODDS_RTOL}|d|", bool((err <= LOG_ODDS_ATOL).all())),
            ("classifier: Grad-CAM maps, GPU vs CPU (correlation)", f"{corr:.4f}", ">= 0.99", corr >= 0.99),
            ("classifier: trained on the GPU (mixed precision), image AUROC", f"{trained['image_auroc']:.3f}",
             "> 0.5", trained["image_auroc"] > 0.5)]


def timing(gpu: torch.device, args) -> list[tuple]:
    """WideResNet-50 (random weights: nothing is downloaded) PatchCore at 512 px, 10 % coreset, on the GPU."""
    with tempfile.TemporaryDirectory() as tmp:
        data.generate_synthetic(tmp, size=512, seed=0, n_train=args.n_train, n_test_good=args.n_test, n_defect=1,
                                categories=("weave",))
        train, test = data.load_category(tmp, "weave")
        test = test[:args.n_test]
        s = patchcore.Settings("wide_resnet50_2", "none", backbones.default_layers("wide_resnet50_2"), 512, None, 3,
                               1024, 1024, 0.1, False, 9, 0)
        if gpu.type == "cuda":
            torch.cuda.reset_peak_memory_stats(gpu)
        t0 = time.perf_counter()
        bank = patchcore.fit(train, s, gpu, 8)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        patchcore.score(bank, test, gpu, 8)
        ms = 1000 * (time.perf_counter() - t0) / len(test)
    peak = torch.cuda.max_memory_allocated(gpu) / 2 ** 20 if gpu.type == "cuda" else float("nan")
    what = f"WRN50 PatchCore 512 px, {len(train)} train images, 10 % coreset ({len(bank.nn)} patches)"
    return [(f"{what}: fit s", f"{fit_s:.1f}", "", None), (f"{what}: ms per test image", f"{ms:.0f}", "", None),
            (f"{what}: GPU peak memory MB", f"{peak:.0f}", "", None)]  # measurements, not checks


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("--device", default="cuda", help="the device compared with the CPU (cpu: a dry run)")
    p.add_argument("--n-train", type=int, default=100, help="synthetic 512 px training images for the timing")
    p.add_argument("--n-test", type=int, default=20, help="test images scored for the timing")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device, so there is nothing to check here; run it on a GPU machine "
                 "(or --device cpu for a dry run of the script).")
    gpu = torch.device(args.device)
    name = torch.cuda.get_device_name(gpu) if gpu.type == "cuda" else "CPU (dry run)"
    print(f"{name}; torch {torch.__version__}; FAISS GPUs: {faiss.get_num_gpus()}; "
          f"TF32 convolutions: {torch.backends.cudnn.allow_tf32}")
    with tempfile.TemporaryDirectory() as tmp:
        root = data.generate_synthetic(Path(tmp) / "data", size=128, seed=0, n_train=30, n_test_good=10, n_defect=6,
                                       categories=("weave",))
        rows = patchcore_check(root, gpu, args) + classifier_check(root, gpu, args, Path(tmp) / "runs")
    rows += timing(gpu, args)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'check':<{width}}  {'value':>16}  {'tolerance':<22}ok")
    for check, value, tolerance, ok in rows:
        print(f"{check:<{width}}  {value:>16}  {tolerance:<22}{'' if ok is None else 'yes' if ok else 'NO'}")
    if any(r[3] is False for r in rows):
        sys.exit("gpu_check: some checks failed (see the table)")


if __name__ == "__main__":
    main()
