"""Tests of data.py: the MVTec-layout loader, transforms, errors, CLI, synthetic generator, splits and atomic_dir.

    python3 -m pytest -q tests/test_data.py --durations=5
"""
import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data

CATEGORIES = ("weave", "washer")
DEFECTS = ("hole", "missing", "scratch", "stain")  # sorted, as the loader returns them
N_TRAIN, N_TEST_GOOD, N_DEFECT = 16, 6, 4  # conftest's synth_root
RAW = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean, std that leave pixel values in [0, 1]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def copy_category(synth_root: Path, tmp_path: Path, category: str = "weave") -> Path:
    """A private copy of one category (tests below damage it); returns the new data root."""
    root = tmp_path / "root"
    shutil.copytree(synth_root / category, root / category)
    return root


def pixels(path) -> np.ndarray:
    """(H, W, 3) float array of an image file."""
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def tree_hashes(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def fake_test(counts: dict[str, int]) -> list[data.Sample]:
    """Test samples without files (the split functions only look at rel and defect_type)."""
    return [data.Sample(f"/x/test/{t}/{i:03d}.png", f"test/{t}/{i:03d}.png", int(t != "good"), t, None)
            for t, n in counts.items() for i in range(n)]


@pytest.fixture(scope="module")
def loaded(synth_root):
    """{category: (train, test)} of the shared synthetic tree; loading it must not warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return {c: data.load_category(synth_root, c) for c in CATEGORIES}


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


def test_cli_split_writes_the_split(synth_root, loaded, tmp_path):
    out = tmp_path / "split.json"
    data.main(["split", "--data-root", str(synth_root), "--category", "weave", "--seed", "3",
               "--scenario", "unseen-type", "--k", "1", "--held-out", "hole", "--out", str(out)])
    assert data.read_split(out) == data.make_split(loaded["weave"][1], "weave", 3, "unseen-type", 1, "hole")
    assert not list(tmp_path.glob("*.tmp"))


def test_cli_synth_writes_a_loadable_tree(tmp_path):
    data.main(["synth", "--out", str(tmp_path / "s"), "--size", "32", "--n-train", "2", "--n-test-good", "1",
               "--n-defect", "1"])
    for c in CATEGORIES:
        train, test = data.load_category(tmp_path / "s", c)
        assert len(train) == 2 and len(test) == 1 + len(data.SYNTH_DEFECTS)
        assert Image.open(train[0].path).size == (32, 32)


# ----------------------------------------------------------------------------------------------------------------
# synthetic generator
# ----------------------------------------------------------------------------------------------------------------
TINY = dict(size=32, n_train=3, n_test_good=2, n_defect=2)


@pytest.fixture(scope="module")
def tiny_trees(tmp_path_factory):
    """Three tiny trees: seed 0 twice (into different folders) and seed 1."""
    base = tmp_path_factory.mktemp("tiny")
    return tuple(data.generate_synthetic(base / name, seed=seed, **TINY)
                 for name, seed in (("a", 0), ("b", 0), ("c", 1)))


def test_generator_same_seed_same_bytes(tiny_trees):
    a, b, _ = tiny_trees
    ha, hb = tree_hashes(a), tree_hashes(b)
    per_category = TINY["n_train"] + TINY["n_test_good"] + 2 * len(data.SYNTH_DEFECTS) * TINY["n_defect"]
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


@pytest.mark.parametrize("category", CATEGORIES)
def test_normal_images_vary(loaded, category):
    train, _ = loaded[category]
    images = [pixels(s.path) for s in train]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i] - images[j]).mean() > 1.0, (i, j)
    assert np.std([im.mean() for im in images]) > 1.0  # lighting varies, not only sensor noise


def test_generator_rejects_unknown_category(tmp_path):
    with pytest.raises(data.DataError, match=r"unknown synthetic category 'bottle'"):
        data.generate_synthetic(tmp_path, size=32, categories=("bottle",))


# ----------------------------------------------------------------------------------------------------------------
# splits
# ----------------------------------------------------------------------------------------------------------------
def test_split_deterministic_per_seed_and_different_across_seeds(loaded):
    _, test = loaded["weave"]
    s0 = data.make_split(test, "weave", 0, "all-types", None)
    assert s0 == data.make_split(list(test), "weave", 0, "all-types", None)
    s1 = data.make_split(test, "weave", 1, "all-types", None)
    assert (s0["train_defects"], s0["eval"]) != (s1["train_defects"], s1["eval"])
    assert {s0["seed"], s1["seed"]} == {0, 1} and s0["category"] == "weave"


def test_split_does_not_depend_on_input_order(loaded):
    _, test = loaded["weave"]
    assert data.make_split(test, "weave", 0, "all-types", None) == \
        data.make_split(test[::-1], "weave", 0, "all-types", None)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_pool_and_eval_disjoint_cover_and_at_most_half(seed):
    test = fake_test({"good": 5, "a": 3, "b": 1, "c": 8, "d": 2})
    parts = data.pool_and_eval(test, seed)
    assert set(parts) == {"good", "a", "b", "c", "d"}
    for t, (pool, ev) in parts.items():
        group = [s for s in test if s.defect_type == t]
        assert len(pool) == len(group) // 2  # floor: an odd folder keeps the extra image for evaluation
        assert not set(pool) & set(ev) and sorted(pool + ev, key=lambda s: s.rel) == group


def test_split_parts_are_disjoint_and_capped_by_k(loaded):
    _, test = loaded["weave"]
    rels = {s.rel for s in test}
    for k, per_type in ((None, N_DEFECT // 2), (0, 0), (1, 1), (100, N_DEFECT // 2)):
        split = data.make_split(test, "weave", 0, "all-types", k)
        train, held, ev = split["train_defects"], split["heldout_good"], split["eval"]
        assert not (set(train) | set(held)) & set(ev)
        assert len(set(train)) == len(train) and len(set(ev)) == len(ev)
        assert set(train) | set(held) | set(ev) <= rels
        for d in DEFECTS:
            assert sum(r.startswith(f"test/{d}/") for r in train) == per_type
        assert all(r.startswith("test/good/") for r in held) and len(held) == N_TEST_GOOD // 2
        assert len(ev) == (N_TEST_GOOD - N_TEST_GOOD // 2) + len(DEFECTS) * (N_DEFECT - N_DEFECT // 2)
    with pytest.raises(data.DataError, match=r"k must be >= 0, got -1"):
        data.make_split(test, "weave", 0, "all-types", -1)


def test_k_takes_a_prefix_of_the_pool(loaded):
    _, test = loaded["washer"]
    full = data.make_split(test, "washer", 2, "few-shot", None)["train_defects"]
    one = data.make_split(test, "washer", 2, "few-shot", 1)["train_defects"]
    assert set(one) <= set(full)  # a larger k only adds images


def test_eval_set_is_shared_across_scenarios(loaded):
    _, test = loaded["weave"]
    for seed in (0, 5):
        ev_all = data.make_split(test, "weave", seed, "all-types", None)["eval"]
        assert data.make_split(test, "weave", seed, "all-types", 1)["eval"] == ev_all
        assert data.make_split(test, "weave", seed, "few-shot", 0)["eval"] == ev_all
        for held in DEFECTS:
            unseen = data.make_split(test, "weave", seed, "unseen-type", 1, held)
            assert set(unseen["eval"]) <= set(ev_all)
            assert {r.split("/")[1] for r in unseen["eval"]} == {"good", held}
            assert all(f"/{held}/" not in r for r in unseen["train_defects"])
            assert {r.split("/")[1] for r in unseen["train_defects"]} == set(DEFECTS) - {held}
            assert unseen["held_out"] == held and unseen["scenario"] == "unseen-type"


def test_adding_a_type_does_not_reshuffle_the_others():
    small = fake_test({"good": 6, "a": 4, "b": 5})
    parts_small = data.pool_and_eval(small, 3)
    parts_big = data.pool_and_eval(small + fake_test({"zz": 4}), 3)
    for t in ("good", "a", "b"):
        assert parts_small[t] == parts_big[t]


def test_split_roundtrip_and_apply(loaded, tmp_path):
    _, test = loaded["weave"]
    split = data.make_split(test, "weave", 4, "unseen-type", 2, "stain")
    path = tmp_path / "split.json"
    data.write_split(split, path)
    assert data.read_split(path) == split
    assert not (tmp_path / "split.json.tmp").exists()
    train, held, ev = data.apply_split(test, data.read_split(path))
    assert [s.rel for s in train] == split["train_defects"] and [s.rel for s in ev] == split["eval"]
    assert all(isinstance(s, data.Sample) and s in test for s in train + held + ev)
    assert all(s.label == 1 for s in train) and all(s.label == 0 for s in held)


def test_apply_split_rejects_foreign_paths(loaded):
    _, test = loaded["weave"]
    split = data.make_split(test, "weave", 0, "all-types", 1)
    split["eval"] = split["eval"] + ["test/crack/999.png"]
    with pytest.raises(data.DataError, match=r"lists 1 images that are not in the category \(first: test/crack/999\.png\)"):
        data.apply_split(test, split)


def test_read_split_errors(tmp_path):
    with pytest.raises(data.DataError, match=r"cannot read split file .*missing\.json"):
        data.read_split(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(data.DataError, match=r"cannot read split file .*bad\.json"):
        data.read_split(tmp_path / "bad.json")
    (tmp_path / "partial.json").write_text(json.dumps({"category": "weave", "train_defects": [], "heldout_good": []}))
    with pytest.raises(data.DataError, match=r"partial\.json has no 'eval' entry"):
        data.read_split(tmp_path / "partial.json")


def test_bad_scenario_and_held_out(loaded):
    _, test = loaded["weave"]
    with pytest.raises(data.DataError, match=r"unknown scenario 'zero-shot' \(expected one of all-types, unseen-type"):
        data.make_split(test, "weave", 0, "zero-shot", 1)
    with pytest.raises(data.DataError, match=r"held-out type 'crack' is not a defect type of weave \(hole, missing"):
        data.make_split(test, "weave", 0, "unseen-type", 1, "crack")
    with pytest.raises(data.DataError, match=r"held-out type 'None'"):
        data.make_split(test, "weave", 0, "unseen-type", 1, None)
    with pytest.raises(data.DataError, match=r"--held-out is only used by the unseen-type scenario, not all-types"):
        data.make_split(test, "weave", 0, "all-types", 1, "hole")
    with pytest.raises(data.DataError, match=r"has 1 defect type; unseen-type needs at least 2"):
        data.make_split(fake_test({"good": 4, "a": 4}), "one", 0, "unseen-type", 1, "a")


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


# ----------------------------------------------------------------------------------------------------------------
# DRA's open-set protocol (general, hard)
# ----------------------------------------------------------------------------------------------------------------
def test_general_evaluates_the_test_set_minus_exactly_the_m_labelled(loaded):
    train, test = loaded["weave"]
    every = {s.rel for s in test}
    for m in (1, 3):
        split = data.open_set_split(train, test, "weave", 0, "general", m)
        assert len(split["train_defects"]) == m and split["k"] == m
        assert all(not r.startswith("test/good/") for r in split["train_defects"])
        assert set(split["eval"]) == every - set(split["train_defects"])  # every other test image, good included
        assert len(split["eval"]) == len(every) - m
    one, three = (data.open_set_split(train, test, "weave", 0, "general", m)["train_defects"] for m in (1, 3))
    assert one == three[:1]  # a smaller M takes the first images of a larger M's draw


def test_hard_evaluates_good_plus_exactly_the_other_types(loaded):
    train, test = loaded["weave"]
    for known in ("hole", "scratch"):
        split = data.open_set_split(train, test, "weave", 0, "hard", 2, known=known)
        assert split["known"] == known and len(split["train_defects"]) == 2
        assert all(r.startswith(f"test/{known}/") for r in split["train_defects"])
        expected = {s.rel for s in test if s.defect_type != known}  # good + every image of the other types
        assert set(split["eval"]) == expected
    # fewer if the type has fewer: weave has 4 images per type at this size
    assert len(data.open_set_split(train, test, "weave", 0, "hard", 10, known="hole")["train_defects"]) == 4


def test_open_set_draws_are_seeded_and_normals_come_from_train_good(loaded):
    train, test = loaded["weave"]
    a, b = (data.open_set_split(train, test, "weave", 0, "general", 3) for _ in range(2))
    assert a == b
    draws = {tuple(data.open_set_split(train, test, "weave", seed, "general", 3)["train_defects"]) for seed in range(5)}
    assert len(draws) > 1  # the draw changes with the seed
    hard = {tuple(data.open_set_split(train, test, "weave", seed, "hard", 2, known="hole")["train_defects"])
            for seed in range(5)}
    assert len(hard) > 1
    held = a["heldout_good"]
    assert held and all(r.startswith("train/good/") for r in held) and not set(held) & set(a["eval"])
    assert len(held) == max(2, round(len(train) * data.HELDOUT_TRAIN_FRACTION))
    # the same normals for every run of a seed (general, hard, PatchCore), so the fused detector calibrates on them
    assert data.open_set_split(train, test, "weave", 0, "hard", 2, known="stain")["heldout_good"] == held
    assert data.open_set_patchcore_split(train, test, "weave", 0)["heldout_good"] == held
    labelled, heldout, evaluated = data.apply_split(test, a, train)
    assert [s.rel for s in heldout] == held and all(s.label == 0 for s in heldout)
    assert not {s.rel for s in data.without_heldout(train, heldout)} & set(held)


def test_general_with_no_labelled_anomaly_evaluates_every_test_image(loaded):
    train, test = loaded["weave"]
    zero = data.open_set_split(train, test, "weave", 0, "general", 0)  # for classify.py --synthetic cutpaste
    assert zero["train_defects"] == [] and zero["k"] == 0
    assert sorted(zero["eval"]) == sorted(s.rel for s in test)
    assert zero["heldout_good"] == data.open_set_split(train, test, "weave", 0, "general", 1)["heldout_good"]


def test_open_set_bad_input_is_one_sentence(loaded):
    train, test = loaded["weave"]
    n_defects = sum(s.label for s in test)
    with pytest.raises(data.DataError, match=rf"--general-m {n_defects + 1} is larger than the {n_defects} defect "
                                             rf"images of weave; choose M <= {n_defects}"):
        data.open_set_split(train, test, "weave", 0, "general", n_defects + 1)
    for bad in (-1, 1.5, "3"):
        with pytest.raises(data.DataError, match="--general-m must be a non-negative whole number"):
            data.open_set_split(train, test, "weave", 0, "general", bad)
    for bad in (0, -1, 1.5):  # the hard scenario's known type needs at least one labelled anomaly
        with pytest.raises(data.DataError, match="--hard-m must be a positive whole number"):
            data.open_set_split(train, test, "weave", 0, "hard", bad, known="stain")
    with pytest.raises(data.DataError, match="known type 'crack' is not a defect type of weave"):
        data.open_set_split(train, test, "weave", 0, "hard", 1, known="crack")
    one_type = [s for s in test if s.defect_type in ("good", "hole")]
    with pytest.raises(data.DataError, match="has 1 defect type; the hard scenario .* needs at least 2"):
        data.open_set_split(train, one_type, "weave", 0, "hard", 1, known="hole")


def test_code_version_is_read_once_per_process(monkeypatch):
    data.code_version.cache_clear()
    first = data.code_version()
    assert set(first) == {"git_commit", "git_dirty"}
    calls = []
    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: calls.append(a))  # a later HEAD is never read
    assert data.run_info()["git_commit"] == first["git_commit"] and not calls
    data.code_version.cache_clear()
