"""Exact retrieval's candidate proposal: faiss ``IndexFlatIP.search`` against a float32 torch matmul + topk.

    python bench/bench_propose.py

Both are the first step of the exact ``max`` retrieval (``mind.merge._propose_faiss``,
``mind.merge._propose_torch``; the rest, float64 rescoring and the rounding bound, is shared, so the
results are identical).  Random N(0, 1) tables and interest vectors, K = 4, d = 64, n = 10 (margin 18),
seen histories of 1-40 items, 1 thread for both; median of ``--rounds`` timed calls after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def main() -> None:
    import faiss

    from mind.merge import _propose_faiss, _propose_torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="1349x1,1349x35,65743x35,65743x256,184699x256",
                    help="comma-separated ITEMSxUSERS")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, faiss {faiss.__version__}, 1 thread, median of {args.rounds} calls\n")
    print("| items | users | faiss IndexFlatIP ms | torch matmul + topk ms | faiss / torch |")
    print("|---:|---:|---:|---:|---:|")
    for case in args.cases.split(","):
        N, B = (int(x) for x in case.split("x"))
        K, d = 4, 64
        E = rng.standard_normal((N + 1, d)).astype(np.float32)
        index = faiss.IndexFlatIP(d)
        index.add(E[1:])
        table = torch.from_numpy(E)
        uv = torch.from_numpy(rng.standard_normal((B, K, d)).astype(np.float32))
        excl = [rng.choice(np.arange(1, N + 1), rng.integers(1, 41), replace=False) for _ in range(B)]

        def timed(f) -> float:
            f()
            ts = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts) * 1e3

        a = timed(lambda: _propose_faiss(index, uv, excl, 18, N))
        b = timed(lambda: _propose_torch(uv, table, excl, 18))
        print(f"| {N:,} | {B} | {a:.2f} | {b:.2f} | {a / b:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
