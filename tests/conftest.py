"""Shared fixtures: a tiny synthetic MVTec-layout tree, generated once per test session (CPU, seconds)."""
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the scripts live in the repo root, flat

import data  # noqa: E402


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """weave (texture) and washer (object) at 64 px: 16 train/good, 6 test/good, 4 images per defect type."""
    root = tmp_path_factory.mktemp("synth")
    return data.generate_synthetic(root, size=64, seed=0, n_train=16, n_test_good=6, n_defect=4)


@pytest.fixture(scope="session")
def synth_root_128(tmp_path_factory) -> Path:
    """The same two categories at 128 px with more images, for the quality checks (AUROC thresholds)."""
    root = tmp_path_factory.mktemp("synth128")
    return data.generate_synthetic(root, size=128, seed=0, n_train=30, n_test_good=10, n_defect=6)


def truncated_copy(synth_root: Path, category: str, rel: str, dest: Path) -> Path:
    """A copy of one synthetic category under dest in which the image `rel` is cut short; returns dest."""
    shutil.copytree(synth_root / category, dest / category)
    bad = dest / category / rel
    bad.write_bytes(bad.read_bytes()[:100])
    return dest
