"""MIND: Multi-Interest Network with Dynamic routing (Li et al., CIKM 2019).

A YouTube-DNN style candidate generator whose user tower emits K vectors:

    item embedding      e_i = E_id[i] + mean_{g in genres(i), g != 0} E_genre[g]        (d,)
                        row 0 (padding) is the zero vector.
    user profile        p_u = concat_f E_f[x_{u,f}]                                     (F * d_f,)
                        feature value 0 means "unknown" and has its own learned row.
    multi-interest      C = B2IRouting(d, d, K, r=3, softmax_over="interests")(E_hist, hist != 0)   (B, K, d)
    H layers            V_k = act(W2 ReLU(W1 [C_k ; p_u] + b1) + b2)                    (B, K, d)
                        act = identity (linear, the default recipe) or ReLU (the paper's)
    label-aware attn    v_u = V^T softmax(pow_p(V e_target))                              (B, d)   (training only)

The same forms run in training and serving: the first H layer as W1c C_k + (W1p p_u + b1), the
profile part once per user (:func:`h_layers_forward`, also the exported tower's), and the genre
pooling as a matmul where its (n, genres) matrix is no larger than the gathered (n, G, d) form.

Serving scores an item by the best of the K interests: score(u, i) = max_k V_k . e_i.
With ``dynamic_interests=True`` only the first K'_u = max(1, min(K, floor(log2 n_u)))
interests are active; the inactive ones are reported through an interest mask
(B, K) bool and must be ignored (see :func:`retrieval_vectors`).

This module uses only ``mind_kernels``' public API.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from mind_kernels import B2IRouting, dynamic_interest_mask


def _signed_power(x: torch.Tensor, p: float) -> torch.Tensor:
    """sign(x) |x|^p; the clamp keeps the gradient of |x|^p finite at x = 0 for p < 1."""
    return torch.sign(x) * x.abs().clamp_min(1e-12).pow(p)


def label_aware_attention(
    interests: torch.Tensor,
    target: torch.Tensor,
    interest_mask: Optional[torch.Tensor] = None,
    p: float = math.inf,
) -> torch.Tensor:
    """Label-aware attention: v_u = sum_k a_k V_k with a = softmax_k(pow_p(V_k . e_target)).

    Args:
        interests: V (B, K, d).
        target: e_target (B, d).
        interest_mask: (B, K) bool, True for active interests; None = all active.
            Inactive interests get weight exactly 0.
        p: the attention's hardness (the paper's recipe: inf).

    ``pow_p`` on a negative inner product: the paper writes pow(V e, p), which for even p
    would turn a strongly *anti*-aligned interest into the most attended one.  We use the
    sign-preserving power ``pow_p(x) = sign(x) * |x|^p`` so the map is monotone in x for
    every p > 0 (p = 1 is the plain inner product, p = 2 sharpens).  Special cases:

    * ``p = 0``: uniform average over the active interests (the limit x^0 = 1).
    * ``p = inf``: hard attention, a one-hot on argmax_k V_k . e over active interests
      (ties go to the lowest k); the gradient flows through the selected V_k only.

    For 0 < p < 1 the derivative p|x|^(p-1) is unbounded near x = 0 (clamped at |x| = 1e-12,
    i.e. gradients up to ~1e6 p); on MovieLens-100k p = 0.5 trained far worse than p = 0 or
    p >= 1, so use p = 0, p >= 1 or inf.

    Returns:
        v_u (B, d).
    """
    if interests.dim() != 3 or target.dim() != 2 or interests.shape[0] != target.shape[0] \
            or interests.shape[2] != target.shape[1]:
        raise ValueError(
            f"label_aware_attention: want V (B, K, d) and e (B, d), got {tuple(interests.shape)} "
            f"and {tuple(target.shape)}")
    if p < 0 or math.isnan(p):
        raise ValueError(f"label_aware_attention: p must be >= 0 (or inf), got {p!r}")
    B, K, _ = interests.shape
    if interest_mask is None:
        interest_mask = torch.ones(B, K, dtype=torch.bool, device=interests.device)
    interest_mask = interest_mask.to(torch.bool)
    logits = torch.einsum("bkd,bd->bk", interests, target)
    neg_inf = torch.finfo(logits.dtype).min
    if p == 0:
        weights = interest_mask.to(interests.dtype)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    elif math.isinf(p):
        best = logits.masked_fill(~interest_mask, neg_inf).argmax(dim=1)
        weights = torch.nn.functional.one_hot(best, K).to(interests.dtype)
    else:
        powered = _signed_power(logits, p)
        weights = torch.softmax(powered.masked_fill(~interest_mask, neg_inf), dim=1)
        weights = weights * interest_mask.to(weights.dtype)
    return torch.einsum("bk,bkd->bd", weights, interests)


class _GatherRows(torch.autograd.Function):
    """rows (..., d) = table[index]; backward: index_add_ of the gradient rows into a zero table.

    The same values and gradient as ``F.embedding(index, table)``, whose CPU backward
    (``embedding_dense_backward``) is the slower of the two on a (256, 50) history batch
    (docs/results/training-speed.md).  index_add_ sums in index order: deterministic.
    """

    @staticmethod
    def forward(ctx, table, index):
        ctx.save_for_backward(index)
        ctx.rows = table.shape[0]
        return table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[1])

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        d = grad.shape[-1]
        out = grad.new_zeros(ctx.rows, d)
        return out.index_add_(0, index.reshape(-1), grad.reshape(-1, d)), None


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table (R, d) gathered at a LongTensor ``index`` of any shape -> (*index.shape, d), with autograd."""
    return _GatherRows.apply(table, index)


def h_layers_forward(h_layers: nn.Sequential, caps: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
    """V = H([c_k ; p_u]) for caps (B, K, d) and profile (B, P) -> (B, K, d).

    The first layer (an nn.Linear on d + P inputs) runs as W1c c_k + (W1p p_u + b1): the same
    weight sliced, the profile part computed once per user and broadcast over K instead of K
    times on a concatenated input (equal up to float rounding).  Training, serving and the
    exported tower all call this.
    """
    d = caps.shape[2]
    first = h_layers[0]
    x = torch.nn.functional.linear(caps, first.weight[:, :d])
    x = x + torch.nn.functional.linear(profile, first.weight[:, d:], first.bias)[:, None, :]
    for layer in h_layers[1:]:
        x = layer(x)
    return x


def retrieval_vectors(interests: torch.Tensor, interest_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Replace inactive interests by the user's first interest, for max-over-interests retrieval.

    A retriever that merges the K per-interest top-n lists by score and de-duplicates
    items returns exactly the same list whether an interest is absent or a copy of an
    active one, so this lets inactive interests be dropped without ragged tensors.
    Interest 0 is always active (K'_u >= 1).
    """
    if interest_mask is None:
        return interests
    first = interests[:, :1, :].expand_as(interests)
    return torch.where(interest_mask[:, :, None].to(torch.bool), interests, first)


class MIND(nn.Module):
    """The MIND user/item towers (see the module docstring for the math).

    Args:
        num_items: items are 1..num_items, 0 is padding.
        item_genres: LongTensor (num_items + 1, G), genre ids per item, 0 = padding. G may be 0.
        num_genres: size of the genre vocabulary including index 0 (None: max id + 1).
        user_feature_cardinalities: vocabulary size (incl. 0 = unknown) of each user feature.
        dim: d, the embedding and user-vector size.
        num_interests: K.
        num_iters: routing iterations r.
        user_feature_dim: d_f, per-feature profile embedding size.
        hidden_mult: H-layer hidden size is hidden_mult * d.
        dynamic_interests: K'_u per user instead of K.
        backend: routing backend for ``mind_kernels`` ("auto", "reference", "cpp", ...).
        routing_init_std: sigma of the routing logits b0 ~ N(0, sigma^2).
        softmax_over: coupling axis, "interests" (MIND, default) or "behaviors" (ComiRec).
        logit_scale: s of the routing update b_ij += s * c_j . u_i (docs/ROUTING.md).
        h_out_activation: "linear" (the default recipe) or "relu" (the paper's: every interest
            vector in the non-negative orthant, so their cosines are >= 0).
    """

    def __init__(
        self,
        num_items: int,
        item_genres: Optional[torch.Tensor] = None,
        num_genres: Optional[int] = None,
        user_feature_cardinalities: Sequence[int] = (),
        dim: int = 64,
        num_interests: int = 4,
        num_iters: int = 3,
        user_feature_dim: int = 16,
        hidden_mult: int = 4,
        dynamic_interests: bool = False,
        backend: str = "auto",
        routing_init_std: float = 1.0,
        softmax_over: str = "interests",
        logit_scale: float = 1.0,
        h_out_activation: str = "linear",
    ):
        super().__init__()
        if h_out_activation not in ("relu", "linear"):
            raise ValueError(f"MIND: h_out_activation must be 'relu' or 'linear', got {h_out_activation!r}")
        if item_genres is None:
            item_genres = torch.zeros(num_items + 1, 0, dtype=torch.long)
        item_genres = torch.as_tensor(item_genres, dtype=torch.long)
        if item_genres.dim() != 2 or item_genres.shape[0] != num_items + 1:
            raise ValueError(f"MIND: item_genres must be (num_items + 1, G) = ({num_items + 1}, G), "
                             f"got {tuple(item_genres.shape)}")
        max_genre = int(item_genres.max()) if item_genres.numel() else 0
        num_genres = max(int(num_genres or 0), max_genre + 1)
        self.config = dict(
            num_items=num_items, num_genres=num_genres,
            user_feature_cardinalities=[int(c) for c in user_feature_cardinalities], dim=dim,
            num_interests=num_interests, num_iters=num_iters, user_feature_dim=user_feature_dim,
            hidden_mult=hidden_mult, dynamic_interests=bool(dynamic_interests), backend=backend,
            routing_init_std=float(routing_init_std), softmax_over=softmax_over,
            logit_scale=float(logit_scale), h_out_activation=h_out_activation,
        )
        self.num_items, self.dim, self.num_interests = num_items, dim, num_interests
        self.dynamic_interests = bool(dynamic_interests)

        self.register_buffer("item_genres", item_genres.clone(), persistent=True)
        self.item_id_embedding = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.genre_embedding = nn.Embedding(num_genres, dim, padding_idx=0)
        self.user_feature_embeddings = nn.ModuleList(
            nn.Embedding(int(c), user_feature_dim) for c in self.config["user_feature_cardinalities"])
        # Small init: the scores are inner products of d-dim vectors, N(0,1) rows would
        # start the softmax saturated.
        for emb in [self.item_id_embedding, self.genre_embedding, *self.user_feature_embeddings]:
            nn.init.normal_(emb.weight, std=1.0 / math.sqrt(dim))
        with torch.no_grad():
            self.item_id_embedding.weight[0].zero_()
            self.genre_embedding.weight[0].zero_()

        self.extractor = B2IRouting(dim, dim, num_interests, num_iters=num_iters, softmax_over=softmax_over,
                                    init_std=routing_init_std, dynamic_interests=self.dynamic_interests,
                                    backend=backend, logit_scale=float(logit_scale))
        profile_dim = user_feature_dim * len(self.user_feature_embeddings)
        hidden = hidden_mult * dim
        out_act = [nn.ReLU()] if h_out_activation == "relu" else []
        self.h_layers = nn.Sequential(
            nn.Linear(dim + profile_dim, hidden), nn.ReLU(),
            nn.Linear(hidden, dim), *out_act,
        )

    @classmethod
    def from_config(cls, config: dict, item_genres: Optional[torch.Tensor] = None) -> "MIND":
        """Rebuild from ``model.config`` (item_genres comes back with the state_dict).

        Configs saved by earlier versions load too: one without ``h_out_activation`` had the ReLU
        head, one without ``logit_scale`` s = 1, and ``routing_weight_scale`` only scaled S's
        initialisation, which the saved weights replace.
        """
        cfg = dict(config)
        cfg.setdefault("h_out_activation", "relu")
        cfg.pop("routing_weight_scale", None)
        if item_genres is None:
            item_genres = torch.zeros(cfg["num_items"] + 1, 0, dtype=torch.long)
        return cls(item_genres=item_genres, **cfg)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # item_genres' width G comes from the data, take it from the saved buffer.
        key = prefix + "item_genres"
        if key in state_dict and state_dict[key].shape != self.item_genres.shape:
            self.item_genres = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----- item tower -------------------------------------------------------------------
    def embed_items(self, items: torch.Tensor) -> torch.Tensor:
        """e_i for a LongTensor of item indices of any shape (...,) -> (..., d); index 0 gives 0.

        Each distinct item is embedded once and gathered: a history batch repeats items
        heavily, and the genre pooling costs G * d per embedded row.
        """
        if self.item_genres.shape[1] == 0:
            return self.item_id_embedding(items)
        uniq, inverse = torch.unique(items.reshape(-1), return_inverse=True)
        return gather_rows(self._embed_unique(uniq), inverse).reshape(*items.shape, self.dim)

    def _embed_unique(self, items: torch.Tensor) -> torch.Tensor:
        """e_i for item indices of any shape (...,) -> (..., d), every position embedded (no de-duplication).

        The genre mean is one (n, num_genres) x (num_genres, d) matmul when that pooling matrix has
        no more entries than the gathered (n, G, d) genre rows (small genre vocabularies such as
        MovieLens'; its backward is one product instead of a row-by-row scatter), else the gather.
        """
        emb = self.item_id_embedding(items)
        if self.genre_embedding.num_embeddings <= self.item_genres.shape[1] * self.dim:
            return emb + self.genre_pooling_matrix(items) @ self.genre_embedding.weight
        genres = self.item_genres[items]                                   # (n, G)
        valid = (genres != 0).to(emb.dtype)
        pooled = (self.genre_embedding(genres) * valid[..., None]).sum(-2)
        pooled = pooled / valid.sum(-1, keepdim=True).clamp_min(1.0)      # items without genres: 0
        return emb + pooled

    def genre_pooling_matrix(self, items: torch.Tensor) -> torch.Tensor:
        """P (..., num_genres) with P[i, g] = [g in genres(i)] / |genres(i)| (g != 0; items without genres: 0).

        ``P @ E_genre`` is the mean genre embedding of :meth:`_embed_unique`: a matmul whose
        backward is ``P^T grad`` (num_genres x d), where the gather form materialises (n, G, d)
        twice and scatters its gradient row by row.  Column 0 (padding) is always 0.
        """
        genres = self.item_genres[items]                                   # (..., G)
        valid = (genres != 0).to(self.genre_embedding.weight.dtype)
        w = valid / valid.sum(-1, keepdim=True).clamp_min(1.0)
        out = torch.zeros(*genres.shape[:-1], self.genre_embedding.num_embeddings, dtype=w.dtype,
                          device=w.device)
        return out.scatter_add_(-1, genres, w)

    def item_embeddings(self) -> torch.Tensor:
        """(num_items + 1, d): the table used as target embedding and for retrieval; row 0 = 0."""
        return self.embed_items(torch.arange(self.num_items + 1, device=self.item_genres.device))

    # ----- user tower -------------------------------------------------------------------
    def profile(self, user_features: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        """p_u (B, F * d_f); ``user_features`` (B, F) LongTensor, None = all unknown (0)."""
        F = len(self.user_feature_embeddings)
        device = self.item_genres.device
        if user_features is None:
            user_features = torch.zeros(batch, F, dtype=torch.long, device=device)
        if user_features.shape != (batch, F):
            raise ValueError(f"MIND: user_features must be ({batch}, {F}), got {tuple(user_features.shape)}")
        if F == 0:
            return torch.zeros(batch, 0, device=device)
        return torch.cat([emb(user_features[:, f]) for f, emb in enumerate(self.user_feature_embeddings)], dim=1)

    def interests(self, histories: torch.Tensor, user_features: Optional[torch.Tensor] = None,
                  return_weights: bool = False, item_table: Optional[torch.Tensor] = None,
                  jagged: bool = False):
        """The K user vectors.

        Args:
            histories: (B, L) LongTensor of item indices, 0 = padding (any alignment).
            user_features: (B, F) LongTensor or None (unknown profile).
            return_weights: also return the routing coupling weights (B, K, L).
            item_table: None, or :meth:`item_embeddings` (num_items + 1, d) already computed
                this step (the full softmax needs it anyway): the behaviours are then rows
                gathered from it, the same values as :meth:`embed_items` without embedding twice.
            jagged: route the batch's real behaviours only (values (N, d) + offsets (B + 1,),
                ``mind_kernels.B2IRouting.forward_jagged``): the embedding gather and the routing
                cost follow N = the number of non-padding ids instead of B x L.  Each user's
                behaviours keep their order and take routing-logit columns 0 .. n_u - 1, so the
                result equals the padded path on the *left*-aligned batch.  In training the
                logits are drawn fresh each call, so that is the same model; in eval mode the
                fixed logits buffer would be read at other columns than for our right-aligned
                histories, so serving stays padded.  Not with ``return_weights``.

        Returns:
            V (B, K, d), interest_mask (B, K) bool [, weights (B, K, L)].
        """
        if histories.dim() != 2:
            raise ValueError(f"MIND: histories must be (B, L), got {tuple(histories.shape)}")
        B, L = histories.shape
        mask = histories != 0
        if self.dynamic_interests:
            interest_mask = dynamic_interest_mask(mask, self.num_interests)
        else:
            interest_mask = torch.ones(B, self.num_interests, dtype=torch.bool, device=histories.device)
        if jagged:
            if return_weights:
                raise ValueError("MIND.interests: return_weights gives the padded (B, K, L) weights; "
                                 "call it with jagged=False")
            ids = histories[mask]                                          # (N,), row-major: oldest first
            offsets = torch.zeros(B + 1, dtype=torch.long, device=histories.device)
            torch.cumsum(mask.sum(1), 0, out=offsets[1:])
            values = self.embed_items(ids) if item_table is None else gather_rows(item_table, ids)
            caps = self.extractor.forward_jagged(values, offsets, max_len=L)
            weights = None
        else:
            behaviors = self.embed_items(histories) if item_table is None else gather_rows(item_table, histories)
            # The layer builds the same dynamic mask itself and keeps inactive interests out of
            # the coupling softmax; we recompute it here only to report it.
            caps, weights = self.extractor(behaviors, mask, return_weights=True)
        profile = self.profile(user_features, B)
        vectors = h_layers_forward(self.h_layers, caps, profile)
        if return_weights:
            return vectors, interest_mask, weights
        return vectors, interest_mask

    def forward(self, histories, user_features=None, targets=None, p: float = math.inf,
                item_table: Optional[torch.Tensor] = None, jagged: bool = False):
        """Training view.

        With ``targets``: v_u (B, d) by label-aware attention on the targets' embeddings.
        Without: the interests V (B, K, d) and the interest mask (B, K), for objectives that
        score items by the best interest (``mind.loss``'s ``scoring="max"``); going through
        ``forward`` keeps DistributedDataParallel's gradient hooks in the step.
        ``item_table``, ``jagged``: see :meth:`interests`.
        """
        vectors, interest_mask = self.interests(histories, user_features, item_table=item_table, jagged=jagged)
        if targets is None:
            return vectors, interest_mask
        return label_aware_attention(vectors, self.embed_items(targets), interest_mask, p)
