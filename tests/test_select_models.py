"""Known answers for the model-selection rule: Pareto front, trend line, pick, filters, files and bad input."""
import csv
import json
import os

import numpy as np
import pytest

import select_models as sm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cand(name, params, metric, task="mvtec_ad", usable=True, input_res=224, code="https://x", source="test"):
    """A hand-made candidate row."""
    return sm.Candidate(name, task, params, metric, "auroc", input_res, usable, code, source)


def write_table(path, rows, columns=sm.COLUMNS):
    """Write rows (dicts) as a candidate CSV and return its path as a string."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return str(path)


def row(name, task, params, metric, usable="yes", input_res="224", code="https://x"):
    """A CSV row as a dict of strings."""
    return dict(name=name, task=task, params_millions=params, metric_value=metric,
                metric_name="top1" if task == "imagenet1k" else "image_auroc_mean", input_res=input_res,
                usable_at_512=usable, code_url=code, source=f"hand-made {name}")


# --- Pareto front ---------------------------------------------------------------------------------------------

def test_pareto_drops_dominated_points():
    # b (2 M, 9) is beaten by a (1 M, 10); d (4 M, 11) is beaten by c (3 M, 12).
    assert sm.pareto_front([1, 2, 3, 4], [10, 9, 12, 11]) == [0, 2]


def test_pareto_front_is_sorted_by_size():
    assert sm.pareto_front([30, 1, 10], [90, 50, 80]) == [1, 2, 0]


def test_pareto_ties():
    assert sm.pareto_front([5, 5], [80, 80]) == [0, 1]  # equal on both counts: keep both
    assert sm.pareto_front([5, 5], [80, 81]) == [1]  # equal params: keep the more accurate
    assert sm.pareto_front([4, 5], [80, 80]) == [0]  # equal metric: keep the smaller


# --- trend line -----------------------------------------------------------------------------------------------

def test_fit_trend_log_and_linear():
    slope, intercept = sm.fit_trend([1, 10, 100], [1, 2, 3], "log")  # metric = log10(params) + 1
    assert slope == pytest.approx(1.0) and intercept == pytest.approx(1.0)
    slope, intercept = sm.fit_trend([1, 2, 3], [3, 5, 7], "linear")  # metric = 2 * params + 1
    assert slope == pytest.approx(2.0) and intercept == pytest.approx(1.0)


def test_fit_trend_needs_two_sizes():
    with pytest.raises(ValueError, match="two different parameter counts"):
        sm.fit_trend([5, 5], [1, 2])


# --- selection ------------------------------------------------------------------------------------------------

def test_select_largest_residual_and_ignores_dominated():
    # On log10 x = 0, 1, 2, 3 the line is 11.5 x + 54; residuals -4, +4.5, +3, -3.5: "10" is furthest above.
    kept = [cand("1", 1, 50), cand("10", 10, 70), cand("100", 100, 80), cand("1000", 1000, 85),
            cand("dominated", 20, 60)]
    result = sm.select(kept, "log")
    assert result["pareto"] == ["1", "10", "100", "1000"]
    assert result["selected"] == "10"
    assert result["residuals"]["10"] == pytest.approx(4.5)
    assert result["trend"]["slope"] == pytest.approx(11.5) and result["trend"]["intercept"] == pytest.approx(54.0)


def test_select_linear_x_changes_the_pick():
    # Same points on a linear x: the 1000 M model pins the line low, so "100" sits furthest above it.
    kept = [cand("1", 1, 50), cand("10", 10, 70), cand("100", 100, 80), cand("1000", 1000, 85)]
    result = sm.select(kept, "linear")
    slope, intercept = np.polyfit([1, 10, 100, 1000], [50, 70, 80, 85], 1)
    assert result["trend"]["slope"] == pytest.approx(slope) and result["trend"]["x_scale"] == "linear"
    assert result["selected"] == "100"


def test_select_single_candidate():
    result = sm.select([cand("only", 25, 99.0)])
    assert result["selected"] == "only" and result["pareto"] == ["only"]
    assert result["trend"]["slope"] is None and "no line" in result["trend"]["note"]


def test_select_two_pareto_candidates_picks_the_smaller():
    result = sm.select([cand("big", 50, 99.0), cand("small", 5, 97.0), cand("worse", 60, 90.0)])
    assert result["pareto"] == ["small", "big"]
    assert result["selected"] == "small"
    assert all(abs(r) < 1e-9 for r in result["residuals"].values())
    assert "two sizes" in result["trend"]["note"]


def test_select_empty_raises():
    with pytest.raises(ValueError, match="nothing to select"):
        sm.select([])


# --- filters --------------------------------------------------------------------------------------------------

def test_filters_params_resolution_code():
    cands = [cand("ok", 10, 90), cand("huge", 150, 99), cand("unknown", None, 99),
             cand("vit224", 86, 95, usable=False, input_res=224), cand("vit518", 86, 95, usable=False, input_res=518),
             cand("nocode", 10, 95, code="")]
    kept, excluded = sm.apply_filters(cands, max_params=100, min_res=512)
    assert [c.name for c in kept] == ["ok", "vit518"]
    assert "150 M params > 100 M" in excluded["huge"]
    assert "unknown" in excluded["unknown"]
    assert "not usable at >= 512 px" in excluded["vit224"]
    assert excluded["nocode"] == "no public code"
    kept, _ = sm.apply_filters(cands, max_params=200, min_res=224)  # looser limits let the ViT and the giant in
    assert {c.name for c in kept} == {"ok", "huge", "vit224", "vit518"}


# --- loading and bad input ------------------------------------------------------------------------------------

def test_load_reads_free_text_resolution(tmp_path):
    path = write_table(tmp_path / "c.csv", [row("a", "mvtec_ad", "24.86", "99.1", input_res="224 (256->crop 224)"),
                                            row("b", "mvtec_ad", "", "98.0", input_res="")])
    a, b = sm.load_candidates(path)
    assert (a.params, a.metric, a.input_res, a.usable_at_512) == (24.86, 99.1, 224, True)
    assert b.params is None and b.input_res is None


@pytest.mark.parametrize("field, value, message", [
    ("params_millions", "about 25", "params_millions 'about 25' is not a number"),
    ("metric_value", "", "metric_value is empty"),
    ("usable_at_512", "maybe", "usable_at_512 must be yes or no"),
    ("task", "cifar10", "task 'cifar10' is not one of"),
])
def test_load_rejects_bad_values(tmp_path, field, value, message):
    bad = {**row("a", "mvtec_ad", "10", "90"), field: value}
    with pytest.raises(ValueError, match=message):
        sm.load_candidates(write_table(tmp_path / "c.csv", [bad]))


def test_shipped_table_loads_and_keeps_sources():
    cands = sm.load_candidates(os.path.join(ROOT, "candidates.csv"))
    assert {c.task for c in cands} == set(sm.TASKS)
    assert all(c.source for c in cands)
    assert any("via digest" in c.source for c in cands)  # numbers read from secondary digests keep the mark


def test_shipped_table_selection():
    # The picks the README states; if the table changes, update both.
    cands = sm.load_candidates(os.path.join(ROOT, "candidates.csv"))
    for task, expected in (("imagenet1k", "efficientnet_b1 (V2)"), ("mvtec_ad", "EfficientAD-S")):
        kept, _ = sm.apply_filters([c for c in cands if c.task == task], 100, 512)
        assert sm.select(kept, "log")["selected"] == expected


# --- the script end to end ------------------------------------------------------------------------------------

def test_main_writes_selection_and_plots(tmp_path, capsys):
    table = write_table(tmp_path / "c.csv", [
        row("small", "mvtec_ad", "3", "97"), row("mid", "mvtec_ad", "8", "99"), row("large", "mvtec_ad", "25", "99.3"),
        row("dominated", "mvtec_ad", "25", "95"), row("nosize", "mvtec_ad", "", "99.9"),
        row("r18", "imagenet1k", "11.7", "69.8"), row("b1", "imagenet1k", "7.8", "79.8"),
        row("vit", "imagenet1k", "86.6", "81.1", usable="no", input_res="224 (fixed)")])
    out = tmp_path / "out"
    sm.main(["--candidates", table, "--task", "all", "--out-dir", str(out)])
    sel = json.loads((out / "selection.json").read_text())
    assert sel["mvtec_ad"]["selected"] == "mid"  # log10 x: 0.48, 0.90, 1.40 -> "mid" is above the line
    assert sel["mvtec_ad"]["pareto"] == ["small", "mid", "large"]
    assert "unknown" in sel["mvtec_ad"]["excluded"]["nosize"]
    assert sel["mvtec_ad"]["trend"]["x_scale"] == "log" and sel["mvtec_ad"]["trend"]["slope"] > 0
    assert sel["imagenet1k"] == {**sel["imagenet1k"], "selected": "b1", "pareto": ["b1"]}
    assert "vit" in sel["imagenet1k"]["excluded"]
    for task in sm.TASKS:
        png = out / f"scatter_{task}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    lines = capsys.readouterr().out.splitlines()
    assert "selected mvtec_ad: mid" in lines and "selected imagenet1k: b1" in lines


def test_main_missing_column_exits_with_one_sentence(tmp_path):
    columns = [c for c in sm.COLUMNS if c != "code_url"]
    table = write_table(tmp_path / "c.csv", [row("a", "mvtec_ad", "10", "90")], columns)
    with pytest.raises(SystemExit) as exit_info:
        sm.main(["--candidates", table, "--out-dir", str(tmp_path / "out")])
    assert str(exit_info.value.code).startswith("error: ") and "lacks the column(s) code_url" in exit_info.value.code
    assert not (tmp_path / "out").exists()  # no partial output


def test_main_nothing_left_after_filtering(tmp_path):
    table = write_table(tmp_path / "c.csv", [row("huge", "mvtec_ad", "500", "99")])
    with pytest.raises(SystemExit) as exit_info:
        sm.main(["--candidates", table, "--task", "mvtec_ad", "--out-dir", str(tmp_path / "out")])
    assert "no mvtec_ad candidate passes the filters" in exit_info.value.code
    assert not (tmp_path / "out").exists()
