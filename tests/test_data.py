"""Tests of data.py: the MVTec-layout loader, transforms, errors, the check command, atomic_dir and run info.

    python3 -m pytest -q tests/test_data.py --durations=5
"""
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import CATEGORIES, DEFECTS, N_DEFECT, N_TEST_GOOD, N_TRAIN, pixels

RAW = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean, std that leave pixel values in [0, 1]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def copy_category(synth_root: Path, tmp_path: Path, category: str = "weave") -> Path:
    """A private copy of one category (tests below damage it); returns the new data root."""
    root = tmp_path / "root"
    shutil.copytree(synth_root / category, root / category)
    return root


# ----------------------------------------------------------------------------------------------------------------
# loader on the synthetic tree
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("category", CATEGORIES)
def test_counts_labels_and_types(loaded, category):
    train, test = loaded[category]
    assert len(train) == N_TRAIN
    assert all(s.label == 0 and s.defect_type == "good" and s.mask_path is None for s in train)
    assert all(s.rel.startswith("train/good/") for s in train)
    counts = {t: sum(s.defect_type == t for s in test) for t in {s.defect_type for s in test}}
    assert counts == {"good": N_TEST_GOOD, **{d: N_DEFECT for d in DEFECTS}}
    for s in test:
        assert s.label == (0 if s.defect_type == "good" else 1)
        assert Path(s.path).parent.name == s.defect_type
        assert Path(s.path).is_absolute() and Path(s.path).is_file()
        assert s.rel == f"test/{s.defect_type}/{Path(s.path).name}"


@pytest.mark.parametrize("category", CATEGORIES)
def test_order_is_sorted_and_deterministic(loaded, synth_root, category):
    train, test = loaded[category]
    assert [s.rel for s in train] == sorted(s.rel for s in train)
    keys = [(s.defect_type, Path(s.path).name) for s in test]
    assert keys == sorted(keys)
    again = data.load_category(synth_root, category)
    assert again == (train, test)


@pytest.mark.parametrize("category", CATEGORIES)
def test_masks_paired_by_stem_nonempty_for_defects_zero_for_good(loaded, category):
    _, test = loaded[category]
    for s in test:
        size = Image.open(s.path).size
        mask = data.read_mask(s, size)
        assert mask.shape == size[::-1] and mask.dtype == bool
        assert s.has_mask
        if s.label == 0:
            assert s.mask_path is None and not mask.any()
        else:
            mp = Path(s.mask_path)
            assert mp.name == f"{Path(s.path).stem}_mask.png"
            assert mp.parent.name == s.defect_type and mp.parent.parent.name == "ground_truth"
            assert 0 < mask.sum() < mask.size


def test_loader_ignores_non_images_and_reads_uppercase_extensions(synth_root, tmp_path):
    root = copy_category(synth_root, tmp_path)
    (root / "weave" / "test" / "hole" / "notes.txt").write_text("not an image")
    (root / "weave" / "train" / "good" / ".DS_Store").write_bytes(b"\0\1")
    (root / "weave" / "train" / "good" / "sub").mkdir()
    shutil.move(root / "weave" / "train" / "good" / "000.png", root / "weave" / "train" / "good" / "000.PNG")
    train, test = data.load_category(root, "weave")
    assert len(train) == N_TRAIN and any(s.path.endswith("000.PNG") for s in train)
    assert sum(s.defect_type == "hole" for s in test) == N_DEFECT


def test_label_comes_from_the_exact_folder_name(synth_root, tmp_path):
    """A defect folder whose name merely contains 'good' is still a defect (no substring labels)."""
    root = copy_category(synth_root, tmp_path)
    cat = root / "weave"
    shutil.move(cat / "test" / "stain", cat / "test" / "not_good")
    shutil.move(cat / "ground_truth" / "stain", cat / "ground_truth" / "not_good")
    _, test = data.load_category(root, "weave")
    odd = [s for s in test if s.defect_type == "not_good"]
    assert len(odd) == N_DEFECT and all(s.label == 1 and s.mask_path for s in odd)


# ----------------------------------------------------------------------------------------------------------------
# transforms and MVTecDataset
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [48, 100])
def test_dataset_shapes_and_binary_masks(loaded, size):
    _, test = loaded["washer"]
    ds = data.MVTecDataset(test, size, *RAW)
    assert len(ds) == len(test)
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, size, size) and item["mask"].dtype == torch.float32
        values = set(item["mask"].unique().tolist())
        assert item["label"] == test[i].label and item["index"] == i and item["has_mask"] is True
        if test[i].label == 1:
            assert values == {0.0, 1.0}  # nearest-neighbour: no in-between values
        else:
            assert values == {0.0}
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0


@pytest.mark.parametrize("category", CATEGORIES)
@pytest.mark.parametrize("size", [48, 100])
def test_resized_mask_stays_on_the_defect(loaded, category, size):
    _, test = loaded[category]
    defects = [s for s in test if s.label == 1]
    ds = data.MVTecDataset(defects, size, *RAW)
    for i, s in enumerate(defects):
        item = ds[i]
        mask = item["mask"][0].bool().numpy()
        original = data.read_mask(s, Image.open(s.path).size)
        assert mask.any(), s.rel
        # nearest-neighbour reference: output pixel i samples source pixel floor((i + 0.5) * H / S)
        idx = np.floor((np.arange(size) + 0.5) * original.shape[0] / size).astype(int)
        ref = original[np.ix_(idx, idx)]
        # no shift: every resized mask pixel comes from within one source pixel of a defect pixel
        # (PIL's fixed-point nearest may pick the neighbour of the ideal source pixel)
        near = np.zeros_like(original)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                near |= np.roll(original, (dy, dx), axis=(0, 1))
        assert not (mask & ~near[np.ix_(idx, idx)]).any(), s.rel
        if s.defect_type != "scratch":  # blobs: the areas agree (a 1-px scratch may shift by a pixel)
            iou = (mask & ref).sum() / (mask | ref).sum()
            assert iou > 0.6, (s.rel, iou)
        if s.defect_type == "hole":  # and the resized image is still dark there
            gray = item["image"].mean(0).numpy()
            assert gray[mask].mean() < 0.6 * gray[~mask].mean(), s.rel


def test_image_to_tensor_normalises_each_rgb_channel():
    image = Image.new("RGB", (10, 7), (255, 51, 0))
    mean, std = (0.5, 0.1, 0.2), (0.5, 0.2, 0.4)
    x = data.image_to_tensor(image, 16, mean, std)
    assert x.shape == (3, 16, 16)
    expected = torch.tensor([(1.0 - 0.5) / 0.5, (0.2 - 0.1) / 0.2, (0.0 - 0.2) / 0.4])
    assert torch.allclose(x, expected.view(3, 1, 1).expand(3, 16, 16), atol=1e-5)


def test_grayscale_and_rgba_images_become_rgb(synth_root, tmp_path):
    root = copy_category(synth_root, tmp_path)
    good = root / "weave" / "train" / "good"
    rgb0, rgb1 = pixels(good / "000.png").astype(np.uint8), pixels(good / "001.png").astype(np.uint8)
    gray = Image.fromarray(rgb0).convert("L")
    gray.save(good / "000.png")
    alpha = np.linspace(0, 255, rgb1.shape[0] * rgb1.shape[1]).reshape(rgb1.shape[:2]).astype(np.uint8)
    Image.fromarray(np.dstack([rgb1, alpha]), "RGBA").save(good / "001.png")
    assert Image.open(good / "000.png").mode == "L" and Image.open(good / "001.png").mode == "RGBA"

    im0, im1 = data.read_image(good / "000.png"), data.read_image(good / "001.png")
    assert im0.mode == "RGB" and im1.mode == "RGB"
    a0 = np.asarray(im0)
    assert (a0[..., 0] == np.asarray(gray)).all() and (a0[..., 0] == a0[..., 1]).all() and (a0[..., 1] == a0[..., 2]).all()
    assert (np.asarray(im1) == rgb1).all()  # alpha dropped, colour kept

    train, _ = data.load_category(root, "weave")
    ds = data.MVTecDataset(train[:2], 32, *RAW)
    assert ds[0]["image"].shape == (3, 32, 32) and ds[1]["image"].shape == (3, 32, 32)


def test_center_crop_crops_image_and_mask_identically(loaded):
    _, test = loaded["washer"]
    defects = [s for s in test if s.label == 1]
    full = data.MVTecDataset(defects, 64, *RAW)
    crop = data.MVTecDataset(defects, 64, *RAW, center_crop=48)
    for i in range(len(defects)):
        f, c = full[i], crop[i]
        assert c["image"].shape == (3, 48, 48) and c["mask"].shape == (1, 48, 48)
        assert torch.equal(c["image"], f["image"][:, 8:56, 8:56])
        assert torch.equal(c["mask"], f["mask"][:, 8:56, 8:56])
    # the washer is centred, so the crop keeps most of every defect
    assert sum(crop[i]["mask"].sum() for i in range(len(defects))) > \
        0.7 * sum(full[i]["mask"].sum() for i in range(len(defects)))


def test_make_loader_batches_and_seeded_shuffle(loaded):
    _, test = loaded["weave"]
    batch = next(iter(data.make_loader(test, 32, *RAW, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["mask"].shape == (4, 1, 32, 32)
    assert batch["label"].tolist() == [s.label for s in test[:4]] and batch["index"].tolist() == [0, 1, 2, 3]

    def order(seed):
        loader = data.make_loader(test, 16, *RAW, batch_size=5, shuffle=True, seed=seed)
        return [i for b in loader for i in b["index"].tolist()]
    assert order(0) == order(0)
    assert sorted(order(0)) == list(range(len(test)))
    assert order(0) != order(1)


# ----------------------------------------------------------------------------------------------------------------
# bad input: one DataError sentence that names the path
# ----------------------------------------------------------------------------------------------------------------
def test_missing_root(tmp_path):
    with pytest.raises(data.DataError, match=r"data root .*nowhere does not exist"):
        data.load_category(tmp_path / "nowhere", "weave")


def test_missing_category_lists_the_categories_found(synth_root, tmp_path):
    with pytest.raises(data.DataError, match=r"category 'wrong' not found .*; categories found: washer, weave$"):
        data.load_category(synth_root, "wrong")
    root = copy_category(synth_root, tmp_path)
    (root / "notes").mkdir()  # not a category: no train/good
    with pytest.raises(data.DataError, match=r"categories found: weave$"):
        data.load_category(root, "screw")


@pytest.mark.parametrize("how", ["empty", "non-images only", "no folder"])
def test_no_training_images(synth_root, tmp_path, how):
    root = copy_category(synth_root, tmp_path)
    good = root / "weave" / "train" / "good"
    shutil.rmtree(good)
    if how != "no folder":
        good.mkdir()
    if how == "non-images only":
        (good / "readme.txt").write_text("x")
    with pytest.raises(data.DataError, match=r"no training images in .*train/good"):
        data.load_category(root, "weave")


def test_missing_test_folder(synth_root, tmp_path):
    root = copy_category(synth_root, tmp_path)
    shutil.rmtree(root / "weave" / "test")
    with pytest.raises(data.DataError, match=r"no test folder .*weave/test \(expected test/good"):
        data.load_category(root, "weave")


def test_defect_folder_without_images(synth_root, tmp_path):
    root = copy_category(synth_root, tmp_path)
    (root / "weave" / "test" / "crack").mkdir()
    with pytest.raises(data.DataError, match=r"test folder .*test/crack has no images"):
        data.load_category(root, "weave")


def test_category_without_defect_folders(synth_root, tmp_path):
    root = copy_category(synth_root, tmp_path)
    for d in DEFECTS:
        shutil.rmtree(root / "weave" / "test" / d)
    with pytest.raises(data.DataError, match=r"has no defect images \(expected test/<defect_type>"):
        data.load_category(root, "weave")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_image_is_named(synth_root, tmp_path, damage):
    root = copy_category(synth_root, tmp_path)
    path = root / "weave" / "test" / "hole" / "001.png"
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[:len(raw) // 2], "garbage": bytes(range(256)) * 8, "empty": b""}[damage])
    with pytest.raises(data.DataError, match=r"cannot read image " + re.escape(str(path))):
        data.load_category(root, "weave")  # found when the category is loaded, before any fitting
    _, test = data.load_category(root, "weave", check=False)  # ... and, unchecked, when it is read
    with pytest.raises(data.DataError, match=r"cannot read image " + re.escape(str(path))):
        data.read_image(path)
    i = next(i for i, s in enumerate(test) if s.path == str(path))
    with pytest.raises(data.DataError, match=re.escape(str(path))):
        data.MVTecDataset(test, 32, *RAW)[i]


def test_unreadable_mask_is_named(synth_root, tmp_path):
    root = copy_category(synth_root, tmp_path)
    mask_path = root / "weave" / "ground_truth" / "hole" / "002_mask.png"
    mask_path.write_bytes(b"\x89PNG garbage")
    with pytest.raises(data.DataError, match=r"cannot read mask " + re.escape(str(mask_path))):
        data.load_category(root, "weave")
    _, test = data.load_category(root, "weave", check=False)
    s = next(s for s in test if s.mask_path == str(mask_path))
    with pytest.raises(data.DataError, match=r"cannot read mask " + re.escape(str(mask_path))):
        data.read_mask(s, (64, 64))


def test_mask_size_differs_from_image(synth_root, tmp_path):
    root = copy_category(synth_root, tmp_path)
    mask_path = root / "weave" / "ground_truth" / "stain" / "000_mask.png"
    Image.fromarray(np.full((24, 32), 255, np.uint8)).save(mask_path)
    expected = (f"mask {mask_path} is 32x24 px but its image {root / 'weave' / 'test' / 'stain' / '000.png'} "
                f"is 64x64 px")
    with pytest.raises(data.DataError, match=re.escape(expected)):
        data.load_category(root, "weave")
    _, test = data.load_category(root, "weave", check=False)
    i, s = next((i, s) for i, s in enumerate(test) if s.mask_path == str(mask_path))
    with pytest.raises(data.DataError, match=re.escape(expected)):
        data.MVTecDataset(test, 32, *RAW)[i]


def test_defect_without_mask_warns_and_has_no_mask(synth_root, tmp_path):
    root = copy_category(synth_root, tmp_path)
    (root / "weave" / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.warns(UserWarning, match=r"1 defect images have no mask .*test/scratch/001\.png"):
        _, test = data.load_category(root, "weave")
    without = [s for s in test if not s.has_mask]
    assert [s.rel for s in without] == ["test/scratch/001.png"]
    assert without[0].label == 1 and without[0].mask_path is None
    i = test.index(without[0])
    item = data.MVTecDataset(test, 32, *RAW)[i]
    assert item["has_mask"] is False and item["label"] == 1 and item["mask"].sum() == 0


def test_mask_named_like_its_image_is_found(synth_root, tmp_path):
    root = copy_category(synth_root, tmp_path)
    gt = root / "weave" / "ground_truth" / "hole"
    shutil.move(gt / "003_mask.png", gt / "003.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, test = data.load_category(root, "weave")
    s = next(s for s in test if s.rel == "test/hole/003.png")
    assert s.mask_path == str(gt / "003.png") and data.read_mask(s, (64, 64)).any()


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def test_cli_check_wrong_category_exits_with_the_categories_found(synth_root):
    with pytest.raises(SystemExit) as e:
        data.main(["check", "--data-root", str(synth_root), "--category", "wrong"])
    assert isinstance(e.value.code, str) and e.value.code  # non-zero exit, message on stderr
    assert e.value.code.startswith("error: category 'wrong' not found")
    assert "categories found: washer, weave" in e.value.code


def test_cli_check_prints_counts(synth_root, capsys):
    data.main(["check", "--data-root", str(synth_root), "--category", "washer"])
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["train/good"] == [str(N_TRAIN)]
    assert rows["test/good"] == [str(N_TEST_GOOD), "0"]
    for d in DEFECTS:
        assert rows[f"test/{d}"] == [str(N_DEFECT), str(N_DEFECT)]


# ----------------------------------------------------------------------------------------------------------------
# atomic_dir
# ----------------------------------------------------------------------------------------------------------------
def test_atomic_dir_success_writes_files(tmp_path):
    out = tmp_path / "runs" / "exp"
    with data.atomic_dir(out) as tmp:
        assert tmp != out and tmp.parent == out.parent and tmp.is_dir()
        (tmp / "metrics.json").write_text("{}")
        assert not out.exists()  # nothing visible until the block succeeds
    assert (out / "metrics.json").read_text() == "{}"
    assert sorted(p.name for p in out.parent.iterdir()) == ["exp"]


def test_atomic_dir_error_leaves_nothing(tmp_path):
    out = tmp_path / "exp"
    with pytest.raises(RuntimeError, match="boom"):
        with data.atomic_dir(out) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_error_keeps_the_previous_result(tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with data.atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]


def test_atomic_dir_replaces_an_existing_dir(tmp_path):
    out = tmp_path / "exp"
    (out / "sub").mkdir(parents=True)
    (out / "old.txt").write_text("old")
    (out / "sub" / "x").write_text("x")
    with data.atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]


def test_center_crop_larger_than_the_image_is_refused(loaded):
    train, _ = loaded["weave"]
    with pytest.raises(data.DataError, match="center crop 80 px is larger than the resized image"):
        data.MVTecDataset(train, 64, (0, 0, 0), (1, 1, 1), center_crop=80)


def test_code_version_is_read_once_per_process(monkeypatch):
    data.code_version.cache_clear()
    first = data.code_version()
    assert set(first) == {"git_commit", "git_dirty"}
    calls = []
    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: calls.append(a))  # a later HEAD is never read
    assert data.run_info()["git_commit"] == first["git_commit"] and not calls
    data.code_version.cache_clear()
