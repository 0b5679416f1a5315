"""B2I routing as few standard tensor ops as possible, for graph runtimes (the ONNX export).

onnxruntime pays a fixed cost per graph node, and at batch 1 that cost is most of a call; the
reference (``mind_kernels.reference``) is written to be read, with a masked softmax that guards
every special case, and gives the exported tower about 1.5x the nodes of this form
(``bench/bench_export.py`` measures the latency).  It is the same math, reassociated as ROUTING.md
allows, for inference only (no gradient semantics):

    u = E S^T                                   (B, L, d)
    keep = mask (B, 1, L) * interest_mask (B, K, 1)          (as 0/1 floats)
    b = b0 (+ -inf on inactive interests, "interests" axis only)
    r times:  w = softmax(b, axis) * keep;  z = w u;  c = squash(z);  b += s c u^T  (t < r)

which is the reference's coupling exactly where the reference's special cases cannot arise in the
tower: a user always has an active interest (K'_u >= 1), and a user with no behaviour gets
keep = 0, hence z = 0 and c = 0 as in the reference.  The export tests hold it to the
native (fused) tower at float32 tolerance for both softmax axes, masks and dynamic interests.
"""

from __future__ import annotations

from typing import Optional

import torch

SQUASH_EPS = 1e-9  # mind_kernels.reference.SQUASH_EPS: squash(0) = 0


def routing(behaviors: torch.Tensor, weight: torch.Tensor, init_logits: torch.Tensor, mask: torch.Tensor,
            interest_mask: Optional[torch.Tensor], num_iters: int, softmax_over: str,
            logit_scale: float) -> torch.Tensor:
    """Capsules (B, K, d) from E (B, L, D_in), S (d, D_in), b0 (K, L), mask (B, L) bool, interest mask (B, K) or None."""
    B, L, _ = behaviors.shape
    K = init_logits.shape[-2]
    u = behaviors @ weight.t()                                               # (B, L, d)
    keep = mask[:, None, :].to(u.dtype)                                      # (B, 1, L)
    logits = init_logits.expand(B, K, L)
    if interest_mask is not None:
        keep = keep * interest_mask[:, :, None].to(u.dtype)                  # (B, K, L)
        if softmax_over == "interests":
            logits = logits + torch.where(interest_mask, 0.0, float("-inf"))[:, :, None]
    axis = 1 if softmax_over == "interests" else 2
    u_t = u.transpose(1, 2)                                                  # (B, d, L)
    for t in range(num_iters):
        z = (torch.softmax(logits, dim=axis) * keep) @ u                     # (B, K, d)
        n2 = (z * z).sum(dim=-1, keepdim=True)
        caps = n2 / (1.0 + n2) * z / torch.sqrt(n2 + SQUASH_EPS)
        if t + 1 < num_iters:
            logits = logits + logit_scale * (caps @ u_t)
    return caps
