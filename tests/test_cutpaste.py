"""Tests of cutpaste.py: CutPaste and CutPaste-scar synthetic defects, seeded and confined to their pasted region."""
import numpy as np
import pytest
from PIL import Image

import cutpaste


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random RGB image: any patch moved elsewhere changes the pixels it lands on."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def as_array(d: cutpaste.Pasted) -> np.ndarray:
    return np.asarray(d.image)


def test_a_synthetic_defect_is_a_pure_function_of_seed_epoch_and_index():
    image = noise(64, 64)
    a, b = cutpaste.synthetic_defect(image, 3, 1, 5), cutpaste.synthetic_defect(image, 3, 1, 5)
    assert np.array_equal(as_array(a), as_array(b)) and np.array_equal(a.mask, b.mask)
    assert (a.kind, a.source, a.box) == (b.kind, b.source, b.box)
    for other in ((4, 1, 5), (3, 2, 5), (3, 1, 6)):  # another seed, epoch or index: another defect
        assert not np.array_equal(as_array(cutpaste.synthetic_defect(image, *other)), as_array(a)), other
    assert np.array_equal(np.asarray(image), np.asarray(noise(64, 64)))  # the input is never changed in place


def test_about_half_of_the_defects_are_scars():
    kinds = [cutpaste.synthetic_defect(noise(32, 32), 0, 1, i).kind for i in range(200)]
    assert set(kinds) == {"cutpaste", "scar"} and 70 <= kinds.count("scar") <= 130


@pytest.mark.parametrize("make", [cutpaste.cutpaste, cutpaste.scar])
@pytest.mark.parametrize("size", [(64, 64), (256, 256), (90, 40)])
def test_the_image_changes_only_inside_the_pasted_region_which_stays_inside_and_moved(make, size):
    W, H = size
    image = noise(W, H)
    before = np.asarray(image)
    for i in range(40):
        d = make(image, cutpaste.defect_rng(0, 1, i))
        after = as_array(d)
        left, top, right, bottom = d.box
        assert 0 <= left < right <= W and 0 <= top < bottom <= H  # inside the image
        assert d.box[:2] != d.source[:2]  # pasted somewhere else than where it was cut
        sl, st, sr, sb = d.source
        assert 0 <= sl < sr <= W and 0 <= st < sb <= H
        assert after.shape == before.shape and d.mask.shape == (H, W) and d.mask.any()
        outside_box = np.ones((H, W), dtype=bool)
        outside_box[top:bottom, left:right] = False
        assert not (d.mask & outside_box).any()  # the mask lies in the box
        assert np.array_equal(after[~d.mask], before[~d.mask])  # exactly the input outside the pasted pixels
        assert (after[d.mask] != before[d.mask]).any()  # and something new inside them
        if make is cutpaste.cutpaste:
            assert d.kind == "cutpaste" and d.mask.sum() == (right - left) * (bottom - top)  # a full rectangle
            assert (right - left, bottom - top) == (sr - sl, sb - st)  # pasted as cut


def test_cutpaste_rectangles_follow_the_papers_area_and_aspect_ratios():
    image = noise(256, 256)
    areas, aspects = [], []
    for i in range(300):
        left, top, right, bottom = cutpaste.cutpaste(image, cutpaste.defect_rng(1, 1, i)).source
        areas.append((right - left) * (bottom - top) / 256 ** 2)
        aspects.append((right - left) / (bottom - top))
    assert 0.018 < min(areas) and max(areas) < 0.155  # (0.02, 0.15) of the image, up to whole-pixel rounding
    assert 0.28 < min(aspects) < 0.4 and 2.5 < max(aspects) < 3.6  # (0.3, 1/0.3), log-uniform
    assert 120 < sum(a > 1 for a in aspects) < 180  # as often wide as tall


@pytest.mark.parametrize("size,width,length", [(256, (2, 16), (10, 25)), (512, (4, 32), (20, 50))])
def test_scars_have_the_papers_size_at_256_px_scaled_with_the_image(size, width, length):
    image = noise(size, size)
    widths, lengths, fill = [], [], []
    for i in range(300):
        d = cutpaste.scar(image, cutpaste.defect_rng(2, 1, i))
        left, top, right, bottom = d.source
        widths.append(right - left)
        lengths.append(bottom - top)
        fill.append(d.mask.sum() / ((d.box[2] - d.box[0]) * (d.box[3] - d.box[1])))
    assert (min(widths), max(widths)) == width and (min(lengths), max(lengths)) == length
    assert min(fill) < 0.6  # rotated: the mask is the strip's own pixels, not its bounding box
    assert cutpaste.scaled_range((2, 16), 64) == (1, 4) and cutpaste.scaled_range((10, 25), 32) == (1, 3)


def test_other_position_never_returns_the_avoided_corner_and_reaches_every_other():
    rng = np.random.default_rng(0)
    seen = {cutpaste.other_position(rng, 3, 2, avoid=(1, 1)) for _ in range(300)}
    assert seen == {(x, y) for x in range(3) for y in range(2)} - {(1, 1)}
    outside = {cutpaste.other_position(rng, 2, 1, avoid=(5, 0)) for _ in range(100)}  # not a corner of this grid
    assert outside == {(0, 0), (1, 0)}


def test_script_writes_a_sheet_of_images_defects_and_regions(synth_root, tmp_path, capsys):
    out = cutpaste.main(["--data-root", str(synth_root), "--category", "weave", "--image-size", "48", "--n", "3",
                         "--out", str(tmp_path / "sheet.png")])
    with Image.open(out) as sheet:
        assert sheet.size == (3 * 48, 3 * 48)  # image | defect | region, one row per image
    assert "3 images" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"^error: --n must be at least 1"):
        cutpaste.main(["--data-root", str(synth_root), "--category", "weave", "--n", "0",
                       "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()
