"""The compiled routing ops (CPU C++ and CUDA C++) and their autograd.

The schema is defined once in C++ (``csrc/schema.cpp``, ``TORCH_LIBRARY``)::

    mind_kernels::routing_forward(Tensor behaviors, Tensor weight, Tensor init_logits,
        Tensor? mask, Tensor? interest_mask, int num_iters, bool over_behaviors,
        float logit_scale=1.0) -> (Tensor capsules, Tensor coupling, Tensor preactivation)
    mind_kernels::routing_backward(Tensor grad_capsules, Tensor behaviors, Tensor weight,
        Tensor coupling, Tensor preactivation) -> (Tensor grad_behaviors, Tensor grad_weight)

    mind_kernels::routing_jagged_forward(Tensor values, Tensor offsets, Tensor weight, Tensor init_logits,
        Tensor? interest_mask, int num_iters, bool over_behaviors, float logit_scale=1.0)
        -> (Tensor capsules, Tensor coupling, Tensor preactivation)
    mind_kernels::routing_jagged_backward(Tensor grad_capsules, Tensor values, Tensor offsets, Tensor weight,
        Tensor coupling, Tensor preactivation, int max_len) -> (Tensor grad_values, Tensor grad_weight)

    mind_kernels::best_interest_ce(Tensor scores, Tensor targets, Tensor? interest_mask, int num_classes,
        float grad_scale) -> (Tensor losses, Tensor grad_scores)          (CPU only; mind_kernels/losses.py)

The jagged pair (ROUTING.md, "Jagged batches"; csrc/routing_jagged_cpu.cpp, and csrc/cuda/routing.cu
where the CUDA kernels are built) takes histories as values (N, D_in) + offsets (B + 1,); its coupling
is (N, K), aligned with values' rows; backward's max_len is the forward's L_max (b0's positions).

``capsules`` (B, K, D_out) has E's dtype; ``coupling`` w (B, K, L) and
``preactivation`` z (B, K, D_out) are in the accumulation dtype (float64 for
float64 inputs, else float32).  ``logit_scale`` s scales the logit update
b_ij += s * (c_j . u_i) of the iterations t < r.  Backward needs only E, S, w
and z: with ``detach_routing=True`` the gradient flows through the final
z = w S e only, whatever s.

The CPU implementation registers under the CPU dispatch key, the CUDA one under
CUDA; this module adds ``register_fake`` (shapes for torch.compile) and
``register_autograd`` (the backward op) once, for both.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from typing import Optional

import torch

from . import autograd_glue

_LOAD_ERROR: Optional[str] = None
try:  # the package must import and the reference must work when the extension is missing
    from mind_kernels import _C  # noqa: F401  (loading it registers the ops)
except (ImportError, OSError) as exc:  # pragma: no cover - depends on the install
    _C = None
    _LOAD_ERROR = f"the compiled extension mind_kernels._C is not built or failed to load ({exc})"

BUILD_INFO_PATH = os.path.join(os.path.dirname(__file__), "_build_info.json")


def build_info() -> dict:
    """What the extension was built for (written by setup.py beside the binary); {} if absent."""
    try:
        with open(BUILD_INFO_PATH) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _check_build_matches_runtime() -> None:
    info = build_info()
    if _C is None or not info:
        return
    running = {"torch": torch.__version__, "python": f"{sys.version_info[0]}.{sys.version_info[1]}"}
    for key, now in running.items():
        built = info.get(key)
        if built is not None and built != now:
            warnings.warn(
                f"mind_kernels._C was built for {key} {built} but {key} {now} is running; "
                "rebuild with `pip install --no-build-isolation .` if the fused backends misbehave",
                RuntimeWarning,
                stacklevel=3,
            )


_check_build_matches_runtime()


def extension_error() -> Optional[str]:
    """Why the compiled extension is unavailable, or None when it loaded."""
    return _LOAD_ERROR


@torch.compiler.assume_constant_result  # dynamo cannot trace the dispatcher query; the answer never changes
def kernel_unavailable_reason(device_type: str) -> Optional[str]:
    """None when a compiled routing kernel exists for ``device_type`` ("cpu" or "cuda"), else why not."""
    return _kernel_unavailable_reason(device_type)


@functools.lru_cache(maxsize=None)  # asked on every call by the dispatcher; fixed once the extension loaded
def _kernel_unavailable_reason(device_type: str) -> Optional[str]:
    if _LOAD_ERROR is not None:
        return _LOAD_ERROR
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    for op in ("routing_forward", "routing_backward"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"mind_kernels::{op}", key):
            where = "csrc/routing_cpu.cpp" if key == "CPU" else "csrc/cuda/ (needs a CUDA torch and nvcc at build time)"
            return f"mind_kernels._C has no {key} kernel for {op}; it was built without {where}"
    return None


@torch.compiler.assume_constant_result
def jagged_kernel_unavailable_reason(device_type: str) -> Optional[str]:
    """None when the compiled jagged routing kernel exists for ``device_type``, else why not."""
    return _jagged_kernel_unavailable_reason(device_type)


@functools.lru_cache(maxsize=None)
def _jagged_kernel_unavailable_reason(device_type: str) -> Optional[str]:
    return _missing_kernel(("routing_jagged_forward", "routing_jagged_backward"), device_type)


@torch.compiler.assume_constant_result
def loss_kernel_unavailable_reason(device_type: str) -> Optional[str]:
    """None when the compiled ``best_interest_ce`` kernel serves ``device_type`` (CPU only), else why not."""
    return _loss_kernel_unavailable_reason(device_type)


@functools.lru_cache(maxsize=None)  # asked on every loss call
def _loss_kernel_unavailable_reason(device_type: str) -> Optional[str]:
    if device_type != "cpu":
        return f"the compiled best_interest_ce kernel is CPU only ({device_type} runs its math in torch ops)"
    return _missing_kernel(("best_interest_ce",), device_type)


def _missing_kernel(op_names, device_type: str) -> Optional[str]:
    """Why one of ``op_names`` has no compiled ``device_type`` kernel (ops an older build may lack), or None."""
    if _LOAD_ERROR is not None:
        return _LOAD_ERROR
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    for op in op_names:
        if not hasattr(torch.ops.mind_kernels, op) or not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"mind_kernels::{op}", key
        ):
            return f"mind_kernels._C has no {key} kernel for {op} (rebuild the extension)"
    return None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if _C is not None:

    @torch.library.register_fake("mind_kernels::routing_forward")
    def _routing_forward_fake(
        behaviors, weight, init_logits, mask, interest_mask, num_iters, over_behaviors, logit_scale=1.0
    ):
        B, L, _ = behaviors.shape
        K = init_logits.shape[-2]
        D_out = weight.shape[0]
        acc = _acc_dtype(behaviors.dtype)
        capsules = behaviors.new_empty((B, K, D_out))
        coupling = behaviors.new_empty((B, K, L), dtype=acc)
        preactivation = behaviors.new_empty((B, K, D_out), dtype=acc)
        return capsules, coupling, preactivation

    @torch.library.register_fake("mind_kernels::routing_backward")
    def _routing_backward_fake(grad_capsules, behaviors, weight, coupling, preactivation):
        return torch.empty_like(behaviors, memory_format=torch.contiguous_format), torch.empty_like(
            weight, memory_format=torch.contiguous_format
        )

    setup_context, backward = autograd_glue.padded(torch.ops.mind_kernels.routing_backward)
    torch.library.register_autograd("mind_kernels::routing_forward", backward, setup_context=setup_context)

    if hasattr(torch.ops.mind_kernels, "routing_jagged_forward"):  # an older build may lack the jagged ops

        @torch.library.register_fake("mind_kernels::routing_jagged_forward")
        def _routing_jagged_forward_fake(
            values, offsets, weight, init_logits, interest_mask, num_iters, over_behaviors, logit_scale=1.0
        ):
            # Every output size is known from the input sizes: B from offsets, N from values.
            B = offsets.shape[0] - 1
            K = init_logits.shape[-2]
            D_out = weight.shape[0]
            acc = _acc_dtype(values.dtype)
            capsules = values.new_empty((B, K, D_out))
            coupling = values.new_empty((values.shape[0], K), dtype=acc)
            preactivation = values.new_empty((B, K, D_out), dtype=acc)
            return capsules, coupling, preactivation

        @torch.library.register_fake("mind_kernels::routing_jagged_backward")
        def _routing_jagged_backward_fake(grad_capsules, values, offsets, weight, coupling, preactivation, max_len):
            return torch.empty_like(values, memory_format=torch.contiguous_format), torch.empty_like(
                weight, memory_format=torch.contiguous_format
            )

        setup_context, backward = autograd_glue.jagged(torch.ops.mind_kernels.routing_jagged_backward)
        torch.library.register_autograd(
            "mind_kernels::routing_jagged_forward", backward, setup_context=setup_context
        )


if _C is not None and hasattr(torch.ops.mind_kernels, "best_interest_ce"):

    @torch.library.register_fake("mind_kernels::best_interest_ce")
    def _best_interest_ce_fake(scores, targets, interest_mask, num_classes, grad_scale):
        rows = scores.new_empty((scores.shape[0],), dtype=_acc_dtype(scores.dtype))
        return rows, torch.empty_like(scores, memory_format=torch.contiguous_format)


def routing_fused(behaviors, weight, init_logits, mask, interest_mask, num_iters, softmax_over, logit_scale=1.0):
    """Run the compiled op (CPU or CUDA by the tensors' device); returns (capsules, coupling).

    Masks are normalised to bool and logits to the accumulation dtype here so
    the C++ side sees one layout; the kernels make inputs contiguous themselves.
    """
    acc = _acc_dtype(behaviors.dtype)
    # Conversions only where needed: at B = 1 each extra tensor op is a visible share of the call.
    if mask is not None and mask.dtype != torch.bool:
        mask = mask != 0
    if interest_mask is not None and interest_mask.dtype != torch.bool:
        interest_mask = interest_mask != 0
    if init_logits.dtype != acc:
        init_logits = init_logits.to(acc)
    args = (
        behaviors,
        weight,
        init_logits,  # no gradient flows to it: the registered backward returns None for it
        mask,
        interest_mask,
        num_iters,
        softmax_over == "behaviors",
        float(logit_scale),
    )
    return _forward(torch.ops.mind_kernels.routing_forward, args, behaviors, weight)


def routing_jagged_fused(values, offsets, weight, init_logits, interest_mask, num_iters, softmax_over,
                         logit_scale=1.0):
    """Run the compiled jagged op (CPU); returns (capsules (B, K, D_out), coupling (N, K))."""
    acc = _acc_dtype(values.dtype)
    if interest_mask is not None and interest_mask.dtype != torch.bool:
        interest_mask = interest_mask != 0
    if init_logits.dtype != acc:
        init_logits = init_logits.to(acc)
    args = (values, offsets, weight, init_logits, interest_mask, num_iters, softmax_over == "behaviors",
            float(logit_scale))
    return _forward(torch.ops.mind_kernels.routing_jagged_forward, args, values, weight)


def _forward(op, args, behaviors, weight):
    """(capsules, coupling) of a compiled forward op.  Serving (no_grad / inference, or no input requiring
    grad) skips the Python autograd kernel that register_autograd puts in front of the op (~4 us of a
    ~20 us B = 1 call)."""
    if _autograd_not_needed(behaviors, weight):
        with torch._C._AutoDispatchBelowAutograd():
            capsules, coupling, _ = op(*args)
    else:
        capsules, coupling, _ = op(*args)
    return capsules, coupling


def _autograd_not_needed(behaviors, weight) -> bool:
    """True when the call cannot record a graph: plain eager tensors, none of them needing a gradient.

    Tracing (torch.compile) and functorch transforms keep the regular dispatch path.
    """
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return not (torch.is_grad_enabled() and (behaviors.requires_grad or weight.requires_grad))
