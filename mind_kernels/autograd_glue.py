"""The autograd of the fused routing ops, shared by the compiled (C++/CUDA) and the Triton ops.

Every fused forward returns (capsules, coupling w, preactivation z); with ``detach_routing=True``
(ROUTING.md) w and z are constants, so their incoming gradients are dropped and the backward op
maps dL/dc to (dE, dS) from E, S, w and z alone.  Nothing flows to b0, the masks, num_iters, the
softmax axis or logit_scale.  Each factory returns ``(setup_context, backward)`` for
``register_autograd``; only the backward op differs between backends.
"""

from __future__ import annotations

from typing import Callable


def padded(backward_op: Callable):
    """For ``routing_forward(behaviors, weight, init_logits, mask, interest_mask, num_iters,
    over_behaviors, logit_scale)``; ``backward_op(grad_c, E, S, w, z) -> (dE, dS)``."""

    def setup_context(ctx, inputs, output):
        _, coupling, preactivation = output
        ctx.save_for_backward(inputs[0], inputs[1], coupling, preactivation)

    def backward(ctx, grad_capsules, grad_coupling, grad_preactivation):
        behaviors, weight, coupling, preactivation = ctx.saved_tensors
        if grad_capsules is None:
            return (None,) * 8
        grad_behaviors, grad_weight = backward_op(grad_capsules, behaviors, weight, coupling, preactivation)
        return (
            grad_behaviors if ctx.needs_input_grad[0] else None,
            grad_weight if ctx.needs_input_grad[1] else None,
            None, None, None, None, None, None,  # init_logits, masks, num_iters, over_behaviors, logit_scale
        )

    return setup_context, backward


def jagged(backward_op: Callable):
    """For ``routing_jagged_forward(values, offsets, weight, init_logits, interest_mask, num_iters,
    over_behaviors, logit_scale)``; ``backward_op(grad_c, values, offsets, S, w, z, max_len) ->
    (dvalues, dS)`` with max_len = b0's last size (so no device read of the offsets is needed)."""

    def setup_context(ctx, inputs, output):
        values, offsets, weight, init_logits = inputs[0], inputs[1], inputs[2], inputs[3]
        _, coupling, preactivation = output
        ctx.save_for_backward(values, offsets, weight, coupling, preactivation)
        ctx.max_len = init_logits.shape[-1]

    def backward(ctx, grad_capsules, grad_coupling, grad_preactivation):
        values, offsets, weight, coupling, preactivation = ctx.saved_tensors
        if grad_capsules is None:
            return (None,) * 8
        grad_values, grad_weight = backward_op(grad_capsules, values, offsets, weight, coupling, preactivation,
                                               ctx.max_len)
        return (
            grad_values if ctx.needs_input_grad[0] else None,
            None,  # offsets
            grad_weight if ctx.needs_input_grad[2] else None,
            None, None, None, None, None,  # init_logits, interest_mask, num_iters, over_behaviors, logit_scale
        )

    return setup_context, backward
