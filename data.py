"""Data for the study: MVTec AD folder layout, seeded experiment splits, 512 px transforms, and a synthetic generator.

Every script reads images through this file, so bad input fails here with one sentence that names the path.

    python data.py synth --out /tmp/s --size 128 --seed 0          # synthetic MVTec-layout tree (weave, washer)
    python data.py check --data-root /tmp/s --category weave        # counts per folder, or the error
    python data.py split --data-root /tmp/s --category weave --scenario all-types --k 5 --out /tmp/split.json
    python data.py split --data-root /tmp/s --category weave --scenario hard --k 10 --held-out hole --out /tmp/h.json
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SCENARIOS = ("all-types", "unseen-type", "few-shot")
OPEN_SET_SCENARIOS = ("general", "hard")  # DRA's open-set protocol (Ding et al., CVPR 2022), see open_set_split
POOL_FRACTION = 0.5  # at most half of each test folder may be given to the classifier; the rest is evaluated
# Open-set protocol: every test image not labelled is evaluated, so the normal images that set thresholds and
# calibrate the fused detector come from train/good instead: a seeded 10 % of it, held out from both methods' training.
HELDOUT_TRAIN_FRACTION = 0.1
SYNTH_DEFECTS = ("scratch", "hole", "stain", "missing")
# Decoded images kept in memory by resized_image (classify.py reads every image once per epoch): at 512 px an RGB
# image is 0.79 MB, so 400 images take 315 MB and the cache at most 400 MB, per process (each loader worker has one).
IMAGE_CACHE = 512


class DataError(ValueError):
    """Bad input: the message is one sentence that names the path and what was expected."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every script's --help: the module docstring with its line breaks (the commands to copy), and each default."""


# ----------------------------------------------------------------------------------------------------------------
# The MVTec AD layout: <root>/<category>/{train/good, test/<type>, ground_truth/<type>/<stem>_mask.png}
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One image: where it is, what it is, and where its mask is (None for good images or a missing mask)."""
    path: str          # absolute path of the image
    rel: str           # path relative to the category folder, e.g. "test/hole/003.png" (used in split files)
    label: int         # 0 good, 1 defect (from the folder name)
    defect_type: str   # "good" or the test sub-folder name
    mask_path: str | None

    @property
    def has_mask(self) -> bool:
        """Good images have an all-zero mask; a defect image has one only if its mask file exists."""
        return self.label == 0 or self.mask_path is not None


def list_images(folder: Path) -> list[Path]:
    """Sorted image files in a folder (no recursion)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def category_dir(root: str | Path, category: str) -> Path:
    """Check that root/category exists and looks like the MVTec layout; return it."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist (expected a folder holding <category>/train/good)")
    folder = root / category
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())
        raise DataError(f"category '{category}' not found in {root}; categories found: {', '.join(found) or 'none'}")
    return folder


def find_mask(gt_dir: Path, stem: str) -> Path | None:
    """The mask of image <stem>: <stem>_mask.png (MVTec AD) or <stem>.png, else None."""
    for name in (f"{stem}_mask.png", f"{stem}.png"):
        if (gt_dir / name).is_file():
            return gt_dir / name
    return None


def load_category(root: str | Path, category: str, check: bool = True) -> tuple[list[Sample], list[Sample]]:
    """(train samples, test samples) of one category, sorted by defect type then file name; with `check`, every
    file is checked first (check_files), so that a bad one fails before any fitting or training."""
    folder = category_dir(root, category)
    good_dir = folder / "train" / "good"
    train_files = list_images(good_dir) if good_dir.is_dir() else []
    if not train_files:
        raise DataError(f"no training images in {good_dir} (expected image files of normal parts)")
    train = [Sample(str(p), str(p.relative_to(folder)), 0, "good", None) for p in train_files]

    test_dir = folder / "test"
    if not test_dir.is_dir():
        raise DataError(f"no test folder {test_dir} (expected test/good and test/<defect_type> folders)")
    test, missing_masks = [], []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        files = list_images(type_dir)
        if not files:
            raise DataError(f"test folder {type_dir} has no images")
        label = 0 if type_dir.name == "good" else 1
        for p in files:
            mask = None if label == 0 else find_mask(folder / "ground_truth" / type_dir.name, p.stem)
            if label == 1 and mask is None:
                missing_masks.append(p)
            test.append(Sample(str(p), str(p.relative_to(folder)), label, type_dir.name, mask and str(mask)))
    if not any(s.label == 1 for s in test):
        raise DataError(f"category {folder} has no defect images (expected test/<defect_type> folders besides good)")
    if missing_masks:  # allowed (users' own data): pixel metrics skip these images
        warnings.warn(f"{len(missing_masks)} defect images have no mask in {folder / 'ground_truth'} "
                      f"(first: {missing_masks[0]}); pixel metrics skip them", stacklevel=2)
    if check:
        check_files(train + test)
    return train, test


def file_size(path: str, what: str = "image") -> tuple[int, int]:
    """(W, H) of an image file after PIL's integrity check, without decoding the pixels: for PNG every chunk's
    checksum is read, so a truncated or corrupted file fails here; other formats are checked as far as PIL can."""
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
        return size
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read {what} {path}: {e}") from None


def check_files(samples: Sequence[Sample]) -> None:
    """Every image and mask opens and passes its integrity check, and every mask has its image's size: about 1 ms
    a file, so a bad file is found before minutes or hours of fitting, with the sentence the readers would give."""
    for s in tqdm(samples, desc="checking files", disable=None, leave=False):
        size = file_size(s.path)
        if s.mask_path is not None:
            mask_size = file_size(s.mask_path, "mask")
            if mask_size != size:
                raise DataError(mask_size_error(s.mask_path, mask_size, s.path, size))



def read_image(path: str | Path) -> Image.Image:
    """Read an image as 3-channel RGB (grayscale and RGBA are converted); name the file if it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() forces the full decode, so a truncated file fails here
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


@functools.lru_cache(maxsize=IMAGE_CACHE)
def resized_image(path: str, size: int) -> tuple[Image.Image, tuple[int, int]]:
    """(the image resized to size x size as image_to_tensor does, its original (W, H)), decoded once per process."""
    image = read_image(path)
    return image.resize((size, size), Image.BILINEAR), image.size


def read_mask(sample: Sample, image_size: tuple[int, int]) -> np.ndarray:
    """Binary mask (H, W) of a sample at its image's original size (W, H); zeros for good images."""
    if sample.mask_path is None:
        return np.zeros(image_size[::-1], dtype=bool)
    try:
        with Image.open(sample.mask_path) as im:
            mask = np.asarray(im.convert("L")) > 0
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read mask {sample.mask_path}: {e}") from None
    if mask.shape[::-1] != tuple(image_size):
        raise DataError(mask_size_error(sample.mask_path, mask.shape[::-1], sample.path, image_size))
    return mask


def mask_size_error(mask_path: str, mask_size: tuple[int, int], image_path: str, image_size: tuple[int, int]) -> str:
    return (f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} px but its image {image_path} is "
            f"{image_size[0]}x{image_size[1]} px")


# ----------------------------------------------------------------------------------------------------------------
# Transforms and the torch Dataset
# ----------------------------------------------------------------------------------------------------------------
def image_to_tensor(image: Image.Image, image_size: int, mean: Sequence[float], std: Sequence[float],
                    center_crop: int | None = None) -> torch.Tensor:
    """Resize to image_size x image_size (bilinear, antialiased), optionally center-crop, normalise: (3, S, S)."""
    image = image.resize((image_size, image_size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    if center_crop:
        x = crop_center(x, center_crop)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def mask_to_tensor(mask: np.ndarray, image_size: int, center_crop: int | None = None) -> torch.Tensor:
    """Resize a binary mask with nearest-neighbour (never bilinear) like its image: (1, S, S) float in {0, 1}."""
    m = Image.fromarray(mask.astype(np.uint8) * 255).resize((image_size, image_size), Image.NEAREST)
    m = torch.from_numpy(np.asarray(m) > 0).float()[None]  # (H, W) -> (1, H, W)
    return crop_center(m, center_crop) if center_crop else m


def crop_center(x: torch.Tensor, size: int) -> torch.Tensor:
    """Center crop of the last two dims: (..., H, W) -> (..., size, size)."""
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


class MVTecDataset(torch.utils.data.Dataset):
    """Samples -> dict(image (3,S,S), mask (1,S,S), label, has_mask, index); `augment(image, epoch, index)` acts on
    the PIL image. cache=True keeps each image decoded and resized in memory (resized_image): the same tensors,
    decoded once per process."""

    def __init__(self, samples: Sequence[Sample], image_size: int, mean: Sequence[float], std: Sequence[float],
                 center_crop: int | None = None, augment=None, cache: bool = False):
        if center_crop and center_crop > image_size:
            raise DataError(f"center crop {center_crop} px is larger than the resized image ({image_size} px)")
        self.samples, self.image_size, self.mean, self.std = list(samples), image_size, mean, std
        self.center_crop, self.augment, self.cache = center_crop, augment, cache

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, i = key if isinstance(key, tuple) else (0, key)  # (epoch, index) from EpochSampler, or an index
        s = self.samples[i]
        if self.cache:  # resizing an image that already has the size is a copy in PIL: the tensors are the same
            image, original_size = resized_image(s.path, self.image_size)
        else:
            image = read_image(s.path)
            original_size = image.size
        mask = read_mask(s, original_size)
        if self.augment is not None:
            image = self.augment(image, epoch, i)
        return {"image": image_to_tensor(image, self.image_size, self.mean, self.std, self.center_crop),
                "mask": mask_to_tensor(mask, self.image_size, self.center_crop),
                "label": s.label, "has_mask": s.has_mask, "index": i}


def default_workers() -> int:
    """DataLoader worker processes for this machine: 0 on 1-2 cores, else min(8, cores - 1).

    Why: the main process needs a core of its own (to feed the GPU, or for the maths on a CPU run), so on 2 cores a
    worker only competes with it and holds a second image cache. Above that, every core but one decodes, resizes
    and augments. Decoding an MVTec PNG and resizing it to 512 px takes ~10-30 ms of one core, so 8 workers give
    several hundred images a second, more than one GPU trains or scores at 512 px; more would add memory (one image
    cache each), not speed. Cores are those this process may run on (taskset, containers), not the machine's.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if cores <= 2 else min(8, cores - 1)


class EpochSampler(torch.utils.data.Sampler):
    """(epoch, index) keys for MVTecDataset in an order that depends only on (seed, epoch): a seeded permutation per
    epoch with shuffle, else 0..N-1. Call set_epoch(e) before epoch e, as with torch's DistributedSampler.

    Why the epoch travels with every index: worker processes hold their own copy of the dataset (kept across epochs
    with persistent_workers), so an epoch counter set on the dataset or the augmentation in the main process would
    never reach them, while the sampler runs in the main process and its keys are sent to whichever worker loads
    the image. An augmentation can then be a pure function of (seed, epoch, index) (classify.Augment): the same
    images in the same order for 0, 2 or 8 workers.
    """

    def __init__(self, n: int, shuffle: bool, seed: int):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = np.random.default_rng([self.seed, *b"shuffle", self.epoch]).permutation(self.n) if self.shuffle \
            else range(self.n)
        return iter([(self.epoch, int(i)) for i in order])


def make_loader(samples: Sequence[Sample], image_size: int, mean, std, batch_size: int, center_crop=None,
                augment=None, shuffle: bool = False, seed: int = 0, cache: bool = False,
                device: torch.device | None = None, workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over samples in the order of an EpochSampler (loader.sampler.set_epoch(e) before epoch e).

    workers > 0: that many worker processes, kept across epochs (persistent_workers). With cache=True each process
    that loads images keeps its own cache of at most IMAGE_CACHE images (400 MB at 512 px). Nothing random runs
    in a worker except an augmentation seeded by (seed, epoch, index); the loader's seeded generator also seeds each
    worker's torch, random and numpy generators (base seed + worker id), so nothing is left unseeded. For a CUDA
    device the batches come in pinned memory (pinned by a thread of the main process when there are workers), so
    that .to(device, non_blocking=True) overlaps with the GPU's work.
    """
    if workers < 0:
        raise DataError(f"--workers must be at least 0, got {workers}")
    return torch.utils.data.DataLoader(
        MVTecDataset(samples, image_size, mean, std, center_crop, augment, cache), batch_size=batch_size,
        sampler=EpochSampler(len(samples), shuffle, seed), generator=torch.Generator().manual_seed(seed),
        num_workers=workers, persistent_workers=workers > 0, pin_memory=device is not None and device.type == "cuda")


# ----------------------------------------------------------------------------------------------------------------
# Experiment splits (evaluate.py's protocol). Per category and seed, every test folder is shuffled once and cut into
# a pool (at most half: the classifier may train on defects from it; its good images are held-out normals for
# validation and thresholds) and an evaluation part. Every scenario evaluates on the evaluation parts only, so
# PatchCore, which never sees a defect, is scored once per category and seed and reused across scenarios.
# ----------------------------------------------------------------------------------------------------------------
def pool_and_eval(test: Sequence[Sample], seed: int) -> dict[str, tuple[list[Sample], list[Sample]]]:
    """{defect_type: (pool, eval)}: a seeded shuffle of each test folder, floor(n * POOL_FRACTION) go to the pool."""
    out = {}
    for t in sorted({s.defect_type for s in test}):
        group = sorted((s for s in test if s.defect_type == t), key=lambda s: s.rel)  # independent of input order
        # One generator per (seed, folder name): adding a folder does not reshuffle the others.
        rng = np.random.default_rng([seed, *t.encode()])
        group = [group[i] for i in rng.permutation(len(group))]
        n_pool = int(len(group) * POOL_FRACTION)
        out[t] = (group[:n_pool], group[n_pool:])
    return out


def make_split(test: Sequence[Sample], category: str, seed: int, scenario: str, k: int | None,
               held_out: str | None = None) -> dict:
    """Which test images the classifier may train on and which form the shared evaluation set (relative paths).

    all-types / few-shot: k defect images of every type from its pool (k=None: the whole pool).
    unseen-type: k of every type except `held_out`; evaluated on good + the held-out type only.
    """
    if scenario not in SCENARIOS:
        raise DataError(f"unknown scenario '{scenario}' (expected one of {', '.join(SCENARIOS)})")
    parts = pool_and_eval(test, seed)
    types = [t for t in parts if t != "good"]
    if scenario == "unseen-type":
        if len(types) < 2:
            raise DataError(f"category {category} has {len(types)} defect type; unseen-type needs at least 2")
        if held_out not in types:
            raise DataError(f"held-out type '{held_out}' is not a defect type of {category} ({', '.join(types)})")
    elif held_out is not None:
        raise DataError(f"--held-out is only used by the unseen-type scenario, not {scenario}")
    if k is not None and k < 0:
        raise DataError(f"k must be >= 0, got {k}")
    train_types = [t for t in types if t != held_out]
    eval_types = ["good", held_out] if scenario == "unseen-type" else ["good", *types]
    return {
        "category": category, "seed": seed, "scenario": scenario, "k": k, "held_out": held_out,
        "train_defects": [s.rel for t in train_types for s in parts[t][0][:k]],
        "heldout_good": [s.rel for s in parts["good"][0]] if "good" in parts else [],
        "eval": [s.rel for t in eval_types if t in parts for s in parts[t][1]],
    }


def apply_split(test: Sequence[Sample], split: dict,
                train: Sequence[Sample] = ()) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(train defects, held-out good, evaluation samples) of a split, checking every listed path exists. Held-out
    good images are test/good images (pool protocol) or train/good images (open-set protocol): pass `train`."""
    by_rel = {s.rel: s for s in (*test, *train)}
    missing = [r for key in ("train_defects", "heldout_good", "eval") for r in split[key] if r not in by_rel]
    if missing:
        raise DataError(f"split file lists {len(missing)} images that are not in the category "
                        f"(first: {missing[0]}); was it made for another category or data root?")
    return tuple([by_rel[r] for r in split[key]] for key in ("train_defects", "heldout_good", "eval"))


def without_heldout(train: Sequence[Sample], heldout_good: Sequence[Sample]) -> list[Sample]:
    """train/good minus the split's held-out normals (open-set protocol: neither method trains on them)."""
    held = {s.rel for s in heldout_good}
    return [s for s in train if s.rel not in held]


# ----------------------------------------------------------------------------------------------------------------
# DRA's open-set protocol (Ding et al., "Catching Both Gray and Black Swans", CVPR 2022, Sec. 4.1), the protocol of
# the published open-set tables. No pool: M labelled anomalies are drawn from the test set and removed from it, and
# every other test image is evaluated.
#   general: M anomalies drawn from all defect images of the category (not per type); evaluated on the rest.
#   hard:    M anomalies of one known type; evaluated on test/good + every image of the other types (all unseen; the
#            known type's other images are left out).
# Normal images for thresholds and calibration: a seeded 10 % of train/good, the same for every run of a seed.
# ----------------------------------------------------------------------------------------------------------------
def heldout_train_good(train: Sequence[Sample], seed: int) -> list[Sample]:
    """A seeded HELDOUT_TRAIN_FRACTION of train/good (at least 2 images), held out from both methods' training."""
    group = sorted(train, key=lambda s: s.rel)
    n = max(2, round(len(group) * HELDOUT_TRAIN_FRACTION))
    if len(group) < n + 1:
        raise DataError(f"train/good has {len(group)} images; the open-set protocol holds {n} out for thresholds "
                        f"and needs at least one more to train on")
    rng = np.random.default_rng([seed, *b"heldout/train"])
    return [group[i] for i in sorted(rng.permutation(len(group))[:n])]


def check_m(m, what: str, minimum: int = 1) -> int:
    """M of the open-set protocol: a whole number >= minimum (1, or 0 where no labelled anomaly is a valid split),
    or one sentence."""
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < minimum:
        kind, examples = ("positive", "1 or 10") if minimum > 0 else ("non-negative", "0, 1 or 10")
        raise DataError(f"{what} must be a {kind} whole number of labelled anomalies, got {m!r} (e.g. {examples})")
    return int(m)


def open_set_split(train: Sequence[Sample], test: Sequence[Sample], category: str, seed: int, scenario: str,
                   m: int, known: str | None = None) -> dict:
    """The classifier's M labelled anomalies and the evaluation set of DRA's general or hard scenario (relative
    paths). Draws are seeded by (seed, scenario[, known type]); a smaller M takes the first images of a larger M's
    draw. PatchCore trains on no test image, so one PatchCore run per seed scores every evaluation set. general
    allows M = 0 (no labelled anomaly: classify.py --synthetic cutpaste); hard needs M >= 1 (its known type)."""
    if scenario not in OPEN_SET_SCENARIOS:
        raise DataError(f"unknown open-set scenario '{scenario}' (expected one of {', '.join(OPEN_SET_SCENARIOS)})")
    m = check_m(m, "--general-m", minimum=0) if scenario == "general" else check_m(m, "--hard-m")
    defects = sorted((s for s in test if s.label == 1), key=lambda s: s.rel)  # independent of input order
    types = sorted({s.defect_type for s in defects})
    if scenario == "general":
        if known is not None:
            raise DataError("a known defect type is only used by the hard scenario, not general")
        if m > len(defects):
            raise DataError(f"--general-m {m} is larger than the {len(defects)} defect images of {category}; "
                            f"choose M <= {len(defects)}")
        rng = np.random.default_rng([seed, *b"general"])
        labelled = [defects[i] for i in rng.permutation(len(defects))[:m]]
        eval_types = None
    else:
        if len(types) < 2:
            raise DataError(f"category {category} has {len(types)} defect type; the hard scenario evaluates on the "
                            f"other types and needs at least 2 (use general)")
        if known not in types:
            raise DataError(f"known type '{known}' is not a defect type of {category} ({', '.join(types)})")
        group = [s for s in defects if s.defect_type == known]
        rng = np.random.default_rng([seed, *f"hard/{known}".encode()])
        labelled = [group[i] for i in rng.permutation(len(group))[:m]]  # fewer if the type has fewer
        eval_types = {"good", *types} - {known}
    taken = {s.rel for s in labelled}
    evaluated = [s.rel for s in sorted(test, key=lambda s: (s.defect_type, s.rel))
                 if s.rel not in taken and (eval_types is None or s.defect_type in eval_types)]
    return {"category": category, "seed": seed, "scenario": scenario, "k": m, "known": known, "held_out": None,
            "train_defects": [s.rel for s in labelled],
            "heldout_good": [s.rel for s in heldout_train_good(train, seed)],
            "eval": evaluated}


def open_set_patchcore_split(train: Sequence[Sample], test: Sequence[Sample], category: str, seed: int) -> dict:
    """PatchCore's split of the open-set protocol: every test image scored (each general/hard evaluation set is a
    subset of it), the seed's held-out train/good images left out of the memory bank for its threshold."""
    return {"category": category, "seed": seed, "scenario": "open-set", "k": 0, "known": None, "held_out": None,
            "train_defects": [], "heldout_good": [s.rel for s in heldout_train_good(train, seed)],
            "eval": [s.rel for s in sorted(test, key=lambda s: (s.defect_type, s.rel))]}


def write_split(split: dict, path: str | Path) -> None:
    """Write a split as JSON (atomically)."""
    write_json(path, split)


def read_split(path: str | Path) -> dict:
    """Read a split JSON written by write_split."""
    try:
        split = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read split file {path}: {e}") from None
    for key in ("category", "train_defects", "heldout_good", "eval"):
        if key not in split:
            raise DataError(f"split file {path} has no '{key}' entry (write it with `python data.py split`)")
    return split


# ----------------------------------------------------------------------------------------------------------------
# Result files shared by every script: atomic writes, run info, scores.csv, overlays
# ----------------------------------------------------------------------------------------------------------------
def write_json(path: str | Path, obj) -> None:
    """Write JSON through a temp file and a rename, so an interrupted run never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside out_dir; on success it replaces out_dir, on error it is deleted."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """The git commit of the code this process runs, and whether tracked files differed from it, read once: the
    first call (at the start of every script's run) fixes it, so a commit made while a long study runs is not
    recorded for runs whose code was loaded before it."""
    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=Path(__file__).parent,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": git("rev-parse", "--short", "HEAD") or None,
            "git_dirty": None if status is None else bool(status)}


def portable(value):
    """A value to record in a committed result file: an absolute path becomes its last part ('.../mvtec'), so that
    no path of this machine is written; a relative path (as the README's commands give them) is kept."""
    if isinstance(value, (str, Path)) and os.path.isabs(str(value)):
        return f".../{Path(value).name}"
    return str(value) if isinstance(value, Path) else value


def recorded_args(args: argparse.Namespace) -> dict:
    """A run's arguments for args.json and metrics.json, every path portable()."""
    return {k: portable(v) for k, v in vars(args).items()}


def run_info() -> dict:
    """Versions and the git commit (code_version), stored in every metrics.json."""
    return {**code_version(), "python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_scores(path: str | Path, samples: Sequence[Sample], scores: Sequence[float]) -> None:
    """scores.csv: one row per image, path,label,defect_type,score; the path relative to the category folder
    (test/crack/000.png), so that results can be committed and read on another machine."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "defect_type", "score"])
        for s, score in zip(samples, scores):
            w.writerow([s.rel, s.label, s.defect_type, f"{float(score):.10g}"])  # p(defect) near 1 needs digits


def read_scores(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(paths, labels, defect types, scores) of a scores.csv written by write_scores."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return ([r["path"] for r in rows], np.array([int(r["label"]) for r in rows], dtype=int),
                np.array([r["defect_type"] for r in rows]), np.array([float(r["score"]) for r in rows]))
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"cannot read scores file {path} (expected columns path,label,defect_type,score): {e}") from None


def print_table(metrics: dict, keys: Sequence[str], out_dir: str | Path) -> None:
    """A script's final aligned table, with the same numbers as its metrics.json."""
    print(f"\n{'metric':<22}{'value':>12}")
    for key in keys:
        value = metrics.get(key)
        print(f"{key:<22}{'n/a' if value is None else f'{value:.4g}':>12}")
    print(f"results in {out_dir}")


def save_overlay(path: str | Path, image: Image.Image, amap: np.ndarray, mask: np.ndarray, title: str = "") -> None:
    """PNG of three panels: image | anomaly map over the image | ground truth. amap and mask are (S, S)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    image = image.resize(amap.shape[::-1], Image.BILINEAR)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    axes[0].imshow(image)
    axes[1].imshow(image)
    axes[1].imshow(amap, cmap="jet", alpha=0.5)
    axes[2].imshow(mask, cmap="gray", vmin=0, vmax=1)
    for ax, name in zip(axes, ("image", "anomaly map", "ground truth")):
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic MVTec-layout data: a periodic texture ("weave") and a centred object ("washer"), each with four
# visually different defect types painted from the same boolean array that becomes the mask (pixel-exact).
# Normal images vary in lighting, colour, noise and position so that the task is not trivial.
# ----------------------------------------------------------------------------------------------------------------
def synth_weave(rng: np.random.Generator, size: int) -> np.ndarray:
    """A normal woven texture: (size, size, 3) float in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = size / 10 * rng.uniform(0.95, 1.05)
    phase_x, phase_y = rng.uniform(0, 2 * np.pi, 2)
    warp = np.sin(2 * np.pi * x / period + phase_x) * (np.sin(2 * np.pi * y / (2 * period) + phase_y) > 0)
    weft = np.sin(2 * np.pi * y / period + phase_y) * (np.sin(2 * np.pi * y / (2 * period) + phase_y) <= 0)
    gray = 0.5 + 0.18 * (warp + weft)
    base = np.array([0.62, 0.48, 0.32]) * rng.uniform(0.96, 1.04, 3)  # brown cloth, slight colour drift
    return gray[..., None] * base * 1.6


def synth_washer(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A normal metal washer on a dark background: image (size, size, 3) and its object mask (size, size)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2 + rng.uniform(-size / 32, size / 32, 2)  # small shifts
    r = np.hypot(y - cy, x - cx)
    outer, inner = size * rng.uniform(0.34, 0.36), size * 0.15
    ring = (r < outer) & (r > inner)
    shade = 0.55 + 0.25 * (x - cx) / size - 0.15 * (y - cy) / size + 0.08 * np.cos(r / size * 40)  # brushed metal
    image = np.full((size, size, 3), 0.12) + 0.03 * np.sin(x / size * 6)[..., None]
    image[ring] = shade[ring, None] * np.array([0.9, 0.92, 1.0])
    return image, ring


def disk(size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    """Boolean disk (size, size)."""
    y, x = np.mgrid[0:size, 0:size]
    return np.hypot(y - cy, x - cx) <= radius


def paint_defect(rng: np.random.Generator, image: np.ndarray, kind: str, where: np.ndarray,
                 background: np.ndarray) -> np.ndarray:
    """Paint one defect of `kind` centred on a random pixel of `where`; return its mask (size, size) bool."""
    size = image.shape[0]
    ys, xs = np.nonzero(where)
    i = rng.integers(len(ys))
    cy, cx = ys[i], xs[i]
    if kind == "scratch":  # a thin bright line
        angle, length = rng.uniform(0, np.pi), size * rng.uniform(0.25, 0.45)
        t = np.linspace(-0.5, 0.5, 4 * size)
        py = np.clip(np.round(cy + t * length * np.sin(angle)), 0, size - 1).astype(int)
        px = np.clip(np.round(cx + t * length * np.cos(angle)), 0, size - 1).astype(int)
        mask = np.zeros((size, size), dtype=bool)
        mask[py, px] = True
        if size >= 96:  # two pixels wide at larger sizes
            mask[np.clip(py + 1, 0, size - 1), px] = True
        image[mask] = 0.95
    elif kind == "hole":  # a dark round hole
        mask = disk(size, cy, cx, size * rng.uniform(0.04, 0.07))
        image[mask] = 0.03
    elif kind == "stain":  # a translucent blue-green blot of irregular shape
        mask = disk(size, cy, cx, size * rng.uniform(0.05, 0.08))
        mask |= disk(size, cy + rng.uniform(-1, 1) * size * 0.05, cx + rng.uniform(-1, 1) * size * 0.05,
                     size * rng.uniform(0.03, 0.05))
        image[mask] = 0.4 * image[mask] + 0.6 * np.array([0.15, 0.45, 0.5])
    elif kind == "missing":  # a piece gone: the region shows the flat `background` colour
        half = size * rng.uniform(0.06, 0.1)
        mask = np.zeros((size, size), dtype=bool)
        mask[max(0, int(cy - half)):int(cy + half), max(0, int(cx - half)):int(cx + half)] = True
        mask &= where
        image[mask] = background
    else:
        raise ValueError(f"unknown synthetic defect '{kind}'")
    return mask


def synth_image(rng: np.random.Generator, category: str, size: int, defect: str | None) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image (size, size, 3) uint8 and its defect mask (size, size) bool."""
    if category == "weave":
        image, where = synth_weave(rng, size), np.ones((size, size), dtype=bool)
        margin = size // 8  # keep defects away from the border
        where[:margin], where[-margin:], where[:, :margin], where[:, -margin:] = False, False, False, False
        background = image.mean(axis=(0, 1))  # a missing piece of cloth looks like flat, pattern-less cloth
    else:
        image, where = synth_washer(rng, size)
        background = np.full(3, 0.12)  # a missing piece of washer shows the dark background
    mask = paint_defect(rng, image, defect, where, background) if defect else np.zeros((size, size), dtype=bool)
    image = image * rng.uniform(0.85, 1.15)  # lighting
    image = image + rng.normal(0, 0.02, image.shape)  # sensor noise
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), mask


def generate_synthetic(out: str | Path, size: int = 128, seed: int = 0, n_train: int = 40, n_test_good: int = 12,
                       n_defect: int = 8, categories: Sequence[str] = ("weave", "washer")) -> Path:
    """Write a synthetic MVTec-layout tree: <out>/<category>/{train/good, test/*, ground_truth/*}. Same seed, same bytes."""
    out = Path(out)
    for ci, category in enumerate(categories):
        if category not in ("weave", "washer"):
            raise DataError(f"unknown synthetic category '{category}' (expected weave or washer)")
        rng = np.random.default_rng([seed, ci])
        jobs = [("train", "good", None, i) for i in range(n_train)]
        jobs += [("test", "good", None, i) for i in range(n_test_good)]
        jobs += [("test", d, d, i) for d in SYNTH_DEFECTS for i in range(n_defect)]
        for split, folder, defect, i in jobs:
            image, mask = synth_image(rng, category, size, defect)
            path = out / category / split / folder / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
            if defect:
                mask_path = out / category / "ground_truth" / folder / f"{i:03d}_mask.png"
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    return out


# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="write a synthetic MVTec-layout tree",
                       formatter_class=HelpFormatter)
    s.add_argument("--out", required=True)
    s.add_argument("--size", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n-train", type=int, default=40)
    s.add_argument("--n-test-good", type=int, default=12)
    s.add_argument("--n-defect", type=int, default=8, help="images per defect type")
    for name, help_ in (("check", "print the folder counts of a category"), ("split", "write a split file")):
        c = sub.add_parser(name, help=help_, formatter_class=HelpFormatter)
        c.add_argument("--data-root", required=True)
        c.add_argument("--category", required=True)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--scenario", choices=SCENARIOS + OPEN_SET_SCENARIOS, default="all-types")
    c.add_argument("--k", type=int, default=None, help="defect images per type for the classifier (default: pool); "
                   "general/hard: M, the labelled anomalies")
    c.add_argument("--held-out", default=None, help="defect type left out (unseen-type); hard: the one known type")
    c.add_argument("--out", required=True)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        if args.command == "synth":
            generate_synthetic(args.out, args.size, args.seed, args.n_train, args.n_test_good, args.n_defect)
            print(f"wrote synthetic categories weave, washer ({args.size} px) to {args.out}")
            return
        train, test = load_category(args.data_root, args.category)
        if args.command == "check":
            print(f"{'folder':<16}{'images':>8}{'masks':>8}")
            print(f"{'train/good':<16}{len(train):>8}{'':>8}")
            for t in sorted({s.defect_type for s in test}):
                group = sorted((s for s in test if s.defect_type == t), key=lambda s: s.rel)  # independent of input order
                print(f"{'test/' + t:<16}{len(group):>8}{sum(s.mask_path is not None for s in group):>8}")
        else:
            if args.scenario in OPEN_SET_SCENARIOS and args.k is None:
                raise DataError(f"--scenario {args.scenario} needs --k M, the number of labelled anomalies (e.g. 10)")
            split = open_set_split(train, test, args.category, args.seed, args.scenario, args.k, args.held_out) \
                if args.scenario in OPEN_SET_SCENARIOS else \
                make_split(test, args.category, args.seed, args.scenario, args.k, args.held_out)
            write_split(split, args.out)
            print(f"wrote {args.out}: {len(split['train_defects'])} training defects, {len(split['eval'])} eval images")
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
