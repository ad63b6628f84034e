"""Pick the study's models by a stated rule applied to published numbers, not by taste.

Per task (ImageNet top-1 or MVTec AD image AUROC): keep candidates that are small enough, usable at a large
input and have public code; take the Pareto front of accuracy vs. parameters; fit a trend line through it; select
the Pareto candidate furthest above the line. Writes selection.json, args.json and scatter_<task>.png.

    python select_models.py                                   # both tasks, shipped table, runs/select/
    python select_models.py --task mvtec_ad --max-params 30   # stricter size budget
    python select_models.py --candidates my.csv --x-scale linear --out-dir /tmp/select
"""
import argparse
import csv
import json
import math
import os
import re
import sys
from dataclasses import dataclass

import numpy as np

import data

TASKS = ("imagenet1k", "mvtec_ad")
COLUMNS = ("name", "task", "params_millions", "metric_value", "metric_name", "input_res", "usable_at_512",
           "code_url", "source")
YES_NO = ("yes", "no")
TIE_DECIMALS = 9  # residuals equal to 9 decimals count as a tie (a line through 2 points leaves ~1e-14, not 0)


@dataclass
class Candidate:
    """One row of the candidate table: a model, its size, its published score and where the numbers come from."""
    name: str
    task: str
    params: float | None  # millions; None when the source gives no parameter count
    metric: float
    metric_name: str
    input_res: int | None  # leading integer of the input_res column ("224 (256->crop 224)" -> 224)
    usable_at_512: bool
    code_url: str
    source: str


def parse_number(text: str, what: str, where: str) -> float | None:
    """Read a finite float from a table cell; '' gives None, anything else non-numeric raises ValueError."""
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: {what} '{text}' is not a number.") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: {what} '{text}' is not a finite number.")
    return value


def load_candidates(path: str) -> list[Candidate]:
    """Read the candidate CSV, checking columns, numbers and the yes/no and task fields."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks the column(s) {', '.join(missing)}; expected {','.join(COLUMNS)}.")
        rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    candidates, seen = [], set()
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{path} line {line} ({row['name'] or 'no name'})"
        if not row["name"]:
            raise ValueError(f"{path} line {line}: the name is empty.")
        if row["task"] not in TASKS:
            raise ValueError(f"{where}: task '{row['task']}' is not one of {', '.join(TASKS)}.")
        if (row["task"], row["name"]) in seen:
            raise ValueError(f"{where}: the name appears twice for task {row['task']}.")
        seen.add((row["task"], row["name"]))
        params = parse_number(row["params_millions"], "params_millions", where)
        if params is not None and params <= 0:
            raise ValueError(f"{where}: params_millions must be positive, got {params}.")
        metric = parse_number(row["metric_value"], "metric_value", where)
        if metric is None:
            raise ValueError(f"{where}: metric_value is empty.")
        if row["usable_at_512"].lower() not in YES_NO:
            raise ValueError(f"{where}: usable_at_512 must be yes or no, got '{row['usable_at_512']}'.")
        res = re.match(r"\d+", row["input_res"])  # free text by design: "224 (fixed)", "128-512 per class", ""
        candidates.append(Candidate(row["name"], row["task"], params, metric, row["metric_name"],
                                    int(res.group()) if res else None, row["usable_at_512"].lower() == "yes",
                                    row["code_url"], row["source"]))
    return candidates


def exclusion_reason(c: Candidate, max_params: float, min_res: int) -> str:
    """Why a candidate fails the three conditions of the rule ('' when it passes all of them)."""
    reasons = []
    if c.params is None:
        reasons.append("parameter count unknown (not guessed)")
    elif c.params > max_params:
        reasons.append(f"{c.params:g} M params > {max_params:g} M")
    # usable_at_512 = yes marks a resolution-agnostic model (convolutional, or attention whose position terms
    # are interpolated), so it counts as usable at any --min-res. A "no" model (fixed-size position embeddings)
    # is still usable if it was trained at >= min-res px, which the input_res column tells.
    if not (c.usable_at_512 or (c.input_res is not None and c.input_res >= min_res)):
        reasons.append(f"not usable at >= {min_res} px (fixed input {c.input_res or '?'} px)")
    if not c.code_url:
        reasons.append("no public code")
    return "; ".join(reasons)


def apply_filters(cands: list[Candidate], max_params: float, min_res: int) -> tuple[list[Candidate], dict]:
    """Rule step 1: split candidates into kept ones and {name: reason} for the excluded."""
    kept, excluded = [], {}
    for c in cands:
        reason = exclusion_reason(c, max_params, min_res)
        if reason:
            excluded[c.name] = reason
        else:
            kept.append(c)
    return kept, excluded


def pareto_front(params, metric) -> list[int]:
    """Rule step 2: indices (smallest first) of points no other point beats on size and accuracy."""
    params, metric = np.asarray(params, dtype=float), np.asarray(metric, dtype=float)
    front = []
    for i in range(len(params)):
        # j dominates i when it is no larger, no less accurate, and strictly better on one count:
        # equal on both counts keeps both; equal params keeps the more accurate; equal metric keeps the smaller.
        no_worse = (params <= params[i]) & (metric >= metric[i])
        better = (params < params[i]) | (metric > metric[i])
        if not np.any(no_worse & better):
            front.append(i)
    return sorted(front, key=lambda i: (params[i], -metric[i]))


def to_x(params, x_scale: str) -> np.ndarray:
    """The x axis of the trend line: log10(params) or params."""
    params = np.asarray(params, dtype=float)
    return np.log10(params) if x_scale == "log" else params


def fit_trend(params, metric, x_scale: str = "log") -> tuple[float, float]:
    """Rule step 3: least-squares slope and intercept of metric on x (needs >= 2 distinct x values)."""
    x = to_x(params, x_scale)
    if len(np.unique(x)) < 2:
        raise ValueError("a trend line needs at least two different parameter counts.")
    slope, intercept = np.polyfit(x, np.asarray(metric, dtype=float), deg=1)
    return float(slope), float(intercept)


def select(kept: list[Candidate], x_scale: str = "log") -> dict:
    """Rule steps 2-4: Pareto front, trend line, and the Pareto candidate with the largest residual."""
    if not kept:
        raise ValueError("no candidate passes the filters, so there is nothing to select.")
    params = np.array([c.params for c in kept], dtype=float)
    metric = np.array([c.metric for c in kept], dtype=float)
    front = pareto_front(params, metric)
    n_sizes = len(np.unique(params[front]))
    if n_sizes == 1:
        slope = intercept = None
        residuals = np.zeros(len(front))
        note = "one Pareto candidate (or several equal ones): no line can be fitted, so it is selected"
    else:
        slope, intercept = fit_trend(params[front], metric[front], x_scale)
        residuals = metric[front] - (slope * to_x(params[front], x_scale) + intercept)  # (n_front,)
        note = f"least squares through {len(front)} Pareto candidates"
        if n_sizes == 2:
            note += "; with two sizes the line passes through both, every residual is 0, so the smaller is picked"
    # Step 4: largest residual; ties (e.g. the exact fit through two points) go to the smaller model, then the name.
    best = max(range(len(front)), key=lambda k: (round(residuals[k], TIE_DECIMALS),
                                                 -params[front[k]], kept[front[k]].name))
    if n_sizes > 2 and round(residuals[best], TIE_DECIMALS) <= 0:
        note += "; all lie on the line, so the smaller one is picked"
    return {"selected": kept[front[best]].name,
            "pareto": [kept[i].name for i in front],
            "residuals": {kept[i].name: float(r) for i, r in zip(front, residuals)},
            "trend": {"slope": slope, "intercept": intercept, "x_scale": x_scale, "note": note}}


def format_table(task: str, kept: list[Candidate], excluded: dict, result: dict) -> str:
    """Aligned text: excluded rows with reasons, kept rows (P = Pareto, * = selected), trend line, pick."""
    metric_name = kept[0].metric_name
    lines = [f"excluded: {name}: {reason}" for name, reason in excluded.items()]
    lines.append(f"{'':2} {'name':46} {'params_M':>8} {metric_name:>16} {'residual':>8}  source")
    for c in sorted(kept, key=lambda c: (c.params, -c.metric)):
        mark = ("P" if c.name in result["pareto"] else " ") + ("*" if c.name == result["selected"] else " ")
        res = f"{result['residuals'][c.name]:+8.3f}" if c.name in result["residuals"] else f"{'':8}"
        lines.append(f"{mark} {c.name:46} {c.params:8.2f} {c.metric:16.3f} {res}  {c.source[:60]}")
    t = result["trend"]
    x = "log10(params_M)" if t["x_scale"] == "log" else "params_M"
    line = f"{metric_name} = {t['slope']:.3f} * {x} + {t['intercept']:.3f}" if t["slope"] is not None else "none"
    lines.append(f"trend {task}: {line}  ({t['note']})")
    lines.append(f"selected {task}: {result['selected']}")
    return "\n".join(lines)


def plot_scatter(task: str, cands: list[Candidate], kept: list[Candidate], result: dict, path: str) -> None:
    """Save a log-x scatter: every candidate with a size, the Pareto front, the trend line and the pick."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    kept_names = {c.name for c in kept}
    by_name = {c.name: c for c in cands}
    sized = [c for c in cands if c.params is not None]
    filtered_out = [c for c in sized if c.name not in kept_names]
    dominated = [c for c in kept if c.name not in result["pareto"]]
    fig, ax = plt.subplots(figsize=(9, 6))
    if filtered_out:
        ax.scatter([c.params for c in filtered_out], [c.metric for c in filtered_out], s=25, marker="x",
                   color="0.6", label="excluded by a filter")
    if dominated:
        ax.scatter([c.params for c in dominated], [c.metric for c in dominated], s=25, color="0.45",
                   label="kept, dominated")
    front = [by_name[n] for n in result["pareto"]]
    ax.plot([c.params for c in front], [c.metric for c in front], "o-", color="tab:blue", label="Pareto front")
    for c in front:
        ax.annotate(c.name, (c.params, c.metric), textcoords="offset points", xytext=(4, -10), fontsize=7)
    t = result["trend"]
    if t["slope"] is not None:
        xs = np.geomspace(min(c.params for c in kept), max(c.params for c in kept), 200)  # (200,)
        label = "trend: least squares on " + ("log10(params)" if t["x_scale"] == "log" else "params")
        ax.plot(xs, t["slope"] * to_x(xs, t["x_scale"]) + t["intercept"], "--", color="tab:orange", label=label)
    pick = by_name[result["selected"]]
    ax.scatter([pick.params], [pick.metric], s=160, facecolors="none", edgecolors="tab:red", linewidths=2)
    ax.annotate(f"selected: {pick.name}", (pick.params, pick.metric), textcoords="offset points", xytext=(-20, 25),
                color="tab:red", fontsize=9, ha="right", arrowprops=dict(arrowstyle="->", color="tab:red"))
    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    ticks = [t for t in (1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 500, 1000) if lo <= t <= hi]
    ax.set_xticks(ticks, labels=[str(t) for t in ticks])  # plain 2, 5, 10 rather than 2x10^0
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("parameters (millions, log scale)")
    ax.set_ylabel(kept[0].metric_name)
    n_unsized = len(cands) - len(sized)
    ax.set_title(f"{task}: {len(kept)} kept of {len(cands)} candidates"
                 + (f" ({n_unsized} without a parameter count not shown)" if n_unsized else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def write_atomic(path: str, text: str) -> None:
    """Write text to path via a temp file and a rename, so an interrupted run leaves no half file."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def run(args) -> dict:
    """Apply the rule per task, print the tables, write selection.json, args.json and the scatter plots."""
    # Load and check the whole table first, so bad input stops the run before any file is written.
    cands = load_candidates(args.candidates)
    tasks = [t for t in TASKS if any(c.task == t for c in cands)] if args.task == "all" else [args.task]
    if not tasks:
        raise ValueError(f"{args.candidates} has no rows.")

    # Apply the rule to each task.
    results, parts = {}, {}
    for task in tasks:
        rows = [c for c in cands if c.task == task]
        names = sorted({c.metric_name for c in rows})
        if len(names) > 1:
            raise ValueError(f"task {task} mixes metrics {', '.join(names)}; one table per metric, please.")
        kept, excluded = apply_filters(rows, args.max_params, args.min_res)
        if not kept:
            raise ValueError(f"no {task} candidate passes the filters (<= {args.max_params:g} M params, "
                             f"usable at >= {args.min_res} px, public code).")
        results[task] = {**select(kept, args.x_scale), "excluded": excluded, "metric_name": kept[0].metric_name}
        parts[task] = (rows, kept)
        print(f"== {task}: {len(rows)} rows, {len(kept)} kept, {len(results[task]['pareto'])} on the Pareto front (P),"
              " * = selected ==")
        print(format_table(task, kept, excluded, results[task]))

    # Write the outputs: plots first, the JSON last, each through a temp file.
    os.makedirs(args.out_dir, exist_ok=True)
    for task, (rows, kept) in parts.items():
        path = os.path.join(args.out_dir, f"scatter_{task}.png")
        plot_scatter(task, rows, kept, results[task], path + ".tmp")
        os.replace(path + ".tmp", path)
    write_atomic(os.path.join(args.out_dir, "args.json"), json.dumps(vars(args), indent=2) + "\n")
    write_atomic(os.path.join(args.out_dir, "selection.json"), json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out_dir}/selection.json and {len(tasks)} scatter plot(s)")
    return results


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags; the defaults are the rule as stated in the study plan."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("--candidates", default="candidates.csv", help="CSV with columns " + ",".join(COLUMNS))
    p.add_argument("--task", default="all", choices=(*TASKS, "all"), help="which task to select for")
    p.add_argument("--max-params", type=float, default=100.0, help="keep models with at most this many M params")
    p.add_argument("--min-res", type=int, default=512, help="keep models usable at an input of at least this (px)")
    p.add_argument("--x-scale", default="log", choices=("log", "linear"), help="x of the trend line: log10(params)")
    p.add_argument("--out-dir", default="runs/select", help="where selection.json and the plots go")
    return p.parse_args(argv)


def main(argv=None) -> None:
    """Run the selection; bad input ends with one sentence on stderr and a non-zero exit."""
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
