"""End-to-end MIND training speed: examples/s and epoch seconds, with ratios, in one run.

    python bench/bench_train.py --quick            # ML-100k max_len 50 + a small synthetic set, 1 round
    python bench/bench_train.py                    # everything below, 2 alternated rounds
    python bench/bench_train.py --sections old --old /work/wt-8b87692   # against an earlier commit

1 thread throughout (torch.set_num_threads(1); the ``cpp 2 threads`` variant alone runs on 2).
The machine may be shared, so variants of one case run alternately round by round and the tables
give medians and ratios to a baseline of the same round set.

Sections (each writes rows to train.csv; train.md is the table):

* ``ours``: ``mind.train.train`` for ``--epochs`` epochs per variant (the fused ``cpp`` backend,
  the ``reference`` backend, 2 threads), valid evaluation included (it is part of every epoch);
  epoch seconds = the last epoch's ``seconds``.  Cases: ML-100k at max_len 20, 50, 200 and a
  synthetic set with histories of 50 to 200 items (``mind.data.make_synthetic``).
* ``old``: ``python -m mind train`` at its defaults, of an earlier checkout (``--old``, a worktree
  with its extension built) and of this one, as subprocesses, alternated; ML-100k, max_len 20 (the
  default) and 50, 1 epoch, seconds from metrics.csv.
* ``rechub``: torch-rechub 0.9.0's MIND trained by its own ``MatchTrainer`` (list-wise softmax,
  Adam) on the same examples (our training histories, targets, user features; d = 64, K = 4,
  batch 256), without and with ``mind_kernels.compat.patch()``.  Not comparable, and said so:
  its negatives are 200 uniform items per row (ours: 200 log-uniform items shared by the
  batch, or the exact softmax), it has no genre features and no H layers (one linear map),
  and its epoch has no evaluation (we add ours afterwards for Recall@50).

The step-level tables of earlier speed work (levers, profile, floor) were measured with the
speed switches of their day; docs/results/training-speed.md has them with the commits that ran them.
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

# ------------------------------------------------------------------------------------ data

def load_case(case: str, quick: bool):
    from mind import data as D
    if case.startswith("ml-100k"):
        L = int(case.split("L=")[1])
        return D.prepare(D.load_recbole(D.fetch_movielens_100k()), max_len=L)
    # synthetic: histories of 50..200 items, a catalogue where the sampled softmax applies
    users, items = (300, 5000) if quick else (1200, 30000)
    raw, _ = D.make_synthetic(num_users=users, num_items=items, num_clusters=64, interests_per_user=(2, 4),
                              seq_len=(50, 200), seed=0)
    return D.prepare(raw, max_len=200, min_item_count=1)


# ------------------------------------------------------------------------------------ ours

VARIANTS = {
    "cpp": dict(backend="cpp"),
    "reference": dict(backend="reference"),
    # every other row runs on 1 thread; this one on 2 (the development machine's cores)
    "cpp 2 threads": dict(backend="cpp", threads=2),
}


def run_ours(data, variant: dict, max_len: int, epochs: int) -> dict:
    import torch
    from mind.train import TrainConfig, train
    variant = dict(variant)
    torch.set_num_threads(variant.pop("threads", 1))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(max_len=max_len, epochs=epochs, patience=epochs + 1, progress=False, write_files=False,
                              out_dir=tmp, **variant)
            t0 = time.perf_counter()
            res = train(data, cfg, log=lambda *_: None)
            total = time.perf_counter() - t0
    finally:
        torch.set_num_threads(1)
    secs = [r["seconds"] for r in res.history]
    n = len(data.train_targets)
    return dict(epoch_s=secs[-1], first_epoch_s=secs[0], examples_per_s=n / secs[-1], examples=n,
                valid_recall50=res.history[-1]["valid_recall@50"], wall_s=total)


def section_ours(args, rows):
    cases = ["ml-100k L=50"] if args.quick else ["ml-100k L=20", "ml-100k L=50", "ml-100k L=200"]
    cases.append("synthetic L=50..200")
    if args.cases:
        cases = args.cases.split(",")
    variants = args.variants.split(",")
    for case in cases:
        data = load_case(case, args.quick)
        L = data.max_len if hasattr(data, "max_len") else 200
        L = int(case.split("L=")[1]) if case.startswith("ml-100k") else 200
        results = {v: [] for v in variants}
        for r in range(args.rounds):
            for v in variants:
                res = run_ours(data, VARIANTS[v], L, args.epochs)
                results[v].append(res)
                print(f"[ours] {case} {v} round {r}: epoch {res['epoch_s']:.2f}s "
                      f"({res['examples_per_s']:.0f} ex/s), first epoch {res['first_epoch_s']:.2f}s", flush=True)
        base = statistics.median(x["epoch_s"] for x in results["cpp"]) if "cpp" in results else None
        for v, rs in results.items():
            med = statistics.median(x["epoch_s"] for x in rs)
            rows.append(dict(section="ours", case=case, variant=v, epoch_s=med,
                             examples_per_s=rs[0]["examples"] / med, examples=rs[0]["examples"],
                             first_epoch_s=statistics.median(x["first_epoch_s"] for x in rs),
                             speedup_vs_cpp=(base / med) if base else None, rounds=len(rs),
                             valid_recall50=statistics.median(x["valid_recall50"] for x in rs),
                             note=f"{args.epochs} epoch(s), valid eval included; recall after the last epoch"))


# ------------------------------------------------------------------------------------ old commit

def run_cli(checkout: str, extra: list, max_len: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "mind", "train", "--data", "ml-100k", "--max-len", str(max_len), "--epochs", "1",
               "--threads", "1", "--backend", "cpp", "--no-progress", "--out", tmp, *extra]
        env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout), OMP_NUM_THREADS="1")
        subprocess.run(cmd, env=env, cwd=os.path.abspath(checkout), check=True, capture_output=True, text=True)
        with open(os.path.join(tmp, "metrics.csv")) as f:
            row = list(csv.DictReader(f))[-1]
        return float(row["seconds"])


def section_old(args, rows):
    from mind import data as D
    rev = subprocess.run(["git", "-C", args.old, "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip() or args.old
    base = f"{rev} (its defaults)"
    runs = {base: args.old, "this checkout (its defaults)": str(ROOT)}
    for L in (20, 50):          # 20: the default history length
        n = len(D.prepare(D.load_recbole(D.fetch_movielens_100k()), max_len=L).train_targets)
        times = {k: [] for k in runs}
        for r in range(args.rounds):
            for name, path in runs.items():
                times[name].append(run_cli(path, [], L))
                print(f"[old] L={L} {name} round {r}: {times[name][-1]:.2f}s", flush=True)
        ref = statistics.median(times[base])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append(dict(section="vs old", case=f"ml-100k L={L}", variant=name, epoch_s=med,
                             examples_per_s=n / med, examples=n, speedup_vs_old=ref / med, rounds=len(ts),
                             note="python -m mind train --epochs 1 --threads 1 --backend cpp; seconds from "
                                  "metrics.csv (valid eval included)"))


# ------------------------------------------------------------------------------------ torch-rechub

def rechub_model(data, patched: bool, L: int):
    import contextlib
    import torch
    from torch_rechub.basic.features import SequenceFeature, SparseFeature
    from torch_rechub.models.matching import mind as rechub_mind
    from mind_kernels.compat import torch_rechub as compat

    items = int(data.num_items) + 1
    user = [SparseFeature(f"u{f}", int(c), embed_dim=16) for f, c in enumerate(data.user_feature_cardinalities)]
    hist = [SequenceFeature("hist_item_id", items, embed_dim=64, pooling="concat", shared_with="item_id")]
    item = [SparseFeature("item_id", items, embed_dim=64)]
    neg = [SequenceFeature("neg_items", items, embed_dim=64, pooling="concat", shared_with="item_id")]
    with compat.patched(backend="cpp") if patched else contextlib.nullcontext():
        torch.manual_seed(0)
        return rechub_mind.MIND(user, hist, item, neg, max_length=L, interest_num=4)


def rechub_inputs(data, L: int, rows, negatives: int, seed: int):
    import numpy as np
    import torch
    g = torch.Generator().manual_seed(seed)
    users = torch.as_tensor(np.asarray(data.train_users))[rows]
    feats = torch.as_tensor(np.asarray(data.user_features))[users]
    x = {f"u{f}": feats[:, f] for f in range(feats.shape[1])}
    x["hist_item_id"] = torch.as_tensor(np.asarray(data.train_histories))[rows][:, -L:]
    x["item_id"] = torch.as_tensor(np.asarray(data.train_targets))[rows]
    x["neg_items"] = torch.randint(1, int(data.num_items) + 1, (len(rows), negatives), generator=g)
    return x


def rechub_recall(model, data, L: int) -> float:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from mind.evaluate import evaluate_rankings, retrieve_topk
    split = data.valid
    feats = torch.as_tensor(np.asarray(data.user_features))[torch.as_tensor(np.asarray(split.user_index))]
    x = {f"u{f}": feats[:, f] for f in range(feats.shape[1])}
    x["hist_item_id"] = torch.as_tensor(np.asarray(split.histories))[:, -L:]
    model.eval()
    model.mode = "user"
    with torch.no_grad():
        uv = model(x)
        table = F.normalize(model.embedding.embed_dict["item_id"].weight, dim=-1)
    model.mode = None
    ranked, _ = retrieve_topk(uv, table, 50, exclude=split.full_histories)
    return evaluate_rankings(ranked, split.targets, ns=(20, 50))["recall@50"]


def section_rechub(args, rows):
    import torch
    from torch_rechub.trainers import MatchTrainer
    from torch_rechub.utils.data import MatchDataGenerator
    torch.set_num_threads(1)
    for L in ([50] if args.quick else [20, 50]):
        from mind import data as D
        data = D.prepare(D.load_recbole(D.fetch_movielens_100k()), max_len=L)
        n_all = len(data.train_targets)
        n = min(n_all, args.rechub_examples) if args.rechub_examples else n_all
        rows_idx = torch.arange(n)
        res = {}
        for patched in (False, True):
            model = rechub_model(data, patched, L)
            x = rechub_inputs(data, L, rows_idx, 200, seed=0)
            y = torch.zeros(n, dtype=torch.long)          # the positive is column 0 of (1 + S) logits
            loader = MatchDataGenerator(x, y).dataset
            dl = torch.utils.data.DataLoader(loader, batch_size=256, shuffle=True, num_workers=0)
            with tempfile.TemporaryDirectory() as tmp:
                trainer = MatchTrainer(model, mode=2, optimizer_params={"lr": 3e-3, "weight_decay": 1e-4},
                                       n_epoch=1, device="cpu", model_path=tmp)
                secs = []
                for e in range(args.rechub_epochs):
                    t0 = time.perf_counter()
                    trainer.train_one_epoch(dl, log_interval=10**9)
                    secs.append(time.perf_counter() - t0)
            recall = rechub_recall(model, data, L) if n == n_all else None
            name = "torch-rechub MIND + compat.patch()" if patched else "torch-rechub MIND"
            res[name] = (statistics.median(secs) * n_all / n, recall)
            print(f"[rechub] L={L} {name}: epoch {res[name][0]:.1f}s"
                  f"{' (extrapolated from %d examples)' % n if n < n_all else ''}, valid recall@50 {recall}",
                  flush=True)
        for name, (sec, recall) in res.items():
            rows.append(dict(section="torch-rechub", case=f"ml-100k L={L}", variant=name, epoch_s=sec,
                             examples_per_s=n_all / sec, examples=n_all, valid_recall50=recall,
                             rounds=args.rechub_epochs,
                             note=("its MatchTrainer, Adam lr 3e-3, 200 uniform negatives per row, no eval in epoch"
                                   + (f"; timed on {n} examples, scaled" if n < n_all else
                                      f"; recall after {args.rechub_epochs} epoch(s)"))))


# ------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="ML-100k max_len 50 + a small synthetic set, fewer repeats")
    ap.add_argument("--old", default=None, help="an earlier checkout (a git worktree) with its extension built")
    ap.add_argument("--rounds", type=int, default=None, help="alternated rounds (default 1 quick, 2 full)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per run of ours (default 1 quick, 2 full)")
    ap.add_argument("--variants", default="cpp,reference,cpp 2 threads")
    ap.add_argument("--sections", default="ours,old,rechub")
    ap.add_argument("--cases", default=None,
                    help="comma-separated cases of the ours section, e.g. 'ml-100k L=200,synthetic L=50..200'")
    ap.add_argument("--rechub-epochs", type=int, default=1)
    ap.add_argument("--rechub-examples", type=int, default=None,
                    help="time torch-rechub on this many examples and scale (default: 8192 quick, all full)")
    ap.add_argument("--out", default=str(HERE / "measured" / "train"))
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.epochs = args.epochs or (1 if args.quick else 2)
    if args.rechub_examples is None and args.quick:
        args.rechub_examples = 8192
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    sections = args.sections.split(",")
    if "old" in sections and not args.old:
        print("[old] skipped: no --old checkout given", flush=True)
        sections.remove("old")

    rows = []
    t0 = time.time()
    if "ours" in sections:
        section_ours(args, rows)
    if "old" in sections:
        section_old(args, rows)
    if "rechub" in sections:
        section_rechub(args, rows)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("section", "case", "variant"), k))
    with open(out / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    head = (f"`python bench/bench_train.py {' '.join(argv if argv is not None else sys.argv[1:])}`, "
            f"torch {torch.__version__}, 1 thread, {time.time() - t0:.0f} s; medians over {args.rounds} alternated "
            f"round(s)\n")
    md = [head, "| section | case | variant | epoch s | examples/s | ratio | note |", "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        ratio = r.get("speedup_vs_cpp") or r.get("speedup_vs_old")
        extra = f"valid recall@50 {r['valid_recall50']:.4f}; " if r.get("valid_recall50") is not None else ""
        md.append(f"| {r['section']} | {r['case']} | {r['variant']} | {r['epoch_s']:.2f} | {r['examples_per_s']:.0f} | "
                  f"{'' if ratio is None else f'{ratio:.2f}x'} | {extra}{r.get('note', '')} |")
    (out / "train.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out}/train.csv, train.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
