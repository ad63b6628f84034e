"""One training step of the classifier (forward, backward, AdamW update) on a random batch, by memory layout and
thread count: what an epoch's time is made of once the images are in memory.

Each configuration runs in its own process (torch fixes its thread pool when it starts). `--pair` also runs two
one-thread processes side by side: the throughput of two runs sharing the cores against one run using both. Nothing
here is asserted by the tests; timings depend on the CPU and on what else runs on it.

    python bench/bench_step.py                                   # Lite0, 8 images of 256 px, 1 and 2 threads
    python bench/bench_step.py --image-size 512 --threads 2 --pair
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402


def time_steps(backbone: str, image_size: int, batch_size: int, layout: str, steps: int) -> float:
    """Mean seconds of one training step after one untimed step, in this process."""
    import torch
    import torch.nn.functional as F

    import backbones
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels-last" else torch.contiguous_format
    model, _ = backbones.classifier(backbone, "imagenet", num_classes=2)
    model = model.to(memory_format=fmt).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, 3, image_size, image_size).contiguous(memory_format=fmt)  # (B, 3, S, S)
    y = torch.randint(0, 2, (batch_size,))  # (B,)
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - t0) / steps


def spawn(args: argparse.Namespace, layout: str, threads: int) -> subprocess.Popen:
    """This script in a fresh process with `threads` OpenMP threads, timing one configuration."""
    cmd = [sys.executable, __file__, "--one", layout, "--backbone", args.backbone, "--image-size",
           str(args.image_size), "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)


def seconds_of(proc: subprocess.Popen) -> float:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"error: a timing process failed (exit status {proc.returncode})")
    return float(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration (after one untimed)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--layouts", default="channels-last,contiguous")
    p.add_argument("--pair", action="store_true", help="also two one-thread processes at once")
    p.add_argument("--out", default="runs/bench/step.json")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: time one layout, print it
    args = p.parse_args(argv)
    if args.one:
        print(time_steps(args.backbone, args.image_size, args.batch_size, args.one, args.steps))
        return
    rows = []
    for layout in args.layouts.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            s = seconds_of(spawn(args, layout, threads))
            rows.append({"layout": layout, "threads": threads, "processes": 1, "seconds_per_step": s,
                         "steps_per_second": 1 / s})
    if args.pair:
        procs = [spawn(args, "channels-last", 1) for _ in range(2)]
        s = [seconds_of(proc) for proc in procs]
        rows.append({"layout": "channels-last", "threads": 1, "processes": 2, "seconds_per_step": max(s),
                     "steps_per_second": sum(1 / x for x in s)})
    print(f"\n{args.backbone}, {args.batch_size} images of {args.image_size} px per step")
    print(f"{'layout':<15}{'threads':>8}{'processes':>11}{'s / step':>10}{'steps / s (all processes)':>27}")
    for r in rows:
        print(f"{r['layout']:<15}{r['threads']:>8}{r['processes']:>11}{r['seconds_per_step']:>10.3f}"
              f"{r['steps_per_second']:>27.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    data.write_json(args.out, {"args": vars(args), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
