"""The exportable user tower: one definition that every serving format traces.

``UserTower(model, max_len)`` wraps a trained :class:`mind.model.MIND` (from the outside; the
model is not changed) and computes what native serving computes, with no Python control flow
that depends on the data, so ``torch.export`` and the ONNX exporter can trace it with a dynamic
batch and history length::

    forward(history_ids (B, L) int64, history_mask (B, L) bool, user_features (B, F) int64)
        -> interests V (B, K, d) float32, interest_mask (B, K) bool

Inputs:

* ``history_ids``: item *indices* (rows of ``item_embeddings.npy``; ``items.json`` maps raw ids to
  them), oldest first, any alignment and any length L >= 1.
* ``history_mask``: True for the positions to use.  A position is used when its mask is True and
  its id is a known item (1 <= id <= num_items); anything else (padding 0, an id out of range) is
  dropped, as native serving drops unknown ids.
* ``user_features``: (B, F) feature indices as in ``PreparedData.user_features``, 0 = unknown
  (native serving's ``user_features=None`` is all zeros).  F = 0 for data without profiles:
  pass a (B, 0) tensor.  An index outside a feature's vocabulary is read as 0 (unknown).

Computation (native serving, ``Recommender._batch`` + ``MIND.interests`` in eval mode):

1. Compact the used items to the right, in order, and keep the most recent ``max_len``: a
   (B, max_len) id matrix right-aligned with 0 padding on the left, exactly what native serving
   feeds the model (position p of the routing logits b0 then holds the same item as natively).
2. e_i = T[id_i], with T the (num_items + 1, d) item table (``MIND.item_embeddings()``, the
   table exported as ``item_embeddings.npy``; row 0 = 0).
3. Dynamic interests: K'_u = max(1, min(K, floor(log2 n_u))) = max(1, #{k in 1..K : 2^k <= n_u}),
   the comparison form of ``mind_kernels.dynamic_interest_mask`` (no data-dependent loop).
4. Capsules c = B2I routing (``mind_kernels.b2i_routing``) with the model's S, its fixed eval
   logits b0 (K, max_len), r iterations, softmax axis and logit scale; ``backend`` picks the
   implementation: "auto" (the fused ``mind_kernels::routing_forward`` op on CPU: native's path,
   what AOTInductor packages), "reference" (plain tensor ops, the spec) or "graph" (the same math
   in fewer plain ops, :mod:`mind.export.graph_routing`: what ONNX gets).
5. V = H([c_j ; p_u]) with p_u the concatenated profile embeddings, computed by
   :func:`mind.model.h_layers_forward` as training and native serving compute it.

A user with no used position at all (an empty history, or only unknown ids) is refused
natively (``ValueError``); a tensor program cannot raise per row, so the tower returns that
user's ``interest_mask`` all False and zero vectors: a serving stack must check
``interest_mask[:, 0]`` (always True for a real user, since K'_u >= 1).
"""

from __future__ import annotations

import torch
from torch import nn

import mind_kernels

from ..model import h_layers_forward
from . import graph_routing


class UserTower(nn.Module):
    """History ids, mask and profile features in; the K interest vectors and their mask out.

    Args:
        model: a trained MIND (its eval-mode state is read; the model itself is left as is).
        max_len: the history length the model was trained and is served with.
        backend: routing backend, "auto" (fused op where built), "reference" (plain ops, the spec) or
            "graph" (:mod:`mind.export.graph_routing`: the same math in fewer plain ops, for ONNX).
    """

    def __init__(self, model, max_len: int, backend: str = "auto"):
        super().__init__()
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"UserTower: max_len must be an int >= 1, got {max_len!r}")
        was_training = model.training
        model.eval()
        ext = model.extractor
        with torch.no_grad():
            table = model.item_embeddings().detach().float().clone()
            b0 = ext.initial_logits(1, max_len, table.device).detach().float().clone()  # (K, max_len)
        model.train(was_training)
        self.max_len, self.num_items = int(max_len), int(model.num_items)
        self.num_interests, self.dim = int(model.num_interests), int(model.dim)
        self.dynamic_interests = bool(model.dynamic_interests)
        self.num_iters, self.softmax_over = int(ext.num_iters), str(ext.softmax_over)
        self.logit_scale, self.backend = float(ext.logit_scale), backend
        self.num_features = len(model.user_feature_embeddings)
        self.register_buffer("item_table", table)
        self.register_buffer("init_logits", b0)
        self.routing_weight = nn.Parameter(ext.weight.detach().clone(), requires_grad=False)
        self.feature_embeddings = nn.ModuleList(
            nn.Embedding.from_pretrained(e.weight.detach().clone(), freeze=True) for e in model.user_feature_embeddings)
        self.h_layers = _copy_sequential(model.h_layers)
        # thresholds 2^1 .. 2^K of the dynamic interest count
        self.register_buffer("log2_steps", 2 ** torch.arange(1, self.num_interests + 1, dtype=torch.int64))
        self.eval()

    def _compact(self, history_ids: torch.Tensor, history_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids + mask -> (B, max_len) used ids, right-aligned, most recent max_len kept, 0 elsewhere."""
        B = history_ids.shape[0]
        L = self.max_len
        used = (history_mask != 0) & (history_ids >= 1) & (history_ids <= self.num_items)
        used_i = used.to(torch.int64)
        # rank from the right: 1 for the most recent used item, 2 for the one before, ...
        after = used_i.sum(dim=1, keepdim=True) - used_i.cumsum(dim=1) + used_i
        keep = used & (after <= L)
        # scalar fill values: no shape-of + expand nodes in the exported graphs
        column = torch.where(keep, L - after, L)                           # column L: a dump, dropped below
        ids = torch.where(keep, history_ids, 0)
        out = torch.zeros(B, L + 1, dtype=torch.int64, device=history_ids.device)
        return out.scatter(1, column, ids)[:, :L]

    def forward(self, history_ids: torch.Tensor, history_mask: torch.Tensor, user_features: torch.Tensor):
        ids = self._compact(history_ids, history_mask)                      # (B, L)
        B, K = ids.shape[0], self.num_interests
        mask = ids != 0
        behaviors = nn.functional.embedding(ids, self.item_table)           # (B, L, d)
        has_any = mask.any(dim=1)                                            # (B,)
        if self.dynamic_interests:
            n = mask.sum(dim=1, keepdim=True)                                # (B, 1)
            k_u = (n >= self.log2_steps).sum(dim=1, keepdim=True).clamp_min(1)
            interest_mask = torch.arange(K, device=ids.device)[None, :] < k_u
            routing_mask = interest_mask
        else:
            interest_mask = torch.ones(B, K, dtype=torch.bool, device=ids.device)
            routing_mask = None                                              # as MIND.interests
        if self.backend == "graph":
            caps = graph_routing.routing(behaviors, self.routing_weight, self.init_logits, mask, routing_mask,
                                         self.num_iters, self.softmax_over, self.logit_scale)
        else:
            caps = mind_kernels.b2i_routing(
                behaviors, self.routing_weight, self.init_logits, mask=mask, interest_mask=routing_mask,
                num_iters=self.num_iters, softmax_over=self.softmax_over, logit_scale=self.logit_scale,
                backend=self.backend)
        if self.num_features:
            cols = []
            for f, emb in enumerate(self.feature_embeddings):
                x = user_features[:, f]
                # an index outside the vocabulary reads as 0 (unknown), never out of bounds
                cols.append(emb(torch.where((x >= 0) & (x < emb.num_embeddings), x, 0)))
            profile = torch.cat(cols, dim=1)
        else:
            profile = caps.new_zeros(B, 0)
        vectors = h_layers_forward(self.h_layers, caps, profile)           # the model's own form
        vectors = torch.where(has_any[:, None, None], vectors, 0.0)
        return vectors, interest_mask & has_any[:, None]

    def example_inputs(self, batch: int = 2, length: int = 0):
        """Inputs of the right dtypes (for tracing): ``length`` 0 means max_len."""
        L = length or self.max_len
        ids = torch.arange(1, batch * L + 1).reshape(batch, L) % self.num_items + 1
        return (ids, torch.ones(batch, L, dtype=torch.bool), torch.zeros(batch, self.num_features, dtype=torch.int64))


def _copy_sequential(seq: nn.Sequential) -> nn.Sequential:
    """A frozen copy of the H layers (Linear / ReLU only), so exporting never touches the model."""
    import copy

    out = copy.deepcopy(seq)
    for p in out.parameters():
        p.requires_grad_(False)
    return out
