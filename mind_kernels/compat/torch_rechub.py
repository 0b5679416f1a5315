"""A drop-in ``CapsuleNetwork`` for torch-rechub (0.9.0), served by ``mind_kernels.b2i_routing``.

torch-rechub's ``torch_rechub.basic.layers.CapsuleNetwork`` is the routing layer
of its ``MIND`` (``bilinear_type=0``) and ``ComirecDR`` (``bilinear_type=2``)
models.  :class:`CapsuleNetwork` here has the same constructor, the same
``forward(item_eb, mask)``, the same output ``(B, interest_num, embedding_dim)``,
the same parameters (names, shapes, creation order, hence the same random
initialisation under one seed) and, by default, the same numbers and gradients.
:func:`patch` swaps it into an installed torch-rechub so its models use it
without code changes.

What torch-rechub computes (and this layer reproduces)
------------------------------------------------------
With E (B, L, D) the behaviour embeddings, K = ``interest_num``, r = ``routing_times``:

* per-interest behaviour vectors u_ji (B, K, L, D):

  - ``bilinear_type=0`` (MIND): u_ji = S e_i for every j, S = ``linear.weight`` (D, D);
  - ``bilinear_type=1``: u_ji = S_j e_i, S_j = rows jD..(j+1)D of ``linear.weight`` (K D, D);
  - otherwise (ComirecDR): u_ji = W_i^(j) e_i with a map per *position* i,
    W_i^(j) = ``w[0, i, jD:(j+1)D, :]`` (``w`` is (1, L, K D, D)).

* initial logits b (B, K, L): ``torch.randn(B, K, L, device=E.device)`` for type 0, zeros otherwise.
* round t = 0, 1, 2, ... r-1, with w_j = softmax_i(b_j) over all L positions (padding *inside*
  the denominator), then w_ji = 0 where mask_i == 0:

  - t < 2 ("update round", on u detached):  c_j = squash(sum_i w_ji u_ji);  b_ji += c_j . u_ji
  - t >= 2 ("final round", on u with gradient): c_j = squash(sum_i w_ji u_ji)

  squash(z) = |z|^2 / (1 + |z|^2) / sqrt(|z|^2 + 1e-9) * z.
* output c (B, K, D), then ``relu(Linear(D, D, bias=False)(c))`` when ``relu_layer``.

Quirks of that code, kept by default (``fix_quirks=False``) so that results and
checkpoints match torch-rechub exactly:

1. **Softmax over behaviours with padding in the denominator.**  Padded positions
   take probability mass that is then zeroed, so a user with few behaviours gets
   small coupling weights (and small capsules).  ``exclude_padding=True`` sets the
   padded logits to -1e30 instead, so the softmax runs over real behaviours only.
2. **The round schedule ignores r.**  Rounds 0 and 1 are always update rounds and
   every later round is a final round computed from the *same* logits, so:

   - r = 1: the output is round 0's capsule, computed from u detached: the bilinear
     map and E get **no gradient** from the output (it does not require grad unless
     ``relu_layer``);
   - r = 2: the output is round 1's capsule (one logit update), also **without gradient**;
   - r = 3: standard 3-iteration routing (2 updates, gradient through the final aggregation);
   - r > 3: rounds 3 .. r-1 recompute round 2 from unchanged logits: **identical to r = 3**.

   ``standard_routing=True`` runs r-1 update rounds and one final round with
   gradient for every r (the same as the default for r = 3).
3. **The type-2 map ``w`` is never initialised** (``torch.Tensor(...)``: whatever
   memory held, possibly NaN).  ``init_weight=True`` draws it from
   U(-1/sqrt(D), 1/sqrt(D)), ``nn.Linear(D, K D)``'s default, per position.  This
   consumes random numbers, so models built afterwards draw different parameters
   than torch-rechub's under the same seed.
4. (Not changed by any flag.)  The initial logits are drawn afresh in every call,
   in eval mode too, so a MIND user's interests vary from call to call.
5. (Not changed by any flag.)  ``stop_grad`` is an attribute (True), not an argument;
   setting it to False differentiates through every round, as in torch-rechub.

``fix_quirks=True`` turns on 1-3 at once; each flag given explicitly wins over it.

Which code path serves which type
---------------------------------
* ``bilinear_type=0``: one call of the fused op ``b2i_routing(E, linear.weight, b0, mask,
  num_iters, softmax_over="behaviors")`` - u = S e is shared by the interests, exactly
  the op's contract (its backend is chosen by ``backend``: "auto" = the C++ / CUDA kernels
  when built, else the reference).
* ``bilinear_type=1``: K calls of the fused op, one per interest j with weight S_j and a
  single interest: with the softmax over behaviours, the interests never interact
  (neither the softmax nor the logit update b_ji += c_j . u_ji mixes them), so routing
  K interests with K maps is K independent one-interest routings.
* ``bilinear_type=2`` (ComirecDR): the map differs per position, which the op (one S for
  all positions) cannot express without a wasted identity map, so u is computed by a
  batched matmul over positions (no (B, L, K D, D) temporary, unlike torch-rechub) and
  the rounds run in a faithful PyTorch port of torch-rechub's loop.

Rounds that torch-rechub computes without gradient (r = 1, 2) are computed by the op
under ``torch.no_grad()``, so the output carries no graph, exactly like the original.

Masks: torch-rechub's models pass ``(his > 0).long()`` of shape (B, L) (its docstring
says (B, L, 1), which its forward actually rejects).  This layer takes (B, L) or
(B, L, 1), bool / integer / float, and reads ``mask != 0``; ``None`` means all valid.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..api import b2i_routing

__all__ = ["CapsuleNetwork", "patch", "unpatch", "patched", "is_patched", "from_torch_rechub"]

#: Logit given to padded positions with ``exclude_padding``: exp(-1e30 - max) is exactly 0 in
#: float32, while staying finite keeps every backend's arithmetic well defined.
_PAD_LOGIT = -1e30

#: Rounds 0 and 1 of torch-rechub's loop update the logits; later rounds are final rounds.
_RECHUB_UPDATE_ROUNDS = 2

_FLAG_NAMES = ("fix_quirks", "standard_routing", "init_weight", "exclude_padding", "backend")


def _squash(z: torch.Tensor) -> torch.Tensor:
    """squash over the last axis, written in torch-rechub's order of operations."""
    cap_norm = torch.sum(torch.square(z), -1, True)
    return cap_norm / (1 + cap_norm) / torch.sqrt(cap_norm + 1e-9) * z


def _route_per_interest(
    u_hat: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor, num_iters: int, detach_routing: bool
) -> torch.Tensor:
    """Routing with per-interest behaviour vectors, softmax over behaviours (torch-rechub's loop).

    Args:
        u_hat: u (B, K, L, D); the final round differentiates through it.
        logits: b0 (B, K, L), no gradient.
        valid: (B, L) bool, True for real behaviours.
        num_iters: n >= 1: n-1 update rounds (on u detached when ``detach_routing``), then one final round.

    Returns:
        c (B, K, D).
    """
    u_iter = u_hat.detach() if detach_routing else u_hat
    keep = valid[:, None, :]  # (B, 1, L)
    b = logits
    for t in range(num_iters):
        w = torch.where(keep, F.softmax(b, dim=-1), torch.zeros((), dtype=b.dtype, device=b.device))
        w = w.unsqueeze(2).to(u_hat.dtype)  # (B, K, 1, L)
        if t < num_iters - 1:
            c = _squash(torch.matmul(w, u_iter))  # (B, K, 1, D)
            b = b + torch.matmul(u_iter, c.transpose(2, 3)).squeeze(-1).to(b.dtype)  # b_ji += c_j . u_ji
        else:
            c = _squash(torch.matmul(w, u_hat))
    return c.squeeze(2)


class CapsuleNetwork(nn.Module):
    """torch-rechub's ``CapsuleNetwork`` (MIND / ComirecDR B2I routing) on mind-kernels' fused op.

    See the module docstring for the math, the quirks kept by default and which code path
    serves which ``bilinear_type``.

    Args (torch-rechub's, same order and defaults):
        embedding_dim: D, the item embedding size (input and output).
        seq_len: L, the history length; inputs must have exactly L positions.
        bilinear_type: 0 = MIND (one D x D map), 1 = one map per interest, other = ComirecDR
            (one map per position and interest).
        interest_num: K.
        routing_times: r >= 1 (see quirk 2 for what r != 3 computes).
        relu_layer: apply ``relu`` (Linear(D, D, bias=False) + ReLU) to the capsules.

    Keyword-only (this library's; none of them changes the state_dict):
        fix_quirks: default for the three flags below.
        standard_routing: r-1 update rounds + one final round with gradient for every r.
        init_weight: initialise the type-2 map ``w`` (torch-rechub leaves it uninitialised).
        exclude_padding: padded positions get no softmax mass (torch-rechub includes them).
        backend: ``b2i_routing``'s backend for types 0 and 1 ("auto", "reference", "cpp", ...).

    Parameters (state_dict keys, as torch-rechub 0.9.0): ``relu.0.weight`` (D, D); type 0:
    ``linear.weight`` (D, D); type 1: ``linear.weight`` (K D, D); other: ``w`` (1, L, K D, D).

    Shapes: ``forward(item_eb (B, L, D), mask (B, L) or (B, L, 1)) -> (B, K, D)``.
    """

    def __init__(
        self,
        embedding_dim: int,
        seq_len: int,
        bilinear_type: int = 2,
        interest_num: int = 4,
        routing_times: int = 3,
        relu_layer: bool = False,
        *,
        fix_quirks: bool = False,
        standard_routing: Optional[bool] = None,
        init_weight: Optional[bool] = None,
        exclude_padding: Optional[bool] = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.seq_len = seq_len
        self.bilinear_type = bilinear_type
        self.interest_num = interest_num
        self.routing_times = routing_times
        self.relu_layer = relu_layer
        self.stop_grad = True
        self.fix_quirks = bool(fix_quirks)
        self.standard_routing = self.fix_quirks if standard_routing is None else bool(standard_routing)
        self.init_weight = self.fix_quirks if init_weight is None else bool(init_weight)
        self.exclude_padding = self.fix_quirks if exclude_padding is None else bool(exclude_padding)
        self.backend = backend

        # Same modules, created in the same order as torch-rechub, so one seed gives one initialisation.
        self.relu = nn.Sequential(nn.Linear(embedding_dim, embedding_dim, bias=False), nn.ReLU())
        if bilinear_type == 0:
            self.linear = nn.Linear(embedding_dim, embedding_dim, bias=False)
        elif bilinear_type == 1:
            self.linear = nn.Linear(embedding_dim, embedding_dim * interest_num, bias=False)
        else:
            self.w = nn.Parameter(torch.Tensor(1, seq_len, interest_num * embedding_dim, embedding_dim))
            if self.init_weight:
                bound = 1.0 / math.sqrt(embedding_dim)
                nn.init.uniform_(self.w, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.embedding_dim}, seq_len={self.seq_len}, bilinear_type={self.bilinear_type}, "
            f"interest_num={self.interest_num}, routing_times={self.routing_times}, relu_layer={self.relu_layer}, "
            f"standard_routing={self.standard_routing}, init_weight={self.init_weight}, "
            f"exclude_padding={self.exclude_padding}, backend={self.backend!r}"
        )

    # ------------------------------------------------------------------ helpers

    def routing_plan(self) -> Tuple[int, bool, bool]:
        """(num_iters, detach_routing, output_has_grad) equivalent to torch-rechub's round schedule.

        num_iters counts update rounds + the one round whose capsule is returned; when
        ``output_has_grad`` is False the whole routing runs under ``torch.no_grad()``.
        """
        r = self.routing_times
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"CapsuleNetwork: routing_times must be an int >= 1, got {r!r}")
        if self.standard_routing:
            return r, self.stop_grad, True
        if r > _RECHUB_UPDATE_ROUNDS:
            # Rounds 2 .. r-1 all recompute the final capsule from the logits left by round 1.
            return _RECHUB_UPDATE_ROUNDS + 1, self.stop_grad, True
        # r = 1 or 2: every round is an update round on u_iter; the last one's capsule is returned.
        # With stop_grad, u_iter is detached and nothing in the output has a gradient.
        return r, self.stop_grad, not self.stop_grad

    def _valid_mask(self, mask: Optional[torch.Tensor], batch: int, length: int, device) -> torch.Tensor:
        if mask is None:
            return torch.ones(batch, length, dtype=torch.bool, device=device)
        if not isinstance(mask, torch.Tensor):
            mask = torch.as_tensor(mask, device=device)
        if mask.dim() == 3 and mask.shape[-1] == 1:
            mask = mask.squeeze(-1)
        if tuple(mask.shape) != (batch, length):
            raise ValueError(
                f"CapsuleNetwork: mask must be (B, L) = {(batch, length)} or (B, L, 1), got {tuple(mask.shape)}"
            )
        return (mask != 0).to(device)

    def _initial_logits(self, batch: int, device, random: bool) -> torch.Tensor:
        # The exact call torch-rechub makes (default dtype, the input's device), so a seed gives the same b0.
        if random:
            return torch.randn(batch, self.interest_num, self.seq_len, device=device, requires_grad=False)
        return torch.zeros(batch, self.interest_num, self.seq_len, device=device, requires_grad=False)

    # ------------------------------------------------------------------ forward

    def forward(self, item_eb: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """item_eb (B, L, D), mask (B, L) or (B, L, 1) (nonzero = real behaviour) -> capsules (B, K, D)."""
        if item_eb.dim() != 3 or item_eb.shape[1] != self.seq_len or item_eb.shape[2] != self.embedding_dim:
            raise ValueError(
                f"CapsuleNetwork: item_eb must be (B, seq_len={self.seq_len}, embedding_dim={self.embedding_dim}), "
                f"got {tuple(item_eb.shape)}"
            )
        B, L, D = item_eb.shape
        K = self.interest_num
        valid = self._valid_mask(mask, B, L, item_eb.device)
        num_iters, detach, with_grad = self.routing_plan()

        if self.bilinear_type == 0:
            logits = self._initial_logits(B, item_eb.device, random=True)
        elif self.bilinear_type == 1:
            logits = self._initial_logits(B, item_eb.device, random=False)
        else:
            # torch-rechub: zeros when bilinear_type > 0, randn otherwise (a negative type).
            logits = self._initial_logits(B, item_eb.device, random=self.bilinear_type <= 0)
        if self.exclude_padding:
            logits = logits.masked_fill(~valid[:, None, :], _PAD_LOGIT)

        with contextlib.nullcontext() if with_grad else torch.no_grad():
            if self.bilinear_type == 0:
                capsules = b2i_routing(
                    item_eb, self.linear.weight, logits, valid, None, num_iters,
                    softmax_over="behaviors", detach_routing=detach, backend=self.backend,
                )
            elif self.bilinear_type == 1:
                # The interests never interact under a softmax over behaviours: K one-interest routings.
                capsules = torch.cat(
                    [
                        b2i_routing(
                            item_eb, self.linear.weight[j * D:(j + 1) * D], logits[:, j:j + 1], valid, None,
                            num_iters, softmax_over="behaviors", detach_routing=detach, backend=self.backend,
                        )
                        for j in range(K)
                    ],
                    dim=1,
                )
            else:
                # u[b, i, :] = w[0, i] @ e[b, i]: one batched matmul over positions -> (B, L, K D).
                u = torch.bmm(item_eb.transpose(0, 1), self.w[0, :L].transpose(1, 2)).transpose(0, 1)
                u_hat = u.reshape(B, L, K, D).transpose(1, 2)  # (B, K, L, D)
                capsules = _route_per_interest(u_hat, logits, valid, num_iters, detach)

        if self.relu_layer:
            capsules = self.relu(capsules)
        return capsules


def from_torch_rechub(layer: nn.Module, **flags) -> CapsuleNetwork:
    """A :class:`CapsuleNetwork` with ``layer``'s configuration and parameters (a torch-rechub layer, or ours)."""
    ours = CapsuleNetwork(
        layer.embedding_dim, layer.seq_len, layer.bilinear_type, layer.interest_num, layer.routing_times,
        layer.relu_layer, **flags,
    )
    ours.stop_grad = getattr(layer, "stop_grad", True)
    ours.load_state_dict(layer.state_dict())
    param = next(layer.parameters(), None)
    if param is not None:
        ours.to(device=param.device, dtype=param.dtype)
    return ours


# ---------------------------------------------------------------------- patching torch-rechub


class _PatchState:
    original: Optional[type] = None  # torch-rechub's class, while patched
    replacement: Optional[type] = None  # what is installed, while patched
    modules: List[object] = []  # modules whose ``CapsuleNetwork`` we replaced


_STATE = _PatchState()


def _with_defaults(defaults: Dict[str, object]) -> type:
    unknown = sorted(set(defaults) - set(_FLAG_NAMES))
    if unknown:
        raise TypeError(f"patch(): unknown option(s) {unknown}; choose from {list(_FLAG_NAMES)}")
    if not defaults:
        return CapsuleNetwork

    class _Configured(CapsuleNetwork):
        __doc__ = CapsuleNetwork.__doc__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**defaults, **kwargs})

    _Configured.__name__ = _Configured.__qualname__ = "CapsuleNetwork"
    _Configured.patch_defaults = dict(defaults)
    return _Configured


def _module_dict(module) -> Optional[dict]:
    try:
        return vars(module)  # never getattr: a lazy module's __getattr__ could import things
    except TypeError:
        return None


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return _STATE.replacement is not None


def unpatch() -> bool:
    """Put torch-rechub's own ``CapsuleNetwork`` back everywhere :func:`patch` put ours.

    Also reverts torch-rechub modules imported while patched (they took ours by name).
    Returns False when nothing was patched.  Layers already built keep their class.
    """
    if _STATE.replacement is None:
        return False
    original, replacement = _STATE.original, _STATE.replacement
    targets = list(_STATE.modules)
    for name, module in list(sys.modules.items()):
        if name == "torch_rechub" or name.startswith("torch_rechub."):
            targets.append(module)
    for module in targets:
        d = _module_dict(module)
        if d is not None and d.get("CapsuleNetwork") is replacement:
            setattr(module, "CapsuleNetwork", original)
    _STATE.original = _STATE.replacement = None
    _STATE.modules = []
    return True


def patch(**defaults) -> type:
    """Make torch-rechub build :class:`CapsuleNetwork` (ours) wherever it builds its own.

    Replaces ``torch_rechub.basic.layers.CapsuleNetwork`` and the name in every imported
    module that holds torch-rechub's class (its ``models.matching.mind`` and ``comirec``
    modules import it by name; so may user code).  Modules imported later get ours from
    ``torch_rechub.basic.layers``.  Only layers built afterwards use the kernels.

    ``defaults`` (``fix_quirks``, ``standard_routing``, ``init_weight``, ``exclude_padding``,
    ``backend``) become constructor defaults of the installed class.  Calling ``patch``
    again re-installs with the new defaults (idempotent for the same ones).  Returns the
    installed class.
    """
    import torch_rechub.basic.layers as layers  # noqa: F401  (raises ImportError without torch-rechub)

    replacement = _with_defaults(defaults)
    unpatch()
    original = layers.CapsuleNetwork
    touched = []
    for module in list(sys.modules.values()):
        d = _module_dict(module)
        if d is not None and d.get("CapsuleNetwork") is original:
            setattr(module, "CapsuleNetwork", replacement)
            touched.append(module)
    _STATE.original, _STATE.replacement, _STATE.modules = original, replacement, touched
    return replacement


@contextlib.contextmanager
def patched(**defaults):
    """``with patched(): ...`` - :func:`patch` inside the block, the previous state restored after it."""
    before = _STATE.replacement
    before_defaults = getattr(before, "patch_defaults", {}) if before is not None else None
    cls = patch(**defaults)
    try:
        yield cls
    finally:
        if before is None:
            unpatch()
        else:
            patch(**before_defaults)
