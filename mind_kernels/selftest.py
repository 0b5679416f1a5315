"""``python -m mind_kernels.selftest``: check the built fused backends on this machine against the reference.

On each device present it runs every built fused backend (cpp on CPU; cuda and triton on a CUDA device;
triton on CPU only under ``TRITON_INTERPRET=1``, on tiny shapes) through the public API over a small grid:
the paper shape (L=50, D=64, K=4, r=3) and odd shapes, float32 / float16 / bfloat16, behaviour masks
(with an empty user), jagged batches (values + offsets, ``b2i_routing_jagged``), the dynamic interest mask and random interest masks (with a user whose interests
are all inactive), both softmax axes, logit_scale 1 and 20, B=0, B=1, forward (capsules, coupling) and
gradients (dE, dS).  Each result is compared with the reference run in float64 on the same inputs, with
ROUTING.md's tolerances (:mod:`mind_kernels.checks`).  It prints a pass/fail table and one timing line per
fused backend against the eager reference at the paper shape, and exits 1 on any failure.

    python -m mind_kernels.selftest                 # every device and built backend (under a minute on a GPU)
    python -m mind_kernels.selftest --quick         # a smaller grid (CI)
    python -m mind_kernels.selftest --device cuda --backend triton --json selftest.json
    TRITON_INTERPRET=1 python -m mind_kernels.selftest --device cpu --backend triton   # the interpreter

Exit status: 0 when every row passed, 1 when any failed, 2 when nothing that was asked for can run here.

:data:`VERIFIED` (defined in :mod:`mind_kernels.verified`) records which fused backends have passed on
real hardware, with the device and date; ``python -m mind_kernels.info`` prints it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .verified import VERIFIED  # the record lives in a leaf module (the dispatcher reads it); kept here by name

#: Fused backends to try per device type (triton on CPU only under TRITON_INTERPRET=1).
DEVICE_BACKENDS = {"cpu": ("cpp", "triton"), "cuda": ("cuda", "triton")}
PAPER = (16, 50, 64, 64, 4)  # B, L, D_in, D_out, K: B a multiple of 16 like the timing's, so Triton compiles once
TINY = (3, 5, 3, 6, 3)
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPE_NAMES = {F32: "float32", F16: "float16", BF16: "bfloat16", torch.float64: "float64"}


@dataclass(frozen=True)
class Case:
    label: str
    B: int
    L: int
    D_in: int
    D_out: int
    K: int
    dtype: torch.dtype
    over: str = "interests"
    scale: float = 1.0
    masks: bool = True
    imask: Optional[str] = "dynamic"  # "dynamic" (K'_u from the history length), "random", or None
    batched_logits: bool = True
    r: int = 3
    long_reductions: bool = False  # float32 dS over B * L rows: held to the same-dtype rule (mind_kernels.checks)
    jagged: bool = False  # the same users as values + offsets through b2i_routing_jagged (w is then (N, K))


def _interpreting(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu"


def grid(backend: str, device: str, quick: bool = False) -> List[Case]:
    """The cases one backend runs on one device type."""
    cases: List[Case] = []
    if _interpreting(backend, device):  # the Triton interpreter: tiny shapes, no bfloat16 (see SKIPPED_NOTES)
        T = TINY
        cases += [Case("tiny", *T, F32, over, s, imask="random") for over in ("interests", "behaviors")
                  for s in ((1.0,) if quick else (1.0, 20.0))]
        cases += [Case("tiny", *T, F16, over, imask="random") for over in (("interests",) if quick else
                                                                          ("interests", "behaviors"))]
        if quick:
            cases.append(Case("tiny, s=20", *T, F32, "behaviors", 20.0, imask="random"))
        else:
            cases += [Case("L=D=K=1", 4, 1, 1, 1, 1, F32, imask="random"),
                      Case("through S, K=5", 4, 7, 12, 5, 5, F32, "behaviors", imask="random")]
        cases += [Case("B=1", 1, 5, 3, 6, 3, F32), Case("B=0", 0, 5, 3, 6, 3, F32)]
        cases += [Case("jagged tiny", *T, F32, over, 20.0, imask="random", jagged=True)
                  for over in (("behaviors",) if quick else ("interests", "behaviors"))]
        return cases

    P = PAPER
    for dtype in (F32, F16, BF16):
        for over in ("interests", "behaviors"):
            for s in (1.0, 20.0):
                if quick and s != 1.0 and dtype != F32:
                    continue
                cases.append(Case("paper", *P, dtype, over, s))
    odd = [("odd, through Q", 5, 37, 3, 5, 3), ("odd, through S, K=5", 4, 11, 12, 5, 5), ("L=D=K=1", 4, 1, 1, 1, 1)]
    if quick:
        cases += [Case(lbl, *shape, F32, over, s, imask="random")
                  for (lbl, *shape), over, s in zip(odd, ("interests", "behaviors", "interests"), (20.0, 1.0, 1.0))]
    else:
        cases += [Case("paper, no masks, shared b0", *P, F32, over, masks=False, imask=None, batched_logits=False)
                  for over in ("interests", "behaviors")]
        for lbl, *shape in odd:
            cases += [Case(lbl, *shape, F32, over, s, imask="random") for over in ("interests", "behaviors")
                      for s in (1.0, 20.0)]
            cases += [Case(lbl, *shape, F16, "interests", imask="random"),
                      Case(lbl, *shape, BF16, "behaviors", imask="random")]
        # More users than thread blocks / programs (grid-stride loops, several dS partials per block).
        many = 8192 if device == "cuda" else 2048
        cases += [Case("many users", many, *P[1:], F32, over, long_reductions=True)
                  for over in ("interests", "behaviors")]
    cases.append(Case("B=1", 1, *P[1:], F32, "behaviors" if quick else "interests"))
    if not quick:
        cases += [Case("B=1", 1, *P[1:], F32, "behaviors"), Case("B=1", 1, *P[1:], BF16, "interests")]
    cases.append(Case("B=0", 0, *P[1:], F32))
    # Jagged batches: the same users as values + offsets (mind_kernels.jagged), w compared as (N, K).
    cases += [Case("jagged", *P, F32, "interests", jagged=True), Case("jagged", *P, F32, "behaviors", 20.0, jagged=True)]
    if not quick:
        cases += [Case("jagged", *P, BF16, "interests", 20.0, jagged=True),
                  Case("jagged, odd, through S", 4, 11, 12, 5, 5, F32, "behaviors", imask="random", jagged=True),
                  Case("jagged B=1", 1, *P[1:], F32, jagged=True), Case("jagged B=0", 0, *P[1:], F32, jagged=True)]
    return cases


SKIPPED_NOTES = {
    ("triton", "cpu"): "bfloat16 is not run under the interpreter: it rounds float32 -> bfloat16 toward zero "
                       "(the compiled kernels round to nearest even), doubling the output's rounding error",
}


def make_inputs(case: Case, device: str, seed: int = 0):
    """(E, S, b0, mask, interest_mask, G) on ``device``.

    With masks, histories have random lengths with holes, user 0 has no behaviour, and (random interest
    masks, B > 2) user 1 has every interest inactive.
    """
    from .layers import dynamic_interest_mask

    B, L, D_in, D_out, K = case.B, case.L, case.D_in, case.D_out, case.K
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(B, L, D_in, generator=g).to(case.dtype)
    S = (torch.randn(D_out, D_in, generator=g) / D_in**0.5).to(case.dtype)
    b0 = torch.randn(B, K, L, generator=g) if case.batched_logits else torch.randn(K, L, generator=g)
    mask = interest_mask = None
    if case.masks:
        lengths = torch.randint(1, L + 1, (B,), generator=g)
        mask = (torch.arange(L)[None, :] < lengths[:, None]) & (torch.rand(B, L, generator=g) > 0.2)
        mask[:, 0] = lengths > 0  # every user but user 0 keeps a behaviour
        if B > 1:
            mask[0] = False
    if case.imask == "dynamic":
        interest_mask = dynamic_interest_mask(mask if mask is not None else torch.ones(B, L, dtype=torch.bool), K)
    elif case.imask == "random":
        interest_mask = torch.rand(B, K, generator=g) > 0.4
        interest_mask[torch.arange(B), torch.randint(0, K, (B,), generator=g)] = True  # at least one each ...
        if B > 2:  # ... but user 1
            interest_mask[1] = False
    G = torch.randn(B, K, D_out, generator=g).to(case.dtype)
    return [None if t is None else t.to(device) for t in (E, S, b0, mask, interest_mask, G)]


def _api(backend: str):
    from .api import b2i_routing

    def fn(E, S, b0, mask, interest_mask, r, over, logit_scale=1.0):
        return b2i_routing(E, S, b0, mask, interest_mask, r, over, logit_scale=logit_scale, return_weights=True,
                           backend=backend)

    return fn


def _api_jagged(backend: str):
    """``_api``'s signature for a jagged call: E is values (N, D_in) and the mask slot holds the offsets."""
    from .api import b2i_routing_jagged

    def fn(V, S, b0, offsets, interest_mask, r, over, logit_scale=1.0):
        return b2i_routing_jagged(V, offsets, S, b0, interest_mask, r, over, logit_scale=logit_scale,
                                  return_weights=True, backend=backend)

    return fn


def _as_jagged(E, mask):
    """(values, offsets) of the users of ``make_inputs`` with each one's valid count kept as a prefix."""
    from .jagged import jagged_from_padded

    B, L, _ = E.shape
    n = (mask != 0).sum(dim=1) if mask is not None else torch.full((B,), L, device=E.device)
    return jagged_from_padded(E, torch.arange(L, device=E.device)[None, :] < n[:, None])


@dataclass
class Row:
    backend: str
    device: str
    case: str
    shape: str
    dtype: str
    over: str
    scale: float
    errors: Dict[str, float]  # tensor -> max |error| against the float64 reference
    used: float  # max fraction of the allowed error over the four tensors (pass: <= 1)
    ok: bool
    note: str = ""
    seconds: float = 0.0


def run_case(backend: str, device: str, case: Case, seed: int = 0) -> Row:
    from .checks import HALF_DTYPES, compare, run_op

    B, L, D_in, D_out, K = case.B, case.L, case.D_in, case.D_out, case.K
    row = Row(backend, device, case.label, f"{B}x{L}x{D_in}->{D_out} K={K}", DTYPE_NAMES[case.dtype], case.over,
              case.scale, {}, math.inf, False)
    start = time.perf_counter()
    try:
        E, S, b0, mask, im, G = make_inputs(case, device, seed)
        api = _api
        if case.jagged:
            E, mask = _as_jagged(E, mask)  # mask now holds the offsets
            api = _api_jagged
        args = (mask, im, G, case.r, case.over)
        got = run_op(api(backend), E, S, b0, *args, logit_scale=case.scale)
        oracle = run_op(api("reference"), E.double(), S.double(), b0.double(), mask, im, G.double(), case.r,
                        case.over, logit_scale=case.scale)
        same = None
        if case.dtype in HALF_DTYPES or case.long_reductions:
            same = run_op(api("reference"), E, S, b0, *args, logit_scale=case.scale)
        errs = compare(got, oracle, same, case.dtype)
        row.errors = {e.name: e.max_err for e in errs}
        row.used = max(e.used for e in errs)
        notes = [f"{e.name}: {e.note}" for e in errs if e.note]
        if B > 0 and not (oracle[0] != 0).any():
            notes.append("degenerate case: the reference's capsules are all zero")
        c, w, dE, dS = got
        want = {"capsules": (c.dtype, case.dtype), "coupling": (w.dtype, F32), "dE": (dE.dtype, case.dtype),
                "dS": (dS.dtype, S.dtype)}
        notes += [f"{n} is {DTYPE_NAMES.get(a, a)}, not {DTYPE_NAMES.get(b, b)}" for n, (a, b) in want.items() if a != b]
        if case.jagged:
            if B > 1 and int(mask[1]) == 0 and not (c[0] == 0).all():
                notes.append("the user without behaviours did not get zeros")
        elif mask is not None and B > 1 and not ((c[0] == 0).all() and (w[0] == 0).all() and (dE[0] == 0).all()):
            notes.append("the user without behaviours did not get zeros")
        if case.imask == "random" and B > 2 and not ((c[1] == 0).all() and (case.jagged or (w[1] == 0).all())):
            notes.append("the user without active interests did not get zeros")
        if device == "cuda":
            torch.cuda.synchronize()
        row.note = "; ".join(notes)
        row.ok = row.used <= 1.0 and not notes
    except Exception as exc:  # a kernel error is a failed row, not a crash of the whole check
        row.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        row.ok = False
    row.seconds = time.perf_counter() - start
    return row


# ---------------------------------------------------------------------------------------------- timing


def _median_ms(fn, device: str, reps: int) -> float:
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(2 if device == "cuda" else 1):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def time_backend(backend: str, device: str, quick: bool) -> Dict[str, object]:
    """Forward and forward+backward at the paper shape, float32, against the eager reference (median ms)."""
    B = 4096 if device == "cuda" else 1024
    case = Case("timing", B, *PAPER[1:], F32)
    E, S, b0, mask, im, G = make_inputs(case, device)
    reps = (20 if quick else 50) if device == "cuda" else (3 if quick else 10)
    result: Dict[str, object] = {"backend": backend, "device": device, "shape": f"B={B} L=50 D=64 K=4 r=3 float32"}
    for name in (backend, "reference"):
        fn = _api(name)
        with torch.no_grad():
            result[f"{name}_forward_ms"] = _median_ms(lambda: fn(E, S, b0, mask, im, 3, "interests"), device, reps)
        Eg, Sg = E.clone().requires_grad_(), S.clone().requires_grad_()

        def fwd_bwd():
            Eg.grad = Sg.grad = None
            fn(Eg, Sg, b0, mask, im, 3, "interests")[0].backward(G)

        result[f"{name}_fwd_bwd_ms"] = _median_ms(fwd_bwd, device, reps)
    return result


def _timing_line(t: Dict[str, object]) -> str:
    b = t["backend"]
    f, rf = t[f"{b}_forward_ms"], t["reference_forward_ms"]
    fb, rfb = t[f"{b}_fwd_bwd_ms"], t["reference_fwd_bwd_ms"]
    return (f"timing {b:<6} {t['device']:<4} {t['shape']}: forward {f:.3f} ms vs eager reference {rf:.3f} ms "
            f"({rf / f:.1f}x); forward+backward {fb:.3f} ms vs {rfb:.3f} ms ({rfb / fb:.1f}x)")


# ---------------------------------------------------------------------------------------------- report


def _fmt_err(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.1e}"


def format_table(rows: Sequence[Row]) -> str:
    head = (f"{'backend':<7} {'dev':<4} {'case':<27} {'shape':<20} {'dtype':<8} {'softmax':<9} {'s':>3} "
            f"{'capsules':>8} {'coupling':>8} {'dE':>8} {'dS':>8} {'tol used':>8}  result")
    lines = [head, "-" * len(head)]
    for r in rows:
        errs = [_fmt_err(r.errors[n]) if n in r.errors else "-" for n in ("capsules", "coupling", "dE", "dS")]
        used = "-" if math.isinf(r.used) and not r.errors else ("inf" if math.isinf(r.used) else f"{100 * r.used:.0f}%")
        line = (f"{r.backend:<7} {r.device:<4} {r.case:<27} {r.shape:<20} {r.dtype:<8} {r.over:<9} {r.scale:>3g} "
                f"{errs[0]:>8} {errs[1]:>8} {errs[2]:>8} {errs[3]:>8} {used:>8}  {'PASS' if r.ok else 'FAIL'}")
        if r.note:
            line += f"  ({r.note})"
        lines.append(line)
    return "\n".join(lines)


def _finite(row: dict) -> dict:
    """A row for JSON: an infinite error (non-finite output, wrong shape, exception) becomes null."""
    fix = lambda x: None if isinstance(x, float) and not math.isfinite(x) else x  # noqa: E731
    return {k: ({n: fix(v) for n, v in x.items()} if isinstance(x, dict) else fix(x)) for k, x in row.items()}


def _devices(requested: str) -> List[str]:
    if requested == "auto":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [requested]


def _unavailable(backend: str, device: str) -> Optional[str]:
    from .dispatch import BACKENDS

    b = BACKENDS[backend]
    if device not in b.devices:
        return f"{backend} does not run on {device} tensors"
    return b.unavailable(device)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mind_kernels.selftest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="device to test (default: every device present)")
    parser.add_argument("--backend", choices=("all", "cpp", "cuda", "triton"), default="all",
                        help="fused backend to test (default: every one built for the devices)")
    parser.add_argument("--quick", action="store_true", help="a smaller grid and fewer timing repetitions (CI)")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing lines")
    parser.add_argument("--json", metavar="PATH", help="also write the rows, timings and versions as JSON")
    args = parser.parse_args(argv)

    from . import dispatch

    logged = dispatch._gpu_note_logged
    dispatch._gpu_note_logged = True  # this run is the check the first-GPU-call note points to: no need to log it
    try:
        return _run(args)
    finally:
        dispatch._gpu_note_logged = logged


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    date = datetime.date.today().isoformat()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    print(f"mind_kernels self-test, {date}: torch {torch.__version__}, {platform.machine()} CPU"
          + (f", GPU {gpu}" if gpu else ", no GPU") + (", TRITON_INTERPRET=1" if os.environ.get("TRITON_INTERPRET") == "1"
                                                        else "") + (" (quick)" if args.quick else ""))

    plan, skipped = [], []
    for device in _devices(args.device):
        for backend in DEVICE_BACKENDS[device]:
            if args.backend not in ("all", backend):
                continue
            why = _unavailable(backend, device)
            if why is None:
                plan.append((backend, device))
            elif args.backend != "all" or not (backend == "triton" and device == "cpu"):
                skipped.append((backend, device, why))
    for backend, device, why in skipped:
        print(f"skipped {backend} on {device}: {why}")
    if not plan:
        print("nothing to test: no fused backend asked for is built and runnable here "
              "(the reference backend serves every call)")
        return 2 if args.backend != "all" or args.device != "auto" else 0

    rows: List[Row] = []
    timings: List[Dict[str, object]] = []
    for backend, device in plan:
        note = SKIPPED_NOTES.get((backend, device))
        if note:
            print(f"note: {backend} on {device}: {note}")
        rows += [run_case(backend, device, case, seed=i) for i, case in enumerate(grid(backend, device, args.quick))]
    print()
    print("Errors: max |fused - reference in float64| per tensor. 'tol used': the largest fraction of ROUTING.md's")
    print("allowed error over the four (float32: 1e-5 + 1e-4 |ref|; float16/bfloat16: that plus 2x the error of")
    print("the reference run in the same dtype, as for 'many users' whose dS sums B*L rows); above 100% fails.")
    print(format_table(rows))
    print()
    if not args.no_timing:
        for backend, device in plan:
            if _interpreting(backend, device):
                print(f"timing {backend:<6} {device:<4} not timed (the Triton interpreter measures nothing useful)")
                continue
            try:
                t = time_backend(backend, device, args.quick)
                timings.append(t)
                print(_timing_line(t))
            except Exception as exc:
                print(f"timing {backend:<6} {device:<4} failed: {type(exc).__name__}: {exc}")
    failed = [r for r in rows if not r.ok]
    elapsed = time.perf_counter() - start
    print()
    print("verified on real hardware (mind_kernels.verified.VERIFIED):")
    for name, where in VERIFIED.items():
        print(f"  {name:<7} {'; '.join(where) if where else 'not yet'}")
    tested = ", ".join(f"{b} on {d}" for b, d in plan)
    if failed:
        print(f"self-test FAILED: {len(failed)} of {len(rows)} cases ({tested}) in {elapsed:.1f} s")
    else:
        print(f"self-test passed: {len(rows)} cases ({tested}) in {elapsed:.1f} s")
        for b, d in plan:
            if d == "cuda" and not any(gpu in w for w in VERIFIED.get(b, [])):
                print(f"  to record it: add \"{gpu}, {date}, python -m mind_kernels.selftest\" to VERIFIED[{b!r}] "
                      "(mind_kernels/verified.py)")
    if args.json:
        report = {
            "date": date, "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu,
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1", "quick": args.quick,
            "tested": [{"backend": b, "device": d} for b, d in plan],
            "skipped": [{"backend": b, "device": d, "why": w} for b, d, w in skipped],
            "rows": [_finite(asdict(r)) for r in rows], "timings": timings, "passed": not failed,
            "seconds": elapsed, "verified": VERIFIED,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
