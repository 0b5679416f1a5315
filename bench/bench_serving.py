"""Serving throughput and latency of ``mind.serve.Recommender`` for batches of users, on CPU.

    python bench/bench_serving.py                          # trains a small model on synthetic data first
    python bench/bench_serving.py --model runs/ml100k/model --batches 1,16,256,1024,4096

Model: ``--model DIR`` (a folder from ``python -m mind export``), or by default a MIND trained
for ``--epochs`` epochs on ``mind.data.make_synthetic(--users, --items)`` and exported to a
temporary folder (training time is printed, not measured).

Requests: ``max(batches)`` histories of raw ids drawn once from a seeded RNG: lengths
uniform in 1 .. 2 * max_len (so about half are longer than max_len and get truncated), items
uniform over the catalogue.  A batch of size B is the first B of them.

Threads: ``--threads`` (default 1) torch threads; retrieval's rescoring is numpy, single-threaded.

For each B in ``--batches``: one warm-up call, then ``--repeats`` timed calls (default: enough
to cover ~4096 users, between 3 and 50 calls) of ``recommend_batch(histories[:B], n)`` (model
forward + exact top-n retrieval excluding the history + raw-id/title mapping).  Reported per B:
users/s = B / median call time; p50 / p95 / mean latency of one call (the whole batch) in ms.
The ``loop`` row (``--loop-batch``, default 256) times the per-user alternative, ``recommend``
called B times, to show what batching buys.

Prints a markdown table and writes ``bench_serving.csv`` (one row per B, with torch version,
threads, CPU and git revision) under ``--out`` (default: $OUT, else bench/results/).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mind.serve import export, load  # noqa: E402

from common import git_revision, write_rows_csv  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def train_small(users: int, items: int, dim: int, epochs: int, out: pathlib.Path) -> pathlib.Path:
    """Train MIND on synthetic data for a few epochs and export it to ``out``; returns ``out``."""
    from mind.data import make_synthetic, prepare
    from mind.train import TrainConfig, train

    raw, _ = make_synthetic(num_users=users, num_items=items, num_clusters=16, seed=0)
    data = prepare(raw, max_len=20)
    cfg = TrainConfig(dim=dim, num_interests=4, max_len=20, epochs=epochs, batch_size=256, num_negatives=100,
                      progress=False, write_files=False, out_dir=str(out / "run"))
    t0 = time.perf_counter()
    result = train(data, cfg, log=lambda *_: None)
    print(f"trained MIND (d={dim}, K=4) on synthetic {users} users x {items} items for {epochs} epoch(s) "
          f"in {time.perf_counter() - t0:.1f}s; valid recall@50 {result.valid_metrics['recall@50']:.3f}")
    return export(result.model, data, out / "model")


def make_requests(rec, count: int, seed: int) -> list[list]:
    rng = np.random.default_rng(seed)
    raw = rec.raw_ids[1:]
    lengths = rng.integers(1, 2 * rec.max_len + 1, size=count)
    return [[raw[i] for i in rng.integers(0, len(raw), size=int(L))] for L in lengths]


def time_calls(fn, repeats: int) -> np.ndarray:
    fn()                                                   # warm-up (allocations, first-call costs)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return np.asarray(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="export folder (python -m mind export); default: train a small one")
    p.add_argument("--users", type=int, default=2000, help="synthetic users for the default model (2000)")
    p.add_argument("--items", type=int, default=2000, help="synthetic catalogue size for the default model (2000)")
    p.add_argument("--dim", type=int, default=32, help="embedding size of the default model (32)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs of the default model (2)")
    p.add_argument("--batches", type=_ints, default=[1, 16, 256, 1024, 4096], help="batch sizes (users per call)")
    p.add_argument("-n", type=int, default=50, help="items per user (50)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per batch size (default: ~4096 users, 3..50)")
    p.add_argument("--loop-batch", type=int, default=256, help="users for the per-user loop baseline (0 = skip)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: a serving process per core; on a shared 2-core machine "
                        "2 OpenMP threads made the small per-call matmuls ~30x slower)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("OUT") or str(pathlib.Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)

    torch.set_num_threads(max(1, args.threads))
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or train_small(args.users, args.items, args.dim, args.epochs, pathlib.Path(tmp))
        rec = load(model_dir)
    requests = make_requests(rec, max(args.batches + [args.loop_batch]), args.seed)
    print(f"catalogue {rec.num_items} items, d={rec.item_table.shape[1]}, K={rec.model.num_interests}, "
          f"max_len {rec.max_len}, n={args.n}, torch {torch.__version__}, {threads} thread(s)")

    rows = []
    warnings.simplefilter("ignore")          # no unknown ids here; keep the table clean regardless
    cases = [("batch", b) for b in args.batches] + ([("loop", args.loop_batch)] if args.loop_batch else [])
    for mode, B in cases:
        reqs = requests[:B]
        if mode == "batch":
            fn = lambda: rec.recommend_batch(reqs, args.n)  # noqa: E731
            repeats = args.repeats or int(np.clip(4096 // B, 3, 50))
        else:
            fn = lambda: [rec.recommend(h, args.n) for h in reqs]  # noqa: E731
            repeats = args.repeats or 3
        t = time_calls(fn, repeats)
        med = float(np.median(t))
        rows.append({"mode": mode, "batch": B, "calls": repeats, "users_per_s": B / med,
                     "p50_ms": 1e3 * med, "p95_ms": 1e3 * float(np.percentile(t, 95)),
                     "mean_ms": 1e3 * float(t.mean()), "ms_per_user": 1e3 * med / B, "n": args.n,
                     "items": rec.num_items, "dim": int(rec.item_table.shape[1]), "K": rec.model.num_interests,
                     "max_len": rec.max_len, "threads": threads, "torch": torch.__version__,
                     "cpu": platform.processor() or platform.machine(), "git": git_revision()})
        r = rows[-1]
        print(f"  {mode:5s} B={B:5d}: {r['users_per_s']:9.0f} users/s  p50 {r['p50_ms']:9.2f} ms  "
              f"p95 {r['p95_ms']:9.2f} ms  ({repeats} calls)", flush=True)

    print("\n| mode | batch | users/s | p50 ms / call | p95 ms / call | ms / user | calls |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['batch']} | {r['users_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
              f"{r['ms_per_user']:.3f} | {r['calls']} |")
    path = write_rows_csv(rows, args.out, "bench_serving.csv")
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
