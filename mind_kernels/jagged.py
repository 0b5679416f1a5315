"""Jagged batches of histories (ROUTING.md, "Jagged batches"): layout helpers shared by every backend.

A jagged batch holds B histories of different lengths without padding, as TorchRec's ``JaggedTensor``
does::

    values  (N, D_in)     every behaviour of every user, user after user, oldest first
    offsets (B + 1,)      int64; offsets[0] = 0, non-decreasing, offsets[B] = N;
                          user u's behaviours are values[offsets[u] : offsets[u + 1]], n_u of them

or as a torch nested tensor with ``layout=torch.jagged`` (its ``values()`` and ``offsets()``).

The jagged op equals the padded op on the padded batch (:func:`pad`): E (B, L_max, D_in) with user
u's rows first and zero rows after them, mask = (position < n_u).  The zero rows matter only with
``softmax_over="behaviors"``, where padding sits in the softmax denominator: their logits stay b0
(u_i = S 0 = 0), so the result depends on L_max there (b0's last axis), as the padded op's does on L.

The final coupling weights of a jagged call are jagged too: w (N, K), row offsets[u] + i holding
behaviour i's weight in each interest (the padded op's w[u, :, i]).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def is_jagged_nested(t) -> bool:
    """True for a torch nested tensor with the jagged layout (``torch.nested.nested_tensor(..., layout=torch.jagged)``)."""
    return isinstance(t, torch.Tensor) and t.is_nested and t.layout == torch.jagged


def unpack_nested(nt: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(values (N, D_in), offsets (B + 1,) int64) of a jagged nested tensor of shape (B, j, D_in).

    Raises ValueError for a nested tensor whose rows are not contiguous in ``values`` (``lengths()``
    set: a view with holes), which values + offsets cannot describe.
    """
    if nt.dim() != 3:
        raise ValueError(f"b2i_routing_jagged: a nested `values` must be (B, j, D_in), got {nt.dim()}-D")
    if nt._lengths is not None:
        raise ValueError("b2i_routing_jagged: a nested `values` with holes (lengths() set) is not supported; "
                         "make it contiguous first")
    return nt.values(), nt.offsets().to(torch.int64)


def lengths(offsets: torch.Tensor) -> torch.Tensor:
    """n_u = offsets[u + 1] - offsets[u], (B,) int64."""
    return offsets[1:] - offsets[:-1]


def row_positions(offsets: torch.Tensor, num_rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(user, position) of each of the N rows of values, both (N,) int64, on offsets' device.

    ``num_rows`` (N) is passed so that no device synchronisation is needed to size the result.
    """
    B = offsets.shape[0] - 1
    user = torch.repeat_interleave(torch.arange(B, device=offsets.device), lengths(offsets), output_size=num_rows)
    position = torch.arange(num_rows, device=offsets.device) - offsets[user]
    return user, position


def pad(values: torch.Tensor, offsets: torch.Tensor, max_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The padded batch equal to a jagged one: (E (B, max_len, D_in) with zero rows after each history, mask (B, max_len) bool).

    Differentiable with respect to ``values`` (the gradient of E's rows goes back to their rows of values).
    Every history must be at most ``max_len`` long (validated by the public API).
    """
    B = offsets.shape[0] - 1
    user, position = row_positions(offsets, values.shape[0])
    E = values.new_zeros((B, max_len, values.shape[1])).index_put((user, position), values)
    mask = torch.arange(max_len, device=offsets.device)[None, :] < lengths(offsets)[:, None]
    return E, mask


def coupling_to_jagged(w: torch.Tensor, offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The padded op's coupling w (B, K, L) as the jagged op's (N, K): row offsets[u] + i = w[u, :, i]."""
    user, position = row_positions(offsets, num_rows)
    return w[user, :, position]


def via_padding(run, values, offsets, weight, init_logits, interest_mask, num_iters, softmax_over, detach_routing,
                logit_scale=1.0):
    """Serve a jagged call with a padded backend's ``run``: pad on the device, run, take w back to (N, K).

    Its cost follows B x L_max (the padded kernel's), not N: the reference's path, and the cuda
    backend's when the extension was built without the jagged CUDA kernels.  Gradients reach ``values`` through the padding (autograd of the index_put in :func:`pad`).
    """
    L_max = init_logits.shape[-1]
    E, mask = pad(values, offsets, L_max)
    capsules, w = run(E, weight, init_logits, mask, interest_mask, num_iters, softmax_over, detach_routing,
                      logit_scale)
    return capsules, coupling_to_jagged(w, offsets, values.shape[0])


def longest(offsets: torch.Tensor) -> int:
    """max_u n_u (0 for B = 0): one device synchronisation on a GPU."""
    if offsets.shape[0] <= 1:
        return 0
    return int(lengths(offsets).max())


def jagged_from_padded(E: torch.Tensor, mask: Optional[torch.Tensor] = None):
    """(values, offsets) of a padded batch whose valid positions form a prefix of each row (mask[u, :n_u] True).

    For tests and for callers moving from the padded op; raises ValueError when a mask has holes.
    """
    B, L, _ = E.shape
    if mask is None:
        mask = torch.ones(B, L, dtype=torch.bool, device=E.device)
    mask = mask != 0
    n = mask.sum(dim=1)
    if not bool((mask == (torch.arange(L, device=E.device)[None, :] < n[:, None])).all()):
        raise ValueError("jagged_from_padded: the mask must hold each user's behaviours as a prefix (no holes)")
    offsets = torch.zeros(B + 1, dtype=torch.int64, device=E.device)
    offsets[1:] = torch.cumsum(n, 0)
    return E[mask], offsets
