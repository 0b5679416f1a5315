"""The routing op's public entry points: validation, then the dispatcher."""

from __future__ import annotations

from . import dispatch
from .dispatch import RoutingCall
from .reference import compute_dtype
from .validation import check_routing_inputs


def _call_of(behaviors, weight, shape, softmax_over, detach_routing) -> RoutingCall:
    return RoutingCall(
        device_type=dispatch._device_type(behaviors.device),
        dtype=behaviors.dtype,
        weight_dtype=weight.dtype,
        detach_routing=bool(detach_routing),
        softmax_over=softmax_over,
        batch=shape.batch,
        length=shape.length,
        interests=shape.interests,
        in_dim=shape.in_dim,
        out_dim=shape.out_dim,
    )


def b2i_routing(
    behaviors,
    weight,
    init_logits,
    mask=None,
    interest_mask=None,
    num_iters=3,
    softmax_over="interests",
    detach_routing=True,
    logit_scale=1.0,
    return_weights=False,
    backend="auto",
):
    """MIND's behaviour-to-interest dynamic routing.

    Args:
        behaviors: E (B, L, D_in), float32 / float16 / bfloat16 (float64 for testing).
        weight: S (D_out, D_in), E's dtype or float32; u_i = S e_i.
        init_logits: b0 (K, L) or (B, K, L), float; K is taken from it. No gradient flows to it.
        mask: (B, L) bool or 0/1 integer, True for real behaviours; None = all valid.
        interest_mask: (B, K) bool, active interests; None = all active.
        num_iters: r >= 1 routing iterations.
        softmax_over: "interests" (MIND) or "behaviors" (ComiRec / torch-rechub).
        detach_routing: gradient through the final aggregation only (True) or through every iteration.
        logit_scale: s, a finite float > 0: the logit update is b_ij += s * (c_j . u_i) (EasyRec's MIND uses
            s around 20); s = 1 (the default) is the paper's update.
        return_weights: also return the final coupling weights w (B, K, L) in float32.
        backend: "auto", "reference", "cpp", "triton" or "cuda" (see :mod:`mind_kernels.dispatch`).

    Returns:
        capsules (B, K, D_out) in E's dtype; and w (B, K, L) when ``return_weights``.

    Users without a valid behaviour and inactive interests get zero capsules.
    """
    shape = check_routing_inputs(
        behaviors, weight, init_logits, mask, interest_mask, num_iters, softmax_over, backend, logit_scale
    )
    logit_scale = float(logit_scale)
    call = _call_of(behaviors, weight, shape, softmax_over, detach_routing)
    chosen = dispatch.select(call, backend)  # before the B = 0 shortcut: a refused backend raises either way
    if shape.batch == 0:
        capsules = behaviors.new_zeros((0, shape.interests, shape.out_dim))
        if return_weights:
            acc = compute_dtype(behaviors.dtype)
            return capsules, behaviors.new_zeros((0, shape.interests, shape.length), dtype=acc)
        return capsules
    capsules, weights = chosen.run(
        behaviors, weight, init_logits, mask, interest_mask, num_iters, softmax_over, detach_routing, logit_scale
    )
    return (capsules, weights) if return_weights else capsules


def backends(*args, **kwargs) -> dispatch.BackendTable:
    """Which backends exist and are built; with the arguments of a call, why each would refuse it.

    ``backends()`` lists every backend with, per device type, None or the reason it is
    unavailable.  ``backends(behaviors, weight, init_logits, ...)`` (``b2i_routing``'s
    arguments) also fills ``reasons`` per backend and ``selected`` (what "auto" picks).
    ``print(backends())`` gives a readable table.
    """
    if not args and not kwargs:
        return dispatch.describe()
    names = ["behaviors", "weight", "init_logits", "mask", "interest_mask", "num_iters", "softmax_over",
             "detach_routing", "logit_scale", "return_weights", "backend"]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    detach = bound.pop("detach_routing", True)
    bound.pop("return_weights", None)
    bound.pop("backend", None)
    shape = check_routing_inputs(**bound)
    call = _call_of(bound["behaviors"], bound["weight"], shape, bound.get("softmax_over", "interests"), detach)
    return dispatch.describe(call)
