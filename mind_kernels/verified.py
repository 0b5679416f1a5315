"""Where each fused backend has passed on real hardware: the record that ``python -m mind_kernels.info``
prints and that the dispatcher's first-GPU-call note quotes.

A leaf module (it imports nothing from the package), so the dispatcher can read it without importing
the self-test harness.  ``mind_kernels.selftest.VERIFIED`` is the same object.
"""

from __future__ import annotations

from typing import Dict, List

#: Where each fused backend has passed the self-test (or its test suite) on real hardware: device, date.
#: Append a line after a GPU run of ``bench/gpu_check.sh`` passes; empty means never run on hardware.
VERIFIED: Dict[str, List[str]] = {
    "cpp": ["cpu: this project's CI (tests/test_cpu_kernel.py and this self-test, every run)"],
    "cuda": [],
    "triton": [],
}
