"""Pure-PyTorch B2I dynamic routing: the specification in code.

This module is a literal transcription of ``docs/ROUTING.md``.  It is
the fallback backend and the oracle every fused backend is tested against, so
it is written to be read, not to be fast.

Shapes: B users, L behaviour positions, K interests, D_in -> D_out.

Forward::

    u_i  = S e_i                                  (B, L, D_out), padded positions too
    b    = b0 broadcast to (B, K, L)
    for t = 1 .. r:
        w   = coupling(b)                         (B, K, L)
        z_j = sum_i w_ij u_i                      (B, K, D_out)
        c_j = squash(z_j)
        if t < r: b_ij += s * (c_j . u_i)         (all i and j, padded i too)
    return c

    s = logit_scale > 0 (default 1: the paper's update; EasyRec's MIND uses ~20)

    squash(z) = |z|^2 / (1 + |z|^2) * z / sqrt(|z|^2 + 1e-9)

Coupling:

* ``softmax_over="interests"`` (MIND): for each valid behaviour i, softmax of
  b_ij over the *active* interests j; inactive interests get 0; masked
  behaviours get 0 for every j.
* ``softmax_over="behaviors"`` (ComiRec / torch-rechub): for each interest j,
  softmax of b_ij over *all* L positions (padding inside the denominator), then
  0 where i is masked and 0 for inactive interests.

Decisions where ROUTING.md is silent:

* A user whose interest mask is all False gets w = 0 everywhere, so all K
  capsules are zero (like a user with no valid behaviour).
* float64 inputs are computed in float64 (that is how the oracle is run);
  every other dtype is computed in float32 and the capsules are cast back to
  the input dtype.  The coupling weights are returned in the compute dtype.
* ``mask`` values are read as ``mask != 0``.
* Non-finite inputs: no backend checks for NaN/Inf (that would cost a device
  synchronisation).  A NaN/Inf in a position that takes part in the routing (a
  valid behaviour; in "behaviors" mode any position, padding included, since
  padding sits in the softmax denominator), in S, or in such a position's
  logits propagates to that user's capsules (and, through S, to everyone's);
  other users are unaffected.  In "interests" mode masked positions take no
  part, so whatever they hold is ignored.

Gradients: with ``detach_routing=True`` iterations 1 .. r-1 see ``u`` detached
and the final coupling ``w`` is a constant, so the gradient flows through the
last aggregation ``z = w u`` only (ROUTING.md, "Gradients").  With
``detach_routing=False`` autograd differentiates through every iteration.  No
gradient ever flows to ``init_logits`` or the masks.
"""

from __future__ import annotations

from typing import Optional

import torch

SQUASH_EPS = 1e-9


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32 / float16 / bfloat16 accumulate in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def squash(z: torch.Tensor) -> torch.Tensor:
    """squash(z) = |z|^2/(1+|z|^2) * z/sqrt(|z|^2+eps) over the last axis; squash(0) = 0."""
    n2 = (z * z).sum(dim=-1, keepdim=True)
    return n2 / (1.0 + n2) * z / torch.sqrt(n2 + SQUASH_EPS)


def coupling(
    logits: torch.Tensor,
    mask: torch.Tensor,
    interest_mask: torch.Tensor,
    softmax_over: str,
) -> torch.Tensor:
    """Coupling weights w (B, K, L) from logits b (B, K, L).

    ``mask`` (B, L) and ``interest_mask`` (B, K) are bool.  Entries that are
    excluded get exactly 0, and a softmax with nothing to normalise over gives
    0 rather than NaN.
    """
    valid = mask[:, None, :] & interest_mask[:, :, None]  # (B, K, L): where w may be non-zero
    if softmax_over == "interests":
        # Softmax over the active interests j, independently for each position i.
        b = logits.masked_fill(~interest_mask[:, :, None], float("-inf"))
        axis = 1
    else:
        # Softmax over all L positions (padding included), independently for each interest j.
        b = logits
        axis = 2
    peak = b.amax(dim=axis, keepdim=True)
    # Nothing to normalise over (all -inf): avoid -inf - -inf.  A NaN or +Inf logit must still poison its
    # softmax (the non-finite contract), so only -inf peaks and exactly-zero totals are special-cased.
    peak = torch.where(peak == float("-inf"), torch.zeros_like(peak), peak)
    e = torch.exp(b - peak)
    total = e.sum(dim=axis, keepdim=True)
    w = e / torch.where(total == 0, torch.ones_like(total), total)
    return torch.where(valid, w, torch.zeros_like(w))


def b2i_routing_reference(
    behaviors: torch.Tensor,
    weight: torch.Tensor,
    init_logits: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    interest_mask: Optional[torch.Tensor] = None,
    num_iters: int = 3,
    softmax_over: str = "interests",
    detach_routing: bool = True,
    return_weights: bool = False,
    logit_scale: float = 1.0,
):
    """B2I routing in plain PyTorch; see the module docstring for the math.

    Args:
        behaviors: E (B, L, D_in), float32 / float16 / bfloat16 / float64.
        weight: S (D_out, D_in), E's dtype or float32.
        init_logits: b0 (K, L) or (B, K, L); no gradient flows to it.
        mask: (B, L) bool or 0/1 integers, True for real behaviours; None = all valid.
        interest_mask: (B, K) bool, True for active interests; None = all active.
        num_iters: r >= 1 routing iterations.
        softmax_over: "interests" or "behaviors".
        detach_routing: see module docstring.
        return_weights: also return the final coupling w (B, K, L).
        logit_scale: s > 0 in the logit update b_ij += s * (c_j . u_i); 1 is the paper's update.

    Returns:
        capsules (B, K, D_out) in E's dtype, and w when ``return_weights``.

    Inputs are assumed validated (``mind_kernels.b2i_routing`` does it).
    """
    B, L, _ = behaviors.shape
    K = init_logits.shape[-2]
    acc = compute_dtype(behaviors.dtype)
    device = behaviors.device

    mask = torch.ones(B, L, dtype=torch.bool, device=device) if mask is None else mask != 0
    interest_mask = (
        torch.ones(B, K, dtype=torch.bool, device=device) if interest_mask is None else interest_mask != 0
    )

    E = behaviors.to(acc)
    if softmax_over == "interests":
        # Masked positions carry w = 0 and their logits are never read, so they cannot matter; zeroing
        # them before the matmul keeps a NaN/Inf in padding from leaking through 0 * NaN into the
        # output or into dS (the non-finite contract above).
        E = torch.where(mask[:, :, None], E, torch.zeros_like(E))
    u = E @ weight.to(acc).t()  # (B, L, D_out)
    u_routing = u.detach() if detach_routing else u
    b = init_logits.detach().to(acc).expand(B, K, L)

    for t in range(1, num_iters + 1):
        w = coupling(b, mask, interest_mask, softmax_over)
        if t < num_iters:
            c = squash(w @ u_routing)  # (B, K, D_out)
            agreement = c @ u_routing.transpose(1, 2)  # c_j . u_i
            # s = 1 skips the product (x * 1.0 == x anyway): the reference's graph stays the paper's.
            b = b + (agreement if logit_scale == 1.0 else logit_scale * agreement)  # b_ij += s * (c_j . u_i)
        else:
            # Final round: the gradient flows through z = w u only (w is constant when detached).
            c = squash(w @ u)
    capsules = c.to(behaviors.dtype)
    if return_weights:
        return capsules, w.detach()
    return capsules


def b2i_routing_jagged_reference(
    values: torch.Tensor,
    offsets: torch.Tensor,
    weight: torch.Tensor,
    init_logits: torch.Tensor,
    interest_mask: Optional[torch.Tensor] = None,
    num_iters: int = 3,
    softmax_over: str = "interests",
    detach_routing: bool = True,
    return_weights: bool = False,
    logit_scale: float = 1.0,
):
    """B2I routing of a jagged batch (ROUTING.md, "Jagged batches"), by definition: the padded op on the padded batch.

    Args:
        values: (N, D_in), every user's behaviours one user after another.
        offsets: (B + 1,) int64; user u's behaviours are values[offsets[u] : offsets[u + 1]].
        weight, num_iters, softmax_over, detach_routing, logit_scale: as :func:`b2i_routing_reference`.
        init_logits: b0 (K, L_max) or (B, K, L_max); user u reads its first n_u columns (all L_max in
            "behaviors" mode, where the padding sits in the softmax denominator).
        interest_mask: (B, K) or None.

    Returns:
        capsules (B, K, D_out) in values' dtype, and the final coupling w (N, K) when ``return_weights``.

    The batch is padded to (B, L_max, D_in) with zero rows (:func:`mind_kernels.jagged.pad`), so this
    costs B x L_max, not N: it is the spec and the oracle, not the fast path.  Gradients flow to values
    (through the padding) and S.
    """
    from .jagged import coupling_to_jagged, pad

    E, mask = pad(values, offsets, init_logits.shape[-1])
    capsules, w = b2i_routing_reference(E, weight, init_logits, mask, interest_mask, num_iters, softmax_over,
                                        detach_routing, True, logit_scale=logit_scale)
    if return_weights:
        return capsules, coupling_to_jagged(w, offsets, values.shape[0])
    return capsules
