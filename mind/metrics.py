"""Top-N accuracy metrics of ranked lists against a user's held-out targets (numpy only).

Per user, with T = set(targets) (repeated targets count once) and the first n entries of the
ranking (-1 = padding, never a hit):

* recall@n   = |hits| / |T|
* hit_rate@n = 1 if hits else 0
* ndcg@n     = sum_{hit at 0-based rank r} 1/log2(r+2)  /  sum_{r < min(|T|, n)} 1/log2(r+2)
"""

from __future__ import annotations

import math

import numpy as np


def _per_user(ranked: np.ndarray, targets: list, n: int):
    """Yield (0-based ranks of hits within the top n, |set(targets)|) per user."""
    ranked = np.asarray(ranked)
    if ranked.ndim != 2 or len(ranked) != len(targets):
        raise ValueError(f"ranked must be (U, >=n) with U = len(targets) = {len(targets)}, "
                         f"got shape {ranked.shape}")
    if ranked.shape[1] < n:
        raise ValueError(f"ranked has {ranked.shape[1]} columns, fewer than n={n}")
    for row, t in zip(ranked[:, :n], targets):
        tset = set(np.asarray(t).reshape(-1).tolist())
        if not tset:
            raise ValueError("a user has no targets; metrics are undefined for it")
        seen, hits = set(), []
        for r, item in enumerate(row.tolist()):
            if item in tset and item not in seen:  # a repeated item scores once
                hits.append(r)
            seen.add(item)
        yield hits, len(tset)


def recall_at_n(ranked: np.ndarray, targets: list, n: int) -> np.ndarray:
    """Per user |top-n ∩ T| / |T|; (U,) float64."""
    return np.array([len(h) / m for h, m in _per_user(ranked, targets, n)], dtype=np.float64)


def hit_rate_at_n(ranked: np.ndarray, targets: list, n: int) -> np.ndarray:
    """Per user 1.0 if the top n holds any target, else 0.0; (U,) float64."""
    return np.array([float(len(h) > 0) for h, _ in _per_user(ranked, targets, n)], dtype=np.float64)


def ndcg_at_n(ranked: np.ndarray, targets: list, n: int) -> np.ndarray:
    """Per user DCG / IDCG with binary gains; IDCG fills min(|T|, n) ranks; (U,) float64."""
    out = []
    for hits, m in _per_user(ranked, targets, n):
        dcg = sum(1.0 / math.log2(r + 2) for r in hits)
        idcg = sum(1.0 / math.log2(r + 2) for r in range(min(m, n)))
        out.append(dcg / idcg)
    return np.array(out, dtype=np.float64)


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(U); 0 for one user)."""
    if len(x) == 0:
        return math.nan, math.nan
    se = float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0
    return float(np.mean(x)), se


def evaluate_rankings(ranked: np.ndarray, targets: list, ns=(20, 50)) -> dict:
    """{"recall@N", "recall@N_se", "hit_rate@N", "hit_rate@N_se", "ndcg@N", "ndcg@N_se"
    for N in ns, "num_users"}: means over users and their standard errors."""
    out: dict = {"num_users": len(targets)}
    for n in ns:
        for name, fn in (("recall", recall_at_n), ("hit_rate", hit_rate_at_n), ("ndcg", ndcg_at_n)):
            mean, se = _mean_se(fn(ranked, targets, n))
            out[f"{name}@{n}"] = mean
            out[f"{name}@{n}_se"] = se
    return out
