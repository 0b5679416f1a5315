"""Softmax losses for MIND's next-item objective, over a catalogue of items 1..N (0 = padding).

Three estimators of  -log softmax_i(v_u . e_i)[target]:

* ``"full"``: the exact softmax over all N items (small catalogues).
* ``"sampled"``: sampled softmax with S negatives shared across the batch, drawn with
  replacement from a log-uniform (Zipfian) distribution over the items ranked by training
  popularity (rank 0 = most frequent):

      Q(rank r) = log((r + 2) / (r + 1)) / log(N + 1),       r = 0 .. N-1

  sampled by inverse CDF, O(S) per step whatever N is:  r = floor(exp(u log(N + 1))) - 1,
  u ~ U[0, 1).  Every logit, the true one and the sampled ones, gets the logQ correction
  ``s - log Q(item)`` (Jean et al. 2015; Bengio & Senecal 2008), and a sampled item equal
  to the row's own target (an "accidental hit") is removed (logit -> -inf).
* ``"in_batch"``: the other rows' targets are the negatives.  They are drawn from the
  training distribution of targets, so each logit gets ``s - log q(item)`` with q the
  item's training frequency (item_counts / sum); columns holding the row's own target
  item (duplicates within the batch) other than the diagonal are removed.

All three return the mean cross-entropy over the batch.

``scoring`` (set by the recipe, :mod:`mind.config`) says what scores an item:

* ``"max"`` (the default recipe): the model hands over all its interests V (B, K, d) with
  their mask, and every item, target and negatives alike, is scored by its best active
  interest, ``s(u, i) = max_k V_k . e_i``: the score serving ranks by (``mind.model``).  The
  exact softmax then runs fused (``mind_kernels.best_interest_cross_entropy``: loss and score
  gradients in one pass per user, never keeping the (B, K, N) scores).
* ``"attention"`` (the paper's): one label-aware v_u (B, d) per user.  A negative is scored by
  the interest the *target* picked, so nothing stops another interest from ranking that
  negative first at serving time.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from mind_kernels import best_interest_cross_entropy

_NEG_INF = float("-inf")
#: the exact softmax's score rows padded to a multiple of this (MKL's sgemm is ~1.5x slower at an odd
#: item count; docs/results/training-speed.md)
PAD_ITEMS = 16


def auto_product_dtype(device=None) -> Optional[torch.dtype]:
    """The dtype of the exact softmax's score products: bfloat16 on a CPU that multiplies bf16 natively
    (AVX512-BF16 or AMX), else None (the inputs' float32).  Measured on an AVX512-BF16 CPU: 1.14x per
    epoch with valid Recall@50 within the seed spread (docs/results/training-speed.md); without native
    bf16 the products would be emulated."""
    if device is not None and torch.device(device).type != "cpu":
        return None
    cpu = getattr(torch, "cpu", None)
    native = any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return torch.bfloat16 if native else None


class LogUniformSampler:
    """Log-uniform sampler over items ranked by training count.

    Args:
        item_counts: (N + 1,) training counts per item index; index 0 (padding) is never drawn.
            Ties are broken by item index, so the ranking is deterministic.
    """

    def __init__(self, item_counts):
        counts = torch.as_tensor(item_counts, dtype=torch.float64)[1:]
        self.num_items = n = counts.numel()
        if n < 1:
            raise ValueError("LogUniformSampler: need at least one item")
        # stable sort on -count: equal counts keep index order.
        order = torch.sort(-counts, stable=True).indices
        self.rank_to_item = order + 1                                # item index of rank r
        self.item_to_rank = torch.empty(n + 1, dtype=torch.long)
        self.item_to_rank[0] = -1
        self.item_to_rank[self.rank_to_item] = torch.arange(n)
        self.log_range = math.log(n + 1)
        ranks = torch.arange(n, dtype=torch.float64)
        self._log_q_rank = torch.log(torch.log((ranks + 2) / (ranks + 1)) / self.log_range).float()

    def sample(self, num: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """(num,) item indices in 1..N, i.i.d. log-uniform by rank (with replacement)."""
        u = torch.rand(num, generator=generator, dtype=torch.float64)
        ranks = (torch.exp(u * self.log_range).floor().long() - 1).clamp_(0, self.num_items - 1)
        return self.rank_to_item[ranks].to(device)

    def log_q(self, items: torch.Tensor) -> torch.Tensor:
        """log Q(item) for a LongTensor of item indices (1..N)."""
        ranks = self.item_to_rank.to(items.device)[items]
        return self._log_q_rank.to(items.device)[ranks]


class _BestInterestScores(torch.autograd.Function):
    """(B, N) = max_k V_k . e_n: one (B K, d) x (d, N) mm forward, two backward.

    The winner is not stored as an index: ``max(dim=1)`` with indices costs ~40x ``amax`` on
    the CPU (5 ms against 0.13 ms at B=256, K=4, N=1349 on one thread).  The backward finds
    it again by comparing the saved scores with the best one (a tie goes to the lowest k, as
    with ``max``): fwd + bwd 11.6 ms against 15.8 ms with ``max``'s index (/tmp micro-benchmark,
    same sizes).
    """

    @staticmethod
    def forward(ctx, interests, item_emb, inactive):
        B, K, d = interests.shape
        v = interests.reshape(B * K, d)
        scores = (v @ item_emb.t()).view(B, K, item_emb.shape[0])
        if inactive is not None:
            scores = scores.masked_fill(inactive[:, :, None], _NEG_INF)
        best = scores.amax(dim=1)
        ctx.save_for_backward(v, item_emb, scores, best)
        return best

    @staticmethod
    def backward(ctx, grad):
        v, e, scores, best = ctx.saved_tensors
        B, K, _ = scores.shape
        d = v.shape[1]
        won = scores == best[:, None, :]                                   # (B, K, N)
        # Exact ties do happen (float32 scores, ~1e6 comparisons a step): the gradient goes to
        # the lowest k alone, as max's does.  A few (B, N) bool ops, no data-dependent branch.
        taken = won[:, 0].clone()
        for k in range(1, K):
            won[:, k] &= ~taken
            if k + 1 < K:
                taken |= won[:, k]
        # bool -> float through uint8: the direct conversion is not vectorised on the CPU (~10x slower).
        g = won.view(torch.uint8).to(grad.dtype).mul_(grad[:, None, :]).view(B * K, -1)
        d_int = (g @ e).view(B, K, d) if ctx.needs_input_grad[0] else None
        d_emb = g.t() @ v if ctx.needs_input_grad[1] else None
        return d_int, d_emb, None


def best_interest_scores(interests: torch.Tensor, interest_mask: Optional[torch.Tensor],
                         item_emb: torch.Tensor, paired: bool = False) -> torch.Tensor:
    """max_k V_k . e_i over each user's active interests.

    Args:
        interests: V (B, K, d); interest_mask: (B, K) bool or None (all active; pass None
            when every interest is active, it skips the masking).
        item_emb: (N, d) items scored for every user, or (B, d) one item per user with ``paired``.

    Returns:
        (B, N), or (B,) with ``paired``.  The gradient flows through the winning interest
        (ties: the one ``max`` returns).
    """
    inactive = None if interest_mask is None else ~interest_mask.to(torch.bool)
    if not paired:
        return _BestInterestScores.apply(interests, item_emb, inactive)
    scores = torch.einsum("bkd,bd->bk", interests, item_emb)
    if inactive is not None:
        scores = scores.masked_fill(inactive, _NEG_INF)
    return scores.max(dim=1).values


def _sampled_softmax_from_scores(pos: torch.Tensor, neg: torch.Tensor, targets: torch.Tensor,
                                 negatives: torch.Tensor, target_log_q: torch.Tensor, neg_log_q: torch.Tensor
                                 ) -> torch.Tensor:
    """The sampled softmax of :func:`sampled_softmax_loss` from raw scores pos (B,) and neg (B, S)."""
    pos = pos[:, None] - target_log_q[:, None]
    hit = negatives[None, :] == targets[:, None]
    neg = (neg - neg_log_q[None, :]).masked_fill(hit, _NEG_INF)
    logits = torch.cat([pos, neg], dim=1)
    return -torch.log_softmax(logits, dim=1)[:, 0].mean()


def sampled_softmax_loss(user: torch.Tensor, target_emb: torch.Tensor, targets: torch.Tensor,
                         neg_emb: torch.Tensor, negatives: torch.Tensor,
                         target_log_q: torch.Tensor, neg_log_q: torch.Tensor) -> torch.Tensor:
    """Sampled softmax with logQ correction and accidental-hit removal.

    Args:
        user: v_u (B, d); target_emb: e_target (B, d); targets: (B,) item ids.
        neg_emb: (S, d) embeddings of the shared negatives; negatives: (S,) their ids.
        target_log_q: (B,), neg_log_q: (S,): log Q of the targets and negatives.

    logits[b] = [v_b . e_tb - logQ(t_b),  v_b . e_s - logQ(s) (s = 1..S, -inf where s == t_b)];
    loss = mean_b -log softmax(logits[b])[0].
    """
    return _sampled_softmax_from_scores((user * target_emb).sum(-1), user @ neg_emb.t(), targets, negatives,
                                        target_log_q, neg_log_q)


def full_softmax_loss(user: torch.Tensor, item_table: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Exact softmax over items 1..N: item_table (N + 1, d) with row 0 = padding (excluded)."""
    logits = user @ item_table[1:].t()
    return F.cross_entropy(logits, targets - 1)


def in_batch_softmax_loss(user: torch.Tensor, target_emb: torch.Tensor, targets: torch.Tensor,
                          target_log_q: torch.Tensor) -> torch.Tensor:
    """In-batch negatives: logits[b, c] = v_b . e_{t_c} - log q(t_c); same-item off-diagonal columns removed."""
    return _in_batch_from_scores(user @ target_emb.t(), targets, target_log_q)


def _in_batch_from_scores(scores: torch.Tensor, targets: torch.Tensor, target_log_q: torch.Tensor) -> torch.Tensor:
    """The in-batch softmax of :func:`in_batch_softmax_loss` from raw scores (B, B): row b, column c = s(b, t_c)."""
    logits = scores - target_log_q[None, :]
    B = targets.shape[0]
    dup = (targets[None, :] == targets[:, None]) & ~torch.eye(B, dtype=torch.bool, device=targets.device)
    logits = logits.masked_fill(dup, _NEG_INF)
    return F.cross_entropy(logits, torch.arange(B, device=targets.device))


class SoftmaxLoss:
    """Picks one of the estimators above; call with the model's output, the model and the targets.

    Args:
        kind: "sampled", "full" or "in_batch".
        item_counts: (N + 1,) training counts (the sampler's ranking / in-batch q).
        num_negatives: S for "sampled".
        scoring: "attention" (call with v_u (B, d)) or "max" (call with (V (B, K, d), interest
            mask (B, K)): every item scored by its best interest, see the module docstring).
        product_dtype: the dtype of the exact softmax's score products with scoring="max"
            (:func:`auto_product_dtype`); None = the inputs' dtype.
    """

    KINDS = ("sampled", "full", "in_batch")
    SCORINGS = ("attention", "max")

    def __init__(self, kind: str, item_counts, num_negatives: int, scoring: str,
                 product_dtype: Optional[torch.dtype] = None):
        if kind not in self.KINDS:
            raise ValueError(f"loss must be one of {self.KINDS}, got {kind!r}")
        if scoring not in self.SCORINGS:
            raise ValueError(f"scoring must be one of {self.SCORINGS}, got {scoring!r}")
        if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
            raise ValueError(f"num_negatives must be an integer >= 1, got {num_negatives!r}")
        if product_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"product_dtype must be None, torch.float32 or torch.bfloat16, got {product_dtype!r}")
        self.kind, self.num_negatives, self.scoring = kind, num_negatives, scoring
        self.product_dtype = product_dtype
        counts = torch.as_tensor(item_counts, dtype=torch.float64)
        if kind == "sampled":
            self.sampler = LogUniformSampler(counts)
        # +1 smoothing so items never seen as a target still have a finite log q.
        freq = (counts[1:] + 1.0) / (counts[1:] + 1.0).sum()
        self.log_freq = torch.cat([torch.zeros(1), torch.log(freq).float()])

    def needs_item_table(self) -> bool:
        """True when every step embeds the whole catalogue (the exact softmax)."""
        return self.kind == "full"

    def __call__(self, user, model, targets: torch.Tensor,
                 generator: Optional[torch.Generator] = None, item_table: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
        """``item_table``: ``model.item_embeddings()`` when the caller has it already this step
        (targets are then gathered from it), None = embed what is needed here."""
        if self.scoring == "max":
            return self._max_scored(*user, model, targets, generator, item_table)
        if self.kind == "full":
            return full_softmax_loss(user, model.item_embeddings() if item_table is None else item_table, targets)
        target_emb = model.embed_items(targets) if item_table is None else item_table[targets]
        if self.kind == "in_batch":
            return in_batch_softmax_loss(user, target_emb, targets, self.log_freq.to(user.device)[targets])
        negatives = self.sampler.sample(self.num_negatives, generator=generator, device=user.device)
        neg_emb = model.embed_items(negatives) if item_table is None else item_table[negatives]
        return sampled_softmax_loss(user, target_emb, targets, neg_emb, negatives,
                                    self.sampler.log_q(targets), self.sampler.log_q(negatives))

    def _max_scored(self, interests, interest_mask, model, targets, generator, item_table=None):
        """The three estimators with s(u, i) = max_k V_k . e_i in place of v_u . e_i."""
        if self.kind == "full":
            table = model.item_embeddings() if item_table is None else item_table
            # items 1..N are the classes (row 0 is padding): class = item id - 1
            return best_interest_cross_entropy(interests, table[1:], targets - 1, interest_mask,
                                               product_dtype=self.product_dtype, pad_multiple=PAD_ITEMS)
        target_emb = model.embed_items(targets) if item_table is None else item_table[targets]
        if self.kind == "in_batch":
            return _in_batch_from_scores(best_interest_scores(interests, interest_mask, target_emb), targets,
                                         self.log_freq.to(interests.device)[targets])
        negatives = self.sampler.sample(self.num_negatives, generator=generator, device=interests.device)
        pos = best_interest_scores(interests, interest_mask, target_emb, paired=True)
        neg = best_interest_scores(interests, interest_mask,
                                   model.embed_items(negatives) if item_table is None else item_table[negatives])
        return _sampled_softmax_from_scores(pos, neg, targets, negatives, self.sampler.log_q(targets),
                                            self.sampler.log_q(negatives))


def pairwise_interest_cosine(interests: torch.Tensor, interest_mask: Optional[torch.Tensor]):
    """Per user, the mean pairwise cosine between its active interests (differentiable).

    V (B, K, d); interest_mask (B, K) bool or None (all active).  Returns ``(per_user (B,),
    has_pairs (B,) bool)``: per_user is 0 where a user has fewer than two active interests
    (has_pairs False).  A zero vector has cosine 0 with everything.  Training's penalty and
    the evaluation measure (:func:`mind.diversity.interest_cosine`) both use it.
    """
    B, K, _ = interests.shape
    unit = F.normalize(interests, dim=2, eps=1e-8)
    cos = unit @ unit.transpose(1, 2)                                        # (B, K, K)
    active = (torch.ones(B, K, dtype=torch.bool, device=interests.device) if interest_mask is None
              else interest_mask.to(torch.bool)).to(cos.dtype)
    pair = active[:, :, None] * active[:, None, :] * (1 - torch.eye(K, dtype=cos.dtype, device=cos.device))
    pairs = pair.sum((1, 2))
    return (cos * pair).sum((1, 2)) / pairs.clamp_min(1.0), pairs > 0


def interest_similarity_penalty(interests: torch.Tensor, interest_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean pairwise cosine between a user's active interests, averaged over users (a scalar).

    ``lambda * penalty`` is the interest-diversity regulariser of training (in the spirit of
    SINE's and Re4's terms that push a user's interests apart).  Users with fewer than two
    active interests contribute 0.  V (B, K, d); interest_mask (B, K) bool or None.
    """
    if interests.shape[1] < 2:
        return interests.new_zeros(())
    per_user, has_pairs = pairwise_interest_cosine(interests, interest_mask)
    users = has_pairs.to(per_user.dtype)
    return (per_user * users).sum() / users.sum().clamp_min(1.0)
