"""Tests of classify.py: the fine-tuned normal-vs-defect classifier on the synthetic tree (CPU, Lite0, 64-128 px)."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from sklearn.metrics import roc_auc_score

import backbones
import classify
import cutpaste
import data
import splits
from conftest import truncated_copy
from metrics import normal_threshold

TINY = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--epochs", "2", "--batch-size", "8",
        "--device", "cpu"]


def read_scores(path) -> dict:
    """scores.csv as {path: score}."""
    with open(path) as f:
        return {row["path"]: float(row["score"]) for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def tiny_run(synth_root, tmp_path_factory):
    """One 2-epoch run on the 64 px weave (8 training defects), shared by the tests that inspect its outputs."""
    out = tmp_path_factory.mktemp("classify") / "weave"
    metrics = classify.main(["--data-root", str(synth_root), "--category", "weave", *TINY, "--out-dir", str(out)])
    return out, metrics


def general_split(root, category: str, m: int, path) -> str:
    """Write DRA's general split with M labelled anomalies (M=0: none) for seed 0; return its path."""
    train, test = data.load_category(root, category)
    splits.write_split(splits.open_set_split(train, test, category, 0, "general", m), path)
    return str(path)


@pytest.fixture(scope="module")
def zero_label_run(synth_root, tmp_path_factory):
    """A 2-epoch --synthetic cutpaste run on the 64 px weave with no labelled anomaly (general, M=0)."""
    tmp = tmp_path_factory.mktemp("zero_label")
    out = tmp / "weave"
    split = general_split(synth_root, "weave", 0, tmp / "general-0.json")
    metrics = classify.main(["--data-root", str(synth_root), "--category", "weave", *TINY, "--split", split,
                             "--synthetic", "cutpaste", "--out-dir", str(out)])
    return out, metrics


# ----------------------------------------------------------------------------------------------------------------
# The whole script
# ----------------------------------------------------------------------------------------------------------------
def test_separates_seen_defect_types_and_writes_every_file(synth_root_128, tmp_path, capsys):
    out = tmp_path / "weave"
    metrics = classify.main(["--data-root", str(synth_root_128), "--category", "weave", "--backbone",
                             "efficientnet_lite0", "--image-size", "128", "--epochs", "8", "--batch-size", "8",
                             "--device", "cpu", "--save-maps", "2", "--out-dir", str(out)])
    printed = capsys.readouterr().out
    assert metrics["image_auroc"] >= 0.9, metrics  # all four defect types were seen in training
    assert metrics["pixel_auroc"] > 0.6, metrics  # Grad-CAM points at the defects, if coarsely (stride 32)
    assert sum(line.startswith("epoch ") for line in printed.splitlines()) == 8  # one line per epoch
    assert f"{'image_auroc':<22}{metrics['image_auroc']:>12.4g}" in printed  # the table shows the file's numbers
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "heldout_scores.csv", "images.json", "maps",
                                                     "metrics.json", "model.json", "model.pt", "scores.csv"]
    normals = data.read_scores(out / "heldout_scores.csv")  # the validation normals the threshold comes from
    assert (normals[1] == 0).all() and len(normals[0]) == on_disk_count(out) and normals[3].min() >= 0
    assert metrics["threshold"] == pytest.approx(normals[3].max(), rel=1e-8)  # <= 100 normals: just above their max
    assert len(list((out / "maps").glob("*.png"))) == 2
    on_disk = json.loads((out / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "threshold", "recall_at_threshold",
                "fpr_at_threshold", "train_seconds", "ms_per_image", "n_train_defects", "params_millions"):
        assert on_disk[key] is not None and on_disk[key] == pytest.approx(metrics[key]), key
    assert on_disk["args"]["category"] == "weave" and on_disk["run_info"]["torch"] == torch.__version__
    assert 0.0 <= on_disk["fpr_at_threshold"] <= 1.0 and on_disk["n_train_defects"] == 8
    scores = read_scores(out / "scores.csv")
    assert len(scores) == metrics["n_images"] and all(0.0 <= s <= 1.0 for s in scores.values())


def on_disk_count(out) -> int:
    """The number of validation normals a run lists in images.json."""
    return sum(rel.startswith(("test/good/", "train/good/")) for rel in json.loads((out / "images.json").read_text())["val"])


def test_no_evaluation_image_is_trained_or_validated_on(tiny_run, synth_root):
    out, _ = tiny_run
    sets = json.loads((out / "images.json").read_text())
    train, val, evaluated = set(sets["train"]), set(sets["val"]), set(sets["eval"])
    assert evaluated and not evaluated & train and not evaluated & val and not train & val
    assert evaluated == set(sets["split"]["eval"])
    assert set(sets["split"]["heldout_good"]) <= val  # the held-out good pool validates and sets the threshold
    assert any(r.startswith("test/") and "/good/" not in r for r in val)  # at least one validation defect
    assert json.loads((out / "metrics.json").read_text())["n_images"] == len(evaluated)
    scored = set(read_scores(out / "scores.csv"))  # paths relative to the category folder
    assert scored == evaluated  # scores.csv holds exactly the evaluation images


def test_metrics_record_the_device_it_ran_on_and_the_precision(tiny_run):
    out, metrics = tiny_run
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["device_info"]["device"] == "cpu" and saved["device_info"]["torch"] == torch.__version__
    assert saved["device_info"]["faiss_gpu"] is None and saved["device_info"]["gpu_name"] is None
    assert saved["args"]["precision"] == "mixed" and saved["args"]["workers"] == data.default_workers()
    assert json.loads((out / "args.json").read_text())["precision"] == "mixed"


def test_same_seed_gives_identical_scores(tiny_run, synth_root, tmp_path):
    out, first = tiny_run
    again = classify.main(["--data-root", str(synth_root), "--category", "weave", *TINY,
                           "--out-dir", str(tmp_path / "again")])
    assert read_scores(tmp_path / "again" / "scores.csv") == read_scores(out / "scores.csv")
    without_time = [[{k: v for k, v in h.items() if not k.endswith("seconds")} for h in m["history"]]
                    for m in (first, again)]
    assert without_time[0] == without_time[1]  # the same losses and validation AUROCs, epoch by epoch
    for h in again["history"]:  # an epoch's timed parts (waiting for images, validation) lie inside its time
        assert 0 < h["read_seconds"] and 0 < h["validation_seconds"]
        assert h["read_seconds"] + h["validation_seconds"] < h["seconds"]


def test_worker_processes_change_no_score(tiny_run, synth_root, tmp_path):
    out, first = tiny_run
    workers = 2 if data.default_workers() != 2 else 3  # another count than the default the tiny run used
    again = classify.main(["--data-root", str(synth_root), "--category", "weave", *TINY, "--workers", str(workers),
                           "--out-dir", str(tmp_path / "workers")])
    assert read_scores(tmp_path / "workers" / "scores.csv") == read_scores(out / "scores.csv")
    assert [h["loss"] for h in again["history"]] == [h["loss"] for h in first["history"]]  # the same training


def test_checkpoint_reload_gives_the_same_scores_and_image_sized_maps(tiny_run, synth_root):
    out, _ = tiny_run
    checkpoint = classify.Checkpoint.load(out / "model.pt")
    model, cam_layer = checkpoint.build(torch.device("cpu"))
    _, test = data.load_category(synth_root, "weave")
    by_rel = {s.rel: s for s in test}
    samples = [by_rel[r] for r in json.loads((out / "images.json").read_text())["eval"]]
    scores, maps = classify.score(model, cam_layer, samples, checkpoint.backbone, checkpoint.image_size,
                                  torch.device("cpu"), batch_size=8)
    written = read_scores(out / "scores.csv")
    assert scores == pytest.approx([written[s.rel] for s in samples], rel=1e-5)  # scores.csv keeps 6 digits
    assert maps.shape == (len(samples), 64, 64) and np.isfinite(maps).all() and (maps >= 0).all()
    one_by_one, maps1 = classify.score(model, cam_layer, samples[:3], checkpoint.backbone, 64, torch.device("cpu"),
                                       batch_size=1)
    assert one_by_one == pytest.approx(scores[:3], rel=1e-5, abs=1e-7)  # results do not depend on the batch size
    assert np.allclose(maps1, maps[:3], rtol=1e-4, atol=1e-6)


def test_zero_label_run_trains_and_validates_on_no_real_anomaly(zero_label_run, synth_root):
    out, metrics = zero_label_run
    sets = json.loads((out / "images.json").read_text())
    assert sets["split"]["train_defects"] == [] and sets["train"] and sets["val"]
    assert all(r.startswith("train/good/") for r in sets["train"] + sets["val"])  # no real anomaly, no test image
    _, test = data.load_category(synth_root, "weave")
    assert set(sets["eval"]) == {s.rel for s in test}  # general, M=0: every test image is evaluated
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["synthetic"] == "cutpaste" and saved["n_train_defects"] == saved["n_val_defects"] == 0
    assert saved["n_train_synthetic"] == len(sets["train"]) and saved["n_val_synthetic"] == len(sets["val"])
    assert all(h["val_auroc"] is not None for h in saved["history"])  # synthetic validation defects pick the epoch


def test_cutpaste_run_also_scores_by_the_gaussian_density_of_its_features(zero_label_run, synth_root):
    """Issue 32: a CutPaste run scores its evaluation images a second way, as the paper does: the Mahalanobis distance
    of the pooled features to the Gaussian of its training normals; the same images, its own held-out threshold,
    the density saved in model.pt (loadable with weights_only) and reproduced from it."""
    out, metrics = zero_label_run
    paths, labels, _, density = data.read_scores(out / "density_scores.csv")
    assert paths == data.read_scores(out / "scores.csv")[0] and (density > 0).all()
    held_paths, _, _, held = data.read_scores(out / "density_heldout_scores.csv")
    assert held_paths == data.read_scores(out / "heldout_scores.csv")[0]
    saved = json.loads((out / "metrics.json").read_text())["density"]
    assert saved["threshold"] == pytest.approx(normal_threshold(held), rel=1e-8) and held.max() < saved["threshold"]
    assert saved["image_auroc"] == pytest.approx(roc_auc_score(labels, density), abs=1e-12)
    assert saved["n_fit_normals"] == sum(r.startswith("train/good/") for r in
                                         json.loads((out / "images.json").read_text())["train"])
    ckpt = classify.Checkpoint.load(out / "model.pt")
    assert ckpt.density_mean.shape == (ckpt.density_precision.shape[0],) and ckpt.density_threshold == saved["threshold"]
    model, _ = ckpt.build(torch.device("cpu"))
    _, test = data.load_category(synth_root, "weave")
    samples = [next(s for s in test if s.rel == p) for p in paths[:6]]
    again = classify.mahalanobis(classify.pooled_features(model, samples, ckpt.backbone, ckpt.image_size,
                                                          torch.device("cpu"), 4),
                                 ckpt.density_mean.double().numpy(), ckpt.density_precision.double().numpy())
    np.testing.assert_allclose(again, density[:6], rtol=1e-4)


def test_gaussian_density_recovers_a_known_mahalanobis_distance():
    """Many samples of N(mean, diag(sigma^2)): the fitted density's distance is |x - mean| / sigma per axis."""
    rng = np.random.default_rng(0)
    mean, sigma = np.array([1.0, -2.0, 0.5]), np.array([0.5, 2.0, 1.0])
    m, precision = classify.fit_density(mean + sigma * rng.normal(size=(20000, 3)))
    x = mean + np.array([[3 * sigma[0], 0, 0], [0, -2 * sigma[1], 0], [0, 0, 0]])  # 3, 2 and 0 standard deviations
    np.testing.assert_allclose(classify.mahalanobis(x, m, precision), [3, 2, 0], atol=0.05)


def test_zero_label_threshold_comes_from_the_validation_normals_only(zero_label_run):
    out, metrics = zero_label_run
    paths, labels, types, scores = data.read_scores(out / "heldout_scores.csv")
    val = json.loads((out / "images.json").read_text())["val"]
    assert sorted(paths) == sorted(val) and (labels == 0).all() and set(types) == {"good"}  # no synthetic image
    assert metrics["threshold"] == pytest.approx(normal_threshold(scores), rel=1e-8)


def test_real_anomalies_and_synthetic_defects_train_and_validate_together(synth_root, tmp_path):
    split = general_split(synth_root, "weave", 1, tmp_path / "general-1.json")
    metrics = classify.main(["--data-root", str(synth_root), "--category", "weave", *TINY, "--epochs", "1",
                             "--split", split, "--synthetic", "cutpaste", "--out-dir", str(tmp_path / "out")])
    sets = json.loads((tmp_path / "out" / "images.json").read_text())
    real = [r for r in sets["train"] if r.startswith("test/")]
    assert real == sets["split"]["train_defects"] and metrics["n_train_defects"] == 1  # M=1: it trains
    assert metrics["n_val_defects"] == 0 and metrics["n_val_synthetic"] == len(sets["val"])  # every val normal
    assert metrics["n_train_synthetic"] == len(sets["train"]) - 1  # one per normal training image
    assert metrics["val_auroc"] is not None  # M=1 no longer keeps the last epoch blindly


def test_zero_label_classifier_ranks_defects_above_good_images(synth_root_128, tmp_path):
    """Synthetic defects instead of labels, on the 128 px weave: far better than chance (0.95 when written)."""
    split = general_split(synth_root_128, "weave", 0, tmp_path / "general-0.json")
    metrics = classify.main(["--data-root", str(synth_root_128), "--category", "weave", "--backbone",
                             "efficientnet_lite0", "--image-size", "128", "--epochs", "4", "--batch-size", "8",
                             "--device", "cpu", "--split", split, "--synthetic", "cutpaste",
                             "--out-dir", str(tmp_path / "weave")])
    assert metrics["n_train_defects"] == 0 and metrics["image_auroc"] > 0.75, metrics["image_auroc"]


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one sentence, non-zero exit, nothing written
# ----------------------------------------------------------------------------------------------------------------
def test_split_without_training_defects_is_refused(synth_root, tmp_path):
    _, test = data.load_category(synth_root, "weave")
    splits.write_split(splits.make_split(test, "weave", 0, "few-shot", k=0), tmp_path / "split.json")
    out = tmp_path / "runs" / "weave"
    with pytest.raises(SystemExit, match=r"^error: .*no defect image of weave to train on; a supervised classifier "
                                         r"cannot learn the defect class without examples"):
        classify.main(["--data-root", str(synth_root), "--category", "weave", *TINY,
                       "--split", str(tmp_path / "split.json"), "--out-dir", str(out)])
    general_0 = general_split(synth_root, "weave", 0, tmp_path / "general-0.json")
    with pytest.raises(SystemExit, match=r"^error: the split gives the classifier no defect image of weave") as e:
        classify.main(["--data-root", str(synth_root), "--category", "weave", *TINY, "--split", general_0,
                       "--synthetic", "none", "--out-dir", str(out)])
    assert "\n" not in str(e.value.code) and "--synthetic cutpaste" in str(e.value.code)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("change,message", [
    (["--data-root", "/nonexistent/mvtec"], r"data root /nonexistent/mvtec does not exist"),
    (["--category", "carpet"], r"category 'carpet' not found in .*; categories found: washer, weave"),
    (["--split", "washer-split"], r"split file .* is for category 'washer', not 'weave'"),
    (["--epochs", "0"], r"--epochs must be at least 1, got 0"),
    (["--weights", "/nonexistent/w.pt"], r"cannot read weights file /nonexistent/w.pt"),
])
def test_bad_input_exits_with_one_sentence_and_writes_nothing(synth_root, tmp_path, change, message):
    _, test = data.load_category(synth_root, "washer")
    splits.write_split(splits.make_split(test, "washer", 0, "all-types", k=None), tmp_path / "washer-split")
    change = [str(tmp_path / c) if c == "washer-split" else c for c in change]
    argv = ["--data-root", str(synth_root), "--category", "weave", *TINY, "--out-dir", str(tmp_path / "runs" / "x")]
    for i in range(0, len(change), 2):
        if change[i] in argv:
            argv[argv.index(change[i]) + 1] = change[i + 1]
        else:
            argv += change[i:i + 2]
    with pytest.raises(SystemExit, match=rf"^error: {message}") as e:
        classify.main(argv)
    assert "\n" not in str(e.value.code)
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------------------------
# The pieces, with known answers
# ----------------------------------------------------------------------------------------------------------------
def test_validation_split_is_training_side_stratified_and_seeded(synth_root):
    train, test = data.load_category(synth_root, "washer")
    defects, heldout, evaluated = splits.apply_split(test, splits.make_split(test, "washer", 0, "all-types", k=None))
    fit, val = classify.validation_split(train, defects, heldout, seed=0)
    assert sorted(s.rel for s in fit + val) == sorted(s.rel for s in train + defects + heldout)  # each once
    assert not {s.rel for s in fit + val} & {s.rel for s in evaluated}
    assert set(heldout) <= set(val) and sum(s.rel.startswith("train/") for s in val) == 2  # 10% of 16, rounded
    assert sum(s.label for s in val) == 1  # 2 per type: the 1-in-4 rule gives none, so one is taken
    assert classify.validation_split(train, defects, heldout, seed=0) == (fit, val)
    assert classify.validation_split(train, defects, heldout, seed=1) != (fit, val)
    # a type's only training defect must train: k=1 per type gives no validation defect (the last epoch is kept)
    one_each = [next(s for s in defects if s.defect_type == t) for t in sorted({s.defect_type for s in defects})]
    fit1, val1 = classify.validation_split(train, one_each, heldout, seed=0)
    assert set(one_each) <= set(fit1) and not any(s.label for s in val1)


def test_select_epoch_prefers_auroc_then_loss_then_later_epoch():
    h = [{"val_auroc": 0.9, "val_loss": 0.2}, {"val_auroc": 1.0, "val_loss": 0.3},
         {"val_auroc": 1.0, "val_loss": 0.1}, {"val_auroc": 1.0, "val_loss": 0.1}, {"val_auroc": 0.8, "val_loss": 0.0}]
    assert classify.select_epoch(h) == 3
    assert classify.select_epoch([{"val_auroc": None, "val_loss": v} for v in (0.1, 0.5)]) == 1  # no val defect


def test_class_weights_balance_the_two_classes():
    w = classify.class_weights([0, 0, 0, 0, 0, 0, 1, 1])
    assert w.tolist() == pytest.approx([8 / 12, 8 / 4])
    assert w[0] * 6 == pytest.approx(w[1] * 2)  # each class carries half of the loss


def test_lr_schedule_warms_up_then_decays_by_cosine():
    f = [classify.lr_factor(s, warmup_steps=4, total_steps=20) for s in range(20)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and f[4] == pytest.approx(1.0)
    assert f[12] == pytest.approx(0.5) and all(a > b for a, b in zip(f[4:], f[5:])) and f[-1] > 0


def test_augment_is_seeded_keeps_the_size_and_respects_flips():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8))
    augment = classify.Augment(64, True, seed=3)
    a = [np.asarray(augment(noise, 1, 5)) for _ in range(2)]  # a pure function of (seed, epoch, index)
    assert a[0].shape == (64, 64, 3) and np.array_equal(a[0], a[1])
    assert np.array_equal(a[0], np.asarray(classify.Augment(64, True, seed=3)(noise, 1, 5)))
    for other in (classify.Augment(64, True, seed=4)(noise, 1, 5), augment(noise, 2, 5), augment(noise, 1, 6)):
        assert not np.array_equal(a[0], np.asarray(other))
    # dark left half, bright right half: only a horizontal flip brings the bright side to the left
    halves = Image.fromarray(np.repeat(np.r_[np.zeros(40), np.full(40, 255)].astype(np.uint8)[None, :, None],
                                       80, 0).repeat(3, 2))

    def left_half_means(flips: bool) -> list[float]:
        augment = classify.Augment(64, flips, seed=0)
        return [np.asarray(augment(halves, 1, i))[:, :32].mean() for i in range(16)]

    assert max(left_half_means(False)) < 40  # a small rotation and shift never bring the right half over
    assert 3 <= sum(v > 200 for v in left_half_means(True)) <= 13  # about half of the images are mirrored


def test_synthetic_items_are_defect_copies_of_the_normals_and_none_adds_nothing(synth_root):
    train, test = data.load_category(synth_root, "weave")
    samples = [*train[:3], next(s for s in test if s.label == 1)]
    assert classify.synthetic_items(samples, "none") == []  # --synthetic none: the training list is unchanged
    copies = classify.synthetic_items(samples, "cutpaste")
    assert [s.path for s in copies] == [s.path for s in train[:3]]  # one per normal image, in order
    assert all(s.label == 1 and s.defect_type == "cutpaste" and s.mask_path is None for s in copies)
    assert classify.class_weights([s.label for s in samples + copies]).tolist() == pytest.approx([7 / 6, 7 / 8])


def test_synthetic_defects_come_after_the_augmentation_and_only_from_the_first_synthetic_index():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8))
    augment = classify.Augment(64, True, seed=3)
    train = classify.SyntheticDefects(64, seed=3, first=2, augment=augment)
    for index in (0, 1):  # real items: the label-preserving augmentation alone
        assert np.array_equal(np.asarray(train(image, 1, index)), np.asarray(augment(image, 1, index)))
    expected = cutpaste.synthetic_defect(augment(image, 1, 2), 3, 1, 2).image  # at the model's size, after Augment
    assert np.array_equal(np.asarray(train(image, 1, 2)), np.asarray(expected))
    assert not np.array_equal(np.asarray(train(image, 2, 2)), np.asarray(expected))  # a new defect each epoch
    val = classify.SyntheticDefects(64, seed=3, first=1)  # validation: no augmentation, the loader's epoch 0
    resized = image.resize((64, 64), Image.BILINEAR)
    assert val(resized, 0, 0) is resized  # a real validation image is untouched
    assert np.array_equal(np.asarray(val(image, 0, 1)),
                          np.asarray(cutpaste.synthetic_defect(resized, 3, 0, 1).image))


def augmented_epochs(samples, workers: int, seed: int = 0, epochs: int = 2) -> list[tuple[list[int], torch.Tensor]]:
    """(indices, images) of every training batch of `epochs` epochs, as classify.fit draws them."""
    loader = data.make_loader(samples, 64, *backbones.normalization("efficientnet_lite0"), 4,
                              augment=classify.Augment(64, True, seed), shuffle=True, seed=seed, cache=True,
                              workers=workers)
    batches = []
    for epoch in range(1, epochs + 1):
        loader.sampler.set_epoch(epoch)
        batches += [(b["index"].tolist(), b["image"]) for b in loader]
    return batches


def test_augmentations_do_not_depend_on_the_number_of_workers(synth_root):
    train, _ = data.load_category(synth_root, "weave")
    samples = train[:12]  # 3 batches of 4 per epoch
    alone, two = augmented_epochs(samples, workers=0), augmented_epochs(samples, workers=2)
    assert len(alone) == len(two) == 6
    for (idx0, x0), (idx2, x2) in zip(alone, two):
        assert idx0 == idx2 and torch.equal(x0, x2)  # the same order, the same pixels
    first, second = [i for b in alone[:3] for i in b[0]], [i for b in alone[3:] for i in b[0]]
    assert sorted(first) == sorted(second) == list(range(12)) and first != second  # a fresh shuffle each epoch
    by_index = [{i: x for b in epoch for i, x in zip(b[0], b[1])} for epoch in (alone[:3], alone[3:])]
    assert not torch.equal(by_index[0][0], by_index[1][0])  # an image is augmented anew each epoch
    other_seed = {i: x for idx, xs in augmented_epochs(samples, workers=0, seed=1, epochs=1) for i, x in zip(idx, xs)}
    assert all(not torch.equal(by_index[0][i], other_seed[i]) for i in range(12))  # another seed, other augmentations


def test_autocast_dtype_uses_native_bfloat16_only_and_float32_turns_it_off(monkeypatch):
    cuda = torch.device("cuda")  # only the device's type is looked at: no GPU needed
    assert classify.amp_dtype(torch.device("cpu"), "mixed") is None and classify.amp_dtype(cuda, "float32") is None
    # a GPU that only emulates bfloat16 (Volta, Turing): float16, with the GradScaler
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert classify.amp_dtype(cuda, "mixed") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and later
    assert classify.amp_dtype(cuda, "mixed") == torch.bfloat16


def test_predict_gives_float32_log_odds_under_bfloat16_autocast(synth_root, monkeypatch):
    """The GPU's bfloat16 autocast, simulated on the CPU: the log-odds come from the float32 head, not rounded to a
    bfloat16 grid, and the scoring (Grad-CAM) and validation (no Grad-CAM) paths give the same numbers."""
    monkeypatch.setattr(classify, "autocast",
                        lambda device, precision="mixed": torch.autocast("cpu", dtype=torch.bfloat16))
    torch.manual_seed(0)
    model, cam_layer = backbones.classifier("efficientnet_lite0", "imagenet", 2)
    with torch.no_grad():
        classify.head_of(model).bias[1] += 5  # log-odds of ~5, where the bfloat16 grid is 0.03
    _, test = data.load_category(synth_root, "weave")
    samples = test[:8]
    plain, _, _ = classify.predict(model, samples, "efficientnet_lite0", 64, torch.device("cpu"), 4)
    with_cam, maps, _ = classify.predict(model, samples, "efficientnet_lite0", 64, torch.device("cpu"), 4, cam_layer)
    assert plain.dtype == np.float64 and np.array_equal(plain, plain.astype(np.float32))  # float32 values, widened
    assert np.abs(plain).max() > 1
    on_grid = torch.from_numpy(plain).to(torch.bfloat16).double().numpy()
    assert (plain != on_grid).all()  # not one log-odds sits on the bfloat16 grid
    assert np.allclose(with_cam, plain, rtol=1e-6, atol=1e-6) and maps.dtype == np.float32


class TinyCNN(nn.Module):
    """A 1x1 conv (the Grad-CAM layer) -> global average pooling -> linear: Grad-CAM has a closed form here."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))  # (B, 3, S, S) -> (B, 4, S, S) -> (B, 4) -> (B, 2)


def test_grad_cam_sums_to_the_log_odds_in_a_pooled_linear_model():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    with torch.no_grad():
        model.fc.weight[1] = model.fc.weight[0] + torch.tensor([0.5, 1.0, 0.2, 0.7])  # every channel votes "defect"
    images = torch.randn(3, 3, 16, 16)
    d, cam = classify.grad_cam(model, model.conv, images)
    with torch.no_grad():
        logits = model(images)
        bias = (model.fc.bias[1] - model.fc.bias[0]).item()
    assert cam.shape == (3, 16, 16)
    assert d == pytest.approx((logits[:, 1] - logits[:, 0]).tolist(), abs=1e-5)
    # each pixel is its additive share of the log-odds: no per-image normalisation, comparable across images
    assert cam.sum(dim=(1, 2)).tolist() == pytest.approx((d - bias).tolist(), abs=1e-4)
    assert all(p.grad is None for p in model.parameters())  # scoring does not touch the weights' gradients


def test_unreadable_image_stops_before_training(synth_root, tmp_path, monkeypatch):
    root = truncated_copy(synth_root, "weave", "test/stain/002.png", tmp_path / "data")

    def no_training(*args, **kwargs):
        raise AssertionError("training started although a test image is unreadable")
    monkeypatch.setattr(classify, "fit", no_training)
    with pytest.raises(SystemExit, match=r"^error: cannot read image .*stain/002\.png"):
        classify.main(["--data-root", str(root), "--category", "weave", *TINY, "--out-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
