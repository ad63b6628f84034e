"""Tests of splits.py: both protocols' seeded splits (pool: all-types, unseen-type, few-shot; DRA's open-set: general,
hard), their files and the command that writes one.

    python3 -m pytest -q tests/test_splits.py --durations=5
"""
import json

import pytest

import data
import splits
from conftest import DEFECTS, N_DEFECT, N_TEST_GOOD


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def fake_test(counts: dict[str, int]) -> list[data.Sample]:
    """Test samples without files (the split functions only look at rel and defect_type)."""
    return [data.Sample(f"/x/test/{t}/{i:03d}.png", f"test/{t}/{i:03d}.png", int(t != "good"), t, None)
            for t, n in counts.items() for i in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# pool protocol (all-types, unseen-type, few-shot)
# ----------------------------------------------------------------------------------------------------------------
def test_split_deterministic_per_seed_and_different_across_seeds(loaded):
    _, test = loaded["weave"]
    s0 = splits.make_split(test, "weave", 0, "all-types", None)
    assert s0 == splits.make_split(list(test), "weave", 0, "all-types", None)
    s1 = splits.make_split(test, "weave", 1, "all-types", None)
    assert (s0["train_defects"], s0["eval"]) != (s1["train_defects"], s1["eval"])
    assert {s0["seed"], s1["seed"]} == {0, 1} and s0["category"] == "weave"


def test_split_does_not_depend_on_input_order(loaded):
    _, test = loaded["weave"]
    assert splits.make_split(test, "weave", 0, "all-types", None) == \
        splits.make_split(test[::-1], "weave", 0, "all-types", None)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_pool_and_eval_disjoint_cover_and_at_most_half(seed):
    test = fake_test({"good": 5, "a": 3, "b": 1, "c": 8, "d": 2})
    parts = splits.pool_and_eval(test, seed)
    assert set(parts) == {"good", "a", "b", "c", "d"}
    for t, (pool, ev) in parts.items():
        group = [s for s in test if s.defect_type == t]
        assert len(pool) == len(group) // 2  # floor: an odd folder keeps the extra image for evaluation
        assert not set(pool) & set(ev) and sorted(pool + ev, key=lambda s: s.rel) == group


def test_split_parts_are_disjoint_and_capped_by_k(loaded):
    _, test = loaded["weave"]
    rels = {s.rel for s in test}
    for k, per_type in ((None, N_DEFECT // 2), (0, 0), (1, 1), (100, N_DEFECT // 2)):
        split = splits.make_split(test, "weave", 0, "all-types", k)
        train, held, ev = split["train_defects"], split["heldout_good"], split["eval"]
        assert not (set(train) | set(held)) & set(ev)
        assert len(set(train)) == len(train) and len(set(ev)) == len(ev)
        assert set(train) | set(held) | set(ev) <= rels
        for d in DEFECTS:
            assert sum(r.startswith(f"test/{d}/") for r in train) == per_type
        assert all(r.startswith("test/good/") for r in held) and len(held) == N_TEST_GOOD // 2
        assert len(ev) == (N_TEST_GOOD - N_TEST_GOOD // 2) + len(DEFECTS) * (N_DEFECT - N_DEFECT // 2)
    with pytest.raises(data.DataError, match=r"k must be >= 0, got -1"):
        splits.make_split(test, "weave", 0, "all-types", -1)


def test_k_takes_a_prefix_of_the_pool(loaded):
    _, test = loaded["washer"]
    full = splits.make_split(test, "washer", 2, "few-shot", None)["train_defects"]
    one = splits.make_split(test, "washer", 2, "few-shot", 1)["train_defects"]
    assert set(one) <= set(full)  # a larger k only adds images


def test_eval_set_is_shared_across_scenarios(loaded):
    _, test = loaded["weave"]
    for seed in (0, 5):
        ev_all = splits.make_split(test, "weave", seed, "all-types", None)["eval"]
        assert splits.make_split(test, "weave", seed, "all-types", 1)["eval"] == ev_all
        assert splits.make_split(test, "weave", seed, "few-shot", 0)["eval"] == ev_all
        for held in DEFECTS:
            unseen = splits.make_split(test, "weave", seed, "unseen-type", 1, held)
            assert set(unseen["eval"]) <= set(ev_all)
            assert {r.split("/")[1] for r in unseen["eval"]} == {"good", held}
            assert all(f"/{held}/" not in r for r in unseen["train_defects"])
            assert {r.split("/")[1] for r in unseen["train_defects"]} == set(DEFECTS) - {held}
            assert unseen["held_out"] == held and unseen["scenario"] == "unseen-type"


def test_adding_a_type_does_not_reshuffle_the_others():
    small = fake_test({"good": 6, "a": 4, "b": 5})
    parts_small = splits.pool_and_eval(small, 3)
    parts_big = splits.pool_and_eval(small + fake_test({"zz": 4}), 3)
    for t in ("good", "a", "b"):
        assert parts_small[t] == parts_big[t]


def test_split_roundtrip_and_apply(loaded, tmp_path):
    _, test = loaded["weave"]
    split = splits.make_split(test, "weave", 4, "unseen-type", 2, "stain")
    path = tmp_path / "split.json"
    splits.write_split(split, path)
    assert splits.read_split(path) == split
    assert not (tmp_path / "split.json.tmp").exists()
    train, held, ev = splits.apply_split(test, splits.read_split(path))
    assert [s.rel for s in train] == split["train_defects"] and [s.rel for s in ev] == split["eval"]
    assert all(isinstance(s, data.Sample) and s in test for s in train + held + ev)
    assert all(s.label == 1 for s in train) and all(s.label == 0 for s in held)


def test_apply_split_rejects_foreign_paths(loaded):
    _, test = loaded["weave"]
    split = splits.make_split(test, "weave", 0, "all-types", 1)
    split["eval"] = split["eval"] + ["test/crack/999.png"]
    with pytest.raises(data.DataError, match=r"lists 1 images that are not in the category \(first: test/crack/999\.png\)"):
        splits.apply_split(test, split)


def test_read_split_errors(tmp_path):
    with pytest.raises(data.DataError, match=r"cannot read split file .*missing\.json"):
        splits.read_split(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(data.DataError, match=r"cannot read split file .*bad\.json"):
        splits.read_split(tmp_path / "bad.json")
    (tmp_path / "partial.json").write_text(json.dumps({"category": "weave", "train_defects": [], "heldout_good": []}))
    with pytest.raises(data.DataError, match=r"partial\.json has no 'eval' entry"):
        splits.read_split(tmp_path / "partial.json")


def test_bad_scenario_and_held_out(loaded):
    _, test = loaded["weave"]
    with pytest.raises(data.DataError, match=r"unknown scenario 'zero-shot' \(expected one of all-types, unseen-type"):
        splits.make_split(test, "weave", 0, "zero-shot", 1)
    with pytest.raises(data.DataError, match=r"held-out type 'crack' is not a defect type of weave \(hole, missing"):
        splits.make_split(test, "weave", 0, "unseen-type", 1, "crack")
    with pytest.raises(data.DataError, match=r"held-out type 'None'"):
        splits.make_split(test, "weave", 0, "unseen-type", 1, None)
    with pytest.raises(data.DataError, match=r"--held-out is only used by the unseen-type scenario, not all-types"):
        splits.make_split(test, "weave", 0, "all-types", 1, "hole")
    with pytest.raises(data.DataError, match=r"has 1 defect type; unseen-type needs at least 2"):
        splits.make_split(fake_test({"good": 4, "a": 4}), "one", 0, "unseen-type", 1, "a")


# ----------------------------------------------------------------------------------------------------------------
# DRA's open-set protocol (general, hard)
# ----------------------------------------------------------------------------------------------------------------
def test_general_evaluates_the_test_set_minus_exactly_the_m_labelled(loaded):
    train, test = loaded["weave"]
    every = {s.rel for s in test}
    for m in (1, 3):
        split = splits.open_set_split(train, test, "weave", 0, "general", m)
        assert len(split["train_defects"]) == m and split["k"] == m
        assert all(not r.startswith("test/good/") for r in split["train_defects"])
        assert set(split["eval"]) == every - set(split["train_defects"])  # every other test image, good included
        assert len(split["eval"]) == len(every) - m
    one, three = (splits.open_set_split(train, test, "weave", 0, "general", m)["train_defects"] for m in (1, 3))
    assert one == three[:1]  # a smaller M takes the first images of a larger M's draw


def test_hard_evaluates_good_plus_exactly_the_other_types(loaded):
    train, test = loaded["weave"]
    for known in ("hole", "scratch"):
        split = splits.open_set_split(train, test, "weave", 0, "hard", 2, known=known)
        assert split["known"] == known and len(split["train_defects"]) == 2
        assert all(r.startswith(f"test/{known}/") for r in split["train_defects"])
        expected = {s.rel for s in test if s.defect_type != known}  # good + every image of the other types
        assert set(split["eval"]) == expected
    # fewer if the type has fewer: weave has 4 images per type at this size
    assert len(splits.open_set_split(train, test, "weave", 0, "hard", 10, known="hole")["train_defects"]) == 4


def test_open_set_draws_are_seeded_and_normals_come_from_train_good(loaded):
    train, test = loaded["weave"]
    a, b = (splits.open_set_split(train, test, "weave", 0, "general", 3) for _ in range(2))
    assert a == b
    draws = {tuple(splits.open_set_split(train, test, "weave", seed, "general", 3)["train_defects"])
             for seed in range(5)}
    assert len(draws) > 1  # the draw changes with the seed
    hard = {tuple(splits.open_set_split(train, test, "weave", seed, "hard", 2, known="hole")["train_defects"])
            for seed in range(5)}
    assert len(hard) > 1
    held = a["heldout_good"]
    assert held and all(r.startswith("train/good/") for r in held) and not set(held) & set(a["eval"])
    assert len(held) == max(2, round(len(train) * splits.HELDOUT_TRAIN_FRACTION))
    # the same normals for every run of a seed (general, hard, PatchCore), so the fused detector calibrates on them
    assert splits.open_set_split(train, test, "weave", 0, "hard", 2, known="stain")["heldout_good"] == held
    assert splits.open_set_patchcore_split(train, test, "weave", 0)["heldout_good"] == held
    labelled, heldout, evaluated = splits.apply_split(test, a, train)
    assert [s.rel for s in heldout] == held and all(s.label == 0 for s in heldout)
    assert not {s.rel for s in splits.without_heldout(train, heldout)} & set(held)


def test_general_with_no_labelled_anomaly_evaluates_every_test_image(loaded):
    train, test = loaded["weave"]
    zero = splits.open_set_split(train, test, "weave", 0, "general", 0)  # for classify.py --synthetic cutpaste
    assert zero["train_defects"] == [] and zero["k"] == 0
    assert sorted(zero["eval"]) == sorted(s.rel for s in test)
    assert zero["heldout_good"] == splits.open_set_split(train, test, "weave", 0, "general", 1)["heldout_good"]


def test_open_set_bad_input_is_one_sentence(loaded):
    train, test = loaded["weave"]
    n_defects = sum(s.label for s in test)
    with pytest.raises(data.DataError, match=rf"--general-m {n_defects + 1} is larger than the {n_defects} defect "
                                             rf"images of weave; choose M <= {n_defects}"):
        splits.open_set_split(train, test, "weave", 0, "general", n_defects + 1)
    for bad in (-1, 1.5, "3"):
        with pytest.raises(data.DataError, match="--general-m must be a non-negative whole number"):
            splits.open_set_split(train, test, "weave", 0, "general", bad)
    for bad in (0, -1, 1.5):  # the hard scenario's known type needs at least one labelled anomaly
        with pytest.raises(data.DataError, match="--hard-m must be a positive whole number"):
            splits.open_set_split(train, test, "weave", 0, "hard", bad, known="stain")
    with pytest.raises(data.DataError, match="known type 'crack' is not a defect type of weave"):
        splits.open_set_split(train, test, "weave", 0, "hard", 1, known="crack")
    one_type = [s for s in test if s.defect_type in ("good", "hole")]
    with pytest.raises(data.DataError, match="has 1 defect type; the hard scenario .* needs at least 2"):
        splits.open_set_split(train, one_type, "weave", 0, "hard", 1, known="hole")


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def test_cli_split_writes_the_split(synth_root, loaded, tmp_path):
    out = tmp_path / "split.json"
    splits.main(["--data-root", str(synth_root), "--category", "weave", "--seed", "3",
                 "--scenario", "unseen-type", "--k", "1", "--held-out", "hole", "--out", str(out)])
    assert splits.read_split(out) == splits.make_split(loaded["weave"][1], "weave", 3, "unseen-type", 1, "hole")
    assert not list(tmp_path.glob("*.tmp"))
