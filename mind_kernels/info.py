"""``python -m mind_kernels.info``: versions, what was built, which backend serves what, what is verified."""

from __future__ import annotations

import platform
import sys

import torch

import mind_kernels
from mind_kernels import ops
from mind_kernels.api import backends
from mind_kernels.verified import VERIFIED


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def main() -> None:
    print(f"mind-kernels {mind_kernels.__version__}")
    print(f"python       {sys.version.split()[0]} ({platform.machine()})")
    print(f"torch        {torch.__version__} (CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()})")
    print(f"triton       {_triton_version()}")
    built = ops.build_info()
    if ops.extension_error() is not None:
        print(f"extension    not loaded: {ops.extension_error()}")
    else:
        print(f"extension    built for {built or 'unknown versions (no _build_info.json)'}")
    print()
    print("backend    where  status")
    print(backends())
    jagged_cpu = ops.jagged_kernel_unavailable_reason("cpu")
    print("jagged batches (b2i_routing_jagged): cpp " + ("runs the jagged CPU kernel (cost follows N)" if jagged_cpu
                                                        is None else f"unavailable: {jagged_cpu}")
          + "; cuda " + ("runs its jagged kernels" if ops.jagged_kernel_unavailable_reason("cuda") is None
                         else "pads to (B, L_max) (no jagged CUDA kernel in this build)")
          + "; triton runs its kernels in jagged mode (memory follows N, arithmetic on L_max tiles); the "
          "reference pads to (B, L_max)")
    print()
    print("verified on real hardware (device, date; mind_kernels.verified.VERIFIED):")
    for name, where in VERIFIED.items():
        print(f"  {name:<8} {'; '.join(where) if where else 'not yet: never run on a GPU by this project'}")
    print("`python -m mind_kernels.selftest` checks the built fused backends on this machine against the reference")


if __name__ == "__main__":
    main()
