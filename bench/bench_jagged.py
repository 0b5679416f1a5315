"""Jagged against padded routing on the fused CPU kernel, in one run, as ratios.

    python bench/bench_jagged.py [--lengths ml100k uniform] [--batch 1024] [--max-len 200] [--threads 1]
                                 [--reps 9] [--out bench/measured/jagged.md]

The same users go through ``b2i_routing_jagged`` (values (N, D) + offsets, the jagged CPU kernel) and
through ``b2i_routing`` (E (B, L_max, D) zero-padded + mask, the padded CPU kernel), at B = 1024,
L_max = 200, D_in = D_out = 64, K = 4, r = 3, float32, per-user b0 (B, K, L_max), no interest mask,
each softmax axis.  Timed: the op alone, each side given its own input layout (building the padded
batch or the offsets is the data path's cost, not counted on either side); forward under no_grad, and
forward + backward (gradients to the behaviours and S).  Jagged and padded alternate sample after
sample, so load on the machine hits both alike; medians over ``--reps`` samples.

History lengths (``--lengths``):

* ``ml100k``: the per-user rating counts of MovieLens-100k (943 users, 20 to 737 ratings), read from
  the RecBole file ``ml-100k.inter`` that ``python -m mind`` fetches (``$MIND_DATA_CACHE`` or
  ~/.cache/mind-kernels/ml-100k/), drawn with replacement and clipped to L_max (mean 90.9 at 200);
  skipped with a note when the file is absent.
* ``uniform``: uniform in 50 .. L_max (mean 125 at 200).
* ``full``: every history L_max long, no padding at all: the control, where the two kernels do the same
  work and the ratio shows the jagged layout's own overhead (ideal 1.00x).

"ideal" is B L_max / N, the ratio of padded to real positions: the most that skipping padding can buy.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout

import mind_kernels  # noqa: E402
from mind_kernels.jagged import pad  # noqa: E402

from common import git_revision  # noqa: E402  (bench/ is this script's folder)

D, K, R = 64, 4, 3


def ml100k_counts():
    """Per-user interaction counts of ML-100k from the local cache, or None when it is not there."""
    cache = os.environ.get("MIND_DATA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mind-kernels"))
    path = os.path.join(cache, "ml-100k", "ml-100k.inter")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        next(f)
        counts = collections.Counter(line.split("\t", 1)[0] for line in f if line.strip())
    return torch.tensor(sorted(counts.values()), dtype=torch.int64)


def draw_lengths(kind: str, B: int, max_len: int, g: torch.Generator):
    if kind == "uniform":
        return torch.randint(min(50, max_len), max_len + 1, (B,), generator=g)
    if kind == "full":
        return torch.full((B,), max_len, dtype=torch.int64)
    counts = ml100k_counts()
    if counts is None:
        return None
    return counts[torch.randint(0, counts.numel(), (B,), generator=g)].clamp(max=max_len)


def time_pair(jagged_fn, padded_fn, reps: int):
    """Medians (ms) of alternating samples of the two callables, after a warm-up of each."""
    jagged_fn(), padded_fn()
    jt, pt = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        jagged_fn()
        jt.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        padded_fn()
        pt.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(jt), statistics.median(pt)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", nargs="+", default=["ml100k", "uniform", "full"],
                    choices=["ml100k", "uniform", "full"])
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--max-len", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", default=os.path.join(HERE, "measured", "jagged.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    B, L = args.batch, args.max_len
    head = (f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
            f"thread(s), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, git {git_revision()}; B={B} L_max={L} D={D} K={K} r={R} float32; ms, median of {args.reps}")
    print(head)
    lines = ["| lengths | mean n_u | ideal | softmax over | jagged fwd | padded fwd | fwd ratio | jagged fwd+bwd "
             "| padded fwd+bwd | fwd+bwd ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for kind in args.lengths:
        g = torch.Generator().manual_seed(0)
        n = draw_lengths(kind, B, L, g)
        if n is None:
            notes.append(f"{kind}: skipped, ml-100k.inter is not in the cache (run `python -m mind train --data "
                         "ml-100k` once to fetch it)")
            print(notes[-1])
            continue
        offsets = torch.zeros(B + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(n, 0)
        N = int(offsets[-1])
        V = torch.randn(N, D, generator=g)
        S = torch.randn(D, D, generator=g) / D**0.5
        b0 = torch.randn(B, K, L, generator=g)
        G = torch.randn(B, K, D, generator=g)
        E, mask = pad(V, offsets, L)
        ideal = B * L / N
        for over in ("interests", "behaviors"):
            def jag_fwd():
                with torch.no_grad():
                    mind_kernels.b2i_routing_jagged(V, offsets, S, b0, softmax_over=over, backend="cpp")

            def pad_fwd():
                with torch.no_grad():
                    mind_kernels.b2i_routing(E, S, b0, mask, softmax_over=over, backend="cpp")

            Vg, Eg, Sg = V.clone().requires_grad_(), E.clone().requires_grad_(), S.clone().requires_grad_()

            def jag_full():
                mind_kernels.b2i_routing_jagged(Vg, offsets, Sg, b0, softmax_over=over, backend="cpp").backward(G)

            def pad_full():
                mind_kernels.b2i_routing(Eg, Sg, b0, mask, softmax_over=over, backend="cpp").backward(G)

            jf, pf = time_pair(jag_fwd, pad_fwd, args.reps)
            jb, pb = time_pair(jag_full, pad_full, args.reps)
            mean_n = N / B
            print(f"{kind:>8} mean n_u {mean_n:6.1f} ideal {ideal:4.2f}x  {over:<10} forward: jagged {jf:8.2f} "
                  f"padded {pf:8.2f} ({pf / jf:4.2f}x)   forward+backward: jagged {jb:8.2f} padded {pb:8.2f} "
                  f"({pb / jb:4.2f}x)", flush=True)
            lines.append(f"| {kind} | {mean_n:.1f} | {ideal:.2f}x | {over} | {jf:.2f} | {pf:.2f} | {pf / jf:.2f}x | "
                         f"{jb:.2f} | {pb:.2f} | {pb / jb:.2f}x |")
    cmd = "python bench/bench_jagged.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        "# Jagged against padded routing, fused CPU kernel",
        "",
        f"`{cmd.strip()}`",
        "",
        head,
        "",
        "Ratios are padded time / jagged time (above 1: jagged is faster); \"ideal\" is B L_max / N.",
        "",
        *lines,
        "",
        *notes,
        "",
    ])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
