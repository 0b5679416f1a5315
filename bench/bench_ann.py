"""Benchmark mind.ann's index kinds on a large synthetic catalogue.

    python bench/bench_ann.py --items 1000000 --dim 64 --queries 2000 --interests 4 --n 50

Catalogue: ``--items`` float32 vectors around ``--clusters`` Gaussian centres
(item = centre + ``--spread`` * N(0, I)), row 0 = padding.  Users: ``--queries`` users with
``--interests`` interest vectors each, every interest near a random centre.  For each index
kind (exact ``IndexFlatIP``, IVF-Flat inner product, HNSW-Flat inner product) and each value
of its search knob (``--nprobe`` list for IVF, ``--ef-search`` list for HNSW) it measures:

* build_s: seconds to build the index (IVF: train the quantizer on a sample + add);
* query_s and users_per_s: wall time of ``mind.ann.search`` for all users (multi-interest:
  K searches per user, merge, dedup, float64 rescoring), and users per second;
* recall@n: mean over users of |approx top-n  ∩  exact top-n| / n, exact = the flat index.

Indexes are built one at a time and freed, so peak memory is the catalogue (items x dim x 4
bytes) plus one index (about the same again; HNSW adds 2 M int32 links per item).
Prints a table and writes ``bench_ann.csv`` under ``--out`` (default: $OUT, else bench/results/).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mind.ann import build_index, search  # noqa: E402

from common import git_revision, write_rows_csv  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def make_data(items: int, dim: int, queries: int, interests: int, clusters: int, spread: float, seed: int):
    """(items+1, dim) float32 catalogue (row 0 zeros) and (queries, interests, dim) users."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    E = np.empty((items + 1, dim), np.float32)
    E[0] = 0.0
    block = 1 << 18  # generate in blocks: no float64 copy of the whole catalogue
    for start in range(1, items + 1, block):
        stop = min(start + block, items + 1)
        m = stop - start
        E[start:stop] = centres[rng.integers(0, clusters, m)]
        E[start:stop] += spread * rng.standard_normal((m, dim), dtype=np.float32)
    U = centres[rng.integers(0, clusters, (queries, interests))]
    U = U + spread * rng.standard_normal((queries, interests, dim), dtype=np.float32)
    return E, U.astype(np.float32)


def recall_at(got: np.ndarray, want: np.ndarray, n: int) -> float:
    return float(np.mean([len(set(g[g >= 0]) & set(w[w >= 0])) / n for g, w in zip(got, want)]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--interests", type=int, default=4)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=1.0, help="std of items/interests around their centre")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default="exact,ivf,hnsw")
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=_ints, default=[8, 32], help="comma-separated IVF nprobe values")
    p.add_argument("--M", type=int, default=16, help="HNSW links per node")
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument("--ef-search", type=_ints, default=[64, 128], help="comma-separated HNSW efSearch values")
    p.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0 = faiss default)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(pathlib.Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)

    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    t0 = time.perf_counter()
    E, U = make_data(args.items, args.dim, args.queries, args.interests, args.clusters, args.spread, args.seed)
    print(f"data: {args.items} items x {args.dim} ({E.nbytes / 2**20:.0f} MiB), {args.queries} users x "
          f"{args.interests} interests, n={args.n}, generated in {time.perf_counter() - t0:.1f}s; "
          f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads", flush=True)

    # The exact results are the recall baseline, so the flat index always runs first.
    t = time.perf_counter()
    index = build_index(E, "exact")
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    exact, _ = search(index, U, args.n)
    query_s = time.perf_counter() - t
    del index
    rows = []
    if "exact" in kinds:
        rows.append(dict(kind="exact", params="", build_s=build_s, query_s=query_s, recall=1.0))
        print(f"exact: build {build_s:.2f}s, query {query_s:.2f}s", flush=True)

    settings = []
    if "ivf" in kinds:
        settings.append(("ivf", dict(nlist=args.nlist), [("nprobe", v) for v in args.nprobe]))
    if "hnsw" in kinds:
        settings.append(("hnsw", dict(M=args.M, efConstruction=args.ef_construction),
                         [("efSearch", v) for v in args.ef_search]))
    for kind, build_params, knobs in settings:
        t = time.perf_counter()
        index = build_index(E, kind, **build_params)
        build_s = time.perf_counter() - t
        print(f"{kind}: build {build_s:.2f}s ({build_params})", flush=True)
        for key, value in knobs:
            index.set_search_params(**{key: value})
            t = time.perf_counter()
            got, _ = search(index, U, args.n)
            query_s = time.perf_counter() - t
            rec = recall_at(got, exact, args.n)
            params = ",".join(f"{k}={v}" for k, v in {**build_params, key: value}.items())
            rows.append(dict(kind=kind, params=params, build_s=build_s, query_s=query_s, recall=rec))
            print(f"  {key}={value}: query {query_s:.2f}s, recall@{args.n} {rec:.4f}", flush=True)
        del index

    meta = dict(items=args.items, dim=args.dim, queries=args.queries, interests=args.interests, n=args.n,
                clusters=args.clusters, spread=args.spread, threads=faiss.omp_get_max_threads(),
                faiss=faiss.__version__, cpu=platform.processor() or platform.machine(), git=git_revision())
    for r in rows:
        r["users_per_s"] = args.queries / r["query_s"]
        r.update(meta)
    print()
    header = f"{'kind':<6} {'params':<40} {'build s':>9} {'query s':>9} {'users/s':>10} {'recall@' + str(args.n):>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['kind']:<6} {r['params']:<40} {r['build_s']:>9.2f} {r['query_s']:>9.2f} "
              f"{r['users_per_s']:>10.0f} {r['recall']:>10.4f}")
    path = write_rows_csv(rows, args.out, "bench_ann.csv")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
