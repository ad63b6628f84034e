"""Where a study's time goes: the runs and mean wall time per method (PatchCore, the classifier, the classifier with
CutPaste defects), then the time of every finished run of a study folder split by phase from what each run recorded
(classify.py: each epoch's seconds, split into waiting for images, training steps and validation; scoring ms per
image; patchcore.py: features, coreset and index of the fit, then read / features / search / maps per test image),
plus the report rebuilt from the saved scores.

Only runs that had the machine to themselves give times worth comparing; the table says how many runs it sums.

    python bench/study_time.py results/mvtec
    python bench/study_time.py results/mvtec --no-report        # without timing report.write (on a copy)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import report  # noqa: E402


def phases(run_dir: Path) -> tuple[str, dict[str, float], float | None]:
    """(method, {phase: seconds}, the run's wall seconds as evaluate.py timed it, or None) of one finished run;
    the method is patchcore, classifier or classifier+cutpaste (which trains on twice the images)."""
    info = json.loads((run_dir / "study.json").read_text())
    m = json.loads((run_dir / "metrics.json").read_text())
    n = len(data.read_scores(run_dir / "scores.csv")[0])  # images scored in the timed pass
    method = report.method_of(info)
    if info["method"] == "patchcore":
        fit = m.get("fit_seconds_by_phase") or {"features + coreset + index": m["fit_seconds"]}
        out = {f"fit: {k}": v for k, v in fit.items()}
        scoring = m.get("ms_per_image_by_phase") or {"all": m["ms_per_image"]}
        out |= {f"scoring: {k}": v * n / 1000 for k, v in scoring.items()}
    else:
        h = m["history"]
        epochs = sum(e["seconds"] for e in h)  # training pass + validation scoring, each epoch
        if all("read_seconds" in e for e in h):  # runs since an epoch's parts are recorded
            read, val = (sum(e[k] for e in h) for k in ("read_seconds", "validation_seconds"))
            out = {"epochs: reading + augmenting images": read,
                   "epochs: training steps (forward, backward, update)": epochs - read - val,
                   "epochs: validation": val}
        else:
            out = {"epochs (training + validation)": epochs}
        out |= {"the rest of training (best weights, threshold)": m["train_seconds"] - epochs,
                "scoring (forward + Grad-CAM)": m["ms_per_image"] * n / 1000}
    return method, {f"{method}: {k}": v for k, v in out.items()}, info.get("wall_seconds")


def fmt_seconds(s: float) -> str:
    """'1 h 02 min', '12 min 05 s' or '41.2 s'."""
    if s >= 3600:
        return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
    return f"{int(s // 60)} min {int(s % 60):02d} s" if s >= 60 else f"{s:.1f} s"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("study", help="a study folder written by evaluate.py (e.g. results/mvtec)")
    p.add_argument("--no-report", action="store_true", help="do not time rebuilding the report")
    args = p.parse_args(argv)
    runs = sorted(r.parent for r in Path(args.study).glob("*/seed*/*/*/study.json"))
    if not runs:
        sys.exit(f"error: no finished run in {args.study} (expected <category>/seed<N>/<method>/<tag>/study.json)")
    totals, walls = {}, {}  # phase -> seconds; method -> each run's wall seconds (None where not recorded)
    for run in runs:
        method, split, wall = phases(run)
        walls.setdefault(method, []).append(wall)
        for k, v in split.items():
            totals[k] = totals.get(k, 0.0) + v
    totals = dict(sorted(totals.items(), key=lambda kv: kv[0].split(":")[0]))  # grouped by method, phases in order
    if not args.no_report:  # on a copy: the study's own report (with its heatmaps) stays as it is
        with tempfile.TemporaryDirectory() as tmp:
            skip = shutil.ignore_patterns("memory_bank", "model.pt", "maps")  # the report reads none of them
            copy = shutil.copytree(args.study, Path(tmp) / "study", ignore=skip)
            t0 = time.perf_counter()
            report.write(copy)
            totals["report (tables, intervals, plots)"] = time.perf_counter() - t0
    recorded = sum(totals.values())
    lines = [f"{sum(map(len, walls.values()))} finished runs in {args.study}", "",
             "| method | runs | mean wall time per run |", "|---|---|---|"]
    for method, ws in sorted(walls.items()):
        known = [w for w in ws if w is not None]
        lines.append(f"| {method} | {len(ws)} | {fmt_seconds(float(np.mean(known))) if known else 'not recorded'} |")
    lines += ["", "| phase | time | share |", "|---|---|---|"]
    lines += [f"| {k} | {fmt_seconds(v)} | {100 * v / recorded:.0f} % |" for k, v in totals.items()]
    lines.append(f"| **recorded phases** | **{fmt_seconds(recorded)}** | 100 % |")
    every = [w for ws in walls.values() for w in ws]
    if all(w is not None for w in every):  # evaluate.py times each run from start to end: what the phases miss
        wall = sum(every) + totals.get("report (tables, intervals, plots)", 0.0)
        lines.append(f"| wall time of the runs (+ report) | {fmt_seconds(wall)} | "
                     f"{fmt_seconds(wall - recorded)} outside the phases (loading, checks, writing) |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
