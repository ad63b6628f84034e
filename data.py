"""Data for every script: the MVTec AD folder layout and its checks, the images and masks read from it, the 512 px
transforms and the torch loader over them, and the result files every script writes (JSON, scores.csv, overlays).
The layout and the loader are one file because they read the same files: a bad one fails here, with one sentence
that names the path. The experiment splits are in splits.py, the synthetic generator in synthetic.py.

    python synthetic.py --out /tmp/s --size 128 --seed 0            # a synthetic MVTec-layout tree (weave, washer)
    python data.py check --data-root /tmp/s --category weave        # counts per folder, or the error
    python data.py check --data-root ~/mvtec --category bottle
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
# Decoded images kept in memory by resized_image (classify.py reads every image once per epoch): at 512 px an RGB
# image is 0.79 MB, so 400 images take 315 MB and the cache at most 400 MB, per process (each loader worker has one).
IMAGE_CACHE = 512
MODEL_FORMAT = 1  # model.json's layout (issue 33); a reader refuses any other: a changed layout is a new number
MODEL_KINDS = ("patchcore", "classifier")


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


def load_category(root: str | Path, category: str, check: bool = True,
                  defects_optional: bool = False) -> tuple[list[Sample], list[Sample]]:
    """(train samples, test samples) of one category, sorted by defect type then file name; with `check`, every
    file is checked first (check_files), so that a bad one fails before any fitting or training.

    defects_optional: a category of normal images only (a new product line: train/good, perhaps test/good) is
    allowed, for the callers that fit from normal images alone (issue 33); test is then [] without a test folder.
    The study's callers keep it False: an evaluation needs labelled defects."""
    folder = category_dir(root, category)
    good_dir = folder / "train" / "good"
    train_files = list_images(good_dir) if good_dir.is_dir() else []
    if not train_files:
        raise DataError(f"no training images in {good_dir} (expected image files of normal parts)")
    train = [Sample(str(p), str(p.relative_to(folder)), 0, "good", None) for p in train_files]

    test_dir = folder / "test"
    if not test_dir.is_dir() and defects_optional:
        test_dir = None
    elif not test_dir.is_dir():
        raise DataError(f"no test folder {test_dir} (expected test/good and test/<defect_type> folders)")
    test, missing_masks = [], []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()) if test_dir else []:
        files = list_images(type_dir)
        if not files:
            raise DataError(f"test folder {type_dir} has no images")
        label = 0 if type_dir.name == "good" else 1
        for p in files:
            mask = None if label == 0 else find_mask(folder / "ground_truth" / type_dir.name, p.stem)
            if label == 1 and mask is None:
                missing_masks.append(p)
            test.append(Sample(str(p), str(p.relative_to(folder)), label, type_dir.name, mask and str(mask)))
    if not any(s.label == 1 for s in test) and not defects_optional:
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
    """The git commit of the code this process runs, and whether its tracked code (Python files, requirements.txt)
    differed from it, read once: the first call (at the start of every script's run) fixes it, so a commit made
    while a long study runs is not recorded for runs whose code was loaded before it. Results, docs and the report
    files a study rewrites as it goes do not make the code dirty."""
    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=Path(__file__).parent,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    status = git("status", "--porcelain", "--untracked-files=no", "--", "*.py", "requirements.txt")
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


# ----------------------------------------------------------------------------------------------------------------
# The model folder (issue 33): what a run fitted plus model.json, everything predict.py needs to score new images
# ----------------------------------------------------------------------------------------------------------------
def package_versions() -> dict:
    """Versions of the packages whose numbers the scores depend on, for model.json."""
    import torchvision
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
                "numpy": np.__version__, "pillow": Image.__version__}
    with contextlib.suppress(ImportError):
        import faiss
        versions["faiss"] = faiss.__version__
    return versions


def calibration(rels: Sequence[str], scores: np.ndarray, maps: np.ndarray, image_threshold: float,
                pixel_threshold: float, images: str) -> dict:
    """model.json's calibration from held-out normal images (N,), their maps (N, S, S) and the two thresholds.

    The maps' colour scale is fixed once here, never per image or per set (per-image scaling paints every clean
    part as defective; issue 33): from the normals' median pixel (the colour of a clean part) to as far above the
    pixel threshold, which sits at the middle of the scale. The held-out normals' scores, by path, are what the
    fused detector's z-score is computed against (its mean and spread) and what sets its threshold."""
    vmin = float(np.median(maps))
    return {"images": images, "image_threshold": float(image_threshold),
            "normal_scores": {r: float(x) for r, x in zip(rels, scores)},
            "pixel_threshold": float(pixel_threshold),
            "colour_scale": [vmin, max(2 * float(pixel_threshold) - vmin, vmin + 1e-6)]}


def write_model_json(folder: str | Path, kind: str, files: dict, model: dict, calib: dict | None,
                     category: str) -> None:
    """folder/model.json: which files hold the fitted model, how to rebuild its input pipeline, its calibration,
    and the code and package versions that wrote it. Read back by read_model_json."""
    write_json(Path(folder) / "model.json", {
        "format": MODEL_FORMAT, "kind": kind, "category": category, "files": files, "model": model,
        "calibration": calib, "code": code_version(), "versions": package_versions()})


def read_model_json(folder: str | Path) -> dict:
    """The model.json of a model folder, checked for the fields every reader needs; one sentence if it is not one.
    JSON only: reading a model folder runs nothing from it."""
    path = Path(folder) / "model.json"
    if not Path(folder).is_dir():
        raise DataError(f"model folder {folder} does not exist (expected a run folder of patchcore.py or classify.py)")
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"no model.json in {folder} (expected a run folder written by patchcore.py or "
                        f"classify.py since issue 33)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not isinstance(info, dict) or info.get("format") != MODEL_FORMAT or info.get("kind") not in MODEL_KINDS:
        found = info.get("format") if isinstance(info, dict) else None
        raise DataError(f"{path} is not a model folder this code reads (format {found!r}, kind "
                        f"{info.get('kind') if isinstance(info, dict) else None!r}; expected format {MODEL_FORMAT} "
                        f"and kind {' or '.join(MODEL_KINDS)}): refit it with this version")
    for key in ("files", "model", "calibration", "category"):
        if key not in info:
            raise DataError(f"{path} has no '{key}' entry (refit it with this version)")
    return info


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
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="print the folder counts of a category", formatter_class=HelpFormatter)
    c.add_argument("--data-root", required=True)
    c.add_argument("--category", required=True)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        train, test = load_category(args.data_root, args.category)
        print(f"{'folder':<16}{'images':>8}{'masks':>8}")
        print(f"{'train/good':<16}{len(train):>8}{'':>8}")
        for t in sorted({s.defect_type for s in test}):
            group = sorted((s for s in test if s.defect_type == t), key=lambda s: s.rel)  # independent of input order
            print(f"{'test/' + t:<16}{len(group):>8}{sum(s.mask_path is not None for s in group):>8}")
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
