"""mind-kernels: fused behaviour-to-interest (B2I) dynamic routing for MIND.

Public API:

* :func:`b2i_routing` - the routing op (B, L, D_in) -> (B, K, D_out), with autograd.
* :func:`b2i_routing_jagged` - the same op on a jagged batch: values (N, D_in) + offsets (B + 1,), or a
  jagged nested tensor; cost follows N on the CPU kernel.
* :class:`B2IRouting` - an ``nn.Module`` owning the bilinear map S and the initial logits.
* :func:`dynamic_interest_mask` - K'_u = max(1, min(K, floor(log2 n_u))) as a (B, K) mask.
* :func:`backends` - which backends exist, are built, and why each would refuse a call.
* :func:`best_interest_cross_entropy` - the exact softmax over a catalogue with items scored by a user's
  best interest (max_k V_k . e), fused (loss and gradients in one pass per user; CPU kernel).

The contract is ``docs/ROUTING.md``; ``mind_kernels.reference`` is its
executable form.
"""

from __future__ import annotations

from .api import b2i_routing, b2i_routing_jagged, backends
from .layers import B2IRouting, dynamic_interest_mask
from .losses import best_interest_cross_entropy

__version__ = "0.1.0"

__all__ = ["b2i_routing", "b2i_routing_jagged", "B2IRouting", "dynamic_interest_mask", "backends",
           "best_interest_cross_entropy", "__version__"]
