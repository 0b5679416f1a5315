"""Input checks shared by every backend of the routing op.

Every public entry point calls :func:`check_routing_inputs` before any backend
sees a tensor, so a wrong shape, dtype or device gets one clear message naming
the argument and the shapes seen, whatever backend would have served the call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Optional

import torch

#: Input dtypes the contract accepts for ``behaviors``.  float64 is accepted too:
#: it is what the reference is evaluated in when it serves as the oracle.
BEHAVIOR_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SOFTMAX_AXES = ("interests", "behaviors")
BACKEND_NAMES = ("auto", "reference", "cpp", "triton", "cuda")


@dataclass(frozen=True)
class RoutingShape:
    """Sizes of one routing call: B users, L positions, K interests, D_in -> D_out."""

    batch: int
    length: int
    interests: int
    in_dim: int
    out_dim: int


def _describe(t: Optional[torch.Tensor]) -> str:
    if t is None:
        return "None"
    return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_routing_inputs(
    behaviors,
    weight,
    init_logits,
    mask=None,
    interest_mask=None,
    num_iters=3,
    softmax_over="interests",
    backend="auto",
    logit_scale=1.0,
) -> RoutingShape:
    """Validate the arguments of ``b2i_routing``; return the sizes.

    Raises ``TypeError`` for a wrong type or dtype and ``ValueError`` for a wrong
    rank, size, device or option value, each naming the argument.
    """
    for name, t in (("behaviors", behaviors), ("weight", weight), ("init_logits", init_logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"b2i_routing: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("mask", mask), ("interest_mask", interest_mask)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"b2i_routing: `{name}` must be a torch.Tensor or None, got {type(t).__name__}")

    if behaviors.dim() != 3:
        raise ValueError(f"b2i_routing: `behaviors` must be 3-D (B, L, D_in), got {_describe(behaviors)}")
    if behaviors.dtype not in BEHAVIOR_DTYPES:
        raise TypeError(
            f"b2i_routing: `behaviors` must be float32, float16, bfloat16 or float64, got {behaviors.dtype}"
        )
    B, L, D_in = behaviors.shape
    if L < 1 or D_in < 1:
        raise ValueError(f"b2i_routing: `behaviors` needs L >= 1 and D_in >= 1, got {_describe(behaviors)}")

    if weight.dim() != 2:
        raise ValueError(f"b2i_routing: `weight` must be 2-D (D_out, D_in), got {_describe(weight)}")
    if weight.shape[1] != D_in:
        raise ValueError(
            f"b2i_routing: `weight` is (D_out, D_in) = {tuple(weight.shape)} but `behaviors` has D_in = {D_in} "
            f"(behaviors shape {tuple(behaviors.shape)})"
        )
    if weight.shape[0] < 1:
        raise ValueError(f"b2i_routing: `weight` needs D_out >= 1, got {_describe(weight)}")
    if weight.dtype not in (behaviors.dtype, torch.float32):
        raise TypeError(
            f"b2i_routing: `weight` must have the dtype of `behaviors` ({behaviors.dtype}) or float32, "
            f"got {weight.dtype}"
        )

    if init_logits.dim() not in (2, 3):
        raise ValueError(f"b2i_routing: `init_logits` must be (K, L) or (B, K, L), got {_describe(init_logits)}")
    if not init_logits.is_floating_point():
        raise TypeError(f"b2i_routing: `init_logits` must be a floating tensor, got {init_logits.dtype}")
    K = init_logits.shape[-2]
    if K < 1:
        raise ValueError(f"b2i_routing: `init_logits` needs K >= 1 interests, got {_describe(init_logits)}")
    if init_logits.shape[-1] != L:
        raise ValueError(
            f"b2i_routing: `init_logits` has L = {init_logits.shape[-1]} positions but `behaviors` has L = {L} "
            f"(init_logits {tuple(init_logits.shape)}, behaviors {tuple(behaviors.shape)})"
        )
    if init_logits.dim() == 3 and init_logits.shape[0] != B:
        raise ValueError(
            f"b2i_routing: `init_logits` has B = {init_logits.shape[0]} but `behaviors` has B = {B} "
            f"(init_logits {tuple(init_logits.shape)}, behaviors {tuple(behaviors.shape)})"
        )

    if mask is not None:
        if mask.shape != (B, L):
            raise ValueError(
                f"b2i_routing: `mask` must be (B, L) = {(B, L)}, got shape {tuple(mask.shape)}"
            )
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"b2i_routing: `mask` must be bool or integer 0/1, got {mask.dtype}")
    if interest_mask is not None:
        if interest_mask.shape != (B, K):
            raise ValueError(
                f"b2i_routing: `interest_mask` must be (B, K) = {(B, K)}, got shape {tuple(interest_mask.shape)}"
            )
        if interest_mask.is_floating_point() or interest_mask.is_complex():
            raise TypeError(f"b2i_routing: `interest_mask` must be bool or integer 0/1, got {interest_mask.dtype}")

    _check_device_and_options(
        "b2i_routing", "behaviors", behaviors,
        (("weight", weight), ("init_logits", init_logits), ("mask", mask), ("interest_mask", interest_mask)),
        num_iters, softmax_over, backend, logit_scale,
    )
    return RoutingShape(B, L, K, D_in, weight.shape[0])


def _check_device_and_options(where, first_name, first, others, num_iters, softmax_over, backend, logit_scale):
    """The checks the padded and the jagged op share: every tensor in ``others`` ((name, tensor or None)
    pairs) on ``first``'s device, and the scalar options."""
    device = first.device
    for name, t in others:
        if t is not None and t.device != device:
            raise ValueError(f"{where}: `{name}` is on {t.device} but `{first_name}` is on {device}; "
                             "all tensors must be on one device")
    if isinstance(num_iters, bool) or not isinstance(num_iters, int):
        raise TypeError(f"{where}: `num_iters` must be an int >= 1, got {num_iters!r}")
    if num_iters < 1:
        raise ValueError(f"{where}: `num_iters` must be >= 1, got {num_iters}")
    if softmax_over not in SOFTMAX_AXES:
        raise ValueError(f"{where}: `softmax_over` must be one of {SOFTMAX_AXES}, got {softmax_over!r}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"{where}: `backend` must be one of {BACKEND_NAMES}, got {backend!r}")
    check_logit_scale(logit_scale, where)


def check_logit_scale(logit_scale, where: str = "b2i_routing") -> float:
    """``logit_scale`` s as a float; raises unless it is a finite real number > 0 (ROUTING.md, "Routing logit scale")."""
    if type(logit_scale) is float and 0 < logit_scale < math.inf:   # the common case, without the ABC check
        return logit_scale
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, Real):
        raise TypeError(f"{where}: `logit_scale` must be a finite float > 0, got {logit_scale!r}")
    value = float(logit_scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where}: `logit_scale` must be a finite float > 0, got {logit_scale!r}")
    return value


@dataclass(frozen=True)
class JaggedShape:
    """Sizes of one jagged routing call: B users, N behaviours in all, L_max (b0's positions), K, D_in -> D_out."""

    batch: int
    rows: int
    length: int
    interests: int
    in_dim: int
    out_dim: int


def check_jagged_inputs(
    values,
    offsets,
    weight,
    init_logits,
    interest_mask=None,
    num_iters=3,
    softmax_over="interests",
    backend="auto",
    logit_scale=1.0,
) -> JaggedShape:
    """Validate the arguments of ``b2i_routing_jagged`` (values (N, D_in), offsets (B + 1,)); return the sizes.

    Besides shapes, dtypes and devices, the offsets' values are checked (offsets[0] = 0, non-decreasing,
    offsets[B] = N, every n_u <= L_max of ``init_logits``): one small host read of the offsets, a device
    synchronisation on a GPU.  Under torch.compile those value checks are left to the kernels (the CPU
    op checks them itself) so the graph has no data-dependent branch.
    """
    where = "b2i_routing_jagged"
    for name, t in (("values", values), ("offsets", offsets), ("weight", weight), ("init_logits", init_logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if interest_mask is not None and not isinstance(interest_mask, torch.Tensor):
        raise TypeError(f"{where}: `interest_mask` must be a torch.Tensor or None, got {type(interest_mask).__name__}")
    if values.dim() != 2:
        raise ValueError(f"{where}: `values` must be 2-D (N, D_in), got {_describe(values)}")
    if values.dtype not in BEHAVIOR_DTYPES:
        raise TypeError(f"{where}: `values` must be float32, float16, bfloat16 or float64, got {values.dtype}")
    N, D_in = values.shape
    if D_in < 1:
        raise ValueError(f"{where}: `values` needs D_in >= 1, got {_describe(values)}")
    if offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(f"{where}: `offsets` must be 1-D (B + 1,) with B >= 0, got {_describe(offsets)}")
    if offsets.dtype != torch.int64:
        raise TypeError(f"{where}: `offsets` must be int64, got {offsets.dtype}")
    B = offsets.shape[0] - 1

    if weight.dim() != 2 or weight.shape[1] != D_in or weight.shape[0] < 1:
        raise ValueError(f"{where}: `weight` must be (D_out, D_in) with D_in = {D_in} and D_out >= 1, "
                         f"got {_describe(weight)}")
    if weight.dtype not in (values.dtype, torch.float32):
        raise TypeError(f"{where}: `weight` must have the dtype of `values` ({values.dtype}) or float32, "
                        f"got {weight.dtype}")
    if init_logits.dim() not in (2, 3):
        raise ValueError(f"{where}: `init_logits` must be (K, L_max) or (B, K, L_max), got {_describe(init_logits)}")
    if not init_logits.is_floating_point():
        raise TypeError(f"{where}: `init_logits` must be a floating tensor, got {init_logits.dtype}")
    K, L_max = init_logits.shape[-2], init_logits.shape[-1]
    if K < 1 or L_max < 1:
        raise ValueError(f"{where}: `init_logits` needs K >= 1 and L_max >= 1, got {_describe(init_logits)}")
    if init_logits.dim() == 3 and init_logits.shape[0] != B:
        raise ValueError(f"{where}: `init_logits` has B = {init_logits.shape[0]} but `offsets` has B + 1 = "
                         f"{B + 1} entries")
    if interest_mask is not None:
        if interest_mask.shape != (B, K):
            raise ValueError(f"{where}: `interest_mask` must be (B, K) = {(B, K)}, got shape "
                             f"{tuple(interest_mask.shape)}")
        if interest_mask.is_floating_point() or interest_mask.is_complex():
            raise TypeError(f"{where}: `interest_mask` must be bool or integer 0/1, got {interest_mask.dtype}")
    _check_device_and_options(
        where, "values", values,
        (("offsets", offsets), ("weight", weight), ("init_logits", init_logits), ("interest_mask", interest_mask)),
        num_iters, softmax_over, backend, logit_scale,
    )
    if not torch.compiler.is_compiling():
        _check_offsets_values(offsets, N, L_max, where)
    return JaggedShape(B, N, L_max, K, D_in, weight.shape[0])


def _check_offsets_values(offsets: torch.Tensor, N: int, L_max: int, where: str) -> None:
    o = offsets.detach().cpu()  # B + 1 integers: one small copy (a synchronisation on a GPU)
    if int(o[0]) != 0:
        raise ValueError(f"{where}: `offsets` must start at 0, got offsets[0] = {int(o[0])}")
    n = o[1:] - o[:-1]
    if bool((n < 0).any()):
        u = int(torch.nonzero(n < 0)[0, 0])
        raise ValueError(f"{where}: `offsets` must be non-decreasing, got offsets[{u}] = {int(o[u])} > "
                         f"offsets[{u + 1}] = {int(o[u + 1])}")
    if int(o[-1]) != N:
        raise ValueError(f"{where}: `offsets` must end at N = values.shape[0] = {N}, got offsets[-1] = {int(o[-1])}")
    if n.numel() and int(n.max()) > L_max:
        u = int(torch.argmax(n))
        raise ValueError(f"{where}: user {u} has {int(n[u])} behaviours, more than L_max = {L_max} positions of "
                         "`init_logits` (b0 must cover the longest history)")
