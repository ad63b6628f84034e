"""A synthetic MVTec-layout tree for the tests, the demo and the benchmarks: a periodic texture ("weave") and a
centred object ("washer"), each with four defect types whose masks are pixel-exact. The same seed writes the same
bytes; nothing is downloaded.

    python synthetic.py --out /tmp/s --size 128 --seed 0            # weave and washer, 40 train/good images each
    python synthetic.py --out /tmp/tiny --size 64 --n-train 8 --n-test-good 4 --n-defect 2
    python data.py check --data-root /tmp/s --category weave        # the counts per folder
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from data import DataError, HelpFormatter

SYNTH_DEFECTS = ("scratch", "hole", "stain", "missing")


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
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=40)
    p.add_argument("--n-test-good", type=int, default=12)
    p.add_argument("--n-defect", type=int, default=8, help="images per defect type")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    generate_synthetic(args.out, args.size, args.seed, args.n_train, args.n_test_good, args.n_defect)
    print(f"wrote synthetic categories weave, washer ({args.size} px) to {args.out}")


if __name__ == "__main__":
    main()
