"""Memory per rank of the item table with ``--sharded-embeddings`` against plain DDP, at 1, 2 and 4 ranks.

    python bench/bench_sharded.py                       # 2,000,000 items, d = 64, 1/2/4 ranks, 20 steps each
    python bench/bench_sharded.py --items 500000 --ranks 1 2

For each world size W it launches ``torchrun --nproc_per_node W`` on this script in worker mode, twice:
``sharded`` (mind.sharded.shard_model: TorchRec row-wise, Adagrad fused in the backward) and ``ddp``
(the MIND model in DDP with AdamW, as ``train`` runs it without the flag).  Each worker builds MIND
for a synthetic catalogue (no genres, no profile; the item table dominates), runs ``--steps`` training
steps of ``mind.train.training_loss`` (sampled softmax, 200 negatives, global batch 256, random
histories of 20 items drawn from a Zipf(1.1) popularity), then reports:

* bytes of the item table this rank holds, of its optimizer state, and of table-sized gradients
  (tensor sizes, not RSS: sharded = the local shard and its Adagrad state, no gradient; ddp = the whole
  table, AdamW's two moments and the dense gradient);
* the process's peak RSS (``ru_maxrss``) and its RSS after the steps.  The sharded worker builds the
  seeded full table once before sharding it (mind/sharded.py: every rank starts from DDP's weights),
  so its peak includes one full table at start; its RSS after the steps shows what training holds.

Writes ``bench/measured/sharding/sharding.json`` and ``sharding.md``.  Speed is not measured here:
4 ranks share this machine's 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import socket
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def worker(args) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    import mind.train as T
    from mind.config import TrainConfig
    from mind.distributed import setup
    from mind.loss import SoftmaxLoss
    from mind.model import MIND

    torch.set_num_threads(1)
    sharded = args.mode == "sharded"
    info = setup()
    if sharded:
        from mind.sharded import ensure_process_group
        ensure_process_group()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    config = TrainConfig(dim=args.dim, num_negatives=200, batch_size=256, loss="sampled", progress=False,
                         sharded_embeddings=sharded)
    T.seed_everything(0)
    model = MIND(num_items=args.items, dim=args.dim)
    rng = np.random.default_rng(rank)
    counts = np.zeros(args.items + 1)
    counts[1:] = 1.0 / np.arange(1, args.items + 1) ** 1.1
    loss_fn = SoftmaxLoss("sampled", counts, 200, "max")
    if sharded:
        from mind.sharded import shard_model
        run = shard_model(model, config, info)
        net, model, optimizer = run.dmp, run.model, run.dense_optimizer
    else:
        optimizer = T.build_optimizer(model, config)
        net = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            net = DDP(model, find_unused_parameters=True)   # no genres here: their table is unused
    p = counts[1:] / counts[1:].sum()
    gen = torch.Generator().manual_seed(rank)
    per_rank = 256 // world
    t0 = time.time()
    for _ in range(args.steps):
        hist = torch.from_numpy(rng.choice(args.items, size=(per_rank, 20), p=p) + 1)
        tgt = torch.from_numpy(rng.choice(args.items, size=per_rank, p=p) + 1)
        loss = T.training_loss(net, model, loss_fn, config, hist, None, tgt, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.time() - t0
    if sharded:
        held = run.bytes_per_rank()
    else:
        w = model.item_id_embedding.weight
        state = optimizer.state[w]
        held = {"table": w.numel() * w.element_size(),
                "optimizer_state": sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v)
                                       and v.numel() > 1),
                "gradient": 0 if w.grad is None else w.grad.numel() * w.grad.element_size()}
    row = {"mode": args.mode, "world": world, "rank": rank, "items": args.items, "dim": args.dim,
           "steps": args.steps, "seconds": seconds, "loss": float(loss), **{f"{k}_bytes": v for k, v in held.items()},
           "rss_after_mb": _rss_mb(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6}
    pathlib.Path(args.out, f"{args.mode}_w{world}_r{rank}.json").write_text(json.dumps(row))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=2_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "bench" / "measured" / "sharding"))
    ap.add_argument("--worker", choices=["sharded", "ddp"], dest="mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        return worker(args)
    out = pathlib.Path(args.out)
    raw = out / "ranks"
    raw.mkdir(parents=True, exist_ok=True)
    for f in raw.glob("*.json"):
        f.unlink()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for world in args.ranks:
        for mode in ("sharded", "ddp"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(pathlib.Path(__file__)),
                   "--worker", mode, "--items", str(args.items), "--dim", str(args.dim), "--steps", str(args.steps),
                   "--out", str(raw)]
            print(f"[run] {mode} x {world}: {' '.join(cmd[3:])}", flush=True)
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
            if proc.returncode:
                sys.exit(f"{mode} x {world} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(f.read_text()) for f in sorted(raw.glob("*.json"))]
    (out / "sharding.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    mb = 1e6
    lines = [f"# Item-table memory per rank: {args.items:,} items x d = {args.dim}, float32", "",
             f"`python {' '.join(sys.argv)}` ({time.strftime('%Y-%m-%d')}, torch {__import__('torch').__version__}, "
             f"{args.steps} training steps, global batch 256, sampled softmax). Per rank, rank 0 shown; MB = 10^6 bytes.",
             "", "| mode | ranks | table MB | optimizer state MB | table gradient MB | sum MB | RSS after the steps MB "
             "| peak RSS MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in ("ddp", "sharded"):
        for world in args.ranks:
            r = next((r for r in rows if r["mode"] == mode and r["world"] == world and r["rank"] == 0), None)
            if r is None:
                continue
            total = r["table_bytes"] + r["optimizer_state_bytes"] + r["gradient_bytes"]
            lines.append(f"| {mode} | {world} | {r['table_bytes'] / mb:,.1f} | {r['optimizer_state_bytes'] / mb:,.1f} "
                         f"| {r['gradient_bytes'] / mb:,.1f} | {total / mb:,.1f} | {r['rss_after_mb']:,.0f} "
                         f"| {r['peak_rss_mb']:,.0f} |")
    (out / "sharding.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
