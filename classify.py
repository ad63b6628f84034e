"""The supervised side of the study: fine-tune an ImageNet-pretrained CNN as a normal-vs-defect image classifier.

Trains on train/good plus the few defect images a split allows, picks the epoch and a deployable threshold on
training-side validation images, then scores the evaluation images (defect probability + Grad-CAM map). With
--synthetic cutpaste, CutPaste defects made from the normal images (cutpaste.py) join the defect class, so a split
with no labelled anomaly at all (splits.py --scenario general --k 0) can train a classifier too, and every image is
also scored as the CutPaste paper scores it: the Mahalanobis distance of the network's pooled features to a Gaussian
fitted on the training normals (density_scores.csv beside scores.csv).

    python synthetic.py --out /tmp/s --size 128
    python classify.py --data-root /tmp/s --category weave --backbone efficientnet_lite0 --image-size 128 --epochs 5
    python splits.py --data-root /tmp/s --category weave --scenario general --k 0 --out /tmp/g0.json  # no label
    python classify.py --data-root /tmp/s --category weave --backbone efficientnet_lite0 --image-size 128 --epochs 5 \\
        --split /tmp/g0.json --synthetic cutpaste
    python classify.py --data-root ~/mvtec --category bottle        # EfficientNet-B1 at 512 px, on a GPU
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from sklearn.covariance import LedoitWolf
from torch import nn
from tqdm import tqdm

import backbones
import cutpaste
import data
import splits
from metrics import compute_metrics, image_auroc, normal_threshold, operating_point

VAL_DEFECT_FRACTION = 0.25  # 1 of every 4 training defects of a type validates (int((n + 1) / 4): 3 -> 1, 7 -> 2)
VAL_GOOD_FRACTION = 0.1     # share of train/good held out as extra validation normals
MAX_ROTATION = 5.0          # degrees. Geometric augmentations stay small: only a 3% border strip and the corners
MAX_SHIFT = 0.03            # a 5-degree turn cuts leave the frame, so a defect is hardly ever moved out of view
JITTER = 0.1                # brightness and contrast factors in [1 - JITTER, 1 + JITTER]; no hue/saturation change,
                            # since several MVTec defect types *are* a colour change ("color", cable_swap)
# Categories whose mirror image is a defect: metal_nut's "flip" type is a mirrored nut, cable_swap swaps the colour
# order, a mirrored screw has a left-hand thread, transistor/capsule/pill carry orientation or print. No flips there.
MIRROR_SENSITIVE = ("metal_nut", "cable", "screw", "transistor", "capsule", "pill")
BN_MOMENTUM = 0.1  # the Lite models' TensorFlow-style 0.01 lets BN running stats lag far behind during a short fine-tune
# Convolutions run about 20% faster in channels-last layout on a CPU (oneDNN) and use tensor cores on a GPU;
# the model and every batch are converted, the maths is the same.
MEMORY_FORMAT = torch.channels_last
TABLE_KEYS = ("image_auroc", "average_precision", "pixel_auroc", "aupro", "f1_max", "threshold",
              "recall_at_threshold", "fpr_at_threshold", "best_epoch", "val_auroc", "train_seconds", "ms_per_image",
              "n_train_images", "n_train_defects", "n_train_synthetic",
              "params_millions")  # the final table printed by run()


# ----------------------------------------------------------------------------------------------------------------
# 1. Which images train, validate and evaluate
# ----------------------------------------------------------------------------------------------------------------
def load_split(args: argparse.Namespace, test: Sequence[data.Sample]) -> dict:
    """The split file given by --split, or the default: make_split(..., "all-types", k=None), i.e. the whole pool
    (half of every test folder, rounded down) may train, the other half is evaluated."""
    if args.split is None:
        return splits.make_split(test, args.category, args.seed, "all-types", k=None)
    split = splits.read_split(args.split)
    if split["category"] != args.category:
        raise data.DataError(f"split file {args.split} is for category '{split['category']}', not '{args.category}'")
    return split


def validation_split(train_good: Sequence[data.Sample], train_defects: Sequence[data.Sample],
                     heldout_good: Sequence[data.Sample], seed: int) -> tuple[list[data.Sample], list[data.Sample]]:
    """(fit, val): val = the split's held-out good pool + a seeded 10% of train/good + ~1 in 4 defects of each type.

    Only training-side images: the evaluation images are never seen before the final scoring. A type's last
    training defect is never taken, so every type the split lists is trained on. If the 1-in-4 rule gives no
    validation defect, one is taken from the largest type that has 2 or more; if none has (a single training
    defect, or k=1 per type), val has no real defect: without --synthetic cutpaste, the last epoch is kept (see
    select_epoch); with it, the synthetic validation defects choose the epoch.
    """
    fit, val = [], list(heldout_good)
    rng = np.random.default_rng([seed, *b"val/good"])
    order = rng.permutation(len(train_good))
    n_good = max(1, round(len(train_good) * VAL_GOOD_FRACTION)) if len(train_good) >= 2 else 0
    val += [train_good[i] for i in sorted(order[:n_good])]
    fit += [train_good[i] for i in sorted(order[n_good:])]
    by_type = {}
    for t in sorted({s.defect_type for s in train_defects}):
        group = [s for s in train_defects if s.defect_type == t]
        rng = np.random.default_rng([seed, *f"val/{t}".encode()])  # one generator per type, as splits.pool_and_eval
        by_type[t] = [group[i] for i in rng.permutation(len(group))]
    n_val = {t: int((len(g) + 1) * VAL_DEFECT_FRACTION) for t, g in by_type.items()}
    largest = max(by_type, key=lambda t: len(by_type[t]), default=None)  # the first (sorted) type on ties
    if sum(n_val.values()) == 0 and largest is not None and len(by_type[largest]) >= 2:
        n_val[largest] = 1
    for t, group in by_type.items():
        val += group[:n_val[t]]
        fit += group[n_val[t]:]
    if not any(s.label == 0 for s in val):
        raise data.DataError("no normal image is left for validation (need 2+ images in train/good or a held-out "
                             "good pool in the split); the threshold is set on held-out normal images")
    return fit, val


class Augment:
    """Label-preserving augmentation of a PIL image: resize to the model size, random flips, a small rotation and
    shift (reflect-padded, so no black corner appears), mild brightness and contrast jitter.

    A pure function of (seed, epoch, index): each call seeds its own generator with the three, rather than drawing
    from one stream, whose draws would depend on which loader worker process augments which image in which order.
    The epoch and index come with every image from data.EpochSampler, so any number of workers gives the same images.
    """

    def __init__(self, image_size: int, flips: bool, seed: int):
        self.image_size, self.flips, self.seed = image_size, flips, seed

    def __call__(self, image: Image.Image, epoch: int, index: int) -> Image.Image:
        rng = np.random.default_rng([self.seed, *b"augment", epoch, index])
        u = rng.random(7).tolist()  # 7 uniform numbers in [0, 1), one per decision
        s = self.image_size
        image = image.resize((s, s), Image.BILINEAR)  # augment at the model's size: cheap, and the same for any input
        if self.flips and u[0] < 0.5:
            image = TF.hflip(image)
        if self.flips and u[1] < 0.5:
            image = TF.vflip(image)
        pad = math.ceil(s * (MAX_SHIFT + math.sin(math.radians(MAX_ROTATION))))  # covers what rotation+shift expose
        image = TF.pad(image, [pad], padding_mode="reflect")  # (s, s) -> (s + 2 pad, s + 2 pad)
        shift = [round((2 * u[3] - 1) * MAX_SHIFT * s), round((2 * u[4] - 1) * MAX_SHIFT * s)]
        image = TF.affine(image, angle=(2 * u[2] - 1) * MAX_ROTATION, translate=shift, scale=1.0, shear=[0.0],
                          interpolation=TF.InterpolationMode.BILINEAR)
        image = TF.center_crop(image, [s, s])  # -> (s, s)
        image = TF.adjust_brightness(image, 1 + (2 * u[5] - 1) * JITTER)
        return TF.adjust_contrast(image, 1 + (2 * u[6] - 1) * JITTER)


def synthetic_items(samples: Sequence[data.Sample], mode: str) -> list[data.Sample]:
    """--synthetic cutpaste: one defect-labelled copy of every normal image of samples, in order ([] for none). Each
    copy becomes a new synthetic defect every epoch (SyntheticDefects); it has no mask."""
    if mode == "none":
        return []
    return [replace(s, label=1, defect_type="cutpaste") for s in samples if s.label == 0]


class SyntheticDefects:
    """The images of a list `real + synthetic_items(real)`: items from index `first` on become synthetic defects.

    Each item first passes through `augment` (the label-preserving Augment for training, None for validation), then,
    if synthetic, through cutpaste.synthetic_defect at the model's input size. Like Augment, a pure function of
    (seed, epoch, index): the same images for any number of loader workers. Validation loaders never set an epoch
    (epoch 0), so the synthetic validation defects are the same every epoch, and differ from every training one.
    """

    def __init__(self, image_size: int, seed: int, first: int, augment: Augment | None = None):
        self.image_size, self.seed, self.first, self.augment = image_size, seed, first, augment

    def __call__(self, image: Image.Image, epoch: int, index: int) -> Image.Image:
        if self.augment is not None:
            image = self.augment(image, epoch, index)
        if index < self.first:
            return image
        image = image.resize((self.image_size, self.image_size), Image.BILINEAR)  # a copy if Augment already resized
        return cutpaste.synthetic_defect(image, self.seed, epoch, index).image


# ----------------------------------------------------------------------------------------------------------------
# 2. The model: a pretrained trunk with a fresh 2-class head; the checkpoint that rebuilds it
# ----------------------------------------------------------------------------------------------------------------
def head_of(model: nn.Module) -> nn.Module:
    """The fresh classification head: the last nn.Linear of the network (fc, _fc or classifier[-1])."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


@dataclass
class Checkpoint:
    """A trained classifier: how to rebuild it, its weights and its deployable threshold (model.pt); a CutPaste run's
    Gaussian density too (the mean and precision of its training normals' pooled features, and its threshold)."""
    backbone: str
    image_size: int
    threshold: float
    best_epoch: int
    state_dict: dict
    density_mean: torch.Tensor | None = None  # (F,)
    density_precision: torch.Tensor | None = None  # (F, F)
    density_threshold: float | None = None

    def save(self, path: Path) -> None:
        torch.save({k: getattr(self, k) for k in self.__dataclass_fields__}, path)

    @classmethod
    def load(cls, path: str | Path) -> "Checkpoint":
        try:
            return cls(**torch.load(path, map_location="cpu", weights_only=True))
        except (OSError, RuntimeError, TypeError) as e:
            raise data.DataError(f"cannot read classifier checkpoint {path}: {e}") from None

    def build(self, device: torch.device) -> tuple[nn.Module, nn.Module]:
        """(model in eval mode on device, its Grad-CAM layer)."""
        model, cam_layer = backbones.classifier(self.backbone, "none", num_classes=2)
        model.load_state_dict(self.state_dict)
        return model.to(device, memory_format=MEMORY_FORMAT).eval(), cam_layer


def amp_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype: None (float32) on the CPU or with --precision float32; on a GPU, bfloat16 where it computes
    in bfloat16 natively (Ampere and later), else float16 (with loss scaling). including_emulation=False: torch's
    default also counts GPUs that only emulate bfloat16 (Volta, Turing; slower than float32), which left the
    float16 branch unused."""
    if device.type != "cuda" or precision == "float32":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(device: torch.device, precision: str = "mixed"):
    """Mixed precision on CUDA (amp_dtype); full float32 on the CPU or with --precision float32. The head computes in
    float32 either way (backbones.Float32Linear), so the log-odds are not rounded to the autocast dtype."""
    dtype = amp_dtype(device, precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# 3. Training: class-weighted cross-entropy, AdamW, linear warm-up then cosine decay, best epoch on validation
# ----------------------------------------------------------------------------------------------------------------
def class_weights(labels: Sequence[int]) -> torch.Tensor:
    """Inverse-frequency weights (2,), N / (2 N_c): both classes contribute equally to the loss."""
    counts = torch.bincount(torch.as_tensor(labels), minlength=2).double()  # (2,)
    return (counts.sum() / (2 * counts)).float()


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear warm-up to 1 over warmup_steps, then a cosine decay towards 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def train_epoch(model: nn.Module, loader, optimizer, scheduler, scaler, weights: torch.Tensor,
                device: torch.device, desc: str, freeze_trunk: bool, precision: str = "mixed") -> tuple[float, float]:
    """One pass over the training images; returns the mean class-weighted loss and the seconds spent waiting for
    images (reading, augmenting, batching: with no worker process, all of it happens in this loop)."""
    model.train(not freeze_trunk)  # linear probe: the trunk stays in eval mode (BN statistics, no dropout)
    total, n, waited = 0.0, 0, 0.0
    t0 = time.perf_counter()
    for batch in tqdm(loader, desc=desc, disable=None, leave=False):
        waited += time.perf_counter() - t0
        images = batch["image"].to(device, memory_format=MEMORY_FORMAT, non_blocking=True)  # (B, 3, S, S)
        labels = batch["label"].to(device, non_blocking=True)  # (B,)
        with autocast(device, precision):
            logits = model(images)  # (B, 2)
        # Imbalance: class-weighted cross-entropy (weights N / (2 N_c)), summed and divided by the batch size.
        # PyTorch's weighted "mean" would divide by the batch's weight sum, which undoes the weighting in a batch
        # of normals only -- frequent here, with ~1 defect per 8 normals. We weight rather than oversample so that
        # the few defect images are not repeated many times an epoch (they would be memorised, augmentations aside).
        loss = F.cross_entropy(logits.float(), labels, weight=weights, reduction="sum") / len(labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total, n = total + loss.item() * len(labels), n + len(labels)  # .item() waits for the step to finish
        t0 = time.perf_counter()
    return total / n, waited


def select_epoch(history: list[dict]) -> int:
    """Index of the best epoch: highest validation AUROC, ties broken by lower validation loss, then the later epoch.
    Without a validation defect (a single training defect) AUROC is undefined: the last epoch is kept."""
    if history[-1]["val_auroc"] is None:
        return len(history) - 1
    return max(range(len(history)), key=lambda i: (history[i]["val_auroc"], -history[i]["val_loss"], i))


def validate(model: nn.Module, val_items: Sequence[data.Sample], args: argparse.Namespace, device: torch.device,
             augment=None) -> tuple[float, float | None]:
    """(validation loss, validation AUROC) of the model on the validation images (real, and with --synthetic their
    fixed synthetic defects through `augment`): the loss balanced over the two classes, the AUROC None without a
    validation defect. CE of a 2-class softmax is softplus(-d) for a defect and softplus(d) for a normal image."""
    labels = np.array([s.label for s in val_items])  # (N_val,)
    d, _, _ = predict(model, val_items, args.backbone, args.image_size, device, args.batch_size,
                      precision=args.precision, workers=args.workers, augment=augment)  # (N_val,) log-odds
    ce = np.logaddexp(0, np.where(labels == 1, -d, d))  # (N_val,)
    loss = float(np.mean([ce[labels == c].mean() for c in (0, 1) if (labels == c).any()]))
    return loss, image_auroc(labels, d) if labels.any() else None


def fit(model: nn.Module, fit_samples: Sequence[data.Sample], val_samples: Sequence[data.Sample],
        args: argparse.Namespace, device: torch.device) -> tuple[dict, list[dict]]:
    """Fine-tune (or linear-probe) the model; returns the state dict of the best epoch and the per-epoch history.

    --synthetic cutpaste: every normal fit image also trains as a new synthetic defect each epoch, and every
    validation normal validates as one fixed synthetic defect too (SyntheticDefects), beside the real images."""
    mean, std = backbones.normalization(args.backbone)
    flips = args.flips == "both" or (args.flips == "auto" and args.category not in MIRROR_SENSITIVE)
    augment = Augment(args.image_size, flips, args.seed)
    train_items = [*fit_samples, *synthetic_items(fit_samples, args.synthetic)]  # fit_samples alone with none
    if len(train_items) > len(fit_samples):
        augment = SyntheticDefects(args.image_size, args.seed, len(fit_samples), augment)
    val_items = [*val_samples, *synthetic_items(val_samples, args.synthetic)]
    val_augment = SyntheticDefects(args.image_size, args.seed, len(val_samples)) \
        if len(val_items) > len(val_samples) else None
    loader = data.make_loader(train_items, args.image_size, mean, std, args.batch_size, augment=augment,
                              shuffle=True, seed=args.seed, cache=True, device=device, workers=args.workers)
    weights = class_weights([s.label for s in train_items]).to(device)
    if args.freeze_trunk:
        model.requires_grad_(False)
        head_of(model).requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one CUDA kernel updates every parameter (instead of several per tensor); torch's default elsewhere
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay,
                                  fused=True if device.type == "cuda" else None)
    total_steps = args.epochs * len(loader)
    warmup_steps = min(args.warmup_epochs * len(loader), total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))
    # float16 needs loss scaling against underflow; bfloat16 and float32 do not (the scaler is then a no-op).
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype(device, args.precision) == torch.float16)
    history, best_state, best = [], None, -1
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        loader.sampler.set_epoch(epoch)  # this epoch's shuffle and augmentations (data.EpochSampler)
        loss, read = train_epoch(model, loader, optimizer, scheduler, scaler, weights, device,
                                 f"epoch {epoch}/{args.epochs}", args.freeze_trunk, args.precision)
        t1 = time.perf_counter()
        val_loss, val_auroc = validate(model, val_items, args, device, val_augment)
        t2 = time.perf_counter()
        history.append({"epoch": epoch, "loss": loss, "val_loss": val_loss, "val_auroc": val_auroc,
                        "lr": optimizer.param_groups[0]["lr"], "seconds": t2 - t0,
                        "read_seconds": read, "validation_seconds": t2 - t1})
        if select_epoch(history) == len(history) - 1:  # this epoch is the best so far: keep its weights
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best = epoch
        auroc = "n/a" if val_auroc is None else f"{val_auroc:.4f}"
        print(f"epoch {epoch:>3}/{args.epochs}  loss {loss:.4f}  val_loss {val_loss:.4f}  val_auroc {auroc}  "
              f"{history[-1]['seconds']:.1f} s{'  *' if best == epoch else ''}")
    return best_state, history


# ----------------------------------------------------------------------------------------------------------------
# 4. Scoring: defect probability and Grad-CAM map (Selvaraju et al., ICCV 2017) of every image
# ----------------------------------------------------------------------------------------------------------------
def grad_cam(model: nn.Module, cam_layer: nn.Module, images: torch.Tensor,
             precision: str = "mixed") -> tuple[torch.Tensor, torch.Tensor]:
    """Log-odds of the defect class (B,) and Grad-CAM maps (B, S, S) at the images' size.

    Grad-CAM of the log-odds d = z_defect - z_good (the logit of the equivalent 1-logit model):
    alpha_k = mean_ij dd/dA_kij (Eq. 1), map = ReLU(sum_k alpha_k A_k) (Eq. 2), upsampled bilinearly.
    Scaling: none per image. With global average pooling and a linear head, sum_ij sum_k alpha_k A_kij is exactly
    d minus the bias, so every pixel is in log-odds units, comparable across images as pixel AUROC and AUPRO need
    (per-image min-max normalisation would light up every good image). Good images have mostly negative
    contributions and so maps near zero.
    """
    kept = {}

    def hook(module, inputs, output):
        kept["A"] = output.detach().requires_grad_(True)  # a leaf: the backward pass stops here
        return kept["A"]

    handle = cam_layer.register_forward_hook(hook)
    try:
        with torch.enable_grad(), autocast(images.device, precision):
            logits = model(images)  # (B, 2)
        d = logits[:, 1].float() - logits[:, 0].float()  # (B,)
        # In eval mode every image's d depends only on its own activations, so one backward of the sum gives all.
        grads, = torch.autograd.grad(d.sum(), kept["A"])  # (B, C, h, w)
    finally:
        handle.remove()
    A = kept["A"].detach().float()
    alpha = grads.float().mean(dim=(2, 3), keepdim=True)  # (B, C, h, w) -> (B, C, 1, 1)
    cam = F.relu((alpha * A).sum(dim=1, keepdim=True))  # (B, C, h, w) -> (B, 1, h, w)
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)  # (B, 1, S, S)
    return d.detach(), cam[:, 0]  # (B,), (B, S, S)


def predict(model: nn.Module, samples: Sequence[data.Sample], backbone: str, image_size: int, device: torch.device,
            batch_size: int, cam_layer: nn.Module | None = None, precision: str = "mixed",
            workers: int = 0, augment=None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Defect log-odds (N,) (float32 values, as float64), Grad-CAM maps (N, S, S) (None without cam_layer) and
    masks (N, S, S) of samples. Eval mode: every image is scored on its own, so the results do not depend on the
    batch size. augment(image, 0, index): only SyntheticDefects, to score the fixed synthetic validation defects."""
    if not samples:  # a category of normal images only has no evaluation image (issue 33)
        return np.zeros(0), None if cam_layer is None else np.zeros((0, image_size, image_size), np.float32), \
            np.zeros((0, image_size, image_size), bool)
    model.eval()
    loader = data.make_loader(samples, image_size, *backbones.normalization(backbone), batch_size, augment=augment,
                              cache=True, device=device, workers=workers)
    grad_flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # Grad-CAM needs dd/dA only: no graph through the trunk's weights
    log_odds, maps, masks = [], [], []
    try:
        for batch in tqdm(loader, desc="scoring", disable=None, leave=False):
            images = batch["image"].to(device, memory_format=MEMORY_FORMAT, non_blocking=True)  # (B, 3, S, S)
            if cam_layer is None:
                with torch.no_grad(), autocast(device, precision):
                    logits = model(images).float()  # (B, 2), float32 from the head (backbones.Float32Linear)
                log_odds.append((logits[:, 1] - logits[:, 0]).cpu().double())
            else:
                d, cam = grad_cam(model, cam_layer, images, precision)  # (B,), (B, S, S)
                log_odds.append(d.cpu().double())
                maps.append(cam.cpu().numpy())
            masks.append(batch["mask"][:, 0].numpy() > 0)  # (B, 1, S, S) -> (B, S, S)
    finally:
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
    return torch.cat(log_odds).numpy(), np.concatenate(maps) if maps else None, np.concatenate(masks)


def warm_up(model: nn.Module, cam_layer: nn.Module, batch_size: int, image_size: int, device: torch.device,
            precision: str) -> None:
    """One untimed Grad-CAM batch of zeros at the scoring shape, so that ms/image leaves out one-off set-up: cuDNN's
    kernel timing for the shape (benchmark=True), cuBLAS handles, first allocations. No image is read: the image
    cache is not primed, so the timed pass still decodes every image."""
    model.eval()
    images = torch.zeros(batch_size, 3, image_size, image_size, device=device)  # (B, 3, S, S)
    grad_cam(model, cam_layer, images.contiguous(memory_format=MEMORY_FORMAT), precision)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probability(log_odds: np.ndarray) -> np.ndarray:
    """p(defect) of log-odds d: the float64 sigmoid 1 / (1 + e^-d) (probabilities tie at 1.0 only above d ~ 37)."""
    return 1 / (1 + np.exp(-np.asarray(log_odds, dtype=np.float64)))


def score(model: nn.Module, cam_layer: nn.Module, samples: Sequence[data.Sample], backbone: str, image_size: int,
          device: torch.device, batch_size: int = 8, precision: str = "mixed",
          workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Defect probabilities (N,) and Grad-CAM maps (N, S, S) of samples, for a trained model."""
    d, maps, _ = predict(model, samples, backbone, image_size, device, batch_size, cam_layer, precision, workers)
    return probability(d), maps


# ----------------------------------------------------------------------------------------------------------------
# 5. CutPaste's own score (Li et al., CVPR 2021): a Gaussian density of the learned representation. The
# paper never scores with the classifier's output: it fits a Gaussian (mean, shrunk covariance) to the pooled features
# of the normal training images and scores an image by its Mahalanobis distance to it (the negative log-density up
# to constants). The covariance of ~250 images in 1,280 dimensions is singular, so it is shrunk (Ledoit-Wolf).
# ----------------------------------------------------------------------------------------------------------------
def pooled_features(model: nn.Module, samples: Sequence[data.Sample], backbone: str, image_size: int,
                    device: torch.device, batch_size: int, precision: str = "mixed", workers: int = 0) -> np.ndarray:
    """The network's pooled features of samples, the input of its classification head: (N, F) float64."""
    kept = []
    hook = head_of(model).register_forward_pre_hook(lambda module, inputs: kept.append(inputs[0].detach().float().cpu()))
    try:
        predict(model, samples, backbone, image_size, device, batch_size, precision=precision, workers=workers)
    finally:
        hook.remove()
    return torch.cat(kept).double().numpy()  # [(B, F)] -> (N, F)


def fit_density(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (F,), precision (F, F)) of a Gaussian fitted to features (N, F), its covariance shrunk (Ledoit-Wolf)."""
    estimate = LedoitWolf().fit(features)
    return estimate.location_, estimate.precision_


def mahalanobis(features: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """sqrt((x - mean)^T precision (x - mean)) of every row: (N, F) -> (N,); higher = more anomalous."""
    centred = features - mean  # (N, F)
    return np.sqrt(np.maximum(np.einsum("nf,fg,ng->n", centred, precision, centred), 0))


# ----------------------------------------------------------------------------------------------------------------
# 6. The model folder (issue 33): model.pt + model.json, all predict.py needs to score new images like the run
# ----------------------------------------------------------------------------------------------------------------
def calibrate(model: nn.Module, cam_layer: nn.Module, normals: Sequence[data.Sample], normal_scores: np.ndarray,
              threshold: float, args: argparse.Namespace, device: torch.device) -> dict:
    """model.json's calibration from the validation normals: their probabilities (N,) and threshold as the run set
    them, and, from their Grad-CAM maps, the maps' fixed colour scale and the pixel threshold."""
    _, maps = score(model, cam_layer, normals, args.backbone, args.image_size, device, args.batch_size,
                    args.precision, args.workers)  # (N, S, S)
    return data.calibration([s.rel for s in normals], normal_scores, maps, threshold,
                            normal_threshold(maps.reshape(len(maps), -1).max(1)),
                            "the validation normals (held-out good images, never trained on)")


def save_model(folder: Path, args: argparse.Namespace, calib: dict) -> None:
    """model.json beside model.pt: how the images reach the network, the calibration, the versions."""
    mean, std = backbones.normalization(args.backbone)
    model = {"backbone": args.backbone, "weights": data.portable(args.weights), "image_size": args.image_size,
             "center_crop": None, "normalization": {"mean": list(mean), "std": list(std)},
             "synthetic": args.synthetic, "score": "p(defect), the softmax of the 2-class head"}
    data.write_model_json(folder, "classifier", {"model": "model.pt"}, model, calib, args.category)


def load_model(folder: str | Path, device: torch.device) -> tuple[nn.Module, nn.Module, dict]:
    """(the model in eval mode, its Grad-CAM layer, model.json) of a model folder; one sentence if model.pt and
    model.json disagree or the weights do not fit the backbone. Nothing from the folder runs (weights_only)."""
    info = data.read_model_json(folder)
    if info["kind"] != "classifier":
        raise data.DataError(f"{folder} holds a {info['kind']} model, not a classifier")
    checkpoint = Checkpoint.load(Path(folder) / info["files"]["model"])
    saved = (info["model"].get("backbone"), info["model"].get("image_size"))
    if saved != (checkpoint.backbone, checkpoint.image_size) or checkpoint.backbone not in backbones.BACKBONES:
        raise data.DataError(f"{folder}: model.json says {saved[0]} at {saved[1]} px but model.pt holds "
                             f"{checkpoint.backbone} at {checkpoint.image_size} px (a folder assembled from two runs)")
    try:
        model, cam_layer = checkpoint.build(device)
    except (RuntimeError, KeyError) as e:
        raise data.DataError(f"{folder}: the weights in model.pt do not fit {checkpoint.backbone}: "
                             f"{str(e).splitlines()[0]}") from None
    return model, cam_layer, info


# ----------------------------------------------------------------------------------------------------------------
def check_args(args: argparse.Namespace) -> None:
    """Reject impossible settings with one sentence."""
    for flag, value, low in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                             ("--image-size", args.image_size, 32), ("--warmup-epochs", args.warmup_epochs, 0),
                             ("--save-maps", args.save_maps, 0), ("--workers", args.workers, 0)):
        if value < low:
            raise data.DataError(f"{flag} must be at least {low}, got {value}")
    if not args.lr > 0 or args.weight_decay < 0:
        raise data.DataError(f"--lr must be > 0 and --weight-decay >= 0, got {args.lr} and {args.weight_decay}")


def run(args: argparse.Namespace) -> dict:
    """Train on the training side of the split, score the evaluation images, write the result files; return metrics."""
    check_args(args)
    data.code_version()  # the commit of the code this process loaded, read before anything long runs
    torch.manual_seed(args.seed)  # the head's initialisation and dropout draw from torch's global generator
    device = backbones.pick_device(args.device)
    device_info = backbones.device_info(device)
    print(backbones.describe_device(device_info))
    backbones.set_precision(args.precision)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # one input size: cuDNN times its kernels, keeps the fastest
    # --synthetic cutpaste without --split may train from train/good alone (issue 33): PatchCore's split of the
    # open-set protocol then holds a seeded 10 % of train/good out for the threshold and scores any test images
    train_good, test = data.load_category(args.data_root, args.category,
                                          defects_optional=args.synthetic != "none" and not args.split)
    split = load_split(args, test) if args.split or any(s.label for s in test) else \
        splits.open_set_patchcore_split(train_good, test, args.category, args.seed)
    train_defects, heldout_good, eval_samples = splits.apply_split(test, split, train_good)
    train_good = splits.without_heldout(train_good, heldout_good)  # open-set protocol: its normals not in train/good
    if not train_defects and args.synthetic == "none":
        raise data.DataError(f"the split gives the classifier no defect image of {args.category} to train on; a "
                             f"supervised classifier cannot learn the defect class without examples (use k >= 1, "
                             f"or --synthetic cutpaste)")
    fit_samples, val_samples = validation_split(train_good, train_defects, heldout_good, args.seed)
    model, cam_layer = backbones.classifier(args.backbone, args.weights, num_classes=2)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = BN_MOMENTUM
    model.to(device, memory_format=MEMORY_FORMAT)
    out_dir = Path(args.out_dir or f"runs/classify/{args.category}")
    n_fit_defects = sum(s.label for s in fit_samples)  # real labelled anomalies; synthetic ones are counted apart
    n_synthetic = {k: len(synthetic_items(v, args.synthetic)) for k, v in (("fit", fit_samples), ("val", val_samples))}
    print(f"{args.category}: training on {len(fit_samples)} images ({n_fit_defects} defects), validating on "
          f"{len(val_samples)} ({sum(s.label for s in val_samples)} defects), evaluating {len(eval_samples)}")
    if args.synthetic != "none":
        print(f"{args.synthetic}: + {n_synthetic['fit']} synthetic defects in training (new each epoch), "
              f"+ {n_synthetic['val']} in validation (the same each epoch)")

    with data.atomic_dir(out_dir) as tmp:
        # Train: fine-tune, keep the epoch with the best validation AUROC
        t0 = time.perf_counter()
        best_state, history = fit(model, fit_samples, val_samples, args, device)
        train_seconds = time.perf_counter() - t0
        model.load_state_dict(best_state)
        best = history[select_epoch(history)]

        # Threshold: deployable, from the validation NORMAL images only (never an evaluation image or a defect)
        val_normals = [s for s in val_samples if s.label == 0]
        d_val, _, _ = predict(model, val_normals, args.backbone, args.image_size, device, args.batch_size,
                              precision=args.precision, workers=args.workers)
        normal_scores = probability(d_val)  # (N_val_normal,) defect probabilities
        threshold = normal_threshold(normal_scores)
        calib = calibrate(model, cam_layer, val_normals, normal_scores, threshold, args, device)

        # Score: defect probability and Grad-CAM map of every evaluation image, metrics shared with patchcore.py
        warm_up(model, cam_layer, args.batch_size, args.image_size, device, args.precision)
        t0 = time.perf_counter()
        d, maps, masks = predict(model, eval_samples, args.backbone, args.image_size, device, args.batch_size,
                                 cam_layer, args.precision, args.workers)
        ms_per_image = 1000 * (time.perf_counter() - t0) / len(eval_samples) if eval_samples else None  # read+net+CAM
        scores = probability(d)  # (N,) defect probability
        labels = np.array([s.label for s in eval_samples])
        labelled = len(set(labels.tolist())) == 2  # not so for a category of normal images only (issue 33)
        metrics = compute_metrics(labels, scores, masks, maps, np.array([s.has_mask for s in eval_samples])) \
            if labelled else dict.fromkeys(("image_auroc", "average_precision", "pixel_auroc", "aupro", "f1_max"))
        point = operating_point(labels, scores, threshold) if labelled else {"recall": None, "fpr": None}
        if not labelled:
            print(f"{args.category} has no labelled test images (test/good and test/<defect_type>): no accuracy is "
                  f"measured; the model folder and its threshold from {len(val_normals)} held-out normals are saved")
        density = None
        if args.synthetic == "cutpaste":  # CutPaste's own score: the Gaussian of the training normals' features
            feature = lambda samples: pooled_features(model, samples, args.backbone, args.image_size, device,
                                                      args.batch_size, args.precision, args.workers)
            mean, prec = fit_density(feature([s for s in fit_samples if s.label == 0]))  # (F,), (F, F)
            density = {"eval": mahalanobis(feature(eval_samples), mean, prec) if eval_samples else np.zeros(0),
                       "heldout": mahalanobis(feature(val_normals), mean, prec)}  # (N,), (N_val_normal,)
            density_threshold = normal_threshold(density["heldout"])
            metrics["density"] = {"threshold": density_threshold,
                                  "n_fit_normals": sum(1 for s in fit_samples if s.label == 0)}
            if labelled:
                metrics["density"].update(compute_metrics(labels, density["eval"]), **{
                    f"{k}_at_threshold": v for k, v in operating_point(labels, density["eval"],
                                                                       density_threshold).items() if k != "threshold"})
                print(f"CutPaste density (Mahalanobis distance of the pooled features): image AUROC "
                      f"{metrics['density']['image_auroc']:.4f}, output score {metrics['image_auroc']:.4f}")
        metrics.update(threshold=threshold, recall_at_threshold=point["recall"], fpr_at_threshold=point["fpr"],
                       best_epoch=best["epoch"], val_auroc=best["val_auroc"], train_seconds=train_seconds,
                       ms_per_image=ms_per_image, n_train_images=len(fit_samples), n_train_defects=n_fit_defects,
                       n_val_images=len(val_samples), n_val_defects=sum(s.label for s in val_samples),
                       synthetic=args.synthetic, n_train_synthetic=n_synthetic["fit"],
                       n_val_synthetic=n_synthetic["val"],
                       params_millions=backbones.count_params(model) / 1e6, peak_rss_mb=data.peak_rss_mb(),
                       history=history, args=data.recorded_args(args), device_info=device_info,
                       run_info=data.run_info())

        # Write: scores.csv, heldout_scores.csv (validation normals), metrics.json, args.json, the images of each
        # set, model.pt, optional overlays
        data.write_scores(tmp / "scores.csv", eval_samples, scores)
        data.write_scores(tmp / "heldout_scores.csv", val_normals, normal_scores)
        if density is not None:  # the same images scored by the density: report.py makes a method row of it
            data.write_scores(tmp / "density_scores.csv", eval_samples, density["eval"])
            data.write_scores(tmp / "density_heldout_scores.csv", val_normals, density["heldout"])
        data.write_json(tmp / "metrics.json", metrics)
        data.write_json(tmp / "args.json", data.recorded_args(args))
        data.write_json(tmp / "images.json", {"split": split, "train": [s.rel for s in fit_samples],
                                              "val": [s.rel for s in val_samples],
                                              "eval": [s.rel for s in eval_samples]})
        Checkpoint(args.backbone, args.image_size, threshold, best["epoch"],
                   {k: v.cpu() for k, v in best_state.items()},
                   *((torch.from_numpy(mean).float(), torch.from_numpy(prec).float(), density_threshold)
                     if density is not None else ())).save(tmp / "model.pt")
        save_model(tmp, args, calib)
        for rank, i in enumerate(np.argsort(-scores, kind="stable")[:args.save_maps]):
            (tmp / "maps").mkdir(exist_ok=True)
            s = eval_samples[i]
            data.save_overlay(tmp / "maps" / f"{rank:02d}_{s.defect_type}_{Path(s.path).stem}.png",
                              data.read_image(s.path), maps[i], masks[i], f"{s.rel}  p(defect) {scores[i]:.3f}")
    data.print_table(metrics, TABLE_KEYS, out_dir)
    return metrics


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("--data-root", required=True, help="folder holding <category>/train/good, test/, ground_truth/")
    p.add_argument("--category", required=True)
    p.add_argument("--backbone", choices=backbones.BACKBONES, default="efficientnet_b1")
    p.add_argument("--weights", default="imagenet",
                   help="trunk initialisation: imagenet, none (random init) or a state-dict file of the ImageNet model")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    p.add_argument("--warmup-epochs", type=int, default=1, help="linear warm-up before the cosine decay")
    p.add_argument("--freeze-trunk", action="store_true", help="train the head only (a linear probe)")
    p.add_argument("--flips", choices=("auto", "both", "none"), default="auto",
                   help="auto: horizontal+vertical flips except for categories whose mirror image is a defect")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=backbones.PRECISIONS, default="mixed",
                   help="mixed: bfloat16 (or float16) autocast on a GPU; float32: no autocast and no TF32, for a "
                        "strict comparison with the CPU (the CPU always computes in float32)")
    p.add_argument("--workers", type=int, default=data.default_workers(),
                   help="DataLoader worker processes (default for this machine: 0 on <= 2 cores, else "
                        "min(8, cores - 1)); the same seed gives the same results for any number")
    p.add_argument("--split", default=None,
                   help="split JSON from splits.py; without one: all-types with the whole pool, for this --seed")
    p.add_argument("--synthetic", choices=("none", "cutpaste"), default="none",
                   help="cutpaste: every normal training image is also a new synthetic defect each epoch (CutPaste "
                        "or scar, 50/50; cutpaste.py), and every validation normal a fixed one; a split without "
                        "labelled anomalies is then allowed")
    p.add_argument("--save-maps", type=int, default=0, help="save Grad-CAM overlays of the N highest-scoring images")
    p.add_argument("--out-dir", default=None, help="default: runs/classify/<category>")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        return run(args)
    except data.DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
