"""End-to-end MIND training speed (issue 13): examples/s and epoch seconds, with ratios, in one run.

    python bench/bench_train.py --quick            # ML-100k max_len 50 + a small synthetic set, 1 round
    python bench/bench_train.py                    # everything below, 2 alternated rounds
    python bench/bench_train.py --old /work/wt-9463034   # + commit 9463034 (a worktree with its extension built)

1 thread throughout (torch.set_num_threads(1); the ``cpp 2 threads`` variant alone runs on 2).
The machine may be shared, so variants of one case run alternately round by round and the tables
give medians and ratios to a baseline of the same round set.

Sections (each writes rows to train.csv; train.md and profile.md are the tables):

* ``ours``: ``mind.train.train`` for ``--epochs`` epochs per variant (fused ``cpp`` backend,
  ``reference``, and each speed lever: ``compile``, ``rowwise``), valid evaluation included
  (it is part of every epoch); epoch seconds = the last epoch's ``seconds`` (the first epoch
  of ``compile`` also pays the compilation, reported apart).  Cases: ML-100k at max_len 20,
  50, 200 and a synthetic set with histories of 50 to 200 items (``mind.data.make_synthetic``).
* ``old``: ``python -m mind train`` of two checkouts as subprocesses, alternated: commit
  9463034 (``--old``) at its defaults, this checkout with those same settings (sampled
  softmax, label-aware attention with p = 0, ReLU last H layer, lambda = 0, sigma = 0.1), and
  this checkout at its own defaults; ML-100k, max_len 50, 1 epoch, seconds from metrics.csv.
* ``rechub``: torch-rechub 0.9.0's MIND trained by its own ``MatchTrainer`` (list-wise softmax,
  Adam) on the same examples (our training histories, targets, user features; d = 64, K = 4,
  batch 256), without and with ``mind_kernels.compat.patch()``.  Not comparable, and said so:
  its negatives are 200 uniform items per row (ours: 200 log-uniform items shared by the
  batch, or the exact softmax), it has no genre features and no H layers (one linear map),
  and its epoch has no evaluation (we add ours afterwards for Recall@50).
* ``levers``: the second round's levers step by step (ML-100k max_len 50, exact and sampled
  softmax; the synthetic set, sampled): one model per variant in one process, variants alternated
  round by round, median step ms and minor page faults per step.  ``keep_freed_memory`` is
  process-wide and one-way, so it alone runs in alternated fresh processes.
* ``floor``: what a default step (ML-100k, max_len 50, B = 256) cannot avoid, timed alone in one
  run next to the whole step: the exact softmax's three score products (bf16 where the defaults
  use it), the six H-layer products, and the fused routing op forward + backward on the same
  shapes.  Their sum is a lower bound for any lever that keeps the model and its precision.
* ``profile``: one training step split by manual timers (module hooks and gradient hooks) into
  routing fwd+bwd, embedding gather + its gradient, H layers, loss (+ penalty), optimizer and
  other, for this checkout and (with ``--old``) commit 9463034, same process code.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

# Settings commit 9463034 trained with by default (its CLI has no --scoring / --h-out / --diversity-lambda).
OLD_DEFAULTS = ["--loss", "sampled", "--p", "0", "--routing-init-std", "0.1", "--h-out", "relu",
                "--scoring", "attention", "--diversity-lambda", "0"]


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

#: the third round's default-on levers off: fused best-interest loss, index_add_ gather (fused AdamW, the
#: third, has no TrainConfig switch; the levers section measures it; bf16 H layers stay a flag)
ROUND3_OFF = dict(fused_loss=False, gather_index_add=False)

VARIANTS = {
    "cpp": dict(backend="cpp"),
    "cpp round-3 levers off": dict(backend="cpp", **ROUND3_OFF),
    # the second and third rounds' default-on levers off (split_h, genre_matmul, pad_items)
    "cpp round-2 levers off": dict(backend="cpp", split_h=False, genre_matmul=False, pad_items=1, **ROUND3_OFF),
    "reference": dict(backend="reference"),
    # "cpp" routes jagged batches where at most half the history slots hold an item (auto)
    "cpp jagged=off": dict(backend="cpp", jagged="off"),
    "cpp jagged=on": dict(backend="cpp", jagged="on"),
    "cpp score bf16": dict(backend="cpp", score_dtype="bfloat16"),
    "cpp score fp32": dict(backend="cpp", score_dtype="float32"),
    "cpp h bf16": dict(backend="cpp", h_dtype="bfloat16"),
    # every other row runs on 1 thread; this one on 2 (the development machine's cores)
    "cpp 2 threads": dict(backend="cpp", threads=2),
    "cpp+compile": dict(backend="cpp", compile=True),
    "cpp+rowwise": dict(backend="cpp", optimizer="rowwise"),
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
            torch._dynamo.reset()
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
    n = len(D.prepare(D.load_recbole(D.fetch_movielens_100k()), max_len=50).train_targets)
    runs = {"9463034 (its defaults)": (args.old, []), "this checkout, 9463034's settings": (str(ROOT), OLD_DEFAULTS),
            "this checkout, its defaults": (str(ROOT), [])}
    times = {k: [] for k in runs}
    for r in range(args.rounds):
        for name, (path, extra) in runs.items():
            times[name].append(run_cli(path, extra, 50))
            print(f"[old] {name} round {r}: {times[name][-1]:.2f}s", flush=True)
    base = statistics.median(times["9463034 (its defaults)"])
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(dict(section="vs 9463034", case="ml-100k L=50", variant=name, epoch_s=med, examples_per_s=n / med,
                         examples=n, speedup_vs_9463034=base / med, rounds=len(ts),
                         note="python -m mind train --epochs 1 --threads 1 --backend cpp; seconds from metrics.csv "
                              "(valid eval included)"))


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
    import numpy as np
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


# ------------------------------------------------------------------------------------ profile

PROFILER = r'''
import json, sys, time, numpy as np, torch
torch.set_num_threads(1)
from mind import data as D
import mind.train as T
from mind.loss import SoftmaxLoss
L, settings, steps = int(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
data = D.prepare(D.load_recbole(D.fetch_movielens_100k()), max_len=L)
cfg = T.TrainConfig(max_len=L, backend="cpp", progress=False, **settings)
torch.manual_seed(0)
model = T.build_model(data, cfg)
try:    # what train() steps with (fused AdamW since round 3); older checkouts have no mind.optim
    from mind.optim import build_optimizer
    opt = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
except (ImportError, AttributeError):
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
kind = T.resolve_loss(cfg.loss, int(data.num_items)) if hasattr(T, "resolve_loss") else cfg.loss
kw = {"scoring": cfg.scoring} if hasattr(cfg, "scoring") else {}
loss_fn = T.build_loss(data, cfg) if hasattr(T, "build_loss") else SoftmaxLoss(kind, np.asarray(data.item_counts), cfg.num_negatives, **kw)
users = torch.as_tensor(np.asarray(data.train_users)); hists = torch.as_tensor(np.asarray(data.train_histories))[:, -L:]
tg = torch.as_tensor(np.asarray(data.train_targets)); ft = torch.as_tensor(np.asarray(data.user_features))
marks = {}
now = time.perf_counter
def mark(k):
    marks[k] = now()
def ext_pre(m, a):
    mark("ext_in")
    if a[0].requires_grad:
        a[0].register_hook(lambda g: mark("b_beh"))
def ext_post(m, a, out):
    mark("ext_out")
    (out[0] if isinstance(out, tuple) else out).register_hook(lambda g: mark("b_caps"))
def h_post(m, a, out):
    mark("h_out"); out.register_hook(lambda g: mark("b_hout"))
model.extractor.register_forward_pre_hook(ext_pre); model.extractor.register_forward_hook(ext_post)
# the last H module runs as a module in every version (the first may be split into two matmuls)
model.h_layers[-1].register_forward_hook(h_post)
parts = {k: 0.0 for k in ("routing fwd+bwd", "embedding gather + grad", "H layers (+ profile)", "loss (+ penalty)", "optimizer", "other")}
order = torch.randperm(len(tg), generator=torch.Generator().manual_seed(0))
total = 0.0
for i in range(steps + 5):
    idx = order[(i * 256) % (len(tg) - 256):][:256]
    marks.clear(); t0 = now()
    hist, t, f = hists[idx], tg[idx], ft[users[idx]]
    if hasattr(T, "training_loss"):
        loss = T.training_loss(model, model, loss_fn, cfg, hist, f, t)
    else:
        loss = loss_fn(model(hist, f, t, p=cfg.p), model, t)
    t_fwd = now(); opt.zero_grad(set_to_none=True); t_bwd0 = now()
    loss.backward(); t_bwd = now(); opt.step(); t_end = now()
    if i < 5:
        continue
    m = marks
    known = {"H layers (+ profile)": (m["h_out"] - m["ext_out"]) + (m["b_caps"] - m["b_hout"]),
             "loss (+ penalty)": (t_fwd - m["h_out"]) + (m["b_hout"] - t_bwd0),
             "optimizer": (t_bwd0 - t_fwd) + (t_end - t_bwd)}
    known["embedding gather + grad"] = (m["ext_in"] - t0) + (t_bwd - m["b_beh"])
    known["routing fwd+bwd"] = (m["ext_out"] - m["ext_in"]) + (m["b_beh"] - m["b_caps"])
    # the marks tile the step, so "other" is 0 up to timer rounding: a check that no part is missed
    known["other"] = (t_end - t0) - sum(known.values())
    for k, v in known.items():
        parts[k] += v
    total += t_end - t0
print(json.dumps({"step_ms": 1e3 * total / steps, "parts_ms": {k: 1e3 * v / steps for k, v in parts.items()}}))
'''


def run_profile(checkout: str, settings: dict, steps: int, L: int = 50) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PROFILER, str(L), json.dumps(settings), str(steps)], env=env,
                         cwd=os.path.abspath(checkout), check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def section_profile(args, rows) -> str:
    old_settings = dict(loss="sampled", p=0.0, routing_init_std=0.1)
    cols = {}
    if args.old:
        cols["9463034, its defaults"] = (args.old, old_settings)
    cols["now, 9463034's settings"] = (str(ROOT), dict(old_settings, h_out_activation="relu", scoring="attention",
                                                        diversity_lambda=0.0))
    cols["now, defaults"] = (str(ROOT), {})
    got = {k: [] for k in cols}
    for _ in range(args.rounds):
        for name, (path, settings) in cols.items():
            got[name].append(run_profile(path, settings, args.profile_steps))
    med = {}
    for name, rs in got.items():
        step = statistics.median(r["step_ms"] for r in rs)
        parts = {k: statistics.median(r["parts_ms"][k] for r in rs) for k in rs[0]["parts_ms"]}
        med[name] = (step, parts)
        for k, v in parts.items():
            rows.append(dict(section="profile", case="ml-100k L=50 B=256", variant=name, part=k, ms=v,
                             share=v / step, step_ms=step, rounds=len(rs)))
    names = list(med)
    lines = ["| part of one step (ML-100k, max_len 50, B=256, cpp, 1 thread) | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]
    for k in med[names[0]][1]:
        lines.append(f"| {k} | " + " | ".join(f"{med[n][1][k]:.2f} ms ({100 * med[n][1][k] / med[n][0]:.0f}%)"
                                             for n in names) + " |")
    lines.append("| **step** | " + " | ".join(f"**{med[n][0]:.2f} ms**" for n in names) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ levers (step level)

#: each round's levers against the same config with that lever off; "adamw_loop" (a _Stepper switch, not
#: a TrainConfig field) steps with torch.optim.AdamW's per-parameter loop instead of fused=True.
ROUND2 = dict(ROUND3_OFF, adamw_loop=True)
ROUND1 = dict(ROUND2, split_h=False, genre_matmul=False, pad_items=1, item_table="loss")
LEVER_CASES = {
    "ml-100k L=50 exact softmax, round 3": ("ml-100k L=50", {}, {
        "round 2 (round-3 levers off)": ROUND2,
        "+ fused best-interest loss": dict(ROUND2, fused_loss=True),
        "+ index_add gather": dict(ROUND2, gather_index_add=True),
        "+ fused AdamW": dict(ROUND2, adamw_loop=False),
        "all (defaults)": {},
        "defaults + bf16 H layers (a flag)": dict(h_dtype="auto"),
    }),
    "ml-100k L=50 exact softmax": ("ml-100k L=50", {}, {
        "round 1 (levers off)": ROUND1,
        "+ split_h": dict(ROUND1, split_h=True),
        "+ genre_matmul": dict(ROUND1, genre_matmul=True),
        "+ pad_items=16": dict(ROUND1, pad_items=16),
        "all round 2": dict(ROUND2, item_table="loss"),
    }),
    "ml-100k L=50 sampled softmax": ("ml-100k L=50", dict(loss="sampled"), {
        "item_table=loss (default)": {},
        "item_table=auto": dict(item_table="auto"),
    }),
    "synthetic L=200 sampled softmax": ("synthetic L=50..200", {}, {
        "item_table=loss (default)": {},
        "item_table=auto": dict(item_table="auto"),
    }),
}


class _Stepper:
    """One model + AdamW + objective of a config; ``run(n)`` times n training steps (median ms, faults/step)."""

    def __init__(self, data, L: int, settings: dict):
        import numpy as np
        import torch
        import mind.train as T
        from mind.optim import build_optimizer
        settings = dict(settings)
        adamw_loop = settings.pop("adamw_loop", False)
        self.cfg = T.TrainConfig(max_len=L, backend="cpp", progress=False, **settings)
        torch.manual_seed(0)
        self.model = T.build_model(data, self.cfg)
        if adamw_loop:
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                         foreach=False)
        else:   # what train() steps with
            self.opt = build_optimizer(self.model, self.cfg.optimizer, self.cfg.lr, self.cfg.weight_decay)
        self.loss_fn = T.build_loss(data, self.cfg)
        self.users = torch.as_tensor(np.asarray(data.train_users))
        self.hists = torch.as_tensor(np.asarray(data.train_histories))[:, -L:]
        self.tg = torch.as_tensor(np.asarray(data.train_targets))
        self.ft = torch.as_tensor(np.asarray(data.user_features))
        self.order = torch.randperm(len(self.tg), generator=torch.Generator().manual_seed(0))
        self.i = 0
        self.run(3)

    def run(self, n: int):
        import resource
        import mind.train as T
        B = self.cfg.batch_size
        times = []
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n):
            idx = self.order[(self.i * B) % (len(self.tg) - B):][:B]
            self.i += 1
            t0 = time.perf_counter()
            loss = T.training_loss(self.model, self.model, self.loss_fn, self.cfg, self.hists[idx],
                                   self.ft[self.users[idx]], self.tg[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            times.append(time.perf_counter() - t0)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / n
        return 1e3 * statistics.median(times), faults


ALLOC_WORKER = r'''
import json, sys, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
import bench_train as BT
from mind.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[2] == "on" else False
data = BT.load_case("ml-100k L=50", True)
st = BT._Stepper(data, 50, {})
ms, faults = st.run(int(sys.argv[3]))
print(json.dumps({"ms": ms, "faults": faults, "applied": applied}))
'''


def section_levers(args, rows):
    """Step time of each lever in one process, variants alternated round by round (medians of medians)."""
    steps = 10 if args.quick else 20
    rounds = max(args.rounds, 3)
    for name, (case, base, variants) in LEVER_CASES.items():
        data = load_case(case, args.quick)
        L = int(case.split("L=")[1]) if case.startswith("ml-100k") else 200
        steppers = {v: _Stepper(data, L, {**base, **kw}) for v, kw in variants.items()}
        got = {v: [] for v in variants}
        for _ in range(rounds):
            for v, st in steppers.items():
                got[v].append(st.run(steps))
        ref = statistics.median(ms for ms, _ in got[next(iter(variants))])
        for v, rs in got.items():
            med = statistics.median(ms for ms, _ in rs)
            rows.append(dict(section="levers", case=name, variant=v, step_ms=med, speedup=ref / med,
                             faults_per_step=statistics.median(f for _, f in rs), rounds=rounds,
                             note=f"{steps} steps x {rounds} alternated rounds, one process, B=256"))
            print(f"[levers] {name} {v}: {med:.2f} ms/step ({ref / med:.2f}x)", flush=True)
    # keep_freed_memory is process-wide and one-way: alternated subprocesses instead.
    got = {"keep_freed_memory off (default)": [], "keep_freed_memory on": []}
    for _ in range(rounds):
        for v in got:
            out = subprocess.run([sys.executable, "-c", ALLOC_WORKER, str(HERE), "on" if " on" in v else "off",
                                  str(steps * 3)], env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                                 cwd=str(ROOT), check=True, capture_output=True, text=True)
            got[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = statistics.median(r["ms"] for r in got["keep_freed_memory off (default)"])
    for v, rs in got.items():
        med = statistics.median(r["ms"] for r in rs)
        rows.append(dict(section="levers", case="ml-100k L=50 exact softmax", variant=v, step_ms=med, speedup=ref / med,
                         faults_per_step=statistics.median(r["faults"] for r in rs), rounds=rounds,
                         note=f"{steps * 3} steps per process, {rounds} alternated processes; mallopt applied: "
                              f"{rs[0]['applied']}"))
        print(f"[levers] allocator {v}: {med:.2f} ms/step ({ref / med:.2f}x)", flush=True)


def section_floor(args, rows) -> str:
    """Dense products and the routing op of one default step, timed alone (medians), beside the step."""
    import torch
    import mind.train as T
    from mind_kernels import b2i_routing
    data = load_case("ml-100k L=50", args.quick)
    cfg = T.TrainConfig(max_len=50, backend="cpp", progress=False)
    B, K, d, L = cfg.batch_size, cfg.num_interests, cfg.dim, 50
    hidden = cfg.hidden_mult * d
    N = int(data.num_items)
    Np = N + (-N) % cfg.pad_items
    sdt = torch.bfloat16 if T.resolve_score_dtype(cfg) == "bfloat16" else torch.float32
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    v, e, gs = r(B * K, d, dtype=sdt), r(Np, d, dtype=sdt), r(B * K, Np, dtype=sdt)
    x, w1, h, w2, dy = r(B * K, d), r(d, hidden), r(B * K, hidden), r(hidden, d), r(B * K, d)
    dh = r(B * K, hidden)
    E, S = r(B, L, d).requires_grad_(), r(d, d).requires_grad_()
    b0 = r(B, K, L)
    mask = torch.as_tensor(data.train_histories[:B])[:, -L:] != 0
    G = r(B, K, d)

    def routing():
        caps = b2i_routing(E, S, b0, mask=mask, num_iters=cfg.num_iters, backend="cpp")
        torch.autograd.grad(caps, (E, S), G)

    parts = {
        f"loss: scores V E^T ({B * K}x{d} . {d}x{Np}, {str(sdt)[6:]})": lambda: v @ e.t(),
        "loss: dV = G E": lambda: gs @ e,
        "loss: dE = G^T V": lambda: gs.t() @ v,
        f"H: 2 forward products ({B * K}x{d} . {d}x{hidden}, {B * K}x{hidden} . {hidden}x{d})":
            lambda: (x @ w1, h @ w2),
        "H: 4 backward products (dX and dW of both layers)": lambda: (dy @ w2.t(), h.t() @ dy, dh @ w1.t(), x.t() @ dh),
        f"routing op fwd+bwd (B={B}, L={L}, K={K}, d={d}, r={cfg.num_iters}, cpp)": routing,
    }
    stepper = _Stepper(data, L, {})
    reps = 20 if args.quick else 50
    got = {k: [] for k in parts}
    steps = []
    for _ in range(max(args.rounds, 3)):
        for k, f in parts.items():
            for _ in range(3):
                f()
            t = []
            for _ in range(reps):
                t0 = time.perf_counter()
                f()
                t.append(time.perf_counter() - t0)
            got[k].append(1e3 * statistics.median(t))
        steps.append(stepper.run(reps)[0])
    step = statistics.median(steps)
    lines = ["| what a default step must compute (timed alone) | ms | share of the step |", "|---|---:|---:|"]
    total = 0.0
    for k, ts in got.items():
        ms = statistics.median(ts)
        total += ms
        rows.append(dict(section="floor", case="ml-100k L=50 B=256", variant=k, ms=ms, step_ms=step))
        lines.append(f"| {k} | {ms:.2f} | {100 * ms / step:.0f}% |")
    lines.append(f"| **sum (a lower bound at this precision)** | **{total:.2f}** | **{100 * total / step:.0f}%** |")
    lines.append(f"| the whole default step (same run, {reps} steps x {len(steps)} rounds) | {step:.2f} | 100% |")
    rows.append(dict(section="floor", case="ml-100k L=50 B=256", variant="sum", ms=total, step_ms=step))
    print("\n".join(lines), flush=True)
    return "\n".join(lines)


def levers_md(rows) -> list:
    md = ["", "| case | lever | step ms | ratio | page faults / step | note |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        if r["section"] == "levers":
            md.append(f"| {r['case']} | {r['variant']} | {r['step_ms']:.2f} | {r['speedup']:.2f}x | "
                      f"{r['faults_per_step']:.0f} | {r['note']} |")
    return md


# ------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="ML-100k max_len 50 + a small synthetic set, fewer repeats")
    ap.add_argument("--old", default=None, help="a checkout of commit 9463034 with its extension built")
    ap.add_argument("--rounds", type=int, default=None, help="alternated rounds (default 1 quick, 2 full)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per run of ours (default 1 quick, 2 full)")
    ap.add_argument("--variants", default="cpp,cpp round-3 levers off,cpp round-2 levers off,reference,cpp+compile,"
                                          "cpp+rowwise")
    ap.add_argument("--sections", default="ours,old,rechub,levers,profile,floor")
    ap.add_argument("--cases", default=None,
                    help="comma-separated cases of the ours section, e.g. 'ml-100k L=200,synthetic L=50..200'")
    ap.add_argument("--rechub-epochs", type=int, default=1)
    ap.add_argument("--rechub-examples", type=int, default=None,
                    help="time torch-rechub on this many examples and scale (default: 8192 quick, all full)")
    ap.add_argument("--profile-steps", type=int, default=None)
    ap.add_argument("--out", default=str(HERE / "measured" / "train"))
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.epochs = args.epochs or (1 if args.quick else 2)
    args.profile_steps = args.profile_steps or (10 if args.quick else 40)
    if args.rechub_examples is None and args.quick:
        args.rechub_examples = 8192
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    sections = args.sections.split(",")
    if "old" in sections and not args.old:
        print("[old] skipped: no --old checkout given", flush=True)
        sections.remove("old")

    rows, profile_md = [], None
    t0 = time.time()
    if "ours" in sections:
        section_ours(args, rows)
    if "old" in sections:
        section_old(args, rows)
    if "rechub" in sections:
        section_rechub(args, rows)
    if "levers" in sections:
        section_levers(args, rows)
    if "profile" in sections:
        profile_md = section_profile(args, rows)
    floor_md = section_floor(args, rows) if "floor" in sections else None

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
        if r["section"] in ("profile", "levers", "floor"):
            continue
        ratio = r.get("speedup_vs_cpp") or r.get("speedup_vs_9463034")
        extra = f"valid recall@50 {r['valid_recall50']:.4f}; " if r.get("valid_recall50") is not None else ""
        md.append(f"| {r['section']} | {r['case']} | {r['variant']} | {r['epoch_s']:.2f} | {r['examples_per_s']:.0f} | "
                  f"{'' if ratio is None else f'{ratio:.2f}x'} | {extra}{r.get('note', '')} |")
    if any(r["section"] == "levers" for r in rows):
        md += levers_md(rows)
    (out / "train.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if profile_md:
        (out / "profile.md").write_text(head + "\n" + profile_md + "\n")
        print(profile_md)
    if floor_md:
        (out / "floor.md").write_text(head + "\n" + floor_md + "\n")
    print(f"wrote {out}/train.csv, train.md" + (", profile.md" if profile_md else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
