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
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

_NEG_INF = float("-inf")


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
    pos = (user * target_emb).sum(-1, keepdim=True) - target_log_q[:, None]
    neg = user @ neg_emb.t() - neg_log_q[None, :]
    neg = neg.masked_fill(negatives[None, :] == targets[:, None], _NEG_INF)
    logits = torch.cat([pos, neg], dim=1)
    return -torch.log_softmax(logits, dim=1)[:, 0].mean()


def full_softmax_loss(user: torch.Tensor, item_table: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Exact softmax over items 1..N: item_table (N + 1, d) with row 0 = padding (excluded)."""
    logits = user @ item_table[1:].t()
    return F.cross_entropy(logits, targets - 1)


def in_batch_softmax_loss(user: torch.Tensor, target_emb: torch.Tensor, targets: torch.Tensor,
                          target_log_q: torch.Tensor) -> torch.Tensor:
    """In-batch negatives: logits[b, c] = v_b . e_{t_c} - log q(t_c); same-item off-diagonal columns removed."""
    logits = user @ target_emb.t() - target_log_q[None, :]
    B = targets.shape[0]
    dup = (targets[None, :] == targets[:, None]) & ~torch.eye(B, dtype=torch.bool, device=targets.device)
    logits = logits.masked_fill(dup, _NEG_INF)
    return F.cross_entropy(logits, torch.arange(B, device=targets.device))


class SoftmaxLoss:
    """Picks one of the estimators above; call with the model's v_u, the model and the targets.

    Args:
        kind: "sampled", "full" or "in_batch".
        item_counts: (N + 1,) training counts (the sampler's ranking / in-batch q).
        num_negatives: S for "sampled".
    """

    KINDS = ("sampled", "full", "in_batch")

    def __init__(self, kind: str, item_counts, num_negatives: int = 100):
        if kind not in self.KINDS:
            raise ValueError(f"loss must be one of {self.KINDS}, got {kind!r}")
        self.kind, self.num_negatives = kind, int(num_negatives)
        counts = torch.as_tensor(item_counts, dtype=torch.float64)
        if kind == "sampled":
            self.sampler = LogUniformSampler(counts)
        # +1 smoothing so items never seen as a target still have a finite log q.
        freq = (counts[1:] + 1.0) / (counts[1:] + 1.0).sum()
        self.log_freq = torch.cat([torch.zeros(1), torch.log(freq).float()])

    def __call__(self, user: torch.Tensor, model, targets: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        target_emb = model.embed_items(targets)
        if self.kind == "full":
            return full_softmax_loss(user, model.item_embeddings(), targets)
        if self.kind == "in_batch":
            return in_batch_softmax_loss(user, target_emb, targets, self.log_freq.to(user.device)[targets])
        negatives = self.sampler.sample(self.num_negatives, generator=generator, device=user.device)
        return sampled_softmax_loss(user, target_emb, targets, model.embed_items(negatives), negatives,
                                    self.sampler.log_q(targets), self.sampler.log_q(negatives))
