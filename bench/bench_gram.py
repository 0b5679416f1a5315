"""The fused CPU forward through Q = S^T S against the same kernel kept on S, in one run.

    python bench/bench_gram.py [--batches 1 16 256 1024 4096] [--out DIR]

The iterations t < r of the forward either multiply by S and S^T (2 K D_in D_out multiply-adds)
or by Q = S^T S (K D_in^2); ``MIND_KERNELS_ROUTE_THROUGH_S=1`` (read on every call) selects the
former.  The inputs of ``cases.inputs`` (L=50, D=64, K=4, r=3, float32, random valid lengths), "interests"
mode with the dynamic interest mask.  The two paths
alternate, rep after rep, so load on the machine hits both alike; medians over the reps.
Writes ``bench_gram.csv`` under ``--out`` (default bench/results).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout

import mind_kernels  # noqa: E402

from cases import Case, inputs  # noqa: E402  (bench/ is this script's folder)
from common import git_revision, write_rows_csv  # noqa: E402

SWITCH = "MIND_KERNELS_ROUTE_THROUGH_S"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256, 1024, 4096])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)

    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, git {git_revision()}; forward, ms (median)")
    print(f"{'B':>5} {'through S':>10} {'through Q':>10} {'speed-up':>9}")
    for B in args.batches:
        E, S, b0, mask = inputs(Case(B))
        imask = mind_kernels.dynamic_interest_mask(mask, Case(B).interests)
        calls = max(1, 2000 // B)  # calls per sample, so a sample lasts long enough to time

        def sample(through_s: bool) -> float:
            if through_s:
                os.environ[SWITCH] = "1"
            else:
                os.environ.pop(SWITCH, None)
            t0 = time.perf_counter()
            for _ in range(calls):
                mind_kernels.b2i_routing(E, S, b0, mask, imask, backend="cpp")
            return (time.perf_counter() - t0) / calls * 1e3

        sample(True), sample(False)  # warm-up both
        times = {True: [], False: []}
        for _ in range(15):
            for through_s in (True, False):
                times[through_s].append(sample(through_s))
        os.environ.pop(SWITCH, None)
        s_ms, q_ms = statistics.median(times[True]), statistics.median(times[False])
        print(f"{B:>5} {s_ms:10.4f} {q_ms:10.4f} {s_ms / q_ms:8.2f}x", flush=True)
        rows.append(dict(batch=B, through_s_ms=s_ms, through_q_ms=q_ms, speedup=s_ms / q_ms,
                         threads=torch.get_num_threads(), torch=torch.__version__, git=git_revision()))
    path = write_rows_csv(rows, args.out, "bench_gram.csv")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
