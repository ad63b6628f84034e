"""Shared fixtures: a tiny synthetic MVTec-layout tree, generated once per test session (CPU, seconds)."""
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the scripts live in the repo root, flat

import data  # noqa: E402
import synthetic  # noqa: E402

CATEGORIES = ("weave", "washer")
DEFECTS = ("hole", "missing", "scratch", "stain")  # sorted, as the loader returns them
N_TRAIN, N_TEST_GOOD, N_DEFECT = 16, 6, 4  # synth_root's


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """weave (texture) and washer (object) at 64 px: 16 train/good, 6 test/good, 4 images per defect type."""
    root = tmp_path_factory.mktemp("synth")
    return synthetic.generate_synthetic(root, size=64, seed=0, n_train=16, n_test_good=6, n_defect=4)


@pytest.fixture(scope="session")
def synth_root_128(tmp_path_factory) -> Path:
    """The same two categories at 128 px with more images, for the quality checks (AUROC thresholds)."""
    root = tmp_path_factory.mktemp("synth128")
    return synthetic.generate_synthetic(root, size=128, seed=0, n_train=30, n_test_good=10, n_defect=6)


@pytest.fixture(scope="session")
def loaded(synth_root):
    """{category: (train, test)} of synth_root; loading it must not warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return {c: data.load_category(synth_root, c) for c in CATEGORIES}


def pixels(path) -> np.ndarray:
    """(H, W, 3) float array of an image file."""
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def truncated_copy(synth_root: Path, category: str, rel: str, dest: Path) -> Path:
    """A copy of one synthetic category under dest in which the image `rel` is cut short; returns dest."""
    shutil.copytree(synth_root / category, dest / category)
    bad = dest / category / rel
    bad.write_bytes(bad.read_bytes()[:100])
    return dest
