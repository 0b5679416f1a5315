"""Triton backend of the B2I routing op: launchers, torch.library registration, dispatcher hooks.

The kernels live in :mod:`mind_kernels.triton.kernels` (math and layout in its
docstring).  This module never imports triton at import time: ``import
mind_kernels`` works without triton, and ``TRITON_INTERPRET=1`` (the CPU
interpreter) only takes effect when it is set before triton's first import.

Ops (``torch.library.triton_op`` + ``wrap_triton``, so torch.compile can see the kernels)::

    mind_kernels::routing_forward_triton(Tensor behaviors, Tensor weight, Tensor init_logits,
        Tensor? mask, Tensor? interest_mask, int num_iters, bool over_behaviors,
        float logit_scale=1.0)
        -> (Tensor capsules, Tensor coupling, Tensor preactivation)
    mind_kernels::routing_backward_triton(Tensor grad_capsules, Tensor behaviors, Tensor weight,
        Tensor coupling, Tensor preactivation) -> (Tensor grad_behaviors, Tensor grad_weight)
    mind_kernels::routing_jagged_forward_triton(Tensor values, Tensor offsets, Tensor weight,
        Tensor init_logits, Tensor? interest_mask, int num_iters, bool over_behaviors, float logit_scale=1.0)
        -> (Tensor capsules, Tensor coupling, Tensor preactivation)
    mind_kernels::routing_jagged_backward_triton(Tensor grad_capsules, Tensor values, Tensor offsets,
        Tensor weight, Tensor coupling, Tensor preactivation, int max_len)
        -> (Tensor grad_values, Tensor grad_weight)

The jagged pair (ROUTING.md, "Jagged batches") runs the same kernels with ``JAGGED=True``: values
(N, D_in) + offsets (B + 1,), coupling (N, K).  Rows past a user's length are never read or written, so
memory traffic follows N; the arithmetic runs on the same (BK, BL) tiles as a padded call at L_max.

capsules c (B, K, D_out) in E's dtype; coupling w (B, K, L) and preactivation
z (B, K, D_out, the final pre-squash aggregate) in float32.  The forward saves
E, S, w and z for backward (``detach_routing=True`` only: the gradient flows
through the final z = w S e, whatever ``logit_scale``).  dS is reduced from one float32 partial per
program, summed by torch in a fixed order: deterministic, no atomics.

Registered once, on first use, by :func:`_ops`.
"""

from __future__ import annotations

import importlib.util
import os
from typing import List, Optional, Tuple

import torch

from .. import autograd_glue

#: Largest padded (BK, max(BL, BDO), BDI) broadcast temporary a program may hold (float32 elements).
#: Beyond it the per-user tile would spill far out of registers; the dispatcher falls back.
MAX_TILE_ELEMENTS = 1 << 16
#: Largest padded 2-D tile (E's (BL, BDI) or S's (BDO, BDI)) held for a whole program.
MAX_MATRIX_ELEMENTS = 1 << 14
#: Persistent-grid size: programs per streaming multiprocessor on CUDA.
PROGRAMS_PER_SM = 4
#: Under the interpreter a few programs, so tests cover several users per program and several dS partials.
INTERPRETER_PROGRAMS = 3


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(device_type: str) -> Optional[str]:
    """None when the Triton kernels can run on ``device_type`` ("cuda" or "cpu"), else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - broken install
        return f"triton failed to import ({exc})"
    if device_type == "cpu":
        if not _interpreting():
            return "Triton runs CPU tensors only under its interpreter (set TRITON_INTERPRET=1 before importing triton)"
        return None
    if device_type == "cuda":
        if _interpreting():
            return "TRITON_INTERPRET=1 is set: the Triton interpreter runs CPU tensors only"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return None
    return f"Triton does not run on device type {device_type!r}"


#: Rows of Q = S^T S per program of the Gram kernel.
GRAM_ROWS = 16


#: Set to "1" to keep every iteration on S (benchmarks compare the two paths); read on every call.
ROUTE_THROUGH_S_ENV = "MIND_KERNELS_ROUTE_THROUGH_S"


def uses_gram(in_dim: int, out_dim: int, num_iters: int) -> bool:
    """Whether the iterations t < r go through Q = S^T S (K D_in^2 instead of 2 K D_in D_out multiply-adds).

    The rule of csrc/routing_math.h (CPU and CUDA kernels): a function of the shapes only, so a user's
    result does not depend on its batch; ``MIND_KERNELS_ROUTE_THROUGH_S=1`` turns it off.
    """
    if os.environ.get(ROUTE_THROUGH_S_ENV) == "1":
        return False
    return num_iters >= 2 and in_dim < 2 * out_dim


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _blocks(length: int, interests: int, in_dim: int, out_dim: int) -> Tuple[int, int, int, int]:
    """Padded tile sizes (BL, BK, BDI, BDO): powers of two."""
    return _pow2(length), _pow2(interests), _pow2(in_dim), _pow2(out_dim)


def shape_refusals(call) -> List[str]:
    """Why the Triton kernels would not take this call (beyond the dispatcher's common checks)."""
    reasons = []
    if call.dtype == torch.float64:
        reasons.append("triton accumulates in float32; float64 (the oracle's dtype) is served by the reference")
    BL, BK, BDI, BDO = _blocks(call.length, call.interests, call.in_dim, call.out_dim)
    tile = BK * max(BL, BDO) * BDI
    if tile > MAX_TILE_ELEMENTS:
        reasons.append(
            f"padded per-user tile K*max(L, D_out)*D_in = {BK}*{max(BL, BDO)}*{BDI} = {tile} elements "
            f"exceeds the on-chip limit of {MAX_TILE_ELEMENTS}"
        )
    for name, rows in (("L", BL), ("D_out", BDO)):
        if rows * BDI > MAX_MATRIX_ELEMENTS:
            reasons.append(
                f"padded {name}*D_in tile {rows}*{BDI} = {rows * BDI} elements exceeds the on-chip limit "
                f"of {MAX_MATRIX_ELEMENTS}"
            )
    return reasons


def _num_programs(batch: int, device: torch.device) -> int:
    if device.type == "cuda":
        cap = torch.cuda.get_device_properties(device).multi_processor_count * PROGRAMS_PER_SM
    else:
        cap = INTERPRETER_PROGRAMS
    return max(1, min(batch, cap))


def _num_warps(BL: int, BK: int, BDI: int, BDO: int) -> int:
    """Warps per program, so each thread holds at most ~64 elements of the largest broadcast temporary.

    Checked with ptxas for sm_90 (no GPU needed): the paper shape (BK, BL, BDI, BDO) = (4, 64, 64, 64)
    at 8 warps uses 200 (forward) / 231 (backward) registers without spills; at 4 warps both hit 255
    and spill.  A (4, 128, 64, 64) tile at 16 warps spills a few bytes; (8, 128, 64, 64) spills kBs.
    """
    tile = BK * max(BL, BDO) * BDI
    return 4 if tile <= 8192 else 8 if tile <= 16384 else 16


def compile_for_sm90(dtype: str = "fp32", over_behaviors: bool = False):
    """Every kernel compiled ahead of time for Hopper (sm_90) at the paper shape, no GPU needed.

    ``dtype`` ("fp32", "bf16", "fp16") is E's and S's.  Returns a list of (label, compiled kernel,
    num_warps): the forward through Q and through S, the backward and the Gram kernel.  The tests use
    it to check that the compiler (stricter than the interpreter) accepts the kernels; bench/gpu_static.py
    reads their registers and spills.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import kernels

    BL, BK, BDI, BDO = _blocks(50, 4, 64, 64)
    warps = _num_warps(BL, BK, BDI, BDO)
    blocks = {"BL": BL, "BK": BK, "BDI": BDI, "BDO": BDO, "EPS": kernels.SQUASH_EPS}
    ints = {n: "i32" for n in ("B", "L", "K", "D_IN", "D_OUT")}
    flags = {"HAS_MASK": True, "HAS_IMASK": True, "OVER_BEHAVIORS": over_behaviors}
    fwd_sig = {"E_ptr": f"*{dtype}", "OFF_ptr": "*i64", "S_ptr": f"*{dtype}", "Q_ptr": "*fp32", "B0_ptr": "*fp32", "M_ptr": "*u8",
               "IM_ptr": "*u8", "C_ptr": f"*{dtype}", "W_ptr": "*fp32", "Z_ptr": "*fp32", **ints, "b0_stride_b": "i32",
               "num_iters": "i32", "logit_scale": "fp32",
               **{n: "constexpr" for n in (*flags, "USE_GRAM", *blocks, "JAGGED")}}
    bwd_sig = {"G_ptr": f"*{dtype}", "E_ptr": f"*{dtype}", "OFF_ptr": "*i64", "S_ptr": f"*{dtype}", "W_ptr": "*fp32",
               "Z_ptr": "*fp32", "DE_ptr": f"*{dtype}", "DSP_ptr": "*fp32", **ints,
               **{n: "constexpr" for n in (*blocks, "JAGGED")}}
    gram_sig = {"S_ptr": f"*{dtype}", "Q_ptr": "*fp32", "D_IN": "i32", "D_OUT": "i32", "ROWS": "constexpr",
                "BDI": "constexpr"}
    cases = [
        ("routing_fwd_kernel (through Q)", kernels.routing_fwd_kernel, fwd_sig,
         {**flags, "USE_GRAM": True, **blocks, "JAGGED": False}, warps),
        ("routing_fwd_kernel (through S)", kernels.routing_fwd_kernel, fwd_sig,
         {**flags, "USE_GRAM": False, **blocks, "JAGGED": False}, warps),
        ("routing_fwd_kernel (jagged)", kernels.routing_fwd_kernel, fwd_sig,
         {**flags, "HAS_MASK": False, "USE_GRAM": True, **blocks, "JAGGED": True}, warps),
        ("routing_bwd_kernel", kernels.routing_bwd_kernel, bwd_sig, {**blocks, "JAGGED": False}, warps),
        ("routing_bwd_kernel (jagged)", kernels.routing_bwd_kernel, bwd_sig, {**blocks, "JAGGED": True}, warps),
        ("gram_kernel", kernels.gram_kernel, gram_sig, {"ROWS": GRAM_ROWS, "BDI": BDI}, 4),
    ]
    target = GPUTarget("cuda", 90, 32)
    return [
        (label, triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                               options={"num_warps": num_warps}), num_warps)
        for label, fn, sig, consts, num_warps in cases
    ]


_OPS = None


def _ops():
    """Register the two triton_ops on first use (this imports triton) and return (forward, backward)."""
    global _OPS
    if _OPS is not None:
        return _OPS
    import triton
    from torch.library import triton_op, wrap_triton

    from . import kernels

    def gram_of(S: torch.Tensor, BDI: int) -> torch.Tensor:
        """Q = S^T S (D_in, D_in) in float32, for the iterations t < r (see uses_gram)."""
        D_out, D_in = S.shape
        gram = S.new_empty((D_in, D_in), dtype=torch.float32)
        wrap_triton(kernels.gram_kernel)[(triton.cdiv(D_in, GRAM_ROWS),)](
            S, gram, D_in, D_out, ROWS=GRAM_ROWS, BDI=BDI
        )
        return gram

    @triton_op("mind_kernels::routing_forward_triton", mutates_args={})
    def routing_forward_triton(
        behaviors: torch.Tensor,
        weight: torch.Tensor,
        init_logits: torch.Tensor,
        mask: Optional[torch.Tensor],
        interest_mask: Optional[torch.Tensor],
        num_iters: int,
        over_behaviors: bool,
        logit_scale: float = 1.0,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        E = behaviors.contiguous()
        S = weight.contiguous()
        B, L, D_in = E.shape
        K = init_logits.shape[-2]
        D_out = S.shape[0]
        b0 = init_logits.to(torch.float32).contiguous()
        b0_stride_b = K * L if b0.dim() == 3 else 0
        capsules = E.new_empty((B, K, D_out))
        coupling = E.new_empty((B, K, L), dtype=torch.float32)
        preactivation = E.new_empty((B, K, D_out), dtype=torch.float32)
        if B == 0:
            return capsules, coupling, preactivation
        # uint8 masks: one byte per flag, the same on every path (bool pointers differ between backends).
        m = (mask != 0).to(torch.uint8).contiguous() if mask is not None else E
        im = (interest_mask != 0).to(torch.uint8).contiguous() if interest_mask is not None else E
        BL, BK, BDI, BDO = _blocks(L, K, D_in, D_out)
        use_gram = uses_gram(D_in, D_out, num_iters)
        gram = gram_of(S, BDI) if use_gram else b0  # b0: an unused pointer
        grid = (_num_programs(B, E.device),)
        wrap_triton(kernels.routing_fwd_kernel)[grid](
            E, E, S, gram, b0, m, im,  # the second E: the unused offsets pointer
            capsules, coupling, preactivation,
            B, L, K, D_in, D_out, b0_stride_b, num_iters, float(logit_scale),
            HAS_MASK=mask is not None, HAS_IMASK=interest_mask is not None, OVER_BEHAVIORS=over_behaviors,
            USE_GRAM=use_gram, BL=BL, BK=BK, BDI=BDI, BDO=BDO, EPS=kernels.SQUASH_EPS,
            num_warps=_num_warps(BL, BK, BDI, BDO),
        )
        return capsules, coupling, preactivation

    @triton_op("mind_kernels::routing_backward_triton", mutates_args={})
    def routing_backward_triton(
        grad_capsules: torch.Tensor,
        behaviors: torch.Tensor,
        weight: torch.Tensor,
        coupling: torch.Tensor,
        preactivation: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        # autograd may hand a stride-0 (expanded) gradient: make everything dense first.
        G = grad_capsules.contiguous()
        E = behaviors.contiguous()
        S = weight.contiguous()
        w = coupling.contiguous()
        z = preactivation.contiguous()
        B, L, D_in = E.shape
        K = w.shape[1]
        D_out = S.shape[0]
        grad_behaviors = torch.empty_like(E)
        if B == 0:
            return grad_behaviors, torch.zeros_like(S)
        BL, BK, BDI, BDO = _blocks(L, K, D_in, D_out)
        P = _num_programs(B, E.device)
        partials = E.new_empty((P, D_out, D_in), dtype=torch.float32)
        wrap_triton(kernels.routing_bwd_kernel)[(P,)](
            G, E, E, S, w, z,  # the second E: the unused offsets pointer
            grad_behaviors, partials,
            B, L, K, D_in, D_out,
            BL=BL, BK=BK, BDI=BDI, BDO=BDO, EPS=kernels.SQUASH_EPS,
            num_warps=_num_warps(BL, BK, BDI, BDO),
        )
        grad_weight = partials.sum(dim=0).to(S.dtype)  # fixed-order reduction: deterministic
        return grad_behaviors, grad_weight

    setup_context, backward = autograd_glue.padded(torch.ops.mind_kernels.routing_backward_triton)
    routing_forward_triton.register_autograd(backward, setup_context=setup_context)

    @triton_op("mind_kernels::routing_jagged_forward_triton", mutates_args={})
    def routing_jagged_forward_triton(
        values: torch.Tensor,
        offsets: torch.Tensor,
        weight: torch.Tensor,
        init_logits: torch.Tensor,
        interest_mask: Optional[torch.Tensor],
        num_iters: int,
        over_behaviors: bool,
        logit_scale: float = 1.0,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        V = values.contiguous()
        off = offsets.contiguous()
        S = weight.contiguous()
        N, D_in = V.shape
        B = off.shape[0] - 1
        K, L = init_logits.shape[-2], init_logits.shape[-1]
        D_out = S.shape[0]
        b0 = init_logits.to(torch.float32).contiguous()
        b0_stride_b = K * L if b0.dim() == 3 else 0
        capsules = V.new_empty((B, K, D_out))
        coupling = V.new_empty((N, K), dtype=torch.float32)
        preactivation = V.new_empty((B, K, D_out), dtype=torch.float32)
        if B == 0:
            return capsules, coupling, preactivation
        im = (interest_mask != 0).to(torch.uint8).contiguous() if interest_mask is not None else V
        BL, BK, BDI, BDO = _blocks(L, K, D_in, D_out)
        use_gram = uses_gram(D_in, D_out, num_iters)
        gram = gram_of(S, BDI) if use_gram else b0  # b0: an unused pointer
        wrap_triton(kernels.routing_fwd_kernel)[(_num_programs(B, V.device),)](
            V, off, S, gram, b0, V, im,
            capsules, coupling, preactivation,
            B, L, K, D_in, D_out, b0_stride_b, num_iters, float(logit_scale),
            HAS_MASK=False, HAS_IMASK=interest_mask is not None, OVER_BEHAVIORS=over_behaviors,
            USE_GRAM=use_gram, BL=BL, BK=BK, BDI=BDI, BDO=BDO, EPS=kernels.SQUASH_EPS, JAGGED=True,
            num_warps=_num_warps(BL, BK, BDI, BDO),
        )
        return capsules, coupling, preactivation

    @triton_op("mind_kernels::routing_jagged_backward_triton", mutates_args={})
    def routing_jagged_backward_triton(
        grad_capsules: torch.Tensor,
        values: torch.Tensor,
        offsets: torch.Tensor,
        weight: torch.Tensor,
        coupling: torch.Tensor,
        preactivation: torch.Tensor,
        max_len: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        G = grad_capsules.contiguous()
        V = values.contiguous()
        off = offsets.contiguous()
        S = weight.contiguous()
        w = coupling.contiguous()
        z = preactivation.contiguous()
        N, D_in = V.shape
        B = off.shape[0] - 1
        K = w.shape[1]
        D_out = S.shape[0]
        # Rows of no user (none: offsets[B] = N) aside, every row is written by its user's program.
        grad_values = torch.empty_like(V)
        if B == 0 or N == 0:
            return grad_values.zero_(), torch.zeros_like(S)
        L = max_len  # the forward's L_max (b0's positions): the tile covers every history
        BL, BK, BDI, BDO = _blocks(L, K, D_in, D_out)
        P = _num_programs(B, V.device)
        partials = V.new_empty((P, D_out, D_in), dtype=torch.float32)
        wrap_triton(kernels.routing_bwd_kernel)[(P,)](
            G, V, off, S, w, z,
            grad_values, partials,
            B, L, K, D_in, D_out,
            BL=BL, BK=BK, BDI=BDI, BDO=BDO, EPS=kernels.SQUASH_EPS, JAGGED=True,
            num_warps=_num_warps(BL, BK, BDI, BDO),
        )
        return grad_values, partials.sum(dim=0).to(S.dtype)

    jagged_setup_context, jagged_backward = autograd_glue.jagged(
        torch.ops.mind_kernels.routing_jagged_backward_triton)
    routing_jagged_forward_triton.register_autograd(jagged_backward, setup_context=jagged_setup_context)
    _OPS = (torch.ops.mind_kernels.routing_forward_triton, torch.ops.mind_kernels.routing_backward_triton)
    return _OPS


def routing_triton(behaviors, weight, init_logits, mask, interest_mask, num_iters, softmax_over, logit_scale=1.0):
    """B2I routing with the Triton kernels; returns (capsules in E's dtype, coupling w float32).

    Same arguments as the reference (inputs already validated); differentiable
    with respect to ``behaviors`` and ``weight`` (detached routing).  No gradient
    reaches ``init_logits`` or the masks.
    """
    forward, _ = _ops()
    capsules, coupling, _ = forward(
        behaviors,
        weight,
        init_logits.detach(),
        mask,
        interest_mask,
        int(num_iters),
        softmax_over == "behaviors",
        float(logit_scale),
    )
    return capsules, coupling


def routing_jagged_triton(values, offsets, weight, init_logits, interest_mask, num_iters, softmax_over,
                          logit_scale=1.0):
    """Jagged B2I routing with the Triton kernels; returns (capsules (B, K, D_out), coupling (N, K) float32).

    Inputs already validated (every history at most L_max = init_logits.shape[-1] long); differentiable
    with respect to ``values`` and ``weight``.  Memory traffic follows N; the per-user arithmetic runs on
    tiles of L_max rounded up to a power of two (the padded kernel's), so a batch of short histories with
    one long one costs like the long one per user.
    """
    _ops()
    capsules, coupling, _ = torch.ops.mind_kernels.routing_jagged_forward_triton(
        values, offsets, weight, init_logits.detach(), interest_mask, int(num_iters), softmax_over == "behaviors",
        float(logit_scale),
    )
    return capsules, coupling
