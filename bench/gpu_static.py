"""Static resources of the GPU kernels for Hopper (sm_90), read without a GPU.

What the compilers report for every kernel of both GPU backends: registers per
thread, the local-memory stack and the local stores/loads (STL/LDL) in the SASS
(register spills and local arrays live there), static shared memory, and how
many warps per SM the registers alone allow.  These bound
occupancy before anything runs; timings need ``bench/gpu_check.sh`` on a GPU.

* CUDA C++: ``cuobjdump --dump-resource-usage`` on the built extension
  (``mind_kernels/_C*.so``), its sm_90 entries (the build's real flags).
* Triton: each kernel compiled for sm_90 at the paper shape (L=50, D=64, K=4)
  with ``triton.compile``, the same way ``tests/test_triton.py`` does, and the
  cubin read by the same cuobjdump (the one Triton bundles).

It also prints the forward's multiply-add count per user, through S and
through Q = S^T S, and the arithmetic intensity against the HBM floor bytes
(ROUTING.md): FLOPs per byte of "read E once, write the capsules once".

    python bench/gpu_static.py [--out DIR]      # writes gpu_static.csv and gpu_static.md
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)  # run from a checkout

from common import git_revision, write_rows_csv  # noqa: E402  (bench/ is this script's folder)

#: Paper shape of ROUTING.md's speed goals.
L, D, K, R = 50, 64, 4, 3
#: Spec-sheet figures of the goal's device (NVIDIA H200 SXM): fp32 non-tensor FLOP/s and HBM bytes/s.
H200_FP32_FLOPS, H200_HBM_BYTES_PER_S = 67e12, 4.8e12
#: Batch of ROUTING.md's GPU goals.
GOAL_BATCH = 4096
#: sm_90 limits: 64K registers and 2048 threads per SM; registers are allocated per warp in units of 256.
SM_REGISTERS, SM_MAX_THREADS, REG_UNIT = 65536, 2048, 256


def cuobjdump() -> str:
    """The cuobjdump that ships with Triton (the CUDA toolkit here has none)."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise SystemExit(f"cuobjdump not found at {path}")
    return path


def _functions(cuobjdump_args: list, arch: str) -> dict:
    """{function name: its lines} of the ``arch`` sections of one cuobjdump listing."""
    out = subprocess.run([cuobjdump(), *cuobjdump_args], capture_output=True, text=True, check=True)
    functions, current_arch, name = {}, arch, None
    for line in out.stdout.splitlines():
        m = re.match(r"\s*arch = (\S+)", line)
        if m:
            current_arch, name = m.group(1), None
            continue
        m = re.match(r"\s*Function\s*:?\s*(\S+?):?\s*$", line)  # " Function NAME:" or "Function : NAME"
        if m:
            name = m.group(1) if current_arch == arch else None
            if name:
                functions[name] = []
            continue
        if name:
            functions[name].append(line)
    return functions


def resource_usage(binary: str, arch: str = "sm_90") -> dict:
    """{function name: {REG, STACK, SHARED, LOCAL}} for the ``arch`` entries of a cubin or fat binary."""
    usage = {}
    for name, lines in _functions(["--dump-resource-usage", binary], arch).items():
        for line in lines:
            if "REG:" in line:
                fields = dict(re.findall(r"(\w+):(\d+)", line))
                usage[name] = {k: int(fields.get(k, 0)) for k in ("REG", "STACK", "SHARED", "LOCAL")}
                break
    return usage


def local_memory_ops(binary: str, arch: str = "sm_90") -> dict:
    """{function name: (STL count, LDL count)}: local-memory stores and loads in the ``arch`` SASS.

    Register spills and local arrays both live in local memory; these are static instruction
    counts (how many such instructions the code has, not how often they run).
    """
    counts = {}
    for name, lines in _functions(["-sass", binary], arch).items():
        stl = sum(1 for line in lines if re.search(r"\bSTL(\.\S+)?\s", line))
        ldl = sum(1 for line in lines if re.search(r"\bLDL(\.\S+)?\s", line))
        counts[name] = (stl, ldl)
    return counts


def warps_by_registers(regs: int) -> int:
    """Resident warps per SM that the register file allows (block granularity ignored)."""
    per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT
    return min(SM_MAX_THREADS // 32, SM_REGISTERS // per_warp)


def mangled_type(code: str) -> tuple:
    """(name, rest) for the first type of an Itanium-mangled template argument list."""
    for prefix, name in (("N3c108BFloat16E", "bf16"), ("N3c104HalfE", "fp16"), ("f", "fp32"), ("d", "fp64")):
        if code.startswith(prefix):
            return name, code[len(prefix):]
    return "?", code


def cuda_rows() -> list:
    libs = glob.glob(os.path.join(REPO, "mind_kernels", "_C*.so"))
    if not libs:
        raise SystemExit("mind_kernels/_C*.so not found: build the package first (pip install -e .)")
    rows = []
    local_ops = local_memory_ops(libs[0])
    for name, u in sorted(resource_usage(libs[0]).items()):
        m = re.search(r"\d(routing_forward_kernel|routing_backward_kernel|gram_kernel|reduce_partials_kernel)I", name)
        if not m:
            continue
        kernel = m.group(1)
        args = name.split(kernel, 1)[1][1:]  # the mangled template arguments after "I"
        first, rest = mangled_type(args)
        dtype = f"{first}->{mangled_type(rest)[0]}" if kernel == "reduce_partials_kernel" else first
        stl, ldl = local_ops.get(name, ("?", "?"))
        rows.append(dict(backend="cuda", kernel=kernel, dtype=dtype, regs=u["REG"], stack=u["STACK"],
                         local_stores=stl, local_loads=ldl, static_shared=u["SHARED"], threads="per shape",
                         warps_per_sm_by_regs=warps_by_registers(u["REG"])))
    return rows


def triton_rows() -> list:
    from mind_kernels.triton import routing as triton_routing

    rows = []
    for dtype in ("fp32", "bf16"):
        for label, compiled, num_warps in triton_routing.compile_for_sm90(dtype):
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                (u,) = resource_usage(f.name).values()
                ((stl, ldl),) = local_memory_ops(f.name).values()
            rows.append(dict(backend="triton", kernel=label, dtype=dtype, regs=u["REG"], stack=u["STACK"],
                             local_stores=stl, local_loads=ldl, static_shared=u["SHARED"], threads=32 * num_warps,
                             warps_per_sm_by_regs=warps_by_registers(u["REG"])))
    return rows


def forward_madds(through_q: bool, L=L, D_in=D, D_out=D, K=K, r=R) -> int:
    """Multiply-adds of one user's forward (the reassociated math of the fused kernels)."""
    aggregate = r * K * L * D_in  # ebar_j = sum_i w_ij e_i, every iteration
    update = (r - 1) * K * L * D_in  # b_ij += e_i . v_j, t < r
    final_z = K * D_in * D_out  # z_j = S ebar_j of the last iteration
    if through_q:
        middle = (r - 1) * K * D_in * D_in  # y_j = Q ebar_j, t < r
    else:
        middle = (r - 1) * 2 * K * D_in * D_out  # z_j = S ebar_j and v_j = S^T c_j, t < r
    return aggregate + update + final_z + middle


def markdown(rows: list, lines: list) -> str:
    head = ("| backend | kernel | dtype | registers / thread | stack bytes | STL / LDL in SASS | static shared bytes | "
            "threads / block | warps / SM the registers allow |")
    out = [head, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['backend']} | {r['kernel']} | {r['dtype']} | {r['regs']} | {r['stack']} | "
                   f"{r['local_stores']} / {r['local_loads']} | {r['static_shared']} | {r['threads']} | "
                   f"{r['warps_per_sm_by_regs']} |")
    notes = [f"  - {line.strip()}" if line.startswith("  ") else f"- {line}" for line in lines]
    return "\n".join(out + [""] + notes) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    rows = cuda_rows() + triton_rows()
    floor_bytes = 4 * (L * D + K * D)  # fp32: read E once, write the capsules once, per user
    lines = []
    for label, through_q in (("through S", False), ("through Q = S^T S", True)):
        madds = forward_madds(through_q)
        lines.append(f"forward multiply-adds per user {label} (L={L}, D={D}, K={K}, r={R}): {madds:,}; "
                     f"arithmetic intensity {2 * madds / floor_bytes:.1f} FLOP per HBM-floor byte (fp32)")
    saving = 1 - forward_madds(True) / forward_madds(False)
    lines.append(f"Q saves {100 * saving:.1f}% of the forward's multiply-adds at this shape")
    floor_us = GOAL_BATCH * floor_bytes / H200_HBM_BYTES_PER_S * 1e6
    lines.append(f"H200 spec sheet ({H200_FP32_FLOPS / 1e12:.0f} TFLOPS fp32, {H200_HBM_BYTES_PER_S / 1e12:.1f} TB/s): "
                 f"ridge {H200_FP32_FLOPS / H200_HBM_BYTES_PER_S:.1f} FLOP/byte; B={GOAL_BATCH} fp32 forward HBM floor "
                 f"{floor_us:.1f} us")
    for label, through_q in (("through S", False), ("through Q", True)):
        fma_us = 2 * GOAL_BATCH * forward_madds(through_q) / H200_FP32_FLOPS * 1e6
        lines.append(f"  {label}: {fma_us:.1f} us of fp32 FMAs at 100% of peak = {fma_us / floor_us:.2f}x the floor; "
                     f"within 2x of the floor needs >= {100 * fma_us / (2 * floor_us):.0f}% of the fp32 peak")
    lines.append(f"git {git_revision()}; compiled here for sm_90, no GPU involved")
    text = markdown(rows, lines)
    print(text)
    write_rows_csv(rows, args.out, "gpu_static.csv")
    with open(os.path.join(args.out, "gpu_static.md"), "w") as f:
        f.write(text)
    print(f"wrote {args.out}/gpu_static.csv and gpu_static.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
