"""Seeded experiment splits of both protocols: which test images the classifier may train on, which normal images
set thresholds, and which images every method is evaluated on; written to JSON so that every script and every
rerun sees the same images. Pool protocol: all-types, unseen-type, few-shot; DRA's open-set protocol: general, hard.

    python synthetic.py --out /tmp/s --size 128 --seed 0           # a synthetic MVTec-layout tree to split
    python splits.py --data-root /tmp/s --category weave --scenario all-types --k 5 --out /tmp/split.json
    python splits.py --data-root /tmp/s --category weave --scenario hard --k 10 --held-out hole --out /tmp/h.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from data import DataError, HelpFormatter, Sample, load_category, write_json

SCENARIOS = ("all-types", "unseen-type", "few-shot")
OPEN_SET_SCENARIOS = ("general", "hard")  # DRA's open-set protocol (Ding et al., CVPR 2022), see open_set_split
POOL_FRACTION = 0.5  # at most half of each test folder may be given to the classifier; the rest is evaluated
# Open-set protocol: every test image not labelled is evaluated, so the normal images that set thresholds and
# calibrate the fused detector come from train/good instead: a seeded 10 % of it, held out from both methods' training.
HELDOUT_TRAIN_FRACTION = 0.1


# ----------------------------------------------------------------------------------------------------------------
# Experiment splits (evaluate.py's protocol). Per category and seed, every test folder is shuffled once and cut into
# a pool (at most half: the classifier may train on defects from it; its good images are held-out normals for
# validation and thresholds) and an evaluation part. Every scenario evaluates on the evaluation parts only, so
# PatchCore, which never sees a defect, is scored once per category and seed and reused across scenarios.
# ----------------------------------------------------------------------------------------------------------------
def pool_and_eval(test: Sequence[Sample], seed: int) -> dict[str, tuple[list[Sample], list[Sample]]]:
    """{defect_type: (pool, eval)}: a seeded shuffle of each test folder, floor(n * POOL_FRACTION) go to the pool."""
    out = {}
    for t in sorted({s.defect_type for s in test}):
        group = sorted((s for s in test if s.defect_type == t), key=lambda s: s.rel)  # independent of input order
        # One generator per (seed, folder name): adding a folder does not reshuffle the others.
        rng = np.random.default_rng([seed, *t.encode()])
        group = [group[i] for i in rng.permutation(len(group))]
        n_pool = int(len(group) * POOL_FRACTION)
        out[t] = (group[:n_pool], group[n_pool:])
    return out


def make_split(test: Sequence[Sample], category: str, seed: int, scenario: str, k: int | None,
               held_out: str | None = None) -> dict:
    """Which test images the classifier may train on and which form the shared evaluation set (relative paths).

    all-types / few-shot: k defect images of every type from its pool (k=None: the whole pool).
    unseen-type: k of every type except `held_out`; evaluated on good + the held-out type only.
    """
    if scenario not in SCENARIOS:
        raise DataError(f"unknown scenario '{scenario}' (expected one of {', '.join(SCENARIOS)})")
    parts = pool_and_eval(test, seed)
    types = [t for t in parts if t != "good"]
    if scenario == "unseen-type":
        if len(types) < 2:
            raise DataError(f"category {category} has {len(types)} defect type; unseen-type needs at least 2")
        if held_out not in types:
            raise DataError(f"held-out type '{held_out}' is not a defect type of {category} ({', '.join(types)})")
    elif held_out is not None:
        raise DataError(f"--held-out is only used by the unseen-type scenario, not {scenario}")
    if k is not None and k < 0:
        raise DataError(f"k must be >= 0, got {k}")
    train_types = [t for t in types if t != held_out]
    eval_types = ["good", held_out] if scenario == "unseen-type" else ["good", *types]
    return {
        "category": category, "seed": seed, "scenario": scenario, "k": k, "held_out": held_out,
        "train_defects": [s.rel for t in train_types for s in parts[t][0][:k]],
        "heldout_good": [s.rel for s in parts["good"][0]] if "good" in parts else [],
        "eval": [s.rel for t in eval_types if t in parts for s in parts[t][1]],
    }


def apply_split(test: Sequence[Sample], split: dict,
                train: Sequence[Sample] = ()) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(train defects, held-out good, evaluation samples) of a split, checking every listed path exists. Held-out
    good images are test/good images (pool protocol) or train/good images (open-set protocol): pass `train`."""
    by_rel = {s.rel: s for s in (*test, *train)}
    missing = [r for key in ("train_defects", "heldout_good", "eval") for r in split[key] if r not in by_rel]
    if missing:
        raise DataError(f"split file lists {len(missing)} images that are not in the category "
                        f"(first: {missing[0]}); was it made for another category or data root?")
    return tuple([by_rel[r] for r in split[key]] for key in ("train_defects", "heldout_good", "eval"))


def without_heldout(train: Sequence[Sample], heldout_good: Sequence[Sample]) -> list[Sample]:
    """train/good minus the split's held-out normals (open-set protocol: neither method trains on them)."""
    held = {s.rel for s in heldout_good}
    return [s for s in train if s.rel not in held]


# ----------------------------------------------------------------------------------------------------------------
# DRA's open-set protocol (Ding et al., "Catching Both Gray and Black Swans", CVPR 2022, Sec. 4.1), the protocol of
# the published open-set tables. No pool: M labelled anomalies are drawn from the test set and removed from it, and
# every other test image is evaluated.
#   general: M anomalies drawn from all defect images of the category (not per type); evaluated on the rest.
#   hard:    M anomalies of one known type; evaluated on test/good + every image of the other types (all unseen; the
#            known type's other images are left out).
# Normal images for thresholds and calibration: a seeded 10 % of train/good, the same for every run of a seed.
# ----------------------------------------------------------------------------------------------------------------
def heldout_train_good(train: Sequence[Sample], seed: int) -> list[Sample]:
    """A seeded HELDOUT_TRAIN_FRACTION of train/good (at least 2 images), held out from both methods' training."""
    group = sorted(train, key=lambda s: s.rel)
    n = max(2, round(len(group) * HELDOUT_TRAIN_FRACTION))
    if len(group) < n + 1:
        raise DataError(f"train/good has {len(group)} images; the open-set protocol holds {n} out for thresholds "
                        f"and needs at least one more to train on")
    rng = np.random.default_rng([seed, *b"heldout/train"])
    return [group[i] for i in sorted(rng.permutation(len(group))[:n])]


def check_m(m, what: str, minimum: int = 1) -> int:
    """M of the open-set protocol: a whole number >= minimum (1, or 0 where no labelled anomaly is a valid split),
    or one sentence."""
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < minimum:
        kind, examples = ("positive", "1 or 10") if minimum > 0 else ("non-negative", "0, 1 or 10")
        raise DataError(f"{what} must be a {kind} whole number of labelled anomalies, got {m!r} (e.g. {examples})")
    return int(m)


def open_set_split(train: Sequence[Sample], test: Sequence[Sample], category: str, seed: int, scenario: str,
                   m: int, known: str | None = None) -> dict:
    """The classifier's M labelled anomalies and the evaluation set of DRA's general or hard scenario (relative
    paths). Draws are seeded by (seed, scenario[, known type]); a smaller M takes the first images of a larger M's
    draw. PatchCore trains on no test image, so one PatchCore run per seed scores every evaluation set. general
    allows M = 0 (no labelled anomaly: classify.py --synthetic cutpaste); hard needs M >= 1 (its known type)."""
    if scenario not in OPEN_SET_SCENARIOS:
        raise DataError(f"unknown open-set scenario '{scenario}' (expected one of {', '.join(OPEN_SET_SCENARIOS)})")
    m = check_m(m, "--general-m", minimum=0) if scenario == "general" else check_m(m, "--hard-m")
    defects = sorted((s for s in test if s.label == 1), key=lambda s: s.rel)  # independent of input order
    types = sorted({s.defect_type for s in defects})
    if scenario == "general":
        if known is not None:
            raise DataError("a known defect type is only used by the hard scenario, not general")
        if m > len(defects):
            raise DataError(f"--general-m {m} is larger than the {len(defects)} defect images of {category}; "
                            f"choose M <= {len(defects)}")
        rng = np.random.default_rng([seed, *b"general"])
        labelled = [defects[i] for i in rng.permutation(len(defects))[:m]]
        eval_types = None
    else:
        if len(types) < 2:
            raise DataError(f"category {category} has {len(types)} defect type; the hard scenario evaluates on the "
                            f"other types and needs at least 2 (use general)")
        if known not in types:
            raise DataError(f"known type '{known}' is not a defect type of {category} ({', '.join(types)})")
        group = [s for s in defects if s.defect_type == known]
        rng = np.random.default_rng([seed, *f"hard/{known}".encode()])
        labelled = [group[i] for i in rng.permutation(len(group))[:m]]  # fewer if the type has fewer
        eval_types = {"good", *types} - {known}
    taken = {s.rel for s in labelled}
    evaluated = [s.rel for s in sorted(test, key=lambda s: (s.defect_type, s.rel))
                 if s.rel not in taken and (eval_types is None or s.defect_type in eval_types)]
    # held_out: hard's known type also names its runs (hard-<type>) and the study's held_out column
    return {"category": category, "seed": seed, "scenario": scenario, "k": m, "known": known, "held_out": known,
            "train_defects": [s.rel for s in labelled],
            "heldout_good": [s.rel for s in heldout_train_good(train, seed)],
            "eval": evaluated}


def open_set_patchcore_split(train: Sequence[Sample], test: Sequence[Sample], category: str, seed: int) -> dict:
    """PatchCore's split of the open-set protocol: every test image scored (each general/hard evaluation set is a
    subset of it), the seed's held-out train/good images left out of the memory bank for its threshold."""
    return {"category": category, "seed": seed, "scenario": "open-set", "k": 0, "known": None, "held_out": None,
            "train_defects": [], "heldout_good": [s.rel for s in heldout_train_good(train, seed)],
            "eval": [s.rel for s in sorted(test, key=lambda s: (s.defect_type, s.rel))]}


def write_split(split: dict, path: str | Path) -> None:
    """Write a split as JSON (atomically)."""
    write_json(path, split)


def read_split(path: str | Path) -> dict:
    """Read a split JSON written by write_split."""
    try:
        split = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read split file {path}: {e}") from None
    for key in ("category", "train_defects", "heldout_good", "eval"):
        if key not in split:
            raise DataError(f"split file {path} has no '{key}' entry (write it with `python splits.py`)")
    return split



# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data-root", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenario", choices=SCENARIOS + OPEN_SET_SCENARIOS + ("open-set",), default="all-types",
                   help="open-set: PatchCore's split of the open-set protocol (every test image, no --k)")
    p.add_argument("--k", type=int, default=None, help="defect images per type for the classifier (default: pool); "
                   "general/hard: M, the labelled anomalies")
    p.add_argument("--held-out", default=None, help="defect type left out (unseen-type); hard: the one known type")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        train, test = load_category(args.data_root, args.category)
        if args.scenario in OPEN_SET_SCENARIOS and args.k is None:
            raise DataError(f"--scenario {args.scenario} needs --k M, the number of labelled anomalies (e.g. 10)")
        split = open_set_patchcore_split(train, test, args.category, args.seed) if args.scenario == "open-set" else \
            open_set_split(train, test, args.category, args.seed, args.scenario, args.k, args.held_out) \
            if args.scenario in OPEN_SET_SCENARIOS else \
            make_split(test, args.category, args.seed, args.scenario, args.k, args.held_out)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_split(split, args.out)
        print(f"wrote {args.out}: {len(split['train_defects'])} training defects, {len(split['eval'])} eval images")
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
