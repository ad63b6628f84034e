"""The study in evaluate.py: planned splits, tables rebuilt from a hand-made runs tree, a tiny end-to-end study."""
import csv
import json
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import classify
import data
import evaluate
import metrics
import patchcore
import report
import splits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import study_time  # noqa: E402


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


def fake_run(root, method, tag, role, paths, labels, scores, threshold, n_labelled, heldout, held_out=None,
             reference=None, seed=0, category="cat", synthetic=None):
    """One finished run as the scripts leave it: scores.csv, heldout_scores.csv, metrics.json, study.json."""
    d = root / category / f"seed{seed}" / ("classify" if method == "classifier" else method) / tag
    d.mkdir(parents=True)
    for name, rows in (("scores.csv", [(p, l, p.split("/")[2], s) for p, l, s in zip(paths, labels, scores)]),
                       ("heldout_scores.csv", [(p, 0, "good", s) for p, s in heldout.items()])):
        with open(d / name, "w", newline="") as f:
            csv.writer(f).writerows([["path", "label", "defect_type", "score"], *rows])
    cost = {"fit_seconds": 2.0} if method == "patchcore" else {"train_seconds": 10.0}
    data.write_json(d / "metrics.json", {"threshold": threshold, "pixel_auroc": 0.9, "aupro": 0.8, "ms_per_image": 5.0,
                                         "params_millions": 1.5, "peak_rss_mb": 100.0, **cost})
    data.write_json(d / "study.json", {"category": category, "seed": seed, "method": method, "tag": tag, "role": role,
                                       "held_out": held_out, "reference": reference, "n_labelled": n_labelled,
                                       **({"synthetic": synthetic} if synthetic else {})})


G, A, B = ["/img/good/0.png", "/img/good/1.png"], ["/img/a/2.png", "/img/a/3.png"], ["/img/b/4.png", "/img/b/5.png"]
HELDOUT = ["/img/held/0.png", "/img/held/1.png", "/img/held/2.png"]


def fake_study(root):
    """PatchCore finds type a, not b; the classifier finds b, not a: each alone is imperfect, fused they are not."""
    fake_run(root, "patchcore", "all", "all-types", G + A + B, [0, 0, 1, 1, 1, 1], [1.0, 1.1, 5, 6, 1.05, 0.95],
             1.21, 0, dict(zip(HELDOUT[:2], [1.0, 1.2])))
    fake_run(root, "classifier", "k1", "all-types", G + A + B, [0, 0, 1, 1, 1, 1],
             [0.01, 0.02, 0.015, 0.012, 0.9, 0.95], 0.021, 2, dict(zip(HELDOUT, [0.01, 0.02, 0.015])))
    # trained without b: b scores like good -> on good + b: (0.012 > 0.01), (0.012 < 0.02), (0.018 > 0.01),
    # (0.018 < 0.02) -> AUROC 2/4
    fake_run(root, "classifier", "unseen-b-k1", "unseen-type", G + B, [0, 0, 1, 1], [0.01, 0.02, 0.012, 0.018],
             0.021, 1, dict(zip(HELDOUT, [0.01, 0.02, 0.015])), held_out="b", reference="k1")


def test_runs_mode_rebuilds_known_tables(tmp_path):
    fake_study(tmp_path)
    text = evaluate.main(["--runs", str(tmp_path), "--device", "cpu"])
    rows = read_csv(tmp_path / "results.csv")

    def value(**where):
        hits = [float(r["value"]) for r in rows if all(r[k] == str(v) for k, v in where.items())]
        assert len(hits) == 1, where
        return hits[0]
    # PatchCore: a above both good images (4 of 4 pairs), b above one good image once (1 of 4): 5/8
    assert value(scenario="all-types", method="patchcore", metric="image_auroc") == 0.625
    assert value(scenario="all-types", method="classifier", tag="k1", metric="image_auroc") == 0.75
    assert value(scenario="all-types", method="classifier", tag="k1", metric="recall_at_threshold") == 0.5
    assert value(scenario="seen-type", method="classifier", held_out="b", metric="image_auroc") == 1.0
    assert value(scenario="unseen-type", method="classifier", held_out="b", metric="image_auroc") == 0.5
    # PatchCore's unseen-type row: its all-types scores of good + b (1.05 > 1.0 only): 1/4, with no run of its own
    assert value(scenario="unseen-type", method="patchcore", held_out="b", metric="image_auroc") == 0.25
    # Fused: each calibrated on its held-out normals, the larger kept: every defect above every good image, and the
    # threshold from the two held-out normals both methods scored flags every defect and no good image
    assert value(scenario="all-types", method="fused", tag="k1", metric="image_auroc") == 1.0
    assert value(scenario="all-types", method="fused", tag="k1", metric="recall_at_threshold") == 1.0
    assert value(scenario="all-types", method="fused", tag="k1", metric="fpr_at_threshold") == 0.0
    assert value(scenario="unseen-type", method="fused", held_out="b", metric="image_auroc") == 0.5
    # Intervals: a perfect AUROC has the interval [1, 1]; an imperfect one contains its value
    assert value(scenario="all-types", method="fused", tag="k1", metric="image_auroc_low") == 1.0
    low = value(scenario="all-types", method="classifier", tag="k1", metric="image_auroc_low")
    high = value(scenario="all-types", method="classifier", tag="k1", metric="image_auroc_high")
    assert low < 0.75 < high
    assert "| b | 1.000 | 0.500 | 0.250 | 0.500 |" in text  # seen vs unseen vs PatchCore vs fused, same images
    assert "| PatchCore | 0 | 0.625 |" in text and "| fused k1 | 2 | 1.000 | [1.000, 1.000] |" in text
    assert "classifier scores 0.500, against 1.000" in text  # the generated findings use the numbers
    diffs = read_csv(tmp_path / "differences.csv")
    assert {d["comparison"] for d in diffs} == {"classifier - PatchCore", "fused - PatchCore", "fused - classifier",
                                                "classifier unseen - seen"}
    assert (tmp_path / "report.md").read_text() == text
    for plot in ("fewshot.png", "roc.png", "seen_unseen.png"):
        assert (tmp_path / plot).stat().st_size > 0


def test_verdicts_carry_the_training_draw_and_show_each_seed(tmp_path):
    """Issue 32: three seeds whose classifier each is far from PatchCore on its images (every per-seed image interval
    excludes 0), two above and one below: the pooled verdict must not call it, its per-seed column lists each
    seed's difference exactly as differences.csv has it; with one seed the reading says what its interval covers."""
    good, a = [f"/img/good/{i}.png" for i in range(20)], [f"/img/a/{i}.png" for i in range(20)]
    paths, labels = good + a, [0] * 20 + [1] * 20
    spread = np.linspace(0, 1, 20)
    for seed, sign in ((0, 1), (1, 1), (2, -1)):
        fake_run(tmp_path, "patchcore", "open-set", "open-set", paths, labels, np.r_[spread, spread + 0.5], 0.5, 0,
                 dict(zip(HELDOUT, [0.01, 0.02, 0.015])), seed=seed)  # the same AUROC on every seed
        fake_run(tmp_path, "classifier", "general-1", "general", paths, labels,
                 np.r_[spread, spread + 5 * sign] / 10, 0.5, 1, dict(zip(HELDOUT, [0.01, 0.02, 0.015])), seed=seed,
                 synthetic="none")  # AUROC 1 on seeds 0 and 1, 0 on seed 2
    text = report.write(tmp_path)
    per_run = {int(d["seed"]): d for d in read_csv(tmp_path / "differences.csv")
               if d["comparison"] == "classifier - PatchCore"}
    assert [per_run[s]["real"] for s in range(3)] == ["True"] * 3  # each seed alone: "real", either way
    row = next(line for line in text.splitlines() if line.startswith("| classifier - PatchCore | general-1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "not distinguishable"
    assert cells[5] == ", ".join(report.fmt_diff(float(per_run[s]["difference"])) for s in range(3))
    pc = metrics.image_auroc(labels, np.r_[spread, spread + 0.5])
    assert cells[5] == ", ".join(report.fmt_diff(v - pc) for v in (1, 1, 0))  # AUROC 1, 1 and 0 against PatchCore's
    assert "| first - second | scenario | difference | 95 % interval | reading | per seed |" in text
    for seed in (1, 2):
        shutil.rmtree(tmp_path / "cat" / f"seed{seed}")
    one = report.write(tmp_path)
    row = next(line for line in one.splitlines() if line.startswith("| classifier - PatchCore | general-1 |"))
    assert f"classifier ahead ({report.ONE_DRAW})" in row


def test_findings_on_labels_needed_come_from_the_intervals(tmp_path):
    """A hand-made open-set study: PatchCore middling, the plain classifier at chance, the CutPaste one perfect."""
    good, a, b = ([f"/img/{t}/{i}.png" for i in range(n)] for t, n in (("good", 20), ("a", 10), ("b", 10)))
    score = {"patchcore": lambda t, i: i / 20 if t == "good" else 0.5 + i / 20,  # AUROC about 0.75
             "none": lambda t, i: i / 40 if t == "good" else i / 20,  # about chance
             "cutpaste": lambda t, i: i / 40 if t == "good" else 0.9 + i / 200}  # every defect above every good

    def run(method, tag, role, paths, n_labelled, synthetic=None, held_out=None):
        kind = synthetic or "patchcore"
        fake_run(tmp_path, method, tag, role, paths, [int("/good/" not in p) for p in paths],
                 [score[kind](p.split("/")[2], int(p.split("/")[3][:-4])) for p in paths], 0.5, n_labelled,
                 dict(zip(HELDOUT, [0.01, 0.02, 0.015])), held_out=held_out, synthetic=synthetic)
    run("patchcore", "open-set", "open-set", good + a + b, 0)
    run("classifier", "general-1", "general", good + a[1:] + b, 1, "none")
    run("classifier", "general-1-cutpaste", "general", good + a[1:] + b, 1, "cutpaste")
    run("classifier", "general-0-cutpaste", "general", good + a + b, 0, "cutpaste")
    run("classifier", "hard-a", "hard", good + b, 1, "none", held_out="a")
    run("classifier", "hard-a-cutpaste", "hard", good + b, 1, "cutpaste", held_out="a")
    text = report.write(tmp_path)
    diffs = {(d["comparison"], d["tag"]): d for d in read_csv(tmp_path / "differences.csv")}
    assert diffs[("classifier+cutpaste - PatchCore", "general-0")]["real"] == "True"
    assert float(diffs[("classifier+cutpaste - PatchCore", "general-0")]["difference"]) > 0
    assert diffs[("classifier+cutpaste - classifier", "hard-a")]["real"] == "True"
    findings = text.split("## Findings")[1].split("\n## ")[0]
    assert "cat: the real labelled anomalies a classifier needs to be ahead of PatchCore" in findings
    assert "without synthetic defects, more than M = 1, ahead at no M run (M = 1: -" in findings
    assert "with CutPaste defects, M = 0, no real label (M = 0: +" in findings
    assert "(classifier + CutPaste - classifier): M = 1: +" in findings and ", CutPaste ahead." in findings
    assert findings.rstrip().endswith(": synthetic defects help.")
    # the same runs, but the CutPaste arm no better than chance: no finding claims more than its interval shows
    for run_dir in tmp_path.rglob("*-cutpaste"):
        rows = data.read_scores(run_dir / "scores.csv")
        with open(run_dir / "scores.csv", "w", newline="") as f:
            csv.writer(f).writerows([["path", "label", "defect_type", "score"],
                                     *([p, l, t, score["none"](t, int(p.split("/")[3][:-4]))] for p, l, t, _ in zip(*rows))])
    findings = report.write(tmp_path).split("## Findings")[1].split("\n## ")[0]
    assert "with CutPaste defects, more than M = 1, ahead at no M run" in findings
    assert "(classifier + CutPaste - classifier): M = 1: +0.000 [0.000, 0.000] (one seed), not distinguishable." in findings
    assert findings.rstrip().endswith(": not distinguishable.")


def test_a_mean_over_categories_has_no_interval_where_a_category_lacks_the_arm(tmp_path):
    """Two categories, the CutPaste arm's hard run in one only: the means over categories show no mean, interval or
    paired difference of the arm."""
    good, a, b = ([f"/img/{t}/{i}.png" for i in range(n)] for t, n in (("good", 10), ("a", 5), ("b", 5)))
    paths, every = good + b, good + a + b
    labels = [int("/good/" not in p) for p in paths]
    for category in ("cat", "dog"):
        fake_run(tmp_path, "patchcore", "open-set", "open-set", every, [int("/good/" not in p) for p in every],
                 list(np.linspace(0, 1, 20)), 0.5, 0, dict(zip(HELDOUT, [0.1, 0.2, 0.3])), category=category)
        for synthetic in ("none", "cutpaste")[:2 if category == "cat" else 1]:
            fake_run(tmp_path, "classifier", "hard-a" + ("-cutpaste" if synthetic == "cutpaste" else ""), "hard",
                     paths, labels, list(np.linspace(0, 1, 15)), 0.5, 1, dict(zip(HELDOUT, [0.1, 0.2, 0.3])),
                     held_out="a", category=category, synthetic=synthetic)
    text = report.write(tmp_path)
    mean_section = text.split("## Mean over categories")[1].split("\n## ")[0]
    hard = mean_section.split("### Open-set, hard")[1].split("\n\n")[1].splitlines()
    header = [c.strip() for c in hard[0].strip("|").split("|")]
    mean_row = [c.strip() for c in next(r for r in hard if r.startswith("| mean")).strip("|").split("|")]
    row = dict(zip(header, mean_row))
    assert row["classifier + CutPaste"] == "–" and row["classifier + CutPaste 95 % interval"] == "–"
    assert row["classifier"] == "1.000" and row["classifier 95 % interval"] == "[1.000, 1.000]"
    cat = text.split("\n## cat\n")[1].split("\n## ")[0].split("### Open-set, hard")[1]
    assert "| mean | 1 | 1.000 | 1.000 |" in cat  # the category that has the arm still shows it
    assert "| classifier - PatchCore | hard (every known type) |" in mean_section  # both categories have it
    assert "| classifier + CutPaste - PatchCore | hard" not in mean_section  # one has it: no mean difference
    assert "| classifier + CutPaste - PatchCore | hard (every known type) |" in cat


def test_fused_threshold_is_set_on_normal_images_only(tmp_path):
    fake_study(tmp_path)
    scored = report.collect(tmp_path)
    pc = next(s for s in scored if s.method == "patchcore" and s.scenario == "all-types")
    cl = next(s for s in scored if s.method == "classifier" and s.scenario == "all-types")
    pc_normals, cl_normals = dict(zip(HELDOUT[:2], [1.0, 1.2])), dict(zip(HELDOUT, [0.01, 0.02, 0.015]))
    fused = report.fuse(pc, pc_normals, cl, cl_normals)
    changed = cl.on(cl.paths)
    changed.scores = changed.scores.copy()
    changed.scores[changed.labels == 1] = [0.5, 0.99, 0.001, 0.3]  # every test anomaly scores differently
    again = report.fuse(pc, pc_normals, changed, cl_normals)
    assert again.threshold == fused.threshold and not np.array_equal(again.scores, fused.scores)
    # ... while a held-out normal image does move it
    moved = report.fuse(pc, pc_normals, cl, {**cl_normals, HELDOUT[1]: 0.05})
    assert moved.threshold != fused.threshold
    # Calibration: held-out normal scores become mean 0, standard deviation 1
    z = report.calibrated("patchcore", np.array([1.0, 1.2]), np.array([1.0, 1.2]))
    assert z.mean() == pytest.approx(0) and z.std(ddof=1) == pytest.approx(1)


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
            "--scenarios", "all-types,unseen-type,few-shot",
            "--few-shot-k", "1,2", "--unseen-k", "1", "--image-size", "64", "--epochs", "1", "--batch-size", "8",
            "--classifier-backbone", "efficientnet_lite0", "--patchcore-backbone", "efficientnet_lite0",
            "--device", "cpu", "--out-dir", str(out)]
    text = evaluate.main(argv)
    rows = read_csv(out / "results.csv")
    combos = {(r["scenario"], r["method"]) for r in rows if r["metric"] == "image_auroc"}
    for scenario in ("all-types", "unseen-type", "few-shot", "seen-type"):
        for method in ("classifier", "patchcore"):
            assert (scenario, method) in combos
    # both methods and the fused detector scored exactly the same evaluation images in every scenario; PatchCore's
    # unseen-type scores are its all-types scores of those images, the same as a second scoring pass would give
    base = out / "weave" / "seed0"
    pc_all = dict(zip(*data.read_scores(base / "patchcore" / "all" / "scores.csv")[::3]))
    for held_out in ("hole", "stain"):
        run = base / "classify" / f"unseen-{held_out}-k1"
        cl = data.read_scores(run / "scores.csv")[0]
        assert all(p.startswith((f"test/{held_out}/", "test/good/")) for p in cl)  # relative to the category
        again = patchcore.main(["--data-root", str(root), "--category", "weave", "--load", str(base / "patchcore" / "all"),
                                "--device", "cpu",  # the study ran on the CPU: the same kernels, rtol 1e-5 below
                                "--split", str(base / "splits" / f"unseen-{held_out}-k1.json"),
                                "--out-dir", str(tmp_path / f"again-{held_out}")])
        paths, _, _, scores = data.read_scores(tmp_path / f"again-{held_out}" / "scores.csv")
        assert paths == cl
        np.testing.assert_allclose([pc_all[p] for p in paths], scores, rtol=1e-5)
        row = [r for r in rows if (r["scenario"], r["method"], r["held_out"], r["metric"]) ==
               ("unseen-type", "patchcore", held_out, "image_auroc")]
        assert len(row) == 1 and float(row[0]["value"]) == pytest.approx(again["image_auroc"])
        trained = json.loads((run / "images.json").read_text())["train"]
        assert not any(p.startswith(f"test/{held_out}/") for p in trained)
    assert {(r["scenario"], r["method"]) for r in rows if r["metric"] == "image_auroc"} >= {
        (sc, "fused") for sc in ("all-types", "unseen-type", "few-shot", "seen-type")}
    assert not (base / "patchcore" / "unseen-hole").exists()  # no second PatchCore pass
    for title in ("All defect types seen", "Seen vs unseen defect type", "Few-shot", "Costs", "Findings"):
        assert title in text
    # resumable: a second call trains nothing and rebuilds the same tables
    mtime = (base / "classify" / "k1" / "metrics.json").stat().st_mtime
    assert evaluate.main(argv) == text
    assert (base / "classify" / "k1" / "metrics.json").stat().st_mtime == mtime
    assert np.isfinite([float(r["value"]) for r in rows]).all()


def two_type_copy(synth_root, dest):
    """The synthetic weave category with two defect types (hole, stain): fewer runs, the same protocol."""
    shutil.copytree(synth_root / "weave", dest / "weave")
    for t in ("missing", "scratch"):
        shutil.rmtree(dest / "weave" / "test" / t), shutil.rmtree(dest / "weave" / "ground_truth" / t)
    return dest


def open_set_argv(root, out, *extra):
    return ["--data-root", str(root), "--categories", "weave", "--seeds", "0", "--scenarios", "general,hard",
            "--general-m", "2", "--hard-m", "1", "--image-size", "64", "--epochs", "1", "--batch-size", "8",
            "--classifier-backbone", "efficientnet_lite0", "--patchcore-backbone", "efficientnet_lite0",
            "--weights", "none", "--device", "cpu", "--out-dir", str(out), *extra]


def test_open_set_study_scores_the_same_images_and_never_evaluates_its_normals(synth_root, tmp_path):
    root = two_type_copy(synth_root, tmp_path / "data")
    out = tmp_path / "study"
    text = evaluate.main(open_set_argv(root, out))
    base = out / "weave" / "seed0"
    assert sorted(p.name for p in (base / "classify").iterdir()) == ["general-2", "hard-hole", "hard-stain"]
    assert [p.name for p in (base / "patchcore").iterdir()] == ["open-set"]  # one PatchCore run serves them all
    scored = report.collect(out)
    for cl in (s for s in scored if s.method == "classifier"):
        for method in ("patchcore", "fused"):  # both on exactly the classifier's evaluation images
            other = [s for s in scored if s.method == method and s.scenario == cl.scenario and s.tag == cl.tag]
            assert len(other) == 1 and list(other[0].paths) == list(cl.paths)
    train, test = data.load_category(root, "weave")
    pc_normals = data.read_scores(base / "patchcore" / "open-set" / "heldout_scores.csv")[0]
    assert pc_normals and all(p.startswith("train/good/") for p in pc_normals)
    pc_metrics = json.loads((base / "patchcore" / "open-set" / "metrics.json").read_text())
    assert pc_metrics["n_train_images"] == len(train) - len(pc_normals)  # its normals are not in the memory bank
    for tag in ("general-2", "hard-hole", "hard-stain"):
        evaluated = set(data.read_scores(base / "classify" / tag / "scores.csv")[0])
        normals = set(data.read_scores(base / "classify" / tag / "heldout_scores.csv")[0])
        assert not normals & evaluated and not set(pc_normals) & evaluated  # thresholds and calibration
        assert set(pc_normals) <= normals  # the fused detector's common normals
        images = json.loads((base / "classify" / tag / "images.json").read_text())
        assert not set(images["train"]) & set(pc_normals)
        assert not set(images["train"]) & set(images["eval"])
    split = json.loads((base / "splits" / "hard-hole.json").read_text())
    assert {p.split("/")[1] for p in split["eval"]} == {"good", "stain"} and split["known"] == "hole"
    for title in ("Open-set, general (DRA)", "Open-set, hard (DRA)", "Open-set paired differences", "Costs"):
        assert title in text
    assert "| PatchCore, whole test set | 0 |" in text and "| classifier general-2 | 2 |" in text

    # A committed study folder: no machine path in any file, no memory bank or checkpoint, moved elsewhere; it
    # still reports the same tables, and a study pointed at it runs nothing that is already there
    for f in (p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".csv", ".md")):
        assert str(tmp_path) not in f.read_text(), f
    moved = tmp_path / "clone" / "study"
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns("memory_bank", "model.pt", "heatmaps.png"))
    assert not list(moved.rglob("memory_bank")) and not list(moved.rglob("model.pt"))
    assert evaluate.main(["--runs", str(moved), "--device", "cpu"]).split("## Plots")[0] == text.split("## Plots")[0]
    mtime = (moved / "weave" / "seed0" / "classify" / "general-2" / "metrics.json").stat().st_mtime
    evaluate.main(open_set_argv(root, moved))
    assert (moved / "weave" / "seed0" / "classify" / "general-2" / "metrics.json").stat().st_mtime == mtime


def test_cutpaste_arm_trains_on_the_same_splits_and_zero_labels(synth_root, tmp_path):
    root = two_type_copy(synth_root, tmp_path / "data")
    out = tmp_path / "study"
    text = evaluate.main(open_set_argv(root, out, "--synthetic", "none,cutpaste", "--general-m", "0,2"))
    base = out / "weave" / "seed0"
    # general-0 by the CutPaste arm only (a plain classifier has nothing to learn the defect class from); every
    # other split by both arms, reading the split's one file
    assert sorted(p.name for p in (base / "classify").iterdir()) == [
        "general-0-cutpaste", "general-2", "general-2-cutpaste", "hard-hole", "hard-hole-cutpaste", "hard-stain",
        "hard-stain-cutpaste"]
    assert sorted(p.name for p in (base / "splits").iterdir()) == [
        "general-0.json", "general-2.json", "hard-hole.json", "hard-stain.json", "open-set.json"]
    scored = report.collect(out)
    for run in sorted((base / "classify").iterdir()):
        info = json.loads((run / "study.json").read_text())
        args = json.loads((run / "args.json").read_text())
        arm = "cutpaste" if run.name.endswith("-cutpaste") else "none"
        split = run.name.removesuffix("-cutpaste")
        assert info["synthetic"] == args["synthetic"] == arm and info["tag"] == run.name
        assert args["split"].endswith(f"/{split}.json")  # data.portable: the file name, no machine path
        paths = data.read_scores(run / "scores.csv")[0]
        if arm == "cutpaste" and (base / "classify" / split).is_dir():  # the plain twin: exactly the same images
            assert paths == data.read_scores(base / "classify" / split / "scores.csv")[0]
            twin = json.loads((base / "classify" / split / "args.json").read_text())
            assert twin["split"] == args["split"] and twin["synthetic"] == "none"
        # PatchCore and the fused detector on exactly these images; PatchCore's set once per split, not per arm
        method = "classifier+cutpaste" if arm == "cutpaste" else "classifier"
        mine = [s for s in scored if s.method == method and s.tag == split]
        assert len(mine) == 1 and list(mine[0].paths) == paths
        for other in ("patchcore", "fused" + method.removeprefix("classifier")):
            sets = [s for s in scored if s.method == other and s.scenario == info["role"] and s.tag == split]
            assert len(sets) == 1 and list(sets[0].paths) == paths, (run.name, other)
    # No real label: nothing from test/ in the zero-label run's training or validation images, none in its split
    assert json.loads((base / "splits" / "general-0.json").read_text())["train_defects"] == []
    images = json.loads((base / "classify" / "general-0-cutpaste" / "images.json").read_text())
    assert images["train"] and images["val"]
    assert all(p.startswith("train/good/") for p in images["train"] + images["val"])
    zero = json.loads((base / "classify" / "general-0-cutpaste" / "metrics.json").read_text())
    assert zero["n_train_defects"] == 0 and zero["n_train_synthetic"] == len(images["train"])
    rows = read_csv(out / "results.csv")
    aurocs = {(r["scenario"], r["method"], r["tag"]) for r in rows if r["metric"] == "image_auroc"}
    for tag in ("general-0", "general-2"):
        assert {("general", m, tag) for m in ("patchcore", "classifier+cutpaste", "fused+cutpaste")} <= aurocs
    assert ("general", "classifier", "general-0") not in aurocs and ("general", "classifier", "general-2") in aurocs
    assert {r["method"] for r in rows if r["scenario"] == "hard"} == {
        "patchcore", "classifier", "classifier+cutpaste", "fused", "fused+cutpaste", "cutpaste-density",
        "fused+cutpaste-density"}  # every CutPaste run is also scored by its Gaussian density (issue 32)
    assert [r["value"] for r in rows if (r["method"], r["tag"], r["metric"]) ==
            ("classifier+cutpaste", "general-0", "n_labelled")] == ["0"]
    diffs = {(d["comparison"], d["tag"]) for d in read_csv(out / "differences.csv") if d["scenario"] == "general"}
    assert {("classifier+cutpaste - PatchCore", "general-0"), ("classifier+cutpaste - PatchCore", "general-2"),
            ("classifier+cutpaste - classifier", "general-2"), ("fused+cutpaste - PatchCore", "general-0")} <= diffs
    assert ("classifier+cutpaste - classifier", "general-0") not in diffs  # no plain classifier at M = 0
    assert {("cutpaste-density - PatchCore", "general-0"), ("cutpaste-density - classifier+cutpaste", "general-0"),
            ("cutpaste-density - classifier", "general-2"), ("fused+cutpaste-density - PatchCore", "general-0")} <= diffs
    density = data.read_scores(base / "classify" / "general-0-cutpaste" / "density_scores.csv")
    assert float([r["value"] for r in rows if (r["method"], r["tag"], r["metric"]) ==
                  ("cutpaste-density", "general-0", "image_auroc")][0]) == pytest.approx(
        metrics.image_auroc(density[1], density[3]), abs=1e-12)
    hard = {d["comparison"] for d in read_csv(out / "differences.csv") if d["scenario"] == "hard"}
    assert {"classifier+cutpaste - PatchCore", "classifier+cutpaste - classifier"} <= hard
    # The report: the arm's rows beside the others, its paired differences, costs and a finding per category
    for line in ("| classifier + CutPaste, general-0 | 0 |", "| classifier + CutPaste, general-2 | 2 |",
                 "| fused + CutPaste, general-0 | 0 |", "| classifier, general-2 | 2 |",
                 "| classifier + CutPaste - classifier | general-2 |", "| classifier + CutPaste - PatchCore | hard",
                 "| classifier + CutPaste general-0 | 0 |", "| classifier + CutPaste, hard (mean over known types) |",
                 "| classifier + CutPaste, density, general-0 | 0 |", "| fused + CutPaste, density, general-0 | 0 |",
                 "| classifier + CutPaste, density - classifier + CutPaste | general-0 |"):
        assert line in text, line
    assert "| classifier, general-0 |" not in text
    assert "classifier + CutPaste 95 % interval" in text  # the hard table's column
    findings = text.split("## Findings")[1].split("\n## ")[0]
    assert "weave: the real labelled anomalies a classifier needs to be ahead of PatchCore" in findings
    assert "without synthetic defects, " in findings and "with CutPaste defects, " in findings
    assert "On the defect types never labelled (hard, every known type) classifier + CutPaste - classifier" in findings
    assert (out / "open_set.png").stat().st_size > 0
    # Where the study's time went (bench/study_time.py): runs counted per method, every phase inside the wall time
    timing = study_time.main([str(out), "--no-report"])
    for line in ("| classifier | 3 |", "| classifier+cutpaste | 4 |", "| patchcore | 1 |",
                 "| classifier+cutpaste: epochs: training steps (forward, backward, update) |"):
        assert line in timing, line
    runs = [r.parent for r in out.glob("*/seed*/*/*/study.json")]
    recorded = sum(sum(study_time.phases(r)[1].values()) for r in runs)
    wall = sum(json.loads((r / "study.json").read_text())["wall_seconds"] for r in runs)
    assert 0 < recorded < wall


def plan(root, out, *flags):
    """(run folder, split file, study.json's synthetic, the run's argv) of every planned run, relative to out."""
    args = evaluate.parse_args(["--data-root", str(root), "--categories", "weave", "--seeds", "0", "--k-values", "1,2",
                                "--few-shot-k", "1", "--unseen-k", "1", "--general-m", "1,2", "--hard-m", "1",
                                "--device", "cpu", "--out-dir", str(out), *flags])
    args.scenarios = args.scenarios.split(",")
    jobs = evaluate.plan_study(args)
    return jobs, [(str(d.relative_to(out)), str(f.relative_to(out)), i.get("synthetic"), argv)
                  for d, i, _, f, argv in jobs]


def test_default_synthetic_plans_the_runs_of_before_and_shards_split_by_split(synth_root, tmp_path):
    root = two_type_copy(synth_root, tmp_path / "data")
    _, default = plan(root, tmp_path)
    # the study's runs before the CutPaste arm (evaluate.py of 92c9d22), folder for folder, split file for split file
    expected = [("patchcore/all", "all"), ("patchcore/open-set", "open-set")] + [
        (f"classify/{t}", t) for t in ("k1", "k2", "unseen-hole-k1", "unseen-stain-k1", "general-1", "general-2",
                                       "hard-hole", "hard-stain")]
    assert [(d, f) for d, f, _, _ in default] == [(f"weave/seed0/{d}", f"weave/seed0/splits/{t}.json")
                                                  for d, t in expected]
    assert not any("--synthetic" in argv for _, _, _, argv in default)
    assert {s for d, _, s, _ in default if "/classify/" in d} == {"none"}
    jobs, both = plan(root, tmp_path, "--synthetic", "none,cutpaste")
    # the same runs, each open-set split followed by its CutPaste run on the same split file
    assert [r for r in both if r[2] != "cutpaste"] == default
    cutpaste = [(d, f) for d, f, s, argv in both if s == "cutpaste" and argv[argv.index("--synthetic") + 1] == s]
    assert cutpaste == [(f"weave/seed0/classify/{t}-cutpaste", f"weave/seed0/splits/{t}.json")
                        for t in ("general-1", "general-2", "hard-hole", "hard-stain")]
    assert [both[i + 1][:2] for i, r in enumerate(both) if r[0].endswith("/general-2")] == [
        ("weave/seed0/classify/general-2-cutpaste", "weave/seed0/splits/general-2.json")]
    # --shard: a split file and every run that reads it in one shard only; the shards together are the plan
    for n in (2, 3):
        shards = [evaluate.shard_jobs(jobs, k, n) for k in range(1, n + 1)]
        files = [{j[3] for j in shard} for shard in shards]
        assert sum(len(f) for f in files) == len(set().union(*files))
        assert sorted(str(j[0]) for shard in shards for j in shard) == sorted(str(j[0]) for j in jobs)
    plain = plan(root, tmp_path)[0]
    assert evaluate.shard_jobs(plain, 2, 3) == plain[1::3]  # one run per split file: every N-th run, as before


def test_plan_prints_each_runs_command_and_the_split_file_it_reads(synth_root, tmp_path, capsys):
    root = two_type_copy(synth_root, tmp_path / "data")
    jobs, _ = plan(root, tmp_path / "study", "--synthetic", "none,cutpaste", "--general-m", "0,1")
    written = {}
    for job in jobs:
        words = shlex.split(job.command())
        assert words[:2] == ["python3", f"{job.script.__name__}.py"] and words[2:] == job.argv
        assert job.script.parse_args(words[2:]).out_dir == str(job.run_dir)
        if job.split_file not in written:  # splits.py, run from its printed command, writes the study's draw
            words = shlex.split(evaluate.split_command(job.split, str(root), job.split_file))
            assert words[:2] == ["python3", "splits.py"]
            splits.main(words[2:])
            written[job.split_file] = json.loads(job.split_file.read_text())
        assert written[job.split_file] == json.loads(json.dumps(job.split))
    assert len(written) == 1 + 1 + 4 + 2 + 2 + 0  # all, open-set, k1 k2 unseen x2, general-0/1, hard x2
    shutil.rmtree(tmp_path / "study")
    # --plan prints those lines, each split file before the runs that read it, and writes nothing
    flags = ["--data-root", str(root), "--categories", "weave", "--seeds", "0", "--k-values", "1,2", "--few-shot-k",
             "1", "--unseen-k", "1", "--general-m", "0,1", "--hard-m", "1", "--synthetic", "none,cutpaste",
             "--device", "cpu", "--out-dir", str(tmp_path / "study")]
    capsys.readouterr()
    assert evaluate.main(flags + ["--plan"]) == ""
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"# {len(jobs)} runs") and not (tmp_path / "study").exists()
    assert [l for l in lines if not l.startswith(("#", "python3 splits.py"))] == [j.command() for j in jobs]
    assert sum(l.startswith("python3 splits.py") for l in lines) == len(written)
    evaluate.main(flags + ["--plan", "--shard", "2/3"])
    assert [l for l in capsys.readouterr().out.splitlines() if l.startswith(("python3 patchcore", "python3 classify"))] \
        == [j.command() for j in evaluate.shard_jobs(jobs, 2, 3)]


def test_each_run_folder_records_the_command_that_reruns_it_alone(synth_root, tmp_path, monkeypatch):
    two_type_copy(synth_root, tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # relative paths, as the README's commands give them, are recorded as they are
    evaluate.main(open_set_argv("data", "study", "--scenarios", "general"))
    for run_dir in ("study/weave/seed0/patchcore/open-set", "study/weave/seed0/classify/general-2"):
        command = json.loads((tmp_path / run_dir / "study.json").read_text())["command"]
        words = shlex.split(command)
        script = {"patchcore.py": patchcore, "classify.py": classify}[words[1]]
        shutil.move(run_dir, "before")
        script.main(words[2:])  # the recorded command, alone: the same run folder, the same scores
        assert data.read_scores(tmp_path / run_dir / "scores.csv")[0] == \
            data.read_scores(tmp_path / "before" / "scores.csv")[0]
        np.testing.assert_allclose(data.read_scores(tmp_path / run_dir / "scores.csv")[3],
                                   data.read_scores(tmp_path / "before" / "scores.csv")[3], rtol=1e-5, atol=1e-6)
        shutil.rmtree("before")


@pytest.mark.parametrize("flags, message", [
    (["--general-m", "0"], r"--general-m takes positive whole numbers .* trains the CutPaste arm only"),
    (["--general-m", "0,-1", "--synthetic", "none,cutpaste"], r"--general-m takes whole numbers \(0 or more\)"),
    (["--synthetic", "none,mixup"], "--synthetic takes a comma list of none, cutpaste"),
    (["--synthetic", "cutpaste", "--scenarios", "all-types,general"], "the CutPaste arm runs in the open-set"),
    (["--general-m", "1,x"], "--general-m takes positive whole numbers"),
    (["--general-m", "99"], "--general-m 99 is larger than the 8 defect images of weave; choose M <= 8"),
    (["--hard-m", "two"], "--hard-m takes positive whole numbers"),
    (["--shard", "3/2"], "--shard takes K/N with 1 <= K <= N"),
    (["--nprobe", "4"], "--nprobe applies to --search ivf only"),
])
def test_open_set_bad_values_end_in_one_sentence_and_write_nothing(synth_root, tmp_path, flags, message):
    root = two_type_copy(synth_root, tmp_path / "data")
    with pytest.raises(SystemExit, match=message):
        evaluate.main(open_set_argv(root, tmp_path / "study", *flags))
    assert not (tmp_path / "study").exists()


def test_hard_on_a_category_with_one_defect_type_writes_nothing(synth_root, tmp_path):
    root = two_type_copy(synth_root, tmp_path / "data")
    shutil.rmtree(root / "weave" / "test" / "stain"), shutil.rmtree(root / "weave" / "ground_truth" / "stain")
    with pytest.raises(SystemExit, match="has 1 defect type; the hard scenario evaluates on the other types"):
        evaluate.main(open_set_argv(root, tmp_path / "study"))
    assert not (tmp_path / "study").exists()


def test_two_shards_do_exactly_the_runs_of_one_process(synth_root, tmp_path):
    root = two_type_copy(synth_root, tmp_path / "data")
    argv = open_set_argv(root, tmp_path / "shared", "--scenarios", "all-types,general", "--k-values", "1")
    assert evaluate.main(argv + ["--shard", "1/2"]) == ""  # a shard reports nothing: the others may still run
    first = {p.parent for p in (tmp_path / "shared").rglob("study.json")}
    evaluate.main(argv + ["--shard", "2/2"])
    both = {p.parent for p in (tmp_path / "shared").rglob("study.json")}
    evaluate.main(open_set_argv(root, tmp_path / "single", "--scenarios", "all-types,general", "--k-values", "1"))
    single = {p.parent for p in (tmp_path / "single").rglob("study.json")}
    rel = lambda runs, top: sorted(str(p.relative_to(top)) for p in runs)  # noqa: E731
    assert rel(both, tmp_path / "shared") == rel(single, tmp_path / "single")  # the same runs ...
    assert 0 < len(first) < len(both)  # ... shared between the two, never both (run_study skips none here)
    for run in both:
        a = data.read_scores(run / "scores.csv")
        b = data.read_scores(tmp_path / "single" / run.relative_to(tmp_path / "shared") / "scores.csv")
        assert a[0] == b[0]
        np.testing.assert_allclose(a[3], b[3], rtol=1e-5)  # ... with the same results
    text = evaluate.main(["--runs", str(tmp_path / "shared"), "--device", "cpu"])
    assert "| classifier general-2 |" in text
