"""predict.py and the model folders behind it (issue 33): fit from train/good alone, score new images like the run,
every bad input a row or a sentence, a foreign model folder refused. CPU, Lite0 at 64 px.

    python3 -m pytest -q tests/test_predict.py --durations=5
"""
import csv
import io
import json
import re
import shutil
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import classify
import data
import patchcore
import predict
import report
from conftest import DEFECTS, N_DEFECT, N_TEST_GOOD
from metrics import image_auroc

PC = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--device", "cpu", "--workers", "0"]
CL = PC + ["--epochs", "1", "--batch-size", "8", "--synthetic", "cutpaste"]


def copy_parts(synth_root: Path, dest: Path, parts) -> Path:
    """A data root holding only the given sub-folders of the synthetic weave (e.g. train/good); returns the root."""
    for part in parts:
        shutil.copytree(synth_root / "weave" / part, dest / "weave" / part)
    return dest


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def models(synth_root, tmp_path_factory):
    """Model folders: PatchCore fitted from train/good alone, PatchCore fitted on the full weave (the same bank: the
    same seeded 10 % held out), and a CutPaste classifier trained from train/good alone (test/good present)."""
    tmp = tmp_path_factory.mktemp("models")
    good_only = copy_parts(synth_root, tmp / "good_only", ["train/good"])
    with_good = copy_parts(synth_root, tmp / "with_good", ["train/good", "test/good"])
    pc = patchcore.main(["--data-root", str(good_only), "--category", "weave", *PC, "--out-dir", str(tmp / "pc")])
    full = patchcore.main(["--data-root", str(synth_root), "--category", "weave", *PC, "--out-dir", str(tmp / "full")])
    cl = classify.main(["--data-root", str(with_good), "--category", "weave", *CL, "--out-dir", str(tmp / "cl")])
    return {"pc": tmp / "pc", "full": tmp / "full", "cl": tmp / "cl", "with_good": with_good,
            "metrics": {"pc": pc, "full": full, "cl": cl}}


@pytest.fixture(scope="module")
def both(models, synth_root, tmp_path_factory):
    """predict.py with both models over the weave's labelled test images: its rows by path, and its output folder."""
    out = tmp_path_factory.mktemp("pred") / "out"
    result = predict.main(["--model", str(models["full"]), "--model", str(models["cl"]), "--images",
                           str(synth_root / "weave" / "test"), "--out", str(out), "--save-maps", "--device", "cpu"])
    return {r["path"]: r for r in read_csv(out / "predictions.csv")}, out, result


# ----------------------------------------------------------------------------------------------------------------
# Fit from normal images alone; the model folder
# ----------------------------------------------------------------------------------------------------------------
def test_fit_from_train_good_alone_saves_a_calibrated_model_folder(models, synth_root, capsys):
    info = json.loads((models["pc"] / "model.json").read_text())
    assert info["kind"] == "patchcore" and info["model"]["image_size"] == 64 and info["model"]["layers"]
    assert info["model"]["normalization"]["mean"] and info["code"]["git_commit"] and info["versions"]["torch"]
    calib = info["calibration"]
    held = sorted(calib["normal_scores"])
    assert held and all(p.startswith("train/good/") for p in held)  # the seeded 10 %, never in the bank
    assert calib["image_threshold"] > max(calib["normal_scores"].values())  # normal_threshold: just above
    low, high = calib["colour_scale"]
    assert low < calib["pixel_threshold"] < high
    assert models["metrics"]["pc"]["image_auroc"] is None and models["metrics"]["pc"]["threshold"] is not None
    # the full run held out the same images, so its bank and threshold are the same as the good-only fit's
    full = json.loads((models["full"] / "model.json").read_text())["calibration"]
    assert full["normal_scores"] == pytest.approx(calib["normal_scores"], rel=1e-6)
    assert models["metrics"]["full"]["image_auroc"] is not None  # with test/ it still measures, plus the threshold
    assert models["metrics"]["full"]["threshold"] == pytest.approx(calib["image_threshold"], rel=1e-6)
    cl = json.loads((models["cl"] / "model.json").read_text())
    assert cl["kind"] == "classifier" and (models["cl"] / "model.pt").is_file()
    assert set(calib["normal_scores"]) <= set(cl["calibration"]["normal_scores"])  # the fused detector's normals
    assert all(p.startswith("train/good/") for p in cl["calibration"]["normal_scores"])


def test_without_defects_the_study_path_still_refuses(models, tmp_path):
    with pytest.raises(data.DataError, match="has no defect images"):
        data.load_category(models["with_good"], "weave")
    with pytest.raises(SystemExit, match=r"^error: category .* has no defect images"):  # classify.py without cutpaste
        classify.main(["--data-root", str(models["with_good"]), "--category", "weave", *CL[:-2],
                       "--out-dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------------------------
# The same numbers as the run; decisions; the fused detector
# ----------------------------------------------------------------------------------------------------------------
def test_predict_reproduces_the_runs_scores_and_ranks_defects_higher(models, both, synth_root):
    rows, _, result = both
    paths, labels, _, scores = data.read_scores(models["full"] / "scores.csv")
    assert len(rows) == len(paths) == N_TEST_GOOD + len(DEFECTS) * N_DEFECT and result["ok"] == len(rows)
    predicted = np.array([float(rows[p.removeprefix("test/")]["patchcore_score"]) for p in paths])
    np.testing.assert_allclose(predicted, scores, rtol=1e-5)
    assert image_auroc(labels, predicted) >= 0.8  # defects above good images
    cl_paths, _, _, cl_scores = data.read_scores(models["cl"] / "scores.csv")  # test/good, scored by the run
    cl_pred = [float(rows[p.removeprefix("test/")]["classifier_score"]) for p in cl_paths]
    assert len(cl_paths) == N_TEST_GOOD and cl_pred == pytest.approx(cl_scores, rel=1e-5, abs=1e-5)


def test_scores_do_not_depend_on_batch_size_or_order(models, both, synth_root, tmp_path):
    rows, _, _ = both
    test = synth_root / "weave" / "test"
    out = tmp_path / "one"
    predict.main(["--model", str(models["pc"]), "--images", str(test / "hole" / "*.png"), str(test / "good" / "005.png"),
                  "--out", str(out), "--batch-size", "3", "--device", "cpu"])
    again = read_csv(out / "predictions.csv")
    assert [r["path"] for r in again] == ["good/005.png"] + [f"hole/{i:03d}.png" for i in range(N_DEFECT)]
    for r in again:  # the good-only fit's bank, other batches: the full run's numbers
        assert float(r["patchcore_score"]) == pytest.approx(float(rows[r["path"]]["patchcore_score"]), rel=1e-5)


def test_decisions_follow_the_stored_thresholds_and_fused_is_the_studys(models, both):
    rows, _, _ = both
    for method in ("patchcore", "classifier"):
        calib = json.loads((models["full" if method == "patchcore" else "cl"] / "model.json").read_text())["calibration"]
        for r in rows.values():
            flagged = float(r[f"{method}_score"]) >= calib["image_threshold"]
            assert r[f"{method}_decision"] == ("defect" if flagged else "good")
            assert (float(r[f"{method}_normalised"]) >= 0.5) == flagged
            assert 0 <= float(r[f"{method}_normalised"]) <= 1 and 0 <= float(r[f"{method}_flagged_area"]) <= 1
    pc = json.loads((models["full"] / "model.json").read_text())["calibration"]["normal_scores"]
    cl = json.loads((models["cl"] / "model.json").read_text())["calibration"]["normal_scores"]
    paths = sorted(rows)
    z = np.maximum(report.calibrated("patchcore", np.array([float(rows[p]["patchcore_score"]) for p in paths]),
                                     np.array(list(pc.values()))),
                   report.calibrated("classifier", np.array([float(rows[p]["classifier_score"]) for p in paths]),
                                     np.array(list(cl.values()))))
    np.testing.assert_allclose([float(rows[p]["fused_score"]) for p in paths], z, rtol=1e-6, atol=1e-9)
    assert all(r["fused_decision"] in ("defect", "good") for r in rows.values())


def test_overlays_maps_and_the_page(both):
    rows, out, _ = both
    overlays = sorted(p.relative_to(out / "overlays").as_posix() for p in (out / "overlays").rglob("*.png"))
    assert overlays == sorted(f"{p}.png" for p in rows)
    assert np.load(out / "maps" / "patchcore" / "hole" / "000.png.npy").shape == (64, 64)
    page = (out / "index.html").read_text(encoding="utf-8")
    linked = [urllib.parse.unquote(s) for s in re.findall(r'<img src="([^"]+)"', page)]
    assert sorted(linked) == sorted(f"overlays/{o}" for o in overlays) and "<script" not in page
    order = [rows[s.removeprefix("overlays/").removesuffix(".png")] for s in linked]
    flags = [r["fused_decision"] == "defect" for r in order]
    assert flags == sorted(flags, reverse=True)  # flagged first
    flagged = [float(r["fused_normalised"]) for r in order if r["fused_decision"] == "defect"]
    assert flagged == sorted(flagged, reverse=True)  # then by score


def test_the_colour_scale_is_the_models_not_the_images(models, tmp_path):
    """A flat map and a map spanning low..high, both holding the value c: c gets one colour in both overlays (per-image
    scaling would paint the flat map at the bottom of its scale and c mid-way on the other)."""
    method = predict.load_methods([str(models["pc"])], patchcore.torch.device("cpu"))[0]
    low, high = method.info["calibration"]["colour_scale"]
    c = low + (high - low) / 4  # below the pixel threshold (the middle of the scale): no contour around it
    black = Image.new("RGB", (60, 60))
    flat = np.full((64, 64), c, np.float32)
    spread = flat.copy()
    spread[:, :20], spread[:, 44:] = low - 5, high + 5  # c in the middle third only
    for name, amap in (("flat", flat), ("spread", spread)):
        predict.save_overlay(tmp_path / f"{name}.png", black, [(method, amap, "")], "")
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png").convert("RGB")) for n in ("flat", "spread"))
    assert a.shape == b.shape
    ys, xs = np.nonzero((a.astype(int) - np.asarray(a[0, 0])).any(2))  # the panel: where not the background
    centre = a[(ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2]
    assert np.abs(centre.astype(int) - b[(ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2]).max() <= 2
    assert np.abs(centre.astype(int) - b[(ys.min() + ys.max()) // 2, xs.min() + 3]).max() > 30  # low: another colour


# ----------------------------------------------------------------------------------------------------------------
# Real-world inputs: a row for each, or a sentence
# ----------------------------------------------------------------------------------------------------------------
def write_bad_inputs(folder: Path, good_png: Path) -> dict:
    """A folder of awkward files; returns {relative path: (status, a word of the reason)}."""
    folder.mkdir()
    rgb = Image.open(good_png).convert("RGB")
    expected = {}

    def save(name, image, status, word, **kw):
        image.save(folder / name, **kw)
        expected[name] = (status, word)

    save("plain.png", rgb, "ok", "")
    save("grey.png", rgb.convert("L"), "converted", "greyscale")
    save("palette.png", rgb.convert("P"), "converted", "palette")
    save("rgba.png", rgb.convert("RGBA"), "converted", "alpha")
    save("cmyk.jpg", rgb.convert("CMYK"), "converted", "CMYK")
    save("sixteen.png", Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257)), "converted", "16-bit")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    save("rotated.jpg", rgb.resize((64, 32)), "converted", "EXIF orientation 6", exif=exif)
    (folder / "sub dir é").mkdir()
    save("sub dir é/naïve name.png", rgb, "ok", "")
    save("bomb.png", Image.new("RGB", (400, 400)), "error", "decompression-bomb")
    (folder / "empty.png").write_bytes(b"")
    expected["empty.png"] = ("error", "empty file")
    (folder / "text.png").write_text("not an image\n")
    expected["text.png"] = ("error", "not an image file")
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    (folder / "truncated.png").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    expected["truncated.png"] = ("error", "cannot read")
    (folder / "corrupt.png").write_bytes(buf.getvalue()[:40] + bytes(200))
    expected["corrupt.png"] = ("error", "")
    return expected


def test_every_bad_input_gives_its_row_and_strict_stops(models, synth_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # bomb.png: 160,000 px, past twice the limit
    expected = write_bad_inputs(tmp_path / "in", synth_root / "weave" / "test" / "good" / "000.png")
    out = tmp_path / "out"
    result = predict.main(["--model", str(models["pc"]), "--images", str(tmp_path / "in"), "--out", str(out),
                           "--device", "cpu"])
    rows = {r["path"]: r for r in read_csv(out / "predictions.csv")}
    assert sorted(rows) == sorted(expected)  # none skipped
    for path, (status, word) in expected.items():
        assert rows[path]["status"] == status and word in rows[path]["reason"], (path, rows[path])
        assert (rows[path]["patchcore_score"] == "") == (status == "error")
        assert "\n" not in rows[path]["reason"] and (status == "ok") == (rows[path]["reason"] == "")
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == ("32", "64")  # upright
    assert (out / "overlays" / "sub dir é" / "naïve name.png.png").is_file()
    assert result["error"] == 5 and "naïve" in urllib.parse.unquote((out / "index.html").read_text("utf-8"))
    with pytest.raises(SystemExit, match=r"^error: .*(bomb|corrupt|empty|text|truncated)\.png: .*--strict") as e:
        predict.main(["--model", str(models["pc"]), "--images", str(tmp_path / "in"), "--out", str(tmp_path / "s"),
                      "--strict", "--device", "cpu"])
    assert "\n" not in str(e.value.code) and not (tmp_path / "s").exists()
    assert not list(tmp_path.glob(".s.tmp*"))  # no half-written output


def test_bad_invocations_end_in_one_sentence_and_write_nothing(models, synth_root, tmp_path):
    images = str(synth_root / "weave" / "test" / "good")
    (tmp_path / "empty").mkdir()
    (tmp_path / "exists").mkdir()
    cases = [
        (["--model", str(models["pc"]), "--images", str(tmp_path / "empty")], "no image found in"),
        (["--model", str(tmp_path / "nope"), "--images", images], "model folder .* does not exist"),
        (["--model", str(synth_root), "--images", images], "no model.json in"),
        (["--model", str(models["pc"]), "--images", str(tmp_path / "missing.png")], ".*missing.png is neither an image file"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=rf"^error: {message}") as e:
            predict.main(argv + ["--out", str(tmp_path / "out"), "--device", "cpu"])
        assert "\n" not in str(e.value.code) and not (tmp_path / "out").exists()
    (tmp_path / "exists" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"^error: output folder .* exists; give --overwrite"):
        predict.main(["--model", str(models["pc"]), "--images", images, "--out", str(tmp_path / "exists")])
    assert [p.name for p in (tmp_path / "exists").iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("kind,change,message", [
    ("pc", {"format": 99}, r"is not a model folder this code reads \(format 99"),
    ("pc", {"model": {"backbone": "resnet18"}}, r"model.json and its memory bank disagree on backbone"),
    ("pc", {"model": {"image_size": 128}}, r"disagree on image_size"),
    ("cl", {"model": {"image_size": 128}}, r"model.json says efficientnet_lite0 at 128 px but model.pt holds"),
    ("cl", {"kind": "patchcore"}, r"no memory bank in"),
])
def test_a_foreign_model_folder_is_refused(models, synth_root, tmp_path, kind, change, message):
    folder = tmp_path / "model"
    shutil.copytree(models[kind], folder)
    info = json.loads((folder / "model.json").read_text())
    for key, value in change.items():
        info[key] = {**info[key], **value} if isinstance(value, dict) else value
    (folder / "model.json").write_text(json.dumps(info))
    with pytest.raises(SystemExit, match=rf"^error: .*{message}") as e:
        predict.main(["--model", str(folder), "--images", str(synth_root / "weave" / "test" / "good"),
                      "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert "\n" not in str(e.value.code) and not (tmp_path / "out").exists()
