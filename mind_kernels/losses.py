"""Best-interest softmax cross-entropy: the exact softmax over a catalogue, each item scored by a user's best interest.

For users b with interests V_b (K, d), an item table E (N, d) whose rows are the classes, and
targets t_b in [0, N):

    s_bkn   = V_bk . e_n                                  (B, K, N)
    best_bn = max over the *active* k of s_bkn            (B, N)   (interest_mask; ties: lowest k)
    loss    = mean_b ( logsumexp_n best_bn - best_b,t_b )

the objective of a multi-interest retriever trained with the score it serves by
(``max_k V_k . e``).  The gradient flows through the winning interest of each (b, n) only.

:func:`best_interest_cross_entropy` computes it fused, the way Liger-Kernel's fused linear
cross-entropy does for language models: the forward runs the score product, then one pass per
user (the compiled CPU kernel ``mind_kernels::best_interest_ce``, or the same math in torch ops
elsewhere) that gives the loss *and* the gradient of the scores, then the two backward products;
the (B, K, N) scores are never kept for backward, and the ~15 element-wise tensor ops of the
unfused form (each a trip through memory, some of them far slower than a copy on the CPU) become
one pass.  Backward only scales the saved gradients.
:func:`best_interest_cross_entropy_reference` is the unfused autograd form and the specification.

``product_dtype`` (e.g. torch.bfloat16 on a CPU with AVX512-BF16 or AMX, or a GPU) runs the three
products in that dtype, scores and gradients in it too; None keeps the inputs' dtype.
``pad_multiple`` pads the table's rows to a multiple of it for the products (MKL's sgemm runs
(B K, d) x (d, N) ~1.5x slower at N = 1349 than at a multiple of 8); padded columns take no part.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import ops


def _check(interests, item_table, targets, interest_mask, name):
    if interests.dim() != 3 or item_table.dim() != 2 or interests.shape[2] != item_table.shape[1]:
        raise ValueError(f"{name}: want interests (B, K, d) and item_table (N, d), got "
                         f"{tuple(interests.shape)} and {tuple(item_table.shape)}")
    B, K, _ = interests.shape
    if B == 0:
        raise ValueError(f"{name}: empty batch (B = 0): the mean loss is undefined")
    if item_table.shape[0] == 0:
        raise ValueError(f"{name}: the item table has no rows (no classes)")
    if targets.shape != (B,) or targets.dtype != torch.long:
        raise ValueError(f"{name}: targets must be int64 of shape ({B},), got {targets.dtype} {tuple(targets.shape)}")
    if interest_mask is not None and interest_mask.shape != (B, K):
        raise ValueError(f"{name}: interest_mask must be (B, K) = ({B}, {K}), got {tuple(interest_mask.shape)}")
    if not (interests.dtype.is_floating_point and interests.dtype == item_table.dtype):
        raise ValueError(f"{name}: interests and item_table must share one floating dtype, got {interests.dtype} "
                         f"and {item_table.dtype}")
    if not (interests.device == item_table.device == targets.device):
        raise ValueError(f"{name}: interests, item_table and targets must be on one device, got "
                         f"{interests.device}, {item_table.device}, {targets.device}")


def best_interest_cross_entropy_reference(interests: torch.Tensor, item_table: torch.Tensor, targets: torch.Tensor,
                                          interest_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The unfused autograd form (the specification): see the module docstring.

    interests (B, K, d), item_table (N, d), targets (B,) int64 in [0, N), interest_mask (B, K) bool or None.
    Ties between interests: ``amax``'s gradient splits them evenly (the fused form gives them to the
    lowest k); ties have probability 0 on continuous inputs.
    """
    _check(interests, item_table, targets, interest_mask, "best_interest_cross_entropy_reference")
    scores = torch.einsum("bkd,nd->bkn", interests, item_table)
    if interest_mask is not None:
        scores = scores.masked_fill(~interest_mask.to(torch.bool)[:, :, None], float("-inf"))
    return F.cross_entropy(scores.amax(dim=1), targets)


def _rows_and_grad_torch(scores, targets, active, num_classes: int, grad_scale: float):
    """The compiled kernel's math in torch ops (any device): per-user losses (B,) and d(grad_scale sum)/d scores."""
    B, K, C = scores.shape
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    s = scores[..., :num_classes].to(acc)
    if active is not None:
        s = s.masked_fill(~active[:, :, None], float("-inf"))
    best, win = s.max(dim=1)                                        # ties: the lowest k
    lse = torch.logsumexp(best, dim=1)
    rows = lse - best.gather(1, targets[:, None]).squeeze(1)
    p = torch.exp(best - lse[:, None]) * grad_scale
    p[torch.arange(B, device=scores.device), targets] -= grad_scale
    g = torch.zeros(B, K, C, dtype=acc, device=scores.device)
    g[..., :num_classes].scatter_(1, win[:, None, :], p[:, None, :])
    return rows, g.to(scores.dtype)


def _scores_rows_grad(interests, item_table, targets, active, product_dtype, pad_multiple, use_kernel):
    """Score product + the per-user pass: (losses (B,), d(mean loss)/d scores (B, K, N_pad), v (B K, d), e (N_pad, d))."""
    B, K, d = interests.shape
    N = item_table.shape[0]
    pdt = product_dtype or interests.dtype
    pad = (-N) % pad_multiple
    e = (F.pad(item_table, (0, 0, 0, pad)) if pad else item_table).to(pdt)
    v = interests.reshape(B * K, d).to(pdt)
    scores = (v @ e.t()).view(B, K, N + pad)
    if use_kernel:
        rows, g = torch.ops.mind_kernels.best_interest_ce(scores, targets, active, N, 1.0 / B)
    else:
        rows, g = _rows_and_grad_torch(scores, targets, active, N, 1.0 / B)
    return rows, g, v, e


class _FusedBestInterestCE(torch.autograd.Function):
    """Forward: loss and both gradients (saved); backward: the saved gradients times grad_output."""

    @staticmethod
    def forward(ctx, interests, item_table, targets, active, product_dtype, pad_multiple, use_kernel):
        B, K, d = interests.shape
        N = item_table.shape[0]
        rows, g, v, e = _scores_rows_grad(interests, item_table, targets, active, product_dtype, pad_multiple,
                                          use_kernel)
        g = g.view(B * K, e.shape[0])
        d_int = (g @ e).view(B, K, d) if ctx.needs_input_grad[0] else None
        d_tab = (g.t() @ v)[:N] if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(d_int, d_tab)
        ctx.dtypes = (interests.dtype, item_table.dtype)
        return rows.mean().to(interests.dtype)

    @staticmethod
    def backward(ctx, grad):
        d_int, d_tab = ctx.saved_tensors
        gi = d_int.to(ctx.dtypes[0]) * grad if d_int is not None else None
        gt = d_tab.to(ctx.dtypes[1]) * grad if d_tab is not None else None
        return gi, gt, None, None, None, None, None


#: None when the compiled kernel serves a device type, else why not (cached: asked on every call).
fused_kernel_unavailable_reason = ops.loss_kernel_unavailable_reason


def best_interest_cross_entropy(interests: torch.Tensor, item_table: torch.Tensor, targets: torch.Tensor,
                                interest_mask: Optional[torch.Tensor] = None, *,
                                product_dtype: Optional[torch.dtype] = None, pad_multiple: int = 16,
                                backend: str = "auto") -> torch.Tensor:
    """Mean best-interest softmax cross-entropy (module docstring), fused; a scalar with autograd.

    Args:
        interests: V (B, K, d), B >= 1.  item_table: E (N, d), one row per class.
        targets: (B,) int64 in [0, N).  interest_mask: (B, K) bool, every user with >= 1 active interest; None = all.
        product_dtype: dtype of the three products (None: the inputs' dtype).
        pad_multiple: the products see the table padded to a multiple of this many rows (1 = none).
        backend: "auto" (the compiled CPU kernel where it serves, else torch ops), "torch" (torch ops),
            or "reference" (:func:`best_interest_cross_entropy_reference`: unfused, float products).

    Gradients reach interests and item_table (each (b, n) through its winning interest; ties: the
    lowest k).  The gradients are computed in the forward (they cost two products, which the
    backward would pay anyway): call it where a backward follows, or under ``torch.no_grad()``,
    where it skips them.
    """
    _check(interests, item_table, targets, interest_mask, "best_interest_cross_entropy")
    if backend not in ("auto", "torch", "reference"):
        raise ValueError(f"best_interest_cross_entropy: backend must be 'auto', 'torch' or 'reference', got {backend!r}")
    if isinstance(pad_multiple, bool) or not isinstance(pad_multiple, int) or pad_multiple < 1:
        raise ValueError(f"best_interest_cross_entropy: pad_multiple must be an int >= 1, got {pad_multiple!r}")
    if backend == "reference":
        return best_interest_cross_entropy_reference(interests, item_table, targets, interest_mask)
    active = None if interest_mask is None else interest_mask.to(torch.bool)
    use_kernel = backend == "auto" and fused_kernel_unavailable_reason(interests.device.type) is None
    if not torch.compiler.is_compiling():
        # named errors before any work (the kernel would stop too, torch ops would index out of range)
        outside = (targets < 0) | (targets >= item_table.shape[0])
        if bool(outside.any()):
            bad = int(outside.nonzero()[0, 0])
            raise ValueError(f"best_interest_cross_entropy: targets[{bad}] = {int(targets[bad])} is outside the "
                             f"{item_table.shape[0]} classes [0, {item_table.shape[0]})")
        if active is not None and not bool(active.any(dim=1).all()):
            raise ValueError("best_interest_cross_entropy: a user has no active interest in interest_mask "
                             "(every user needs at least one)")
    if not (torch.is_grad_enabled() and (interests.requires_grad or item_table.requires_grad)):
        with torch.no_grad():  # evaluation: the loss alone, no gradient products
            rows = _scores_rows_grad(interests, item_table, targets, active, product_dtype, pad_multiple,
                                     use_kernel)[0]
        return rows.mean().to(interests.dtype)
    return _FusedBestInterestCE.apply(interests, item_table, targets, active, product_dtype, pad_multiple, use_kernel)
