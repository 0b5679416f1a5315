"""The fused CPU routing op of two checkouts, timed alternately in one run (did a change slow it?).

    python bench/bench_revisions.py --old /path/to/old/checkout --new . [--rounds 5]

Each checkout must have its extension built in place (``python setup.py build_ext --inplace``).
Every round runs one timing process per checkout (PYTHONPATH = that checkout), alternating, so
both see the same machine load; each process times ``b2i_routing(backend="cpp")`` at L=50, D=64,
K=4, r=3, float32, 1 thread (min over repeats of the mean of a block of calls).  The table gives
the median over rounds and new/old.  ``--new`` is also timed with ``logit_scale=20`` when it
takes the argument.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CASES = [("fwd", 1), ("fwd", 16), ("fwd", 1024), ("fwd+bwd", 1024)]

TIMER = r'''
import json, sys, time, torch, inspect
torch.set_num_threads(1)
import mind_kernels
scale = float(sys.argv[1])
kw = {"logit_scale": scale} if scale != 1.0 else {}
out = {}
for mode, B in json.loads(sys.argv[2]):
    g = torch.Generator().manual_seed(0)
    E = torch.randn(B, 50, 64, generator=g, requires_grad=(mode != "fwd"))
    S = (torch.randn(64, 64, generator=g) / 8).requires_grad_(mode != "fwd")
    b0 = torch.randn(4, 50, generator=g)
    mask = torch.arange(50)[None] < torch.randint(1, 51, (B, 1), generator=g)
    def call():
        c = mind_kernels.b2i_routing(E, S, b0, mask=mask, backend="cpp", **kw)
        if mode != "fwd":
            E.grad = S.grad = None
            c.sum().backward()
    n = max(3, 2000 // B)
    call()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            call()
        best = min(best, (time.perf_counter() - t) / n)
    out[f"{mode} B={B}"] = best * 1e3
print(json.dumps({"file": mind_kernels.__file__, "ms": out}))
'''


def _time(path: str, scale: float) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(path))
    proc = subprocess.run([sys.executable, "-c", TIMER, str(scale), json.dumps(CASES)], env=env,
                          capture_output=True, text=True, check=True, cwd=os.path.abspath(path))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", default=".")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    runs = {"old": [], "new": [], "new s=20": []}
    for r in range(args.rounds):
        for name, path, scale in (("old", args.old, 1.0), ("new", args.new, 1.0), ("new s=20", args.new, 20.0)):
            res = _time(path, scale)
            if r == 0:
                print(f"{name}: {res['file']}", flush=True)
            runs[name].append(res["ms"])
    print("\n| case | old ms | new ms | new/old | new, logit_scale=20 ms |\n|---|---:|---:|---:|---:|")
    for key in runs["old"][0]:
        med = {n: statistics.median(x[key] for x in rs) for n, rs in runs.items()}
        print(f"| {key} | {med['old']:.4g} | {med['new']:.4g} | {med['new'] / med['old']:.2f} | {med['new s=20']:.4g} |")
    print(f"\nmedian over {args.rounds} alternating rounds; 1 thread; L=50, D=64, K=4, r=3, float32, cpp backend")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
