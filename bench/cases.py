"""Setup factories for the routing benchmarks: one function builds every backend's callable for a case.

A case is (B, L, D, K, r, dtype, device); a backend is one of
"cpp" / "cuda" / "triton" (fused kernels through ``mind_kernels.b2i_routing``),
"reference" (eager PyTorch), "compile" (``torch.compile`` of the reference) and
"rechub" (torch-rechub's ``CapsuleNetwork(bilinear_type=0)``, its randomness seeded).
Every callable runs the forward, or forward + backward when ``mode == "fwd+bwd"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

import mind_kernels
from mind_kernels.reference import b2i_routing_reference

L_DEFAULT, D_DEFAULT, K_DEFAULT, R_DEFAULT = 50, 64, 4, 3


@dataclass(frozen=True)
class Case:
    batch: int
    length: int = L_DEFAULT
    dim: int = D_DEFAULT
    interests: int = K_DEFAULT
    iters: int = R_DEFAULT
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    @property
    def name(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"B={self.batch} L={self.length} D={self.dim} K={self.interests} r={self.iters} {dt} {self.device}"


def inputs(case: Case, seed: int = 0):
    """(E, S, b0, mask) for ``case``: random behaviours, S ~ N(0, 1/D), per-user logits, random valid lengths."""
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(case.batch, case.length, case.dim, generator=g)
    S = torch.randn(case.dim, case.dim, generator=g) / case.dim**0.5
    b0 = torch.randn(case.batch, case.interests, case.length, generator=g)
    lengths = torch.randint(1, case.length + 1, (case.batch,), generator=g)
    mask = torch.arange(case.length)[None, :] < lengths[:, None]
    dev = case.device
    return E.to(dev, case.dtype), S.to(dev), b0.to(dev), mask.to(dev)


_compiled_reference = None


def _compiled():
    global _compiled_reference
    if _compiled_reference is None:
        _compiled_reference = torch.compile(b2i_routing_reference, dynamic=True)
    return _compiled_reference


def unavailable(backend: str, case: Case) -> Optional[str]:
    """Why ``backend`` cannot run ``case`` here, or None."""
    if backend in ("cpp", "cuda", "triton"):
        E, S, b0, mask = inputs(Case(2, 3, 2, 2, 1, case.dtype, case.device))
        table = mind_kernels.backends(E, S, b0, mask)
        reasons = {s.name: s.reasons for s in table}[backend]
        return "; ".join(reasons) or None
    if backend == "rechub":
        try:
            import torch_rechub  # noqa: F401
        except ImportError:
            return "torch-rechub is not installed"
    return None


def make_callable(backend: str, case: Case, mode: str) -> Callable[[], object]:
    """A zero-argument callable running one forward (``mode="fwd"``) or forward + backward (``"fwd+bwd"``)."""
    E, S, b0, mask = inputs(case)
    backward = mode == "fwd+bwd"
    if backward:
        E.requires_grad_(True)
        S.requires_grad_(True)

    if backend == "rechub":
        from torch_rechub.basic.layers import CapsuleNetwork

        torch.manual_seed(0)
        layer = CapsuleNetwork(case.dim, case.length, bilinear_type=0, interest_num=case.interests,
                               routing_times=case.iters).to(case.device, case.dtype)
        if backward:
            def fn():
                E.grad = None  # as zero_grad(set_to_none=True) does: no accumulation into an old gradient
                layer(E, mask).sum().backward()
        else:
            def fn():
                with torch.no_grad():
                    return layer(E, mask)
        return fn

    if backend == "compile":
        routing = _compiled()
        call = lambda: routing(E, S, b0, mask, None, case.iters)  # noqa: E731
    else:
        name = backend
        call = lambda: mind_kernels.b2i_routing(E, S, b0, mask, num_iters=case.iters, backend=name)  # noqa: E731

    if backward:
        def fn():
            # As a training step after zero_grad(set_to_none=True): the gradients are written, not
            # accumulated into the previous call's (an extra B L D_in add that is no part of the op).
            E.grad = S.grad = None
            call().sum().backward()
    else:
        def fn():
            with torch.no_grad():
                return call()
    return fn
