"""Synthetic defects from normal images: CutPaste and CutPaste-scar (Li, Sohn, Yoon, Pfister, "CutPaste:
Self-Supervised Learning for Anomaly Detection and Localization", CVPR 2021, Sec. 3.1-3.2), for classify.py
--synthetic cutpaste: a classifier trained on them needs no labelled anomaly.

Every defect is a pure function of (image, seed, epoch, index), like classify.Augment, and returns the pasted region
with the image, so a test can check that nothing outside it changed. Run as a script, it shows what the classifier
trains on: a few train/good images, their synthetic defects and the pasted regions, side by side.

    python synthetic.py --out /tmp/s --size 128
    python cutpaste.py --data-root /tmp/s --category weave --image-size 128 --out /tmp/cutpaste.png
    python classify.py --data-root /tmp/s --category weave --backbone efficientnet_lite0 --image-size 128 \\
        --synthetic cutpaste
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

import data

# CutPaste (Sec. 3.1): a rectangle of AREA_RATIO of the image area, aspect ratio (width / height) between
# ASPECT_RATIO and 1 / ASPECT_RATIO: area (0.02, 0.15), aspect (0.3, 1) u (1, 3.3), the paper's values as the public
# reimplementations use them (LilitYolyan/CutPaste, Runinho/pytorch-cutpaste; the authors' own code was not
# available to us). We draw the aspect ratio log-uniformly over (0.3, 1/0.3): wide and tall patches equally often,
# as the two intervals intend.
AREA_RATIO = (0.02, 0.15)
ASPECT_RATIO = 0.3
# CutPaste-scar (Sec. 3.2): a thin strip, width 2-16 px and length 10-25 px at the paper's 256 px, rotated by
# -45..45 degrees. We scale both ranges with the image size (4-32 x 20-50 px at 512 px), so that a scar covers the
# same share of the object at any --image-size.
SCAR_WIDTH = (2, 16)
SCAR_LENGTH = (10, 25)
SCAR_SCALE = 256
SCAR_ROTATION = 45.0  # degrees
# Colour jitter of the cut patch (the paper: "rotate or jitter pixel values in the patch"): brightness, contrast,
# saturation factors in [1 - JITTER, 1 + JITTER] and a hue shift of at most JITTER of the colour circle, the 0.1 of
# the public reimplementations (torchvision's ColorJitter(0.1, 0.1, 0.1, 0.1)).
JITTER = 0.1
# The paper trains on CutPaste alone, scar alone, or a 3-way task (normal / CutPaste / scar). A defect classifier has
# one defect class, so we mix the two kinds into it (binary "CutPaste + scar"): a scar with this probability.
SCAR_SHARE = 0.5


@dataclass(frozen=True)
class Pasted:
    """A synthetic defect: the new image, its kind, where the patch was cut and where it was pasted."""
    image: Image.Image            # the input with the patch pasted, same size and mode
    kind: str                     # "cutpaste" or "scar"
    source: tuple[int, int, int, int]  # (left, top, right, bottom) of the cut rectangle in the input
    box: tuple[int, int, int, int]     # (left, top, right, bottom) of the pasted patch (the scar's rotated bounds)
    mask: np.ndarray              # (H, W) bool: the pixels the patch replaced; elsewhere the image is the input


def defect_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one synthetic defect: seeded by (seed, epoch, index) alone, as classify.Augment is."""
    return np.random.default_rng([seed, *b"cutpaste", epoch, index])


def color_jitter(patch: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and saturation factors in [1 - JITTER, 1 + JITTER], then a hue shift, in that order."""
    u = rng.random(4)  # 4 uniform numbers in [0, 1), one per change
    patch = ImageEnhance.Brightness(patch).enhance(1 + (2 * u[0] - 1) * JITTER)
    patch = ImageEnhance.Contrast(patch).enhance(1 + (2 * u[1] - 1) * JITTER)
    patch = ImageEnhance.Color(patch).enhance(1 + (2 * u[2] - 1) * JITTER)  # PIL's "colour" is saturation
    shift = round((2 * u[3] - 1) * JITTER * 256)  # hue is 0..255 around the circle in PIL's HSV
    h, s, v = patch.convert("HSV").split()
    h = h.point(lambda x: (x + shift) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def other_position(rng: np.random.Generator, n_x: int, n_y: int, avoid: tuple[int, int]) -> tuple[int, int]:
    """A uniform top-left corner (x, y) in [0, n_x) x [0, n_y) other than `avoid`: the paste never lands where the
    patch was cut (it would change nothing but the jitter)."""
    n, skip = n_x * n_y, avoid[1] * n_x + avoid[0]
    inside = avoid[0] < n_x and avoid[1] < n_y
    k = int(rng.integers(n - 1 if inside else n))
    if inside and k >= skip:
        k += 1
    return k % n_x, k // n_x


def paste(image: Image.Image, patch: Image.Image, alpha: np.ndarray, kind: str, source: tuple[int, int, int, int],
          rng: np.random.Generator) -> Pasted:
    """Paste the patch where its binary alpha (h, w) is set, at a random corner other than the source's."""
    W, H = image.size
    w, h = patch.size
    x, y = other_position(rng, W - w + 1, H - h + 1, avoid=source[:2])
    out = image.copy()
    out.paste(patch, (x, y), Image.fromarray(alpha.astype(np.uint8) * 255))  # a 0/255 mask: copied or untouched
    mask = np.zeros((H, W), dtype=bool)
    mask[y:y + h, x:x + w] = alpha  # (h, w) -> its place in (H, W)
    return Pasted(out, kind, source, (x, y, x + w, y + h), mask)


def cutpaste(image: Image.Image, rng: np.random.Generator) -> Pasted:
    """CutPaste (Sec. 3.1): cut a rectangle of random area and aspect ratio, jitter its colours, paste it elsewhere."""
    W, H = image.size
    area = rng.uniform(*AREA_RATIO) * W * H
    aspect = math.exp(rng.uniform(math.log(ASPECT_RATIO), -math.log(ASPECT_RATIO)))  # width / height, log-uniform
    w = min(W - 1, max(1, round(math.sqrt(area * aspect))))  # at most W - 1: there is always another place to paste
    h = min(H - 1, max(1, round(math.sqrt(area / aspect))))
    left, top = int(rng.integers(W - w + 1)), int(rng.integers(H - h + 1))
    source = (left, top, left + w, top + h)
    patch = color_jitter(image.crop(source), rng)
    return paste(image, patch, np.ones((h, w), dtype=bool), "cutpaste", source, rng)


def scaled_range(low_high: tuple[int, int], size: int) -> tuple[int, int]:
    """A pixel range of the paper's 256 px images at `size` px (at least 1 px)."""
    low, high = (max(1, round(v * size / SCAR_SCALE)) for v in low_high)
    return low, max(low, high)


def scar(image: Image.Image, rng: np.random.Generator) -> Pasted:
    """CutPaste-scar (Sec. 3.2): cut a thin strip, jitter its colours, rotate it by -45..45 degrees, paste it
    elsewhere; the mask is the rotated strip's exact pixels, not its bounding box."""
    W, H = image.size
    (w_low, w_high), (h_low, h_high) = scaled_range(SCAR_WIDTH, min(W, H)), scaled_range(SCAR_LENGTH, min(W, H))
    w = min(W - 1, int(rng.integers(w_low, w_high + 1)))  # inclusive ranges, as the paper's "2-16 px"
    h = min(H - 1, int(rng.integers(h_low, h_high + 1)))
    left, top = int(rng.integers(W - w + 1)), int(rng.integers(H - h + 1))
    source = (left, top, left + w, top + h)
    patch = color_jitter(image.crop(source), rng).convert("RGBA")
    # Nearest-neighbour rotation: every pixel of the rotated strip is a pixel of the jittered strip and its alpha is
    # 0 or 255, so the mask is exact. expand=True: the rotated strip's bounds, transparent around it.
    patch = patch.rotate(rng.uniform(-SCAR_ROTATION, SCAR_ROTATION), resample=Image.NEAREST, expand=True)
    if patch.width >= W or patch.height >= H:  # only at tiny sizes: no room to move the rotated strip
        patch = patch.crop((0, 0, min(patch.width, W - 1), min(patch.height, H - 1)))
    alpha = np.asarray(patch)[..., 3] > 0  # (h', w')
    return paste(image, patch.convert("RGB"), alpha, "scar", source, rng)


def synthetic_defect(image: Image.Image, seed: int, epoch: int, index: int) -> Pasted:
    """One synthetic defect of an RGB image, a pure function of (image, seed, epoch, index): CutPaste or, with
    probability SCAR_SHARE, CutPaste-scar, both labelled "defect" (not the paper's 3-way task)."""
    rng = defect_rng(seed, epoch, index)
    return scar(image, rng) if rng.random() < SCAR_SHARE else cutpaste(image, rng)


# ----------------------------------------------------------------------------------------------------------------
def examples(samples: list[data.Sample], image_size: int, seed: int) -> tuple[Image.Image, list[str]]:
    """(a sheet with one row per image: the image at the model's size, its synthetic defect of epoch 1, the pasted
    region in white; the kind of each defect)."""
    rows, kinds = [], []
    for i, s in enumerate(samples):
        image = data.read_image(s.path).resize((image_size, image_size), Image.BILINEAR)
        d = synthetic_defect(image, seed, 1, i)
        mask = Image.fromarray(d.mask.astype(np.uint8) * 255).convert("RGB")
        kinds.append(d.kind)
        rows.append(np.concatenate([np.asarray(image), np.asarray(d.image), np.asarray(mask)], axis=1))  # (S, 3S, 3)
    return Image.fromarray(np.concatenate(rows, axis=0)), kinds  # (n S, 3 S, 3)


def run(args: argparse.Namespace) -> Path:
    """Write the example sheet of the first --n train/good images; return its path."""
    if args.n < 1 or args.image_size < 16:
        raise data.DataError(f"--n must be at least 1 and --image-size at least 16, got {args.n} and {args.image_size}")
    train, _ = data.load_category(args.data_root, args.category)
    sheet, kinds = examples(train[:args.n], args.image_size, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    sheet.save(tmp)
    tmp.replace(out)
    print(f"wrote {out}: {len(kinds)} images ({kinds.count('cutpaste')} cutpaste, {kinds.count('scar')} scar)")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("--data-root", required=True, help="folder holding <category>/train/good")
    p.add_argument("--category", required=True)
    p.add_argument("--image-size", type=int, default=256, help="the model's input size, where defects are made")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=8, help="train/good images shown")
    p.add_argument("--out", default="cutpaste.png", help="the PNG sheet: image | synthetic defect | pasted region")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    try:
        return run(args)
    except data.DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
