"""ROUTING.md's accuracy rule in code, shared by the test files and ``python -m mind_kernels.selftest``.

A fused backend's outputs (capsules c, coupling w) and gradients (dE, dS) are compared with the
reference evaluated in float64 on the same (rounded) inputs:

* float32 (and float64): every element within ``ATOL + RTOL * |reference|`` (atol 1e-5, rtol 1e-4).
* float16 / bfloat16: the error may exceed that float32 tolerance by at most 2x the max error of the
  reference run in that same dtype.  The float32 tolerance is the floor: backends and the reference
  all accumulate in float32, so where the reference's own error is ~0 (w, or dS for a float32 S) the
  float32 rounding of either side is the honest bound.  (tests/test_cuda_kernel.py's rule.)
* float32 sums over tens of thousands of terms (dS over B * L rows for a large B): float32 rounding
  alone exceeds atol 1e-5 on entries that cancel to ~0, for the reference run in float32 as much as
  for any kernel, so such cases pass the float32 reference's result as ``same_dtype`` and are held to
  the float16 / bfloat16 rule (tests/test_cuda_kernel.py's ``long_reductions``).

:func:`tolerance_used` gives, per tensor, the max error and the fraction of the allowed error it uses
(pass: at most 1); :func:`run_op` runs one routing call forward and backward.
"""

from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch

ATOL = 1e-5
RTOL = 1e-4
HALF_DTYPES = (torch.float16, torch.bfloat16)
NAMES = ("capsules", "coupling", "dE", "dS")


def run_op(fn: Callable, E, S, b0, mask, interest_mask, G, r, over, **kwargs):
    """(capsules, w, dE, dS) of one routing call ``fn`` with gradient G on the capsules.

    ``fn(E, S, b0, mask, interest_mask, r, over, **kwargs)`` returns (capsules, w); ``kwargs``
    (e.g. ``logit_scale``) are passed on.  For B = 0 (no graph to run backward through) the
    gradients are zeros of E's and S's shapes.
    """
    E = E.detach().clone().requires_grad_()
    S = S.detach().clone().requires_grad_()
    c, w = fn(E, S, b0, mask, interest_mask, r, over, **kwargs)
    if E.shape[0] == 0 and not c.requires_grad:  # B = 0: the API returns fresh zeros without a graph
        return c.detach(), w.detach(), torch.zeros_like(E), torch.zeros_like(S)
    c.backward(G)
    return c.detach(), w.detach(), E.grad, S.grad


class TensorError(NamedTuple):
    name: str
    max_err: float  # max |got - oracle|
    used: float  # max over elements of |got - oracle| / allowed: pass when <= 1 (inf: non-finite or wrong shape)
    note: str  # why it failed beyond the numbers ("" when nothing)


def tolerance_used(
    name: str, got: torch.Tensor, oracle: torch.Tensor, same_dtype: Optional[torch.Tensor], dtype: torch.dtype
) -> TensorError:
    """How much of ROUTING.md's allowed error ``got`` uses against the float64 ``oracle``.

    ``dtype`` is the inputs' dtype (E's); ``same_dtype`` is the reference's own result in that dtype:
    required for float16 / bfloat16, optional for float32 (long reductions, see the module docstring).
    """
    if tuple(got.shape) != tuple(oracle.shape):
        return TensorError(name, math.inf, math.inf, f"shape {tuple(got.shape)} != {tuple(oracle.shape)}")
    if got.numel() == 0:
        return TensorError(name, 0.0, 0.0, "")
    x = got.detach().double()
    ref = oracle.detach().double()
    if not torch.isfinite(x).all():
        return TensorError(name, math.inf, math.inf, "non-finite values")
    err = (x - ref).abs()
    allowed = ATOL + RTOL * ref.abs()
    if dtype in HALF_DTYPES and same_dtype is None:
        raise ValueError(f"{name}: a {dtype} comparison needs the reference's result in {dtype}")
    if same_dtype is not None:
        ref_err = (same_dtype.detach().double() - ref).abs().max().item()
        allowed = allowed + 2 * ref_err
    return TensorError(name, err.max().item(), (err / allowed).max().item(), "")


def compare(got: Sequence[torch.Tensor], oracle: Sequence[torch.Tensor], same_dtype, dtype) -> List[TensorError]:
    """:func:`tolerance_used` for each of (capsules, coupling, dE, dS)."""
    same = same_dtype if same_dtype is not None else (None,) * len(got)
    return [tolerance_used(n, g, o, s, dtype) for n, g, o, s in zip(NAMES, got, oracle, same)]


def assert_within_tolerance(got, oracle, same_dtype, dtype) -> None:
    """Raise AssertionError naming every tensor beyond ROUTING.md's tolerance."""
    bad = [e for e in compare(got, oracle, same_dtype, dtype) if not e.used <= 1.0]
    if bad:
        raise AssertionError("; ".join(
            f"{e.name}: max error {e.max_err:.3g} uses {e.used:.3g}x the allowed error {e.note}".strip() for e in bad
        ))
