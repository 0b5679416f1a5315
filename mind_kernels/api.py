"""The routing op's public entry points: validation, then the dispatcher."""

from __future__ import annotations

from . import dispatch
from .dispatch import RoutingCall
from .jagged import is_jagged_nested, unpack_nested
from .reference import compute_dtype
from .validation import check_jagged_inputs, check_routing_inputs


def _call_of(behaviors, weight, shape, softmax_over, detach_routing, jagged=False) -> RoutingCall:
    """What the dispatcher sees of a call; ``behaviors`` is E (B, L, D_in) or, ``jagged``, values (N, D_in)."""
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
        jagged=jagged,
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


def b2i_routing_jagged(
    values,
    offsets,
    weight,
    init_logits,
    interest_mask=None,
    num_iters=3,
    softmax_over="interests",
    detach_routing=True,
    logit_scale=1.0,
    return_weights=False,
    backend="auto",
):
    """B2I routing of a jagged batch: histories of different lengths without padding (ROUTING.md, "Jagged batches").

    Args:
        values: (N, D_in), every user's behaviours, user after user, oldest first (float32 / float16 /
            bfloat16; float64 for testing); or a torch nested tensor with ``layout=torch.jagged`` of
            shape (B, j, D_in), with ``offsets=None``.
        offsets: (B + 1,) int64 with offsets[0] = 0, non-decreasing, offsets[B] = N: user u's behaviours
            are values[offsets[u] : offsets[u + 1]] (TorchRec's ``JaggedTensor`` layout).  n_u = 0 is allowed.
        weight: S (D_out, D_in), values' dtype or float32.
        init_logits: b0 (K, L_max) or (B, K, L_max), with L_max >= every n_u; user u reads its first n_u
            columns ("behaviors" mode: all L_max, the padding sitting in the softmax denominator).
        interest_mask, num_iters, softmax_over, detach_routing, logit_scale, backend: as :func:`b2i_routing`.
        return_weights: also return the final coupling weights as (N, K) float32, row offsets[u] + i
            holding behaviour i's weight in each interest.

    Returns:
        capsules (B, K, D_out) in values' dtype (zeros for a user with n_u = 0); and w (N, K) when
        ``return_weights``.

    The result equals :func:`b2i_routing` on the zero-padded batch (B, L_max, D_in) with mask
    position < n_u.  Gradients flow to ``values`` and ``weight``.  Backends: cpp (CPU) and cuda run
    jagged kernels whose memory traffic and products follow N (each user's n_u rows at its offset);
    triton reads and writes only the n_u rows but computes on (K, L_max) tiles; the reference pads to
    (B, L_max) and runs the padded reference (cost B x L_max).  The offsets are checked on the host
    (one synchronisation on a GPU).
    """
    if is_jagged_nested(values):
        if offsets is not None:
            raise ValueError("b2i_routing_jagged: give `offsets=None` with a nested `values` (its offsets are used)")
        values, offsets = unpack_nested(values)
    shape = check_jagged_inputs(
        values, offsets, weight, init_logits, interest_mask, num_iters, softmax_over, backend, logit_scale
    )
    logit_scale = float(logit_scale)
    call = _call_of(values, weight, shape, softmax_over, detach_routing, jagged=True)
    chosen = dispatch.select(call, backend)  # before the B = 0 shortcut: a refused backend raises either way
    if shape.batch == 0:
        capsules = values.new_zeros((0, shape.interests, shape.out_dim))
        if return_weights:
            return capsules, values.new_zeros((shape.rows, shape.interests), dtype=compute_dtype(values.dtype))
        return capsules
    capsules, weights = chosen.run_jagged(
        values, offsets, weight, init_logits, interest_mask, num_iters, softmax_over, detach_routing, logit_scale
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
