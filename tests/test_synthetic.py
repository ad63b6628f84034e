"""Tests of synthetic.py: every defect type is visible under its pixel-exact mask, normal images vary, the same seed
writes the same bytes, and the command writes a tree that data.py loads.

    python3 -m pytest -q tests/test_synthetic.py --durations=5
"""
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import synthetic
from conftest import CATEGORIES, pixels


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def tree_hashes(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------------
# defects under their masks (the shared synthetic tree)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("category", CATEGORIES)
def test_hole_is_dark_under_its_mask(loaded, category):
    _, test = loaded[category]
    holes = [s for s in test if s.defect_type == "hole"]
    assert holes
    for s in holes:
        gray = pixels(s.path).mean(axis=2)
        mask = data.read_mask(s, gray.shape[::-1])
        inside, outside = gray[mask].mean(), gray[~mask].mean()
        assert inside < 30 and inside < 0.5 * outside, (s.rel, inside, outside)


@pytest.mark.parametrize("category", CATEGORIES)
def test_stain_changes_colour_under_its_mask(loaded, category):
    _, test = loaded[category]
    for s in (s for s in test if s.defect_type == "stain"):
        rgb = pixels(s.path)
        mask = data.read_mask(s, rgb.shape[1::-1])
        blue_minus_red = rgb[..., 2] - rgb[..., 0]  # the stain is blue-green; weave is brown, washer grey
        assert blue_minus_red[mask].mean() > blue_minus_red[~mask].mean() + 20, s.rel


@pytest.mark.parametrize("category", CATEGORIES)
def test_scratch_is_bright_under_its_mask(loaded, category):
    _, test = loaded[category]
    for s in (s for s in test if s.defect_type == "scratch"):
        gray = pixels(s.path).mean(axis=2)
        mask = data.read_mask(s, gray.shape[::-1])
        assert gray[mask].mean() > 180 and gray[mask].mean() > gray[~mask].mean() + 50, s.rel


def test_missing_piece_of_weave_is_flat_under_its_mask(loaded):
    _, test = loaded["weave"]
    for s in (s for s in test if s.defect_type == "missing"):
        gray = pixels(s.path).mean(axis=2)
        mask = data.read_mask(s, gray.shape[::-1])
        assert gray[mask].std() < 0.5 * gray[~mask].std(), s.rel  # the texture is gone there


@pytest.mark.parametrize("category", CATEGORIES)
def test_normal_images_vary(loaded, category):
    train, _ = loaded[category]
    images = [pixels(s.path) for s in train]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i] - images[j]).mean() > 1.0, (i, j)
    assert np.std([im.mean() for im in images]) > 1.0  # lighting varies, not only sensor noise


# ----------------------------------------------------------------------------------------------------------------
# synthetic generator
# ----------------------------------------------------------------------------------------------------------------
TINY = dict(size=32, n_train=3, n_test_good=2, n_defect=2)


@pytest.fixture(scope="module")
def tiny_trees(tmp_path_factory):
    """Three tiny trees: seed 0 twice (into different folders) and seed 1."""
    base = tmp_path_factory.mktemp("tiny")
    return tuple(synthetic.generate_synthetic(base / name, seed=seed, **TINY)
                 for name, seed in (("a", 0), ("b", 0), ("c", 1)))


def test_generator_same_seed_same_bytes(tiny_trees):
    a, b, _ = tiny_trees
    ha, hb = tree_hashes(a), tree_hashes(b)
    per_category = TINY["n_train"] + TINY["n_test_good"] + 2 * len(synthetic.SYNTH_DEFECTS) * TINY["n_defect"]
    assert len(ha) == len(CATEGORIES) * per_category  # images + masks
    assert ha == hb


def test_generator_different_seed_different_bytes(tiny_trees):
    a, _, c = tiny_trees
    ha, hc = tree_hashes(a), tree_hashes(c)
    assert ha.keys() == hc.keys()
    images = [k for k in ha if "ground_truth" not in k]
    assert all(ha[k] != hc[k] for k in images)
    assert any(ha[k] != hc[k] for k in ha if "ground_truth" in k)


def test_generator_masks_nonempty_inside_the_image_and_enough_types(tiny_trees):
    a = tiny_trees[0]
    for c in CATEGORIES:
        _, test = data.load_category(a, c)
        types = {s.defect_type for s in test if s.label == 1}
        assert len(types) >= 3
        for s in (s for s in test if s.label == 1):
            mask = data.read_mask(s, Image.open(s.path).size)  # also checks the mask has the image's size
            assert mask.shape == (32, 32) and 0 < mask.sum() < 0.5 * mask.size, s.rel
            mask_file = np.asarray(Image.open(s.mask_path))
            assert set(np.unique(mask_file)) <= {0, 255}


def test_generator_rejects_unknown_category(tmp_path):
    with pytest.raises(data.DataError, match=r"unknown synthetic category 'bottle'"):
        synthetic.generate_synthetic(tmp_path, size=32, categories=("bottle",))


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def test_cli_synth_writes_a_loadable_tree(tmp_path):
    synthetic.main(["--out", str(tmp_path / "s"), "--size", "32", "--n-train", "2", "--n-test-good", "1",
                    "--n-defect", "1"])
    for c in CATEGORIES:
        train, test = data.load_category(tmp_path / "s", c)
        assert len(train) == 2 and len(test) == 1 + len(synthetic.SYNTH_DEFECTS)
        assert Image.open(train[0].path).size == (32, 32)
