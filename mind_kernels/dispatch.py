"""Pick a backend per call, and say why each one would refuse.

Every backend takes the same arguments as the reference (``logit_scale`` too:
every backend serves any s > 0, so it is not part of a call's description) and
states what it cannot take (device, dtype, option, not built) as a list of
reasons, the way xformers' ``not_supported_reasons`` does.  ``backend="auto"`` takes the first
backend of the device's preference order that has no reason to refuse:

* CPU tensors:  cpp -> reference
* CUDA tensors: cuda -> triton -> reference

An explicitly requested backend that cannot serve raises ``ValueError`` with
every reason.  ``MIND_KERNELS_BACKEND`` (one of the backend names) forces a
backend whenever the call says ``backend="auto"``; an explicit argument wins
over the variable.  When "auto" passes over a built backend that would
normally serve the device (for example the C++ kernels for
``detach_routing=False``), the fallback is logged once per reason on the
``mind_kernels`` logger.

Jagged calls (``b2i_routing_jagged``: values (N, D_in) + offsets, ``RoutingCall.jagged``; ``length`` is
then b0's L_max) go through the same choice and each backend's ``run_jagged``: cpp runs the truly
jagged CPU kernel (cost follows N); cuda runs its kernels with the offsets (each user's n_u rows read
and written, the products over them; an extension built before the jagged kernels pads instead);
triton runs its kernels in jagged mode (memory traffic follows N, arithmetic on (K, L_max) tiles); the
reference pads the batch to (B, L_max) and runs the padded reference
(:func:`mind_kernels.jagged.via_padding` is the padding path).

The fused GPU kernels (cuda, triton) have not been verified on every GPU (see
``mind_kernels.verified.VERIFIED``): the first call in a process that a GPU
backend serves on a CUDA tensor logs once, at WARNING level on the same logger,
that ``python -m mind_kernels.selftest`` checks them on this GPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from . import reference

logger = logging.getLogger("mind_kernels")

ENV_VAR = "MIND_KERNELS_BACKEND"
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class RoutingCall(NamedTuple):
    """What a backend needs to know to accept or refuse a call (a NamedTuple: built on every call, cheaply)."""

    device_type: str
    dtype: torch.dtype
    weight_dtype: torch.dtype
    detach_routing: bool
    softmax_over: str
    batch: int
    length: int
    interests: int
    in_dim: int
    out_dim: int
    jagged: bool = False  # values + offsets (b2i_routing_jagged); length is then L_max


@dataclass
class Backend:
    """One implementation of the op.

    ``unavailable`` says why the backend cannot run at all on a device type
    (not built, not installed), or None; ``refuses`` lists the reasons it
    cannot take one call; ``run`` computes (capsules, coupling weights);
    ``run_jagged`` the same for a jagged batch (values, offsets, ...), with w as (N, K).
    """

    name: str
    devices: Tuple[str, ...]
    unavailable: Callable[[str], Optional[str]]
    refuses: Callable[[RoutingCall], List[str]]
    run: Callable[..., Tuple[torch.Tensor, torch.Tensor]]
    run_jagged: Optional[Callable[..., Tuple[torch.Tensor, torch.Tensor]]] = None

    def not_supported_reasons(self, call: RoutingCall) -> List[str]:
        if call.device_type not in self.devices:
            return [f"{self.name} runs on {'/'.join(self.devices)} tensors, not {call.device_type}"]
        why = self.unavailable(call.device_type)
        if why is not None:
            return [why]
        return self.refuses(call)


# ---------------------------------------------------------------- backends


def _reference_run(
    behaviors, weight, init_logits, mask, interest_mask, num_iters, softmax_over, detach_routing, logit_scale=1.0
):
    return reference.b2i_routing_reference(
        behaviors, weight, init_logits, mask, interest_mask, num_iters, softmax_over, detach_routing, True,
        logit_scale=logit_scale,
    )


def _fused_refuses(call: RoutingCall) -> List[str]:
    reasons = []
    if not call.detach_routing:
        reasons.append("detach_routing=False is served by the reference only (the fused backward is the detached one)")
    if call.dtype not in FUSED_DTYPES:
        reasons.append(f"dtype {call.dtype} is not supported")
    return reasons


def _compiled_unavailable(device_type: str) -> Optional[str]:
    from . import ops

    why = ops.kernel_unavailable_reason(device_type)
    if why is None and device_type == "cuda" and not torch.cuda.is_available():
        return "the CUDA kernels are built, but CUDA is not available here (no GPU or driver)"
    return why


def _compiled_run(
    behaviors, weight, init_logits, mask, interest_mask, num_iters, softmax_over, detach_routing, logit_scale=1.0
):
    from . import ops

    return ops.routing_fused(behaviors, weight, init_logits, mask, interest_mask, num_iters, softmax_over, logit_scale)


def _triton_unavailable(device_type: str) -> Optional[str]:
    try:
        from .triton import routing as triton_routing
    except ImportError as exc:  # the module itself imports triton lazily; this is a packaging error
        return f"mind_kernels.triton could not be imported ({exc})"
    return triton_routing.unavailable_reason(device_type)


def _triton_refuses(call: RoutingCall) -> List[str]:
    from .triton import routing as triton_routing

    return _fused_refuses(call) + triton_routing.shape_refusals(call)


def _triton_run(
    behaviors, weight, init_logits, mask, interest_mask, num_iters, softmax_over, detach_routing, logit_scale=1.0
):
    from .triton import routing as triton_routing

    return triton_routing.routing_triton(
        behaviors, weight, init_logits, mask, interest_mask, num_iters, softmax_over, logit_scale
    )


def _reference_run_jagged(values, offsets, weight, init_logits, interest_mask, num_iters, softmax_over,
                          detach_routing, logit_scale=1.0):
    return reference.b2i_routing_jagged_reference(
        values, offsets, weight, init_logits, interest_mask, num_iters, softmax_over, detach_routing, True,
        logit_scale=logit_scale,
    )


def _cpp_refuses(call: RoutingCall) -> List[str]:
    reasons = _fused_refuses(call)
    if call.jagged:
        from . import ops

        why = ops.jagged_kernel_unavailable_reason("cpu")
        if why is not None:
            reasons.append(why)
    return reasons


def _compiled_run_jagged(values, offsets, weight, init_logits, interest_mask, num_iters, softmax_over,
                         detach_routing, logit_scale=1.0):
    from . import ops

    return ops.routing_jagged_fused(values, offsets, weight, init_logits, interest_mask, num_iters, softmax_over,
                                    logit_scale)


def _cuda_run_jagged(values, offsets, weight, init_logits, interest_mask, num_iters, softmax_over, detach_routing,
                     logit_scale=1.0):
    from . import ops

    if ops.jagged_kernel_unavailable_reason("cuda") is None:
        return _compiled_run_jagged(values, offsets, weight, init_logits, interest_mask, num_iters, softmax_over,
                                    detach_routing, logit_scale)
    # An extension built before the jagged CUDA kernels: the padded kernel on the padded batch.
    return _padding_runner(_compiled_run)(values, offsets, weight, init_logits, interest_mask, num_iters,
                                          softmax_over, detach_routing, logit_scale)


def _triton_run_jagged(values, offsets, weight, init_logits, interest_mask, num_iters, softmax_over, detach_routing,
                       logit_scale=1.0):
    from .triton import routing as triton_routing

    return triton_routing.routing_jagged_triton(values, offsets, weight, init_logits, interest_mask, num_iters,
                                                softmax_over, logit_scale)


def _padding_runner(run):
    """A jagged ``run`` that pads on the device and calls the padded ``run`` (cost follows B x L_max)."""

    def run_jagged(*args, **kwargs):
        from .jagged import via_padding

        return via_padding(run, *args, **kwargs)

    return run_jagged


BACKENDS: Dict[str, Backend] = {
    "reference": Backend("reference", ("cpu", "cuda"), lambda d: None, lambda c: [], _reference_run,
                         _reference_run_jagged),
    "cpp": Backend("cpp", ("cpu",), _compiled_unavailable, _cpp_refuses, _compiled_run, _compiled_run_jagged),
    "cuda": Backend("cuda", ("cuda",), _compiled_unavailable, _fused_refuses, _compiled_run, _cuda_run_jagged),
    "triton": Backend("triton", ("cuda", "cpu"), _triton_unavailable, _triton_refuses, _triton_run,
                      _triton_run_jagged),
}

#: "auto" tries these in order; triton serves CPU tensors only when asked for by name (interpreter).
PREFERENCE = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}

_logged_fallbacks: set = set()


def _device_type(device: torch.device) -> str:
    return device.type


#: (call, requested, MIND_KERNELS_BACKEND) -> Backend: every input of a choice is in the key and the
#: backends' availability is fixed once loaded, so a repeated call skips the reason lists (~2 us, a
#: visible share of a B = 16 call).  Bounded: cleared when it reaches _SELECTION_CACHE_SIZE entries.
_selection_cache: Dict[tuple, "Backend"] = {}
_SELECTION_CACHE_SIZE = 4096


def select(call: RoutingCall, requested: str = "auto") -> Backend:
    """The backend that serves ``call``; raises ValueError with every reason when none can."""
    env = os.environ.get(ENV_VAR)
    if torch.compiler.is_compiling():  # keep the traced path free of mutable global state
        return _select(call, requested, env)
    key = (call, requested, env)
    backend = _selection_cache.get(key)
    if backend is None:
        backend = _select(call, requested, env)  # raises when nothing can serve: never cached
        if not _gpu_note_logged:  # a process's first CUDA call always misses the cache
            note_first_gpu_call(backend, call)
        if len(_selection_cache) >= _SELECTION_CACHE_SIZE:
            _selection_cache.clear()
        _selection_cache[key] = backend
    return backend


#: Whether note_first_gpu_call has logged in this process (the flag keeps the check off the hot path).
_gpu_note_logged = False
GPU_BACKENDS = ("cuda", "triton")


def note_first_gpu_call(backend: Backend, call: RoutingCall) -> None:
    """Once per process: log that the GPU kernels about to serve a CUDA tensor are unverified on this GPU.

    Called by :func:`select` when it picks a backend anew (eager calls; a torch.compile trace does not log).
    """
    global _gpu_note_logged
    if _gpu_note_logged or call.device_type != "cuda" or backend.name not in GPU_BACKENDS:
        return
    _gpu_note_logged = True
    from .verified import VERIFIED

    try:
        gpu = torch.cuda.get_device_name()
    except Exception:  # a mocked call without a GPU, or a broken driver: the note still goes out
        gpu = "this GPU"
    done = [f"{name} on {'; '.join(VERIFIED[name])}" for name in GPU_BACKENDS if VERIFIED.get(name)]
    elsewhere = f" (verified elsewhere: {', '.join(done)})" if done else " (nor yet on any GPU)"
    logger.warning(
        "mind_kernels: the %r backend serves CUDA tensors, but the fused GPU kernels (cuda, triton) have not "
        "been verified on this GPU (%s)%s; `python -m mind_kernels.selftest` checks them against the reference "
        "in under a minute (backend='reference' avoids them)",
        backend.name, gpu, elsewhere,
    )


def _select(call: RoutingCall, requested: str, env: Optional[str]) -> Backend:
    forced = requested if requested != "auto" else (env or "auto").strip().lower() or "auto"
    if forced != "auto":
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={forced!r} is not a backend; choose one of {sorted(BACKENDS)} or 'auto'")
        backend = BACKENDS[forced]
        reasons = backend.not_supported_reasons(call)
        if reasons:
            source = f"backend={requested!r}" if requested != "auto" else f"{ENV_VAR}={forced!r}"
            op = "b2i_routing_jagged" if call.jagged else "b2i_routing"
            raise ValueError(f"{op}: {source} cannot serve this call: " + "; ".join(reasons))
        return backend

    order = PREFERENCE.get(call.device_type)
    if order is None:
        raise ValueError(f"b2i_routing: no backend runs on device type {call.device_type!r}")
    for name in order:
        backend = BACKENDS[name]
        reasons = backend.not_supported_reasons(call)
        if not reasons:
            return backend
        built = backend.unavailable(call.device_type) is None
        key = (name, tuple(reasons))
        if built and key not in _logged_fallbacks:
            _logged_fallbacks.add(key)
            logger.warning("mind_kernels: backend %r passed over (%s); falling back", name, "; ".join(reasons))
    raise AssertionError("the reference backend accepts every validated call")  # pragma: no cover


@dataclass
class BackendStatus:
    name: str
    available: Dict[str, Optional[str]] = field(default_factory=dict)  # device type -> None or why not
    reasons: Optional[List[str]] = None  # for a given call: why it would refuse ([] = would serve)


class BackendTable(list):
    """A list of BackendStatus that prints as a table; ``selected`` is what "auto" picks for the call."""

    selected: Optional[str] = None

    def __str__(self) -> str:
        lines = []
        for s in self:
            for dev, why in s.available.items():
                state = "available" if why is None else f"unavailable: {why}"
                lines.append(f"{s.name:<10} {dev:<5} {state}")
            if s.reasons is not None:
                verdict = "would serve" if not s.reasons else "refuses: " + "; ".join(s.reasons)
                mark = " <- auto" if s.name == self.selected else ""
                lines.append(f"{s.name:<10} call  {verdict}{mark}")
        return "\n".join(lines)


def describe(call: Optional[RoutingCall] = None) -> BackendTable:
    table = BackendTable()
    for name, backend in BACKENDS.items():
        status = BackendStatus(name, {d: backend.unavailable(d) for d in backend.devices})
        if call is not None:
            status.reasons = backend.not_supported_reasons(call)
        table.append(status)
    if call is not None:
        try:
            table.selected = select(call).name
        except ValueError:
            table.selected = None
    return table
