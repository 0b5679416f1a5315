"""torch-rechub's MIND on its own CapsuleNetwork vs on mind-kernels (``compat.torch_rechub.patch()``).

    python bench/bench_rechub_mind.py [--device cpu|cuda|auto] [--batch 1024] [--repeats 20] [--out DIR]

Measures, in one process, alternating the two variants every repeat so that drift on a
shared machine hits both alike:

* ``model fwd+bwd``: torch-rechub's ``MIND`` training step (forward, list-wise softmax
  loss over 1 positive + ``--negatives`` sampled items, backward) on a synthetic batch,
  built once without and once with ``patch()`` (same seed, hence same parameters);
* ``layer fwd`` / ``layer fwd+bwd``: ``CapsuleNetwork(bilinear_type=0)`` alone, torch-rechub's
  vs ours (``fwd`` under ``torch.no_grad()``, as in serving).

Prints a table (median ms, p20-p80, ratio = torch-rechub / ours) and writes
``rechub_mind_<device>.csv`` to ``--out`` (default: ``$OUT`` when set, else ``bench/results``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import mind_kernels
from mind_kernels.compat import torch_rechub as compat

from common import git_revision, write_rows_csv


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns, device, repeats, warmup):
    """{name: [seconds per call]} with the callables run in turn every repeat."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


# ---------------------------------------------------------------------- the MIND training step


def build_mind(args, device, patched):
    from torch_rechub.basic.features import SequenceFeature, SparseFeature
    from torch_rechub.models.matching import mind as rechub_mind

    D = args.dim
    user = [SparseFeature("user_id", args.users, embed_dim=D)]
    history = [SequenceFeature("hist_item_id", args.items, embed_dim=D, pooling="concat", shared_with="item_id")]
    item = [SparseFeature("item_id", args.items, embed_dim=D)]
    neg = [SequenceFeature("neg_items", args.items, embed_dim=D, pooling="concat", shared_with="item_id")]
    ctx = compat.patched(backend=args.backend) if patched else contextlib.nullcontext()
    with ctx:
        torch.manual_seed(0)
        model = rechub_mind.MIND(user, history, item, neg, max_length=args.length, interest_num=args.interests)
    assert isinstance(model.capsule, compat.CapsuleNetwork) == patched
    return model.to(device).train()


def synthetic_batch(args, device):
    g = torch.Generator().manual_seed(0)
    B, L = args.batch, args.length
    hist = torch.randint(1, args.items, (B, L), generator=g)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    hist = hist * (torch.arange(L)[None, :] < lengths[:, None])  # right padding with 0, as torch-rechub pads
    batch = {
        "user_id": torch.randint(0, args.users, (B,), generator=g),
        "hist_item_id": hist,
        "item_id": torch.randint(1, args.items, (B,), generator=g),
        "neg_items": torch.randint(1, args.items, (B, args.negatives), generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


def mind_step(model, batch):
    def step():
        model.zero_grad(set_to_none=True)
        y = model(batch)  # (B, 1 + negatives), the positive first
        loss = F.cross_entropy(y, torch.zeros(y.shape[0], dtype=torch.long, device=y.device))
        loss.backward()
        return loss

    return step


# ---------------------------------------------------------------------- the layer alone


def layer_callables(args, device):
    from torch_rechub.basic.layers import CapsuleNetwork as RechubCapsule

    torch.manual_seed(0)
    theirs = RechubCapsule(args.dim, args.length, bilinear_type=0, interest_num=args.interests).to(device)
    ours = compat.CapsuleNetwork(args.dim, args.length, bilinear_type=0, interest_num=args.interests,
                                 backend=args.backend).to(device)
    ours.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(1)
    E = torch.randn(args.batch, args.length, args.dim, generator=g).to(device)
    lengths = torch.randint(1, args.length + 1, (args.batch,), generator=g)
    mask = (torch.arange(args.length)[None, :] < lengths[:, None]).long().to(device)
    probe = torch.randn(args.batch, args.interests, args.dim, generator=g).to(device)

    def fwd(layer):
        def run():
            with torch.no_grad():
                return layer(E, mask)
        return run

    def fwd_bwd(layer):
        def run():
            layer.zero_grad(set_to_none=True)
            x = E.detach().requires_grad_(True)
            (layer(x, mask) * probe).sum().backward()
        return run

    # Sanity: the two layers agree on this batch (same seed -> same initial logits).
    torch.manual_seed(3)
    a = theirs(E, mask)
    torch.manual_seed(3)
    b = ours(E, mask)
    err = (a - b).abs().max().item()
    if err > 1e-4:
        raise RuntimeError(f"compat CapsuleNetwork disagrees with torch-rechub's by {err}")

    b0 = torch.randn(args.batch, args.interests, args.length, device=device)
    served = mind_kernels.backends(E, ours.linear.weight, b0, mask.bool(), softmax_over="behaviors")
    served_by = args.backend if args.backend != "auto" else served.selected
    return {"fwd": (fwd(theirs), fwd(ours)), "fwd+bwd": (fwd_bwd(theirs), fwd_bwd(ours))}, served_by


# ---------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--length", type=int, default=50)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--interests", type=int, default=4)
    p.add_argument("--negatives", type=int, default=10, help="sampled negatives per user in the MIND step")
    p.add_argument("--items", type=int, default=20000)
    p.add_argument("--users", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--backend", default="auto", help="mind_kernels backend for our layer")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--skip-layer", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    meta = dict(device=args.device, torch=torch.__version__, git=git_revision(), threads=torch.get_num_threads(),
                batch=args.batch, length=args.length, dim=args.dim, interests=args.interests)

    def record(case, mode, times, served_by):
        t_theirs, t_ours = times["torch-rechub"], times["mind-kernels"]
        ratio = statistics.median(t_theirs) / statistics.median(t_ours)
        for variant, ts in times.items():
            rows.append(dict(case=case, mode=mode, variant=variant, backend=served_by if variant == "mind-kernels"
                             else "torch-rechub eager", median_ms=1e3 * statistics.median(ts),
                             p20_ms=1e3 * quantile(ts, 0.2), p80_ms=1e3 * quantile(ts, 0.8), repeats=len(ts),
                             speedup=ratio if variant == "mind-kernels" else 1.0, **meta))

    served_by = None
    if not args.skip_layer:
        fns, served_by = layer_callables(args, device)
        for mode, (theirs, ours) in fns.items():
            times = time_interleaved({"torch-rechub": theirs, "mind-kernels": ours}, device, args.repeats,
                                     args.warmup)
            record("CapsuleNetwork type 0", mode, times, served_by)

    if not args.skip_model:
        batch = synthetic_batch(args, device)
        m_theirs, m_ours = build_mind(args, device, False), build_mind(args, device, True)
        torch.manual_seed(5)
        l_theirs = mind_step(m_theirs, batch)().item()
        torch.manual_seed(5)
        l_ours = mind_step(m_ours, batch)().item()
        if abs(l_theirs - l_ours) > 1e-4 * max(1.0, abs(l_theirs)):
            raise RuntimeError(f"patched MIND loss {l_ours} != torch-rechub's {l_theirs}")
        times = time_interleaved({"torch-rechub": mind_step(m_theirs, batch), "mind-kernels": mind_step(m_ours, batch)},
                                 device, args.repeats, args.warmup)
        if served_by is None:
            served_by = args.backend
        record("MIND train step", "fwd+bwd", times, served_by)

    header = f"{'case':<24} {'mode':<8} {'variant':<13} {'backend':<18} {'median ms':>10} {'p20-p80 ms':>17} {'x rechub':>9}"
    print(f"device={args.device} threads={meta['threads']} B={args.batch} L={args.length} D={args.dim} "
          f"K={args.interests} torch={meta['torch']} git={meta['git']}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['case']:<24} {r['mode']:<8} {r['variant']:<13} {r['backend']:<18} {r['median_ms']:>10.2f} "
              f"{r['p20_ms']:>8.2f}-{r['p80_ms']:<8.2f} {r['speedup']:>9.2f}")

    path = write_rows_csv(rows, args.out, f"rechub_mind_{args.device}.csv")
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
