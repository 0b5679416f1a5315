"""Helpers shared by the fused-backend test files (Triton, CUDA).

They live in :mod:`mind_kernels.checks` (``python -m mind_kernels.selftest`` uses them too); this module
re-exports them under the names the test files import.
"""

from mind_kernels.checks import ATOL, RTOL, assert_within_tolerance, compare, run_op, tolerance_used  # noqa: F401
