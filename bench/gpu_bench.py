"""GPU benchmark of the routing op: every backend, forward and forward+backward, vs the HBM floor.

Backends: triton, cuda (when built), each also as "-S" (every routing iteration
on S instead of Q = S^T S, ``MIND_KERNELS_ROUTE_THROUGH_S=1``), the eager
reference, ``torch.compile`` of the reference, and torch-rechub's
``CapsuleNetwork(bilinear_type=0)`` (when importable).  Case: L=50, D_in=D_out=64, K=4, r=3, softmax over interests,
random valid lengths, for B in {256, 1024, 4096} and float32 / bfloat16.

HBM floor (ROUTING.md, "Speed"):
    forward:          read E once + write the capsules once  = B L D e + B K D e bytes
    forward+backward: read E twice + write dE once            = 3 B L D e bytes
with e the element size.  "x floor" is time / (floor bytes / peak bandwidth);
peak bandwidth comes from a table by device name, else from a timed large copy.

Timing: ``triton.testing.do_bench`` (CUDA events, median and 20/80% quantiles)
on GPU; ``time.perf_counter`` medians with ``--dry-run`` on CPU, which runs the
same table / CSV logic on tiny shapes to check the script without a GPU.  A
backend that fails is reported in the table (``status``) and the run goes on.

    python bench/gpu_bench.py [--out DIR] [--budget-s 300] [--dry-run]
    python bench/gpu_bench.py --sanitize-case cuda     # tiny case for compute-sanitizer

Writes ``gpu_bench.csv`` and ``gpu_bench.log`` under ``--out`` (default: $OUT, else bench/results/);
``gpu_bench.partial.csv`` grows row by row meanwhile and is removed once the full CSV is written.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

from mind_kernels import reference  # noqa: E402

from common import git_revision  # noqa: E402  (bench/ is this script's folder)

#: Peak HBM bandwidth in bytes/s by a substring of ``torch.cuda.get_device_name()`` (first match wins).
PEAK_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM
    ("GH200", 4.0e12),
    ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),  # 40GB
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
    ("A10", 0.6e12),
    ("V100", 0.9e12),
    ("RTX 4090", 1.008e12),
]

#: "-S": the same kernels with every routing iteration on S (MIND_KERNELS_ROUTE_THROUGH_S=1), against
#: their default path through Q = S^T S for the iterations t < r.
BACKENDS = ("triton", "triton-S", "cuda", "cuda-S", "eager", "compile", "rechub")
ROUTE_THROUGH_S = "MIND_KERNELS_ROUTE_THROUGH_S"


@dataclass
class Row:
    device: str
    git_rev: str
    torch: str
    backend: str
    dtype: str
    B: int
    L: int
    D: int
    K: int
    r: int
    mode: str  # "fwd" or "fwd+bwd"
    median_ms: float = float("nan")
    p20_ms: float = float("nan")
    p80_ms: float = float("nan")
    peak_mem_mb: float = float("nan")
    floor_bytes: int = 0
    achieved_gbps: float = float("nan")
    pct_peak_bw: float = float("nan")
    x_floor: float = float("nan")
    vs_eager: float = float("nan")
    vs_compile: float = float("nan")
    max_diff_vs_eager: float = float("nan")
    status: str = "ok"


@dataclass
class Case:
    B: int
    L: int
    D: int
    K: int
    r: int
    dtype: torch.dtype
    device: str
    E: torch.Tensor = field(repr=False, default=None)
    S: torch.Tensor = field(repr=False, default=None)
    b0: torch.Tensor = field(repr=False, default=None)
    mask: torch.Tensor = field(repr=False, default=None)
    G: torch.Tensor = field(repr=False, default=None)


def make_case(B, L, D, K, r, dtype, device, seed=0) -> Case:
    """One setup factory for every backend: same E, S, b0, mask (random lengths 1..L) and gradient."""
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(B, L, D, generator=g).to(device, dtype)
    S = (torch.randn(D, D, generator=g) / D**0.5).to(device, dtype)
    b0 = torch.randn(B, K, L, generator=g).to(device)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).to(device)
    G = torch.randn(B, K, D, generator=g).to(device, dtype)
    return Case(B, L, D, K, r, dtype, device, E, S, b0, mask, G)


def peak_bandwidth(device: str) -> tuple:
    """(bytes/s, where it came from)."""
    if device != "cuda":
        return float("nan"), "n/a (CPU dry run)"
    name = torch.cuda.get_device_name()
    for key, bw in PEAK_BANDWIDTH:
        if key in name:
            return bw, f"table ({key})"
    x = torch.empty(256 * 2**20, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    from triton.testing import do_bench

    ms = do_bench(lambda: y.copy_(x), warmup=5, rep=50)
    return 2 * x.numel() * 4 / (ms * 1e-3), "measured (1 GiB copy)"


# ------------------------------------------------------------------ backends


def _setup_compile():
    import torch._dynamo

    cfg = torch._dynamo.config
    # Every (B, dtype, requires_grad) is its own static graph: 12 of them, past the default limit of 8.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, knob):
            setattr(cfg, knob, 64)


def forward_fn(backend: str, case: Case) -> Callable:
    """A function (E, S) -> capsules for ``backend``; raises with the reason when it cannot run."""
    b0, mask, r = case.b0, case.mask, case.r
    if backend == "triton":
        from mind_kernels.triton import routing as tr

        why = tr.unavailable_reason(case.device)
        if why:
            raise RuntimeError(why)
        return lambda E, S: tr.routing_triton(E, S, b0, mask, None, r, "interests")[0]
    if backend == "cuda":
        from mind_kernels import ops

        why = ops.kernel_unavailable_reason("cuda") if case.device == "cuda" else "CPU dry run"
        if why:
            raise RuntimeError(why)
        return lambda E, S: ops.routing_fused(E, S, b0, mask, None, r, "interests")[0]
    if backend == "eager":
        return lambda E, S: reference.b2i_routing_reference(E, S, b0, mask, None, r)
    if backend == "compile":
        if case.device != "cuda":
            raise RuntimeError("skipped in the CPU dry run (compiling takes minutes on 2 cores)")
        _setup_compile()
        compiled = torch.compile(reference.b2i_routing_reference, dynamic=False)
        return lambda E, S: compiled(E, S, b0, mask, None, r)
    if backend == "rechub":
        if case.dtype != torch.float32:
            # Its forward draws the routing logits with torch.randn / torch.zeros in the default dtype.
            raise RuntimeError("torch-rechub's CapsuleNetwork runs in float32 only (float32 routing logits)")
        from torch_rechub.basic.layers import CapsuleNetwork

        net = CapsuleNetwork(case.D, case.L, bilinear_type=0, interest_num=case.K, routing_times=r)
        net = net.to(case.device, case.dtype)
        with torch.no_grad():
            net.linear.weight.copy_(case.S)  # same S; its gradient lands on the module's own parameter
        fmask = mask.to(case.dtype)
        return lambda E, S: net(E, fmask)
    raise ValueError(backend)


# ------------------------------------------------------------------- timing


def time_fn(fn: Callable, device: str, grads: List[torch.Tensor], reps: int) -> tuple:
    """(median, p20, p80) in ms."""
    if device == "cuda":
        from triton.testing import do_bench

        q = do_bench(fn, warmup=10, rep=reps, quantiles=[0.5, 0.2, 0.8], grad_to_none=grads or None)
        return tuple(float(v) for v in q)
    fn()  # warm-up
    samples = []
    for _ in range(5):
        for t in grads:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return statistics.median(samples), samples[1], samples[-2]


def floor_bytes(case: Case, mode: str) -> int:
    e = torch.finfo(case.dtype).bits // 8
    if mode == "fwd":
        return case.B * case.L * case.D * e + case.B * case.K * case.D * e
    return 3 * case.B * case.L * case.D * e


def measure(backend: str, case: Case, mode: str, base: Row, peak_bw: float, reps: int) -> Row:
    """One row; a "-S" backend runs with MIND_KERNELS_ROUTE_THROUGH_S=1 (read by the launchers per call)."""
    through_s = backend.endswith("-S")
    if through_s:
        os.environ[ROUTE_THROUGH_S] = "1"
    try:
        return _measure(backend, case, mode, base, peak_bw, reps)
    finally:
        if through_s:
            os.environ.pop(ROUTE_THROUGH_S, None)


def _measure(backend: str, case: Case, mode: str, base: Row, peak_bw: float, reps: int) -> Row:
    row = Row(**{**asdict(base), "backend": backend, "mode": mode})
    row.floor_bytes = floor_bytes(case, mode)
    try:
        fwd = forward_fn(backend.removesuffix("-S"), case)
        E = case.E.detach().clone().requires_grad_(mode != "fwd")
        S = case.S.detach().clone().requires_grad_(mode != "fwd")
        if mode == "fwd":
            def fn():
                with torch.no_grad():
                    return fwd(E, S)
            grads = []
        else:
            def fn():
                fwd(E, S).backward(case.G)
            grads = [E, S]
        fn()  # compile / JIT outside the timed region
        if case.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            row.peak_mem_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
        if mode == "fwd" and backend != "rechub":  # rechub draws its own random logits: not comparable
            with torch.no_grad():
                ref = reference.b2i_routing_reference(E.float(), S.float(), case.b0, case.mask, None, case.r)
                row.max_diff_vs_eager = (fn().float() - ref).abs().max().item()
        row.median_ms, row.p20_ms, row.p80_ms = time_fn(fn, case.device, grads, reps)
        seconds = row.median_ms * 1e-3
        row.achieved_gbps = row.floor_bytes / seconds / 1e9
        if peak_bw == peak_bw:  # not NaN
            row.pct_peak_bw = 100 * row.floor_bytes / seconds / peak_bw
            row.x_floor = seconds / (row.floor_bytes / peak_bw)
    except Exception as exc:  # one failing backend must not stop the benchmark
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        row.status = f"failed: {type(exc).__name__}: {msg[:120]}"
    return row


# ------------------------------------------------------------------- report


def fmt(v, spec):
    """format(v, spec), or a right-aligned "-" of the same width for NaN (not measured)."""
    if v == v:
        return format(v, spec)
    width = spec.split(".")[0]
    return "-".rjust(int(width)) if width.isdigit() else "-"


def table(rows: List[Row]) -> str:
    head = (f"{'backend':<8} {'dtype':<9} {'B':>5} {'mode':<8} {'median ms':>10} {'p20-p80 ms':>17} "
            f"{'GB/s':>8} {'%peak':>6} {'x floor':>8} {'vs eager':>9} {'vs compile':>10} {'peak MB':>8} "
            f"{'diff':>8}  status")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.backend:<8} {r.dtype:<9} {r.B:>5} {r.mode:<8} {fmt(r.median_ms, '10.4f')} "
            f"{fmt(r.p20_ms, '8.4f')}-{fmt(r.p80_ms, '8.4f')} {fmt(r.achieved_gbps, '8.1f')} "
            f"{fmt(r.pct_peak_bw, '6.1f')} {fmt(r.x_floor, '8.2f')} {fmt(r.vs_eager, '9.2f')} "
            f"{fmt(r.vs_compile, '10.2f')} {fmt(r.peak_mem_mb, '8.1f')} {fmt(r.max_diff_vs_eager, '8.1e')}  {r.status}"
        )
    return "\n".join(lines)


def add_ratios(rows: List[Row]) -> None:
    """vs eager / vs compile: how many times faster than those backends on the same case."""
    by_case = {}
    for r in rows:
        by_case.setdefault((r.dtype, r.B, r.mode), {})[r.backend] = r
    for group in by_case.values():
        for r in group.values():
            for other, attr in (("eager", "vs_eager"), ("compile", "vs_compile")):
                o = group.get(other)
                if o is not None and o.status == "ok" and r.status == "ok":
                    setattr(r, attr, o.median_ms / r.median_ms)


def sanitize_case(backend: str, device: str = "cuda") -> None:
    """A tiny odd-shaped forward+backward (for compute-sanitizer): checks agreement with the float64 reference."""
    case = make_case(5, 7, 3, 2, 3, torch.float32, device, seed=1)
    case.S = torch.randn(6, 3, device=device)
    case.G = torch.randn(5, 2, 6, device=device)
    case.mask[0] = False
    fwd = forward_fn(backend, case)
    E, S = case.E.clone().requires_grad_(), case.S.clone().requires_grad_()
    out = fwd(E, S)
    out.backward(case.G)
    if device == "cuda":
        torch.cuda.synchronize()
    Er, Sr = case.E.double().requires_grad_(), case.S.double().requires_grad_()
    ref = reference.b2i_routing_reference(Er, Sr, case.b0.double(), case.mask, None, 3)
    ref.backward(case.G.double())
    for name, x, y in (("capsules", out, ref), ("dE", E.grad, Er.grad), ("dS", S.grad, Sr.grad)):
        err = (x.double() - y).abs().max().item()
        print(f"sanitize-case {backend} {name}: max abs diff vs float64 reference {err:.2e}")
        assert err < 1e-4, name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny batches: checks the script without a GPU")
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--budget-s", type=float, default=330.0, help="stop starting measurements after this long")
    p.add_argument("--rep-ms", type=int, default=60, help="do_bench repetition time per measurement")
    p.add_argument("--sanitize-case", choices=["cuda", "triton"], default=None)
    args = p.parse_args(argv)

    if args.sanitize_case:
        sanitize_case(args.sanitize_case, "cpu" if args.dry_run else "cuda")
        return 0

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    # Largest first: B=4096 fp32 is the case ROUTING.md sets goals for, so a spent budget skips the small ones.
    batches = args.batches or ([16, 4] if args.dry_run else [4096, 1024, 256])
    L, D, K, r = (50, 64, 4, 3)
    os.makedirs(args.out, exist_ok=True)
    dev_name = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    peak_bw, peak_src = peak_bandwidth(device)
    rev = git_revision()
    start = time.monotonic()
    rows: List[Row] = []
    partial_file = open(os.path.join(args.out, "gpu_bench.partial.csv"), "w", newline="")
    partial = csv.DictWriter(partial_file, fieldnames=[f.name for f in Row.__dataclass_fields__.values()])
    partial.writeheader()
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for B in batches:
            case = make_case(B, L, D, K, r, dtype, device)
            base = Row(dev_name, rev, torch.__version__, "", dtype_name, B, L, D, K, r, "")
            for mode in args.modes:
                for backend in args.backends:
                    if time.monotonic() - start > args.budget_s:
                        row = Row(**{**asdict(base), "backend": backend, "mode": mode})
                        row.status = f"skipped: time budget of {args.budget_s:.0f}s spent"
                    else:
                        row = measure(backend, case, mode, base, peak_bw, args.rep_ms)
                    rows.append(row)
                    partial.writerow(asdict(row))  # survives a kill by the caller's timeout
                    partial_file.flush()
                    print(f"[{time.monotonic() - start:6.1f}s] {backend:<8} {dtype_name:<9} B={B:<5} {mode:<8} "
                          f"{fmt(row.median_ms, '.4f')} ms  {row.status}", flush=True)
            del case
            if device == "cuda":
                torch.cuda.empty_cache()
    partial_file.close()
    add_ratios(rows)

    header = (f"device: {dev_name}; peak bandwidth {fmt(peak_bw / 1e9, '.0f')} GB/s ({peak_src}); torch "
              f"{torch.__version__}; git {rev}; L={L} D={D} K={K} r={r}, softmax over interests\n"
              "HBM floor: fwd = read E + write capsules; fwd+bwd = read E twice + write dE. "
              "x floor = time / (floor bytes / peak); vs eager / vs compile = speedup; diff = max |c - eager fp32|")
    report = header + "\n\n" + table(rows)
    print("\n" + report)
    csv_path = os.path.join(args.out, "gpu_bench.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()))
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
    with open(os.path.join(args.out, "gpu_bench.log"), "w") as f:
        f.write(report + "\n")
    # The complete CSV replaces the partial one (the device tool brings back at most 8 files).
    os.remove(os.path.join(args.out, "gpu_bench.partial.csv"))
    print(f"\nwrote {csv_path} and gpu_bench.log ({time.monotonic() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
