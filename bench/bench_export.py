"""Serving exports: agreement with native serving on 1,000 users, and user-tower latency.

    python -m mind train --data ml-100k --epochs 2 --out /tmp/exp_run
    python bench/bench_export.py --checkpoint /tmp/exp_run/best.pt          # writes bench/measured/export.{md,csv}

Exports the checkpoint (ML-100k data options as trained) as native, onnx and one aoti package per
thread count (AOTInductor compiles the thread count into its kernels), into ``--work``.

Agreement (1 thread): ``--users`` users = every ML-100k test user (full history, own profile) plus
random histories of length 1, max_len and 3 * max_len in turn (uniform items, random profile
features) up to the total.  Per format: the largest |V_format - V_native| over all interest
entries, whether the interest masks are equal, and the top-50 lists (``recommend_batch``, seen
items excluded): identical, different only in the order of scores tied within 1e-5, or different.

Latency: the user tower alone on item-index tensors (B, max_len), B in (1, 256), for native eager
(``MIND.interests`` under no_grad, what ``Recommender`` calls), the AOTI package and an onnxruntime
CPU session, on each of ``--threads``; ``--reps`` timed calls after 20 warm-up calls, p50 and p99 of
one call in microseconds.  The models run one after another on the same inputs, in one process.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np
import onnx as onnx_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import git_revision, write_rows_csv  # noqa: E402
from mind.cli import _model_from_checkpoint, build_parser  # noqa: E402
from mind.export import export  # noqa: E402
from mind.export.aoti import open_runner as open_aoti  # noqa: E402
from mind.export.onnx import open_runner as open_onnx  # noqa: E402
from mind.export.onnx import write as write_onnx  # noqa: E402
from mind.export.tower import UserTower  # noqa: E402
from mind.serve import load  # noqa: E402

TIE = 1e-5


def _users(data, total, rng):
    """(raw-id histories, (U, F) features): the test users, then random histories of 1, max_len, 3 max_len."""
    raw = np.asarray(data.item_raw_ids)
    feats_all = data.user_features.numpy()
    hist = [raw[np.asarray(h)].tolist() for h in data.test.full_histories]
    feats = [feats_all[u] for u in np.asarray(data.test.users)]
    lengths = (1, data.max_len, 3 * data.max_len)
    card = np.asarray(data.user_feature_cardinalities, dtype=np.int64)
    while len(hist) < total:
        hist.append(raw[rng.integers(1, data.num_items + 1, lengths[len(hist) % 3])].tolist())
        feats.append(rng.integers(0, card) if len(card) else np.zeros(0, np.int64))
    return hist, np.asarray(feats, dtype=np.int64).reshape(len(hist), len(card))


def _compare_lists(a, b):
    """'same', 'tie' (differs only inside groups of scores tied within TIE) or 'differ'."""
    if [x for x, _, _ in a] == [x for x, _, _ in b]:
        return "same"
    sa = np.array([s for _, _, s in a])
    if len(a) != len(b) or np.abs(sa - [s for _, _, s in b]).max() > TIE:
        return "differ"
    i = 0
    while i < len(a):
        j = i + 1
        while j < len(a) and sa[j - 1] - sa[j] < TIE:
            j += 1
        if j < len(a) and {x for x, _, _ in a[i:j]} != {x for x, _, _ in b[i:j]}:
            return "differ"
        i = j
    return "tie"


def _time(fn, reps):
    for _ in range(20):
        fn()
    out = np.empty(reps)
    for r in range(reps):
        t = time.perf_counter()
        fn()
        out[r] = time.perf_counter() - t
    return np.percentile(out, 50) * 1e6, np.percentile(out, 99) * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="best.pt of a run trained with --data ml-100k (default data options)")
    ap.add_argument("--work", default=None, help="folder for the exports (default: a temporary one)")
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=300, help="timed calls per case at B = 1 (B = 256: a tenth)")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "measured"))
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="bench_export_"))

    cli_args = build_parser().parse_args(["export", "--checkpoint", args.checkpoint, "--out", str(work)])
    torch.set_num_threads(1)
    model, data, _ = _model_from_checkpoint(cli_args)
    t0 = time.perf_counter()
    folders = {"native": export(model, data, work / "native", to="native"),
               "onnx": export(model, data, work / "onnx", to="onnx")}
    for t in threads:
        folders[f"aoti{t}"] = export(model, data, work / f"aoti{t}", to="aoti", threads=t)
    # the same tower with the routing traced from the reference's own ops: what --to onnx wrote before
    # mind/export/graph_routing.py, for the node count and latency side by side
    (work / "onnx_reference").mkdir(exist_ok=True)
    onnx_reference = write_onnx(UserTower(model, int(data.max_len)), work / "onnx_reference", routing="reference")
    nodes = {name: len(onnx_lib.load(str(p)).graph.node)
             for name, p in (("graph", folders["onnx"] / "user_tower.onnx"), ("reference", onnx_reference))}
    print(f"onnx graph nodes: {nodes}")
    print(f"exported native, onnx, aoti x{len(threads)} in {time.perf_counter() - t0:.0f} s into {work}")

    # ----- agreement on --users users -----
    rng = np.random.default_rng(0)
    hist, feats = _users(data, args.users, rng)
    n_test = len(data.test.full_histories)
    native = load(folders["native"])
    v0, m0 = native.interests(hist, feats, return_mask=True)
    lists0 = native.recommend_batch(hist, n=50, user_features=feats)
    check_rows = []
    for fmt in ("aoti1" if 1 in threads else f"aoti{threads[0]}", "onnx"):
        rec = load(folders[fmt])
        v, m = rec.interests(hist, feats, return_mask=True)
        kinds = [_compare_lists(a, b) for a, b in zip(lists0, rec.recommend_batch(hist, n=50, user_features=feats))]
        check_rows.append({"format": fmt.rstrip("12"), "users": len(hist), "test_users": n_test,
                           "max_abs_diff": float(np.abs(v - v0).max()), "max_abs_value": float(np.abs(v0).max()),
                           "masks_equal": bool((m == m0).all()), "top50_same": kinds.count("same"),
                           "top50_tie_only": kinds.count("tie"), "top50_differ": kinds.count("differ")})
        print(check_rows[-1])

    # ----- latency -----
    rows = []
    L = data.max_len
    ids = torch.zeros(256, L, dtype=torch.int64)
    for r in range(256):
        known = native.map_history(hist[n_test + r])[-L:]
        ids[r, L - len(known):] = torch.from_numpy(known)
    fts = torch.from_numpy(feats[n_test:n_test + 256])
    onnx_runs = {t: open_onnx(folders["onnx"] / "user_tower.onnx", threads=t) for t in threads}
    onnx_ref_runs = {t: open_onnx(onnx_reference, threads=t) for t in threads}
    aoti_runs = {t: open_aoti(folders[f"aoti{t}"] / "user_tower.pt2") for t in threads}
    for t in threads:
        torch.set_num_threads(t)
        for B in (1, 256):
            x, m, f = ids[:B].contiguous(), (ids[:B] != 0).contiguous(), fts[:B].contiguous()
            reps = args.reps if B == 1 else max(10, args.reps // 10)
            cases = {"native eager": lambda: native.model.interests(x, f), "aoti": lambda: aoti_runs[t](x, m, f),
                     "onnxruntime": lambda: onnx_runs[t](x, m, f),
                     "onnxruntime, reference routing": lambda: onnx_ref_runs[t](x, m, f)}
            with torch.no_grad():
                for name, fn in cases.items():
                    p50, p99 = _time(fn, reps)
                    rows.append({"runtime": name, "threads": t, "batch": B, "p50_us": round(p50, 1),
                                 "p99_us": round(p99, 1), "reps": reps, "torch": torch.__version__,
                                 "cpu": platform.processor() or platform.machine(), "git": git_revision()})
                    print(rows[-1])
    write_rows_csv(rows, args.out, "export.csv")
    write_rows_csv(check_rows, args.out, "export_check.csv")
    _write_md(pathlib.Path(args.out) / "export.md", rows, check_rows, threads, args, nodes)
    print(f"written: {args.out}/export.md, export.csv, export_check.csv")
    return 0


def _write_md(path, rows, check_rows, threads, args, nodes):
    get = {(r["runtime"], r["threads"], r["batch"]): r for r in rows}
    out = ["# Serving exports: agreement and user-tower latency", "",
           f"`python bench/bench_export.py --checkpoint {args.checkpoint}` (git {git_revision()}, torch "
           f"{torch.__version__}, {os.cpu_count()} CPUs seen, {platform.processor() or platform.machine()}, "
           f"load average {os.getloadavg()[0]:.1f} when the table was written); "
           "model: `python -m mind train --data ml-100k --epochs 2` (default options).", "",
           f"## Agreement with native serving ({check_rows[0]['users']} users: {check_rows[0]['test_users']} "
           "ML-100k test users + random histories of length 1, max_len, 3 max_len)", "",
           "| format | max abs diff of interest vectors | largest entry | masks equal | top-50 identical | "
           "only tied scores reordered | different |", "|---|---|---|---|---|---|---|"]
    for c in check_rows:
        out.append(f"| {c['format']} | {c['max_abs_diff']:.2e} | {c['max_abs_value']:.2f} | {c['masks_equal']} | "
                   f"{c['top50_same']} | {c['top50_tie_only']} | {c['top50_differ']} |")
    out += ["", "## User-tower latency, microseconds per call (p50 / p99)", "",
            f"onnxruntime runs the exported graph (`--to onnx`, routing from mind/export/graph_routing.py, "
            f"{nodes['graph']} nodes); \"ort, reference routing\" the same tower traced from "
            f"mind_kernels.reference's ops ({nodes['reference']} nodes).", "",
            "| threads | batch | native eager | AOTI | onnxruntime | ort, reference routing | native / AOTI (p50) | "
            "onnxruntime / AOTI (p50) |",
            "|---|---|---|---|---|---|---|---|"]
    for t in threads:
        for B in (1, 256):
            n, a, o, r = (get[(k, t, B)] for k in ("native eager", "aoti", "onnxruntime",
                                                   "onnxruntime, reference routing"))
            out.append(f"| {t} | {B} | {n['p50_us']:.0f} / {n['p99_us']:.0f} | {a['p50_us']:.0f} / {a['p99_us']:.0f} | "
                       f"{o['p50_us']:.0f} / {o['p99_us']:.0f} | {r['p50_us']:.0f} / {r['p99_us']:.0f} | "
                       f"{n['p50_us'] / a['p50_us']:.1f}x | {o['p50_us'] / a['p50_us']:.2f}x |")
    out += ["", "Goals: AOTI at batch 1 at least 2x faster than native eager; onnxruntime within 1.5x "
            "of AOTI. With a load average above the CPU count, other processes share the cores: the p99 column and "
            "the 2-thread rows (OpenMP waits for a descheduled thread) then measure that contention.", ""]
    path.write_text("\n".join(out))


if __name__ == "__main__":
    sys.exit(main())
