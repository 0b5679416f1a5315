"""``B2IRouting``, the capsule layer that owns S and the initial logits, and the dynamic interest count."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .api import b2i_routing, b2i_routing_jagged
from .jagged import is_jagged_nested, lengths as jagged_lengths, longest, unpack_nested
from .validation import check_logit_scale

#: Eval-mode logits are drawn in chunks of this many positions, each from its own seeded
#: generator, so position i's logits never depend on how long the buffer is.
_EVAL_CHUNK = 64


def dynamic_interest_mask(mask: Optional[torch.Tensor], num_interests: int, length: Optional[int] = None) -> torch.Tensor:
    """Active interests per user: ``out[u, j] = j < K'_u`` with K'_u = max(1, min(K, floor(log2 n_u))).

    Args:
        mask: (B, L) bool or 0/1 integer behaviour mask; n_u is the number of valid positions
            (n_u = 0 gives K'_u = 1).  None means one user with ``length`` valid positions.
        num_interests: K >= 1.

    Returns:
        (B, K) bool.
    """
    if isinstance(num_interests, bool) or not isinstance(num_interests, int) or num_interests < 1:
        raise ValueError(f"dynamic_interest_mask: `num_interests` must be an int >= 1, got {num_interests!r}")
    if mask is None:
        if length is None:
            raise ValueError("dynamic_interest_mask: give a (B, L) `mask`, or `length` when mask is None")
        counts = torch.tensor([length])
    else:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError(
                f"dynamic_interest_mask: `mask` must be a (B, L) tensor, got "
                f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}"
            )
        counts = (mask != 0).sum(dim=1)
    return _interest_mask_from_counts(counts, num_interests)


def _interest_mask_from_counts(counts: torch.Tensor, num_interests: int) -> torch.Tensor:
    """(B, K) bool: j < K'_u for the (B,) history lengths ``counts``."""
    # floor(log2 n) for integers n >= 1, exactly: bit length - 1 (float log2 can round 2^k - 1 up).
    k_u = torch.zeros_like(counts)
    n = counts.clone()
    while bool((n > 1).any()):
        k_u += (n > 1).to(k_u.dtype)
        n = n // 2
    k_u = k_u.clamp(min=1, max=num_interests)
    return torch.arange(num_interests, device=counts.device)[None, :] < k_u[:, None]


def _eval_logits(seed: int, num_interests: int, length: int, std: float) -> torch.Tensor:
    """Deterministic (K, length) logits: chunk c of positions is drawn from a generator seeded (seed, c)."""
    chunks = []
    for c in range(math.ceil(length / _EVAL_CHUNK)):
        g = torch.Generator().manual_seed((seed * 1_000_003 + c) % (2**63))
        chunks.append(torch.randn(_EVAL_CHUNK, num_interests, generator=g))
    return (torch.cat(chunks)[:length].t() * std).contiguous()


class B2IRouting(nn.Module):
    """MIND's multi-interest extractor: B2I dynamic routing with a shared bilinear map.

    ``forward(behaviors (B, L, in_dim), mask (B, L) or None) -> capsules (B, K, out_dim)``.

    * ``weight`` is S (out_dim, in_dim), initialised like ``nn.Linear`` without bias.
    * Training mode draws the initial logits b0 ~ N(0, init_std^2) of shape (B, K, L)
      afresh on every call (the paper's behaviour), from torch's global generator.
    * Eval mode uses the fixed buffer ``eval_logits`` (K, L_buf): drawn once at
      construction from a seed taken from torch's global generator (so
      ``torch.manual_seed`` before construction fixes it), saved in the
      state_dict, and position-stable: the logits of position i are the same
      whatever L the batch is padded to, so in ``softmax_over="interests"`` mode
      a history gives the same interests however it is padded.  A longer L
      extends the buffer deterministically from ``eval_seed``.
    * ``dynamic_interests=True`` builds the interest mask from the behaviour mask
      (see :func:`dynamic_interest_mask`).
    * ``logit_scale`` s (finite float > 0, a plain attribute, not a parameter):
      the routing's logit update is b_ij += s * (c_j . u_i); EasyRec's MIND uses
      s around 20, 1 is the paper's update.
    * ``forward_jagged(values (N, in_dim), offsets (B + 1,), max_len=None)``: the same
      layer on a jagged batch (:func:`mind_kernels.b2i_routing_jagged`); equals
      ``forward`` on the batch padded to ``max_len`` (the same b0 draws and buffer).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_interests: int,
        num_iters: int = 3,
        softmax_over: str = "interests",
        init_std: float = 1.0,
        dynamic_interests: bool = False,
        backend: str = "auto",
        eval_length: int = 256,
        logit_scale: float = 1.0,
    ):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("num_interests", num_interests),
                            ("num_iters", num_iters), ("eval_length", eval_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"B2IRouting: `{name}` must be an int >= 1, got {value!r}")
        if softmax_over not in ("interests", "behaviors"):
            raise ValueError(f"B2IRouting: `softmax_over` must be 'interests' or 'behaviors', got {softmax_over!r}")
        if not init_std > 0:
            raise ValueError(f"B2IRouting: `init_std` must be > 0, got {init_std!r}")
        self.logit_scale = check_logit_scale(logit_scale, "B2IRouting")
        self.in_dim, self.out_dim, self.num_interests = in_dim, out_dim, num_interests
        self.num_iters, self.softmax_over, self.init_std = num_iters, softmax_over, float(init_std)
        self.dynamic_interests, self.backend = dynamic_interests, backend

        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        seed = int(torch.randint(0, 2**62, (1,)).item())
        self.register_buffer("eval_seed", torch.tensor(seed, dtype=torch.int64))
        self.register_buffer("eval_logits", _eval_logits(seed, num_interests, eval_length, self.init_std))

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, num_interests={self.num_interests}, "
            f"num_iters={self.num_iters}, softmax_over={self.softmax_over!r}, init_std={self.init_std}, "
            f"dynamic_interests={self.dynamic_interests}, backend={self.backend!r}, logit_scale={self.logit_scale}"
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The eval buffer may have been extended to a longer L before saving: take its length.
        key = prefix + "eval_logits"
        if key in state_dict and state_dict[key].shape != self.eval_logits.shape:
            self.eval_logits = torch.empty_like(state_dict[key], device=self.eval_logits.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def initial_logits(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """b0: fresh (B, K, L) draws in training mode, the fixed (K, L) buffer slice in eval mode."""
        if self.training:
            return torch.randn(batch, self.num_interests, length, device=device) * self.init_std
        if length > self.eval_logits.shape[1]:
            self.eval_logits = _eval_logits(int(self.eval_seed), self.num_interests, length, self.init_std).to(
                self.eval_logits.device
            )
        return self.eval_logits[:, :length].to(device)

    def forward(self, behaviors: torch.Tensor, mask: Optional[torch.Tensor] = None, return_weights: bool = False):
        if not isinstance(behaviors, torch.Tensor) or behaviors.dim() != 3:
            raise ValueError(
                "B2IRouting: `behaviors` must be a (B, L, in_dim) tensor, got "
                f"{tuple(behaviors.shape) if isinstance(behaviors, torch.Tensor) else type(behaviors).__name__}"
            )
        B, L, _ = behaviors.shape
        interest_mask = None
        if self.dynamic_interests:
            if mask is None:
                mask = torch.ones(B, L, dtype=torch.bool, device=behaviors.device)
            interest_mask = dynamic_interest_mask(mask, self.num_interests)
        return b2i_routing(
            behaviors,
            self.weight,
            self.initial_logits(B, L, behaviors.device),
            mask=mask,
            interest_mask=interest_mask,
            num_iters=self.num_iters,
            softmax_over=self.softmax_over,
            logit_scale=self.logit_scale,
            return_weights=return_weights,
            backend=self.backend,
        )

    def forward_jagged(
        self,
        values: torch.Tensor,
        offsets: Optional[torch.Tensor] = None,
        max_len: Optional[int] = None,
        return_weights: bool = False,
    ):
        """The layer on a jagged batch: values (N, in_dim) + offsets (B + 1,) int64, or a jagged nested tensor.

        ``max_len`` is L_max, the positions b0 covers (default: the longest history in the batch, which
        reads the offsets: one synchronisation on a GPU).  The result equals :meth:`forward` on the batch
        zero-padded to ``max_len`` with mask position < n_u: training mode draws b0 (B, K, max_len) from
        the same generator, eval mode slices the same buffer, and ``dynamic_interests`` counts the same
        n_u.  ``max_len`` matters beyond b0's size only with ``softmax_over="behaviors"`` (padding sits in
        that softmax's denominator).  Returns capsules (B, K, out_dim), and w (N, K) with ``return_weights``.
        """
        if is_jagged_nested(values):
            if offsets is not None:
                raise ValueError("B2IRouting.forward_jagged: give `offsets=None` with a nested `values`")
            values, offsets = unpack_nested(values)
        if not isinstance(values, torch.Tensor) or values.dim() != 2:
            raise ValueError(
                "B2IRouting.forward_jagged: `values` must be a (N, in_dim) tensor or a jagged nested tensor, got "
                f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}"
            )
        if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.shape[0] < 1:
            raise ValueError("B2IRouting.forward_jagged: `offsets` must be a (B + 1,) int64 tensor, got "
                             f"{tuple(offsets.shape) if isinstance(offsets, torch.Tensor) else type(offsets).__name__}")
        B = offsets.shape[0] - 1
        if max_len is None:
            max_len = max(1, longest(offsets))
        elif isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"B2IRouting.forward_jagged: `max_len` must be an int >= 1, got {max_len!r}")
        interest_mask = None
        if self.dynamic_interests:
            interest_mask = _interest_mask_from_counts(jagged_lengths(offsets), self.num_interests)
        return b2i_routing_jagged(
            values,
            offsets,
            self.weight,
            self.initial_logits(B, max_len, values.device),
            interest_mask=interest_mask,
            num_iters=self.num_iters,
            softmax_over=self.softmax_over,
            logit_scale=self.logit_scale,
            return_weights=return_weights,
            backend=self.backend,
        )
