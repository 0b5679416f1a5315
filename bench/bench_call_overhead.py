"""Where a small CPU call's time goes: the public API against the raw compiled op.

    python bench/bench_call_overhead.py [--batches 1 16] [--number 2000]

For each B (the inputs of ``cases.inputs``: L=50, D=64, K=4, r=3, float32, per-user
logits, random valid lengths; "interests" mode with the dynamic interest mask), times,
as the best of 5 repeats of ``--number`` calls:

* ``api``: ``mind_kernels.b2i_routing`` (validation, dispatch, then the op);
* ``op``: ``torch.ops.mind_kernels.routing_forward`` called directly (with the
  Python autograd kernel that ``register_autograd`` puts in front of it);
* both again under ``torch.inference_mode()``, where the op runs with no autograd layer.

``api - op`` under inference mode is the Python layer; ``op`` at B=1 under
inference mode is about the op's fixed cost plus one user's routing.
"""

from __future__ import annotations

import argparse
import os
import sys
import timeit

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/, when imported from elsewhere

import mind_kernels  # noqa: E402

from cases import Case, inputs  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--number", type=int, default=2000)
    args = ap.parse_args(argv)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; microseconds per call (best of 5)")
    print(f"{'B':>5} {'api':>8} {'op':>8} {'api (inf)':>10} {'op (inf)':>9} {'python layer (inf)':>19}")
    for B in args.batches:
        E, S, b0, mask = inputs(Case(B))
        imask = mind_kernels.dynamic_interest_mask(mask, Case(B).interests)

        def api():
            return mind_kernels.b2i_routing(E, S, b0, mask, imask)

        def op():
            return torch.ops.mind_kernels.routing_forward(E, S, b0, mask, imask, Case(B).iters, False)

        def best(fn):
            fn()
            return min(timeit.repeat(fn, number=args.number, repeat=5)) / args.number * 1e6

        t_api, t_op = best(api), best(op)
        with torch.inference_mode():
            i_api, i_op = best(api), best(op)
        print(f"{B:>5} {t_api:8.1f} {t_op:8.1f} {i_api:10.1f} {i_op:9.1f} {i_api - i_op:19.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
