"""Speed of the multi-interest merge rules (mind/merge.py): per-user milliseconds, single calls vs one batch.

    python bench/bench_merge.py                  # ML-100k-sized: 1,349 items, d = 64, K = 4, m = 200, n = 50
    python bench/bench_merge.py --users 1024 --repeat 3

On one thread (torch and numpy/BLAS), random item vectors and interests (the speed does not depend on
the trained values), an ML-100k-like category table (each item 1-3 of 19 genres) and 20 excluded
items per user.  Measured per rule:

* ``merge``: the merge alone from the K x m per-interest candidates already retrieved (the pool,
  its f(u, i) rescoring and the greedy / quota): ``U`` single-user calls vs one call for all ``U`` users;
* ``end to end``: ``mind.merge.merged_topn`` from the interest vectors (candidate retrieval included);
  ``max`` is the exact retrieval alone.

Each cell is the median (and, in brackets, the minimum) over ``--repeat`` runs of (total seconds /
users) in ms; on a shared machine the minimum is the better estimate of the code's own cost.  The
``diverse (cosine)`` row is the rule without categories (item-embedding cosine, the planted data's case).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mind import merge as M  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1349)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--interests", type=int, default=4)
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("-n", type=int, default=50)
    ap.add_argument("--users", type=int, default=1024)
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    N, d, K, U, m, n = args.items, args.dim, args.interests, args.users, args.candidates, args.n
    E = rng.normal(size=(N + 1, d)).astype(np.float32)
    E[0] = 0
    V = rng.normal(size=(U, K, d)).astype(np.float32)
    act = np.ones((U, K), dtype=bool)
    genres = np.zeros((N + 1, 3), dtype=np.int64)
    for i in range(1, N + 1):
        k = rng.integers(1, 4)
        genres[i, :k] = rng.choice(np.arange(1, 20), k, replace=False)
    cats = M.Categories(genres)
    excl = [rng.choice(np.arange(1, N + 1), 20, replace=False) for _ in range(U)]
    per = M.interest_candidates(V, act, E, max(m, n), excl)

    def merge_only(rule, lam, cat, sl):
        return M.merge_candidates(per[sl], V[sl], act[sl], E, n, rule, lam, cat)

    def end_to_end(rule, lam, cat, sl):
        return M.merged_topn(V[sl], n, table=E, active=act[sl], exclude=excl[sl], merge=rule, diversity=lam,
                             categories=cat, candidates=m)

    rules = [("max", "max", 0.0, cats), ("quota", "quota", 0.0, cats), ("diverse lambda=0", "diverse", 0.0, cats),
             (f"diverse lambda={args.lam}", "diverse", args.lam, cats),
             (f"diverse (cosine) lambda={args.lam}", "diverse", args.lam, None)]

    def timed(fn, rule, lam, cat, single: bool) -> str:
        runs = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            if single:
                for u in range(U):
                    fn(rule, lam, cat, slice(u, u + 1))
            else:
                fn(rule, lam, cat, slice(0, U))
            runs.append((time.perf_counter() - t) / U * 1e3)
        return f"{statistics.median(runs):.3f} ({min(runs):.3f})"

    for name, rule, lam, cat in rules:                                  # warm up every path once
        end_to_end(rule, lam, cat, slice(0, 2))
    print(f"# {sys.argv[0]} {' '.join(sys.argv[1:])}")
    print(f"# N={N} items, d={d}, K={K}, m={m} per interest, n={n}, U={U} users, 20 excluded each, 1 thread, "
          f"ms per user: median (min) of {args.repeat} runs; load average {os.getloadavg()[0]:.1f} at the start")
    print("| rule | merge only: single (ms/user) | merge only: batch of U | end to end: single | end to end: batch |")
    print("|---|---:|---:|---:|---:|")
    for name, rule, lam, cat in rules:
        if rule == "max":
            mo = ("-", "-")
        else:
            mo = tuple(timed(merge_only, rule, lam, cat, s) for s in (True, False))
        ee = tuple(timed(end_to_end, rule, lam, cat, s) for s in (True, False))
        print(f"| {name} | {mo[0]} | {mo[1]} | {ee[0]} | {ee[1]} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
