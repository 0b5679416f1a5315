"""mind-kernels: fused behaviour-to-interest (B2I) dynamic routing for MIND.

Public API:

* :func:`b2i_routing` - the routing op (B, L, D_in) -> (B, K, D_out), with autograd.
* :func:`b2i_routing_jagged` - the same op on a jagged batch: values (N, D_in) + offsets (B + 1,), or a
  jagged nested tensor; cost follows N on the CPU kernel.
* :class:`B2IRouting` - an ``nn.Module`` owning the bilinear map S and the initial logits.
* :func:`dynamic_interest_mask` - K'_u = max(1, min(K, floor(log2 n_u))) as a (B, K) mask.
* :func:`backends` - which backends exist, are built, and why each would refuse a call.

The contract is ``shared/design/ROUTING.md``; ``mind_kernels.reference`` is its
executable form.
"""

from __future__ import annotations

from .api import b2i_routing, b2i_routing_jagged, backends
from .layers import B2IRouting, dynamic_interest_mask

__version__ = "0.1.0"

__all__ = ["b2i_routing", "b2i_routing_jagged", "B2IRouting", "dynamic_interest_mask", "backends", "__version__"]
