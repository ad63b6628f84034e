"""The study in evaluate.py: planned splits, tables rebuilt from a hand-made runs tree, a tiny end-to-end study."""
import csv
import json
import shutil

import numpy as np
import pytest

import data
import evaluate


def study_args(**over):
    args = evaluate.parse_args(["--data-root", "x", "--categories", "c"])
    args.scenarios = ["all-types", "unseen-type", "few-shot"]
    for k, v in over.items():
        setattr(args, k, v)
    return args


def test_planned_splits_are_disjoint_and_hold_the_type_out(synth_root):
    _, test = data.load_category(synth_root, "weave")
    splits = evaluate.plan_splits(test, "weave", 0, study_args(k_values="1,2,5", few_shot_k="1,all", unseen_k=1))
    tags = [s["tag"] for s in splits]
    # pools hold floor(4/2) = 2 defects per type: k=5 and 'all' repeat k=2, so they are not run twice
    assert tags == ["k1", "k2", "unseen-hole-k1", "unseen-missing-k1", "unseen-scratch-k1", "unseen-stain-k1"]
    all_eval = set(splits[0]["eval"])
    for s in splits:
        assert not set(s["train_defects"]) & set(s["eval"])
        assert not set(s["heldout_good"]) & set(s["eval"])
        if s["role"] == "all-types":
            assert set(s["eval"]) == all_eval  # one evaluation set for every k: PatchCore is scored once
        else:
            assert not any(p.startswith(f"test/{s['held_out']}/") for p in s["train_defects"])
            assert {p.split("/")[1] for p in s["eval"]} == {"good", s["held_out"]}
            assert set(s["eval"]) <= all_eval and s["reference"] == "k1"
    again = evaluate.plan_splits(test, "weave", 0, study_args(k_values="1,2,5", few_shot_k="1,all", unseen_k=1))
    assert again == splits
    other_seed = evaluate.plan_splits(test, "weave", 1, study_args(k_values="1,2,5", few_shot_k="1,all", unseen_k=1))
    assert other_seed[0]["eval"] != splits[0]["eval"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fake_run(root, method, tag, role, labels, types, scores, threshold, n_labelled, held_out=None, reference=None,
             seed=0, category="cat"):
    """One finished run as the scripts leave it: scores.csv, metrics.json, study.json."""
    d = root / category / f"seed{seed}" / ("classify" if method == "classifier" else method) / tag
    d.mkdir(parents=True)
    with open(d / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "defect_type", "score"])
        w.writerows([f"/img/{t}/{i}.png", l, t, s] for i, (l, t, s) in enumerate(zip(labels, types, scores)))
    cost = {"fit_seconds": 2.0} if method == "patchcore" else {"train_seconds": 10.0}
    data.write_json(d / "metrics.json", {"threshold": threshold, "pixel_auroc": 0.9, "aupro": 0.8, "ms_per_image": 5.0,
                                         "params_millions": 1.5, "peak_rss_mb": 100.0, **cost})
    data.write_json(d / "study.json", {"category": category, "seed": seed, "method": method, "tag": tag, "role": role,
                                       "held_out": held_out, "reference": reference, "n_labelled": n_labelled,
                                       "data_root": str(root)})


def test_runs_mode_rebuilds_known_tables(tmp_path):
    types = ["good", "good", "a", "a", "b", "b"]
    labels = [0, 0, 1, 1, 1, 1]
    # PatchCore ranks every defect above every good image: AUROC 1.0
    fake_run(tmp_path, "patchcore", "all", "all-types", labels, types, [0.1, 0.2, 0.9, 0.8, 0.7, 0.6], 0.65, 0)
    fake_run(tmp_path, "patchcore", "unseen-b", "unseen-type", [0, 0, 1, 1], ["good", "good", "b", "b"],
             [0.1, 0.2, 0.7, 0.6], 0.65, 0, held_out="b")
    # classifier k1: type a perfectly, type b below the good images -> AUROC (4 + 0) / 8 = 0.5 overall
    fake_run(tmp_path, "classifier", "k1", "all-types", labels, types, [0.3, 0.4, 0.9, 0.8, 0.2, 0.1], 0.45, 2)
    # trained without b: b scores like good -> on good + b: pairs (0.35>0.3), (0.35<0.4), (0.3=0.3), (0.3<0.4) -> 1.5/4
    fake_run(tmp_path, "classifier", "unseen-b-k1", "unseen-type", [0, 0, 1, 1], ["good", "good", "b", "b"],
             [0.3, 0.4, 0.35, 0.3], 0.45, 1, held_out="b", reference="k1")
    text = evaluate.main(["--runs", str(tmp_path), "--device", "cpu"])
    rows = read_csv(tmp_path / "results.csv")

    def value(**where):
        hits = [float(r["value"]) for r in rows if all(r[k] == str(v) for k, v in where.items())]
        assert len(hits) == 1, where
        return hits[0]
    assert value(scenario="all-types", method="patchcore", metric="image_auroc") == 1.0
    assert value(scenario="all-types", method="classifier", tag="k1", metric="image_auroc") == 0.5
    assert value(scenario="all-types", method="classifier", tag="k1", metric="recall_at_threshold") == 0.5
    assert value(scenario="seen-type", method="classifier", held_out="b", metric="image_auroc") == 0.0
    assert value(scenario="unseen-type", method="classifier", held_out="b", metric="image_auroc") == 0.375
    assert value(scenario="unseen-type", method="patchcore", held_out="b", metric="image_auroc") == 1.0
    assert "| b | 0.000 | 0.375 | 1.000 |" in text  # seen vs unseen vs PatchCore, same images
    assert "| PatchCore | 0 | 1.000 | 1.000 | 1.000 |" in text
    assert "classifier scores 0.375, against 0.000" in text  # the generated findings use the numbers
    assert (tmp_path / "report.md").read_text() == text
    assert (tmp_path / "fewshot.png").stat().st_size > 0 and (tmp_path / "roc.png").stat().st_size > 0


def test_runs_mode_without_runs_is_one_sentence(tmp_path):
    with pytest.raises(SystemExit, match="no finished runs under"):
        evaluate.main(["--runs", str(tmp_path)])
    with pytest.raises(SystemExit, match="does not exist"):
        evaluate.main(["--runs", str(tmp_path / "nope")])


def test_tiny_study_end_to_end(synth_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth_root / "weave", root / "weave")
    for t in ("missing", "scratch"):  # two defect types are enough here, and halve the runs
        shutil.rmtree(root / "weave" / "test" / t), shutil.rmtree(root / "weave" / "ground_truth" / t)
    out = tmp_path / "study"
    argv = ["--data-root", str(root), "--categories", "weave", "--seeds", "0", "--k-values", "1",
            "--few-shot-k", "1,2", "--unseen-k", "1", "--image-size", "64", "--epochs", "1", "--batch-size", "8",
            "--classifier-backbone", "efficientnet_lite0", "--patchcore-backbone", "efficientnet_lite0",
            "--device", "cpu", "--out-dir", str(out)]
    text = evaluate.main(argv)
    rows = read_csv(out / "results.csv")
    combos = {(r["scenario"], r["method"]) for r in rows if r["metric"] == "image_auroc"}
    for scenario in ("all-types", "unseen-type", "few-shot", "seen-type"):
        for method in ("classifier", "patchcore"):
            assert (scenario, method) in combos
    # both methods scored exactly the same evaluation images in every scenario
    base = out / "weave" / "seed0"
    for held_out in ("hole", "stain"):
        pc = [r["path"] for r in read_csv(base / "patchcore" / f"unseen-{held_out}" / "scores.csv")]
        cl = [r["path"] for r in read_csv(base / "classify" / f"unseen-{held_out}-k1" / "scores.csv")]
        assert pc == cl and all(f"/test/{held_out}/" in p or "/test/good/" in p for p in pc)
        trained = json.loads((base / "classify" / f"unseen-{held_out}-k1" / "images.json").read_text())["train"]
        assert not any(p.startswith(f"test/{held_out}/") for p in trained)
    for title in ("All defect types seen", "Seen vs unseen defect type", "Few-shot", "Costs", "Findings"):
        assert title in text
    # resumable: a second call trains nothing and rebuilds the same tables
    mtime = (base / "classify" / "k1" / "metrics.json").stat().st_mtime
    assert evaluate.main(argv) == text
    assert (base / "classify" / "k1" / "metrics.json").stat().st_mtime == mtime
    assert np.isfinite([float(r["value"]) for r in rows]).all()
