"""PatchCore's exact nearest-neighbour search against the machine's matrix-multiply (GEMM) rate (issue 35).

The exact search of one image is one large product: Q query patches x M bank patches x D dimensions. This bench times,
for the search shapes of PatchCore (Q = 1,024 queries at 256 px, 4,096 at 512 px; banks of 2k, 20k and 86k patches;
D = 1,024), FAISS's flat index (IndexFlatL2), the torch matrix-product search of patchcore.py (squared distances as
|q|^2 - 2 q.b + |b|^2 in bounded-memory blocks, minimum over the bank) and a plain torch.mm of the same matrices, and
prints each one's GFLOP/s (2 Q M D / seconds) with the CPU model and instruction set, for 1 and 2 threads.

    python3 bench/bench_search.py                                   # every shape, 1 and 2 threads (a few minutes)
    python3 bench/bench_search.py --queries 1024 --banks 20000 --threads 2 --out runs/bench/search.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import backbones  # noqa: E402
import patchcore  # noqa: E402


def best_seconds(call, repeats: int) -> float:
    """The fastest of `repeats` timed calls, after one untimed warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_shape(q: int, m: int, d: int, threads: int, repeats: int, seed: int = 0) -> dict:
    """Seconds and GFLOP/s of FAISS's flat search, the torch product search and plain torch.mm for one shape."""
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    g = np.random.default_rng(seed)
    bank = g.standard_normal((m, d), dtype=np.float32)  # (M, D)
    queries = g.standard_normal((q, d), dtype=np.float32)  # (Q, D)
    flops = 2.0 * q * m * d
    index = faiss.IndexFlatL2(d)
    index.add(bank)
    torch_nn = patchcore.TorchSearch(bank, torch.device("cpu"))
    qt, bt = torch.from_numpy(queries), torch.from_numpy(bank)
    row = dict(queries=q, bank=m, dim=d, threads=threads)
    with patchcore.full_float32():
        row["faiss_s"] = best_seconds(lambda: index.search(queries, 1), repeats)
        row["torch_search_s"] = best_seconds(lambda: torch_nn.search(queries, 1), repeats)
        row["gemm_s"] = best_seconds(lambda: torch.mm(qt, bt.T), repeats)
        fd, fi = index.search(queries, 1)
        td, ti = torch_nn.search(queries, 1)
    for k in ("faiss", "torch_search", "gemm"):
        row[f"{k}_gflops"] = flops / row[f"{k}_s"] / 1e9
    row["same_neighbour"] = float((fi[:, 0] == ti[:, 0]).mean())
    row["largest_relative_distance_error"] = float(np.max(np.abs(np.sqrt(fd[:, 0]) - td[:, 0]) / np.sqrt(fd[:, 0])))
    return row


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", default="1024,4096", help="query patches per image (256 px: 1,024; 512 px: 4,096)")
    p.add_argument("--banks", default="2000,20000,86000", help="memory-bank sizes (patches)")
    p.add_argument("--dim", type=int, default=1024, help="patch feature dimension")
    p.add_argument("--threads", default="1,2", help="thread counts (torch and FAISS alike)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (the fastest is kept)")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    print(backbones.cpu_model())
    print(f"torch {torch.__version__}, faiss {faiss.__version__}")
    rows = []
    header = f"{'queries':>7} {'bank':>7} {'threads':>7} | {'FAISS ms':>9} {'GFLOP/s':>7} | {'torch ms':>9} " \
             f"{'GFLOP/s':>7} | {'GEMM ms':>9} {'GFLOP/s':>7} | same NN"
    print(header)
    for threads in (int(t) for t in args.threads.split(",")):
        for q in (int(x) for x in args.queries.split(",")):
            for m in (int(x) for x in args.banks.split(",")):
                r = bench_shape(q, m, args.dim, threads, args.repeats)
                rows.append(r)
                print(f"{q:>7} {m:>7} {threads:>7} | {1000 * r['faiss_s']:>9.1f} {r['faiss_gflops']:>7.1f} | "
                      f"{1000 * r['torch_search_s']:>9.1f} {r['torch_search_gflops']:>7.1f} | "
                      f"{1000 * r['gemm_s']:>9.1f} {r['gemm_gflops']:>7.1f} | {100 * r['same_neighbour']:.2f} %",
                      flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(cpu=backbones.cpu_model(), torch=torch.__version__, faiss=faiss.__version__,
                                                  rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
