"""Triton routing kernels: placeholder until the Triton backend lands (issue 4)."""

from typing import List, Optional


def unavailable_reason(device_type: str) -> Optional[str]:
    return "the Triton backend is not implemented yet"


def shape_refusals(call) -> List[str]:
    return []


def routing_triton(behaviors, weight, init_logits, mask, interest_mask, num_iters, softmax_over):
    raise NotImplementedError("the Triton backend is not implemented yet")
