"""Measures beside accuracy: interest distinctness, list diversity, catalogue coverage, and
recall split by how genre-diverse a user's history is.

All functions work on numpy arrays (tensors are accepted and converted; interest_cosine shares
its torch computation with training's penalty); shapes below use U users,
K interests, d dimensions, n list length, G genre slots per item, num_items items 1..num_items
(index 0 is padding everywhere, as in :class:`mind.data.PreparedData`).

Genres: ``item_genres`` is the (num_items + 1, G) genre-id matrix of ``PreparedData`` (0 =
padding), so an item's genre SET is its non-zero entries; an item may have several genres
(MovieLens) or none.

* :func:`interest_cosine` -- per user, the mean pairwise cosine of its ACTIVE interests:
  ``ic_u = (1 / C(a_u, 2)) * sum_{i < j, i, j active} <v_i, v_j> / (|v_i| |v_j|)``, a_u =
  number of active interests; undefined (NaN) when a_u < 2, so with K = 1 every user is
  NaN and the split-level value is None (see :func:`beyond_accuracy`).  A zero vector has
  cosine 0 with everything.
* :func:`diversity_at_n` -- ComiRec (Cen et al., KDD 2020) Diversity@N:
  ``div_u = sum_{j < k} delta(CATE(i_j) != CATE(i_k)) / (N (N - 1) / 2)`` over the unordered
  pairs of the user's top-N list.  With genre SETS, two items are "different categories" when
  their genre sets are DISJOINT (sharing any one genre makes them the same category); an item
  without genres is a category of its own, so it differs from every other item.  Padding
  entries (-1 / 0) of a short list are dropped and N is the number of real entries; a list
  with fewer than 2 real entries is NaN.
* :func:`coverage_at_n` -- ``|union_u top-N(u) ∩ {1..num_items}| / num_items``.
* :func:`genre_entropy` -- Shannon entropy (natural log, nats) of the genre distribution of a
  user's input history: each history item adds ``1 / |genres(item)|`` to each of its genres,
  ``p_g = mass_g / sum mass``, ``H_u = -sum_g p_g ln p_g``; items without genres add nothing;
  a history with no genre mass has H = 0.
* :func:`entropy_terciles` -- 0 / 1 / 2 = low / mid / high tercile by rank of H within the
  split (a stable sort, so ties keep the split's user order): the user at rank r (0-based)
  of U is in tercile ``floor(3 r / U)``.
"""

from __future__ import annotations

import math

import numpy as np

from .metrics import recall_at_n

TERCILE_NAMES = ("low", "mid", "high")


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def genre_matrix(item_genres) -> np.ndarray:
    """(num_items + 1, G) genre ids (0 = padding) -> (num_items + 1, num_genres) bool multi-hot
    with column 0 (padding) cleared."""
    g = _np(item_genres).astype(np.int64)
    if g.ndim != 2:
        raise ValueError(f"item_genres must be (num_items + 1, G), got shape {g.shape}")
    width = int(g.max()) + 1 if g.size else 1
    m = np.zeros((g.shape[0], max(width, 1)), dtype=bool)
    rows = np.repeat(np.arange(g.shape[0]), g.shape[1])
    m[rows, g.reshape(-1)] = True
    m[:, 0] = False
    return m


def interest_cosine(vectors, mask=None) -> np.ndarray:
    """Per user mean pairwise cosine of the active interests; (U,) float64, NaN where a user
    has fewer than 2 active interests.

    vectors: (U, K, d) raw interest vectors (not the retrieval copies); mask: (U, K) bool,
    True = active (None = all active).  Computed in float64 by the function training's
    diversity penalty uses (:func:`mind.loss.pairwise_interest_cosine`).
    """
    import torch

    from .loss import pairwise_interest_cosine

    v = torch.as_tensor(_np(vectors), dtype=torch.float64)
    if v.dim() != 3:
        raise ValueError(f"vectors must be (U, K, d), got shape {tuple(v.shape)}")
    U, K, _ = v.shape
    m = None if mask is None else torch.as_tensor(_np(mask).astype(bool))
    if m is not None and tuple(m.shape) != (U, K):
        raise ValueError(f"mask must be {(U, K)}, got {tuple(m.shape)}")
    per_user, has_pairs = pairwise_interest_cosine(v, m)
    return np.where(has_pairs.numpy(), per_user.numpy(), np.nan)


def _genre_rows(item_genres) -> np.ndarray:
    g = _np(item_genres).astype(np.int64)
    if g.ndim != 2:
        raise ValueError(f"item_genres must be (num_items + 1, G), got shape {g.shape}")
    return g


def _genre_bits(G: np.ndarray) -> np.ndarray:
    """(B, n, G) genre ids (0 = none) -> (B, n, W) uint64 bitmasks over the genres present in G
    (W = ceil(their count / 64)): two entries share a genre exactly when their masks intersect."""
    ids, pos = np.unique(G, return_inverse=True)
    pos = pos.reshape(G.shape) - (ids[0] == 0)        # bit of each genre id; 0 (none) has no bit
    W = max(1, -(-(len(ids) - int(ids[0] == 0)) // 64))
    bits = np.zeros(G.shape[:2] + (W,), dtype=np.uint64)
    b, i, j = np.nonzero(G != 0)
    p = pos[b, i, j]
    np.bitwise_or.at(bits, (b, i, p // 64), np.left_shift(np.uint64(1), (p % 64).astype(np.uint64)))
    return bits


def diversity_at_n(ranked, item_genres, n: int, chunk: int = 256) -> np.ndarray:
    """Per user ComiRec Diversity@n of the first n entries of ``ranked`` (U, >= n); (U,) float64.

    Pairs of distinct items with disjoint genre sets count as different (an item without
    genres differs from every other item); the same item twice counts as the same category.
    Entries <= 0 (padding) are dropped; NaN for fewer than 2 real entries.  Computed ``chunk`` users
    at a time from each list's genre sets as bitmasks over the genres the chunk holds: O(n^2 W) per
    user with W = ceil(genres in the chunk / 64), whatever the catalogue size.
    """
    r = _np(ranked).astype(np.int64)
    if r.ndim != 2 or r.shape[1] < n:
        raise ValueError(f"ranked must be (U, >= {n}), got shape {r.shape}")
    g = _genre_rows(item_genres)
    out = np.full(len(r), np.nan)
    upper = np.triu(np.ones((n, n), dtype=bool), 1)
    for s in range(0, len(r), chunk):
        items = r[s:s + chunk, :n]                                          # (B, n)
        real = items > 0
        bits = _genre_bits(g[np.where(real, items, 0)])                     # (B, n, W)
        shared = ((bits[:, :, None, :] & bits[:, None, :, :]) != 0).any(3)  # (B, n, n)
        same = shared | (items[:, :, None] == items[:, None, :])
        pairs = upper & real[:, :, None] & real[:, None, :]                 # (B, n, n): i < j, both real
        k = real.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            div = (pairs & ~same).sum((1, 2)) / (k * (k - 1) / 2)
        out[s:s + chunk] = np.where(k >= 2, div, np.nan)
    return out


def coverage_at_n(ranked, n: int, num_items: int) -> float:
    """Fraction of items 1..num_items that appear in at least one user's top n."""
    if num_items <= 0:
        return math.nan
    r = _np(ranked).astype(np.int64)[:, :n].reshape(-1)
    r = r[(r >= 1) & (r <= num_items)]
    return len(np.unique(r)) / num_items


def genre_entropy(histories, item_genres) -> np.ndarray:
    """Per user Shannon entropy (nats) of the genre distribution over the history items;
    histories (U, L) item ids with 0 = padding (or a list of 1-D arrays); (U,) float64.

    Each history item (repeats count again) gives 1/|genres| to each of its genres.  Computed on
    (user, genre) pairs, never on a dense (items x genres) matrix.
    """
    g = _genre_rows(item_genres)
    if isinstance(histories, list):
        lengths = np.array([len(_np(h).reshape(-1)) for h in histories], dtype=np.int64)
        flat = (np.concatenate([_np(h).astype(np.int64).reshape(-1) for h in histories])
                if len(histories) else np.zeros(0, np.int64))
    else:
        h = _np(histories).astype(np.int64)
        lengths = np.full(h.shape[0], h.shape[1] if h.ndim == 2 else 0, dtype=np.int64)
        flat = h.reshape(-1)
    U = len(lengths)
    user = np.repeat(np.arange(U), lengths)
    keep = flat > 0
    user, flat = user[keep], flat[keep]
    genres = g[flat]                                                        # (n, G)
    earlier = np.tril(np.ones((g.shape[1], g.shape[1]), dtype=bool), -1)    # a genre repeated in a row counts once
    has = (genres != 0) & ~((genres[:, :, None] == genres[:, None, :]) & earlier).any(2)
    weight = has / np.maximum(has.sum(1, keepdims=True), 1)                 # 1/|genres| per genre
    pair_user = np.repeat(user, g.shape[1])[has.reshape(-1)]
    pair_genre = genres.reshape(-1)[has.reshape(-1)]
    pair_w = weight.reshape(-1)[has.reshape(-1)]
    out = np.zeros(U)
    if not len(pair_user):
        return out
    key = pair_user * (int(g.max()) + 1) + pair_genre
    uniq, inv = np.unique(key, return_inverse=True)
    mass = np.bincount(inv, weights=pair_w)                                 # per (user, genre)
    owner = uniq // (int(g.max()) + 1)
    total = np.bincount(owner, weights=mass, minlength=U)
    p = mass / total[owner]
    out += np.bincount(owner, weights=-(p * np.log(p)), minlength=U)
    return out


def entropy_terciles(entropy) -> np.ndarray:
    """(U,) values -> (U,) int64 tercile 0 (low) / 1 (mid) / 2 (high) by stable rank."""
    e = _np(entropy).astype(np.float64).reshape(-1)
    U = len(e)
    rank = np.empty(U, dtype=np.int64)
    rank[np.argsort(e, kind="stable")] = np.arange(U)
    return (3 * rank) // max(U, 1)


def _mean_se(x: np.ndarray) -> tuple:
    """Mean and standard error over the non-NaN entries; (None, None) when there are none."""
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return None, None
    se = float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0
    return float(np.mean(x)), se


def beyond_accuracy(ranked, targets, histories, item_genres, num_items: int, ns=(20, 50),
                    vectors=None, mask=None) -> dict:
    """The measures of this module for one split, as metric-dict entries:

    ``interest_cosine``, ``interest_cosine_se`` (only when ``vectors`` is given; None when no
    user has 2 active interests, e.g. K = 1) and, for N in ns: ``diversity@N``,
    ``diversity@N_se``, ``coverage@N``, ``recall@N_entropy_{low,mid,high}`` and their
    ``_se``.  Means are over users (NaN users skipped); an undefined value is None, not NaN,
    so the dict is strict-JSON safe.

    ranked (U, >= max(ns)) items (-1 padded); targets, histories: per user (histories = the
    model's input, (U, L) with 0 padding); item_genres (num_items + 1, G).
    """
    out: dict = {}
    if vectors is not None:
        out["interest_cosine"], out["interest_cosine_se"] = _mean_se(interest_cosine(vectors, mask))
    terc = entropy_terciles(genre_entropy(histories, item_genres))
    for n in ns:
        out[f"diversity@{n}"], out[f"diversity@{n}_se"] = _mean_se(diversity_at_n(ranked, item_genres, n))
        cov = coverage_at_n(ranked, n, num_items)
        out[f"coverage@{n}"] = None if math.isnan(cov) else cov
        rec = recall_at_n(ranked, targets, n) if len(targets) else np.zeros(0)
        for t, name in enumerate(TERCILE_NAMES):
            key = f"recall@{n}_entropy_{name}"
            out[key], out[key + "_se"] = _mean_se(rec[terc == t])
    return out
