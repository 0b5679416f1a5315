"""Merging a user's K interest lists into one top-n list: the rules ``max``, ``quota`` and ``diverse``.

Every serving path (``mind.serve.Recommender`` over native, aoti and onnx exports, with or without
a faiss index of :mod:`mind.ann`), ``mind.evaluate.evaluate_model``, ``mind.explain`` and the
frontier (:mod:`mind.frontier`) call :func:`merged_topn`; each rule has one implementation, here.

Notation, for one user: active interests v_1 .. v_K' (K' <= K; inactive ones are left out), item
vectors e_i (the export's / model's item table, row 0 = padding), the excluded items X (the seen
history), and the relevance of an item

    f(u, i) = max_{k active} e_i . v_k        (float64, elementwise product then a row sum)

Rules:

* ``max`` (the default; MIND's serving): the n items of largest f(u, i), i not in X, ordered by
  (f desc, item asc).  Computed by the retrieval itself: :func:`retrieve_topk` below (exact;
  re-exported by ``mind.evaluate``) or ``mind.ann.search`` (a faiss index, through ``AnnIndex.search``).
* ``quota`` (a per-interest quota, as TorchEasyRec's hit-rate tool takes each interest's own top-k):
  each active interest k ranks its own candidates by (e_i . v_k desc, item asc); the list is built
  in rounds, and in each round every active interest, in the order of its index, adds its best
  item that is not in the list yet (duplicates skipped: that interest moves on to its next item; an
  interest with nothing left loses its turns).  So after r full rounds each active interest has
  contributed r items.
* ``diverse`` (ComiRec's controllable aggregation, Cen et al., KDD 2020, section 3.4): from the
  pool P = the union of the active interests' top-m lists (m = ``candidates``, at least n), greedily

      S_0 = {},   S_t = S_{t-1} + argmax_{i in P \\ S_{t-1}} [ f(u, i) + lambda * sum_{j in S_{t-1}} g(i, j) ]

  with ``lambda = diversity`` >= 0, ties going to the candidate earlier in (f desc, item asc).  The
  list is S_n in the order the items were added.  g:

  - with item categories (any item of the catalogue has one): g(i, j) = 1 when the category sets
    of i and j are disjoint (ComiRec's "different category", and the same test as
    ``mind.diversity.diversity_at_n``; an item without a category differs from every other item),
    else 0;
  - without: g(i, j) = (1 - cos(e_i, e_j)) / 2 in [0, 1], the item-embedding dissimilarity of
    maximal marginal relevance (Carbonell and Goldstein, SIGIR 1998), summed as above.

  lambda = 0 gives exactly the ``max`` list (an item of the max top-n is in the top-n <= m of the
  interest that scores it best, so it is in P); a huge lambda first maximises the number of
  different-category pairs added at each step.  The fair single-vector baseline is the same rule
  with K = 1 (the pool is that vector's top m).

Scores returned with every rule: f(u, i) as float32 (what ``max`` returns).  Lists are
(U, n) int64 item indices padded with -1 (scores -inf) when fewer than n items are eligible.

Candidate lists (``quota`` and ``diverse``): interest k's top-m items, i not in X, under the float64
scores e_i . v_k of a float32 proposal of m + max(8, m // 4) items (a torch matmul over the catalogue,
or the faiss index's search for each interest vector: an approximate index may miss items, never
mis-score them), ordered by (score desc, item asc).

Vectorised: every step of the greedy and of the quota runs on a (users x candidates) block, users
in chunks of ``chunk_size``; the category test works on the candidates' own category rows (their
genre ids, or bitmasks of them when the vocabulary has at most 256 ids), never on a dense
item x category matrix over the catalogue.  A user's list depends on its own inputs only, not on
the batch.

Bad input raises ValueError naming the argument: an unknown ``merge``, ``diversity`` < 0 or not
finite (or > 0 with a rule other than ``diverse``), ``n`` < 1 or larger than the catalogue,
``candidates`` < 1.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

# ----------------------------------------------------------------------------- the exact retrieval (``max``)
# (re-exported by mind.evaluate, whose module docstring states its exactness argument)

_F32_EPS = float(np.finfo(np.float32).eps)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def pair_scores(e64: np.ndarray, u64: np.ndarray) -> np.ndarray:
    """(..., C, d) items x (..., d) vectors -> (..., C) float64 inner products, each an einsum
    sum of products over d: a (vector, item) pair gets bit-identical scores whatever else is
    scored with it and whatever the leading shape (a matmul's blocking could change the
    rounding).  Every float64 rescoring of this package (retrieve_topk, mind.ann, mind.merge)
    uses it, so their scores agree to the bit."""
    if e64.ndim == 2:
        return np.einsum("cd,d->c", e64, u64)
    if e64.ndim == 3:
        return np.einsum("ucd,ud->uc", e64, u64)
    return np.einsum("ukcd,ukd->ukc", e64, u64)


def _exact_scores(u64: np.ndarray, e64: np.ndarray) -> np.ndarray:
    """(K, d) interests x (C, d) items -> (C,) float64 max_k <u_k, e_c> (``pair_scores`` per interest)."""
    out = np.full(len(e64), -np.inf)
    for k in range(len(u64)):
        np.maximum(out, pair_scores(e64, u64[k]), out=out)
    return out


def _rank(items: np.ndarray, scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Best n of (items, scores) by score desc, then item asc."""
    order = np.lexsort((items, -scores))[:n]
    return items[order], scores[order]


def top_exact(U64: np.ndarray, E32: np.ndarray, cands: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank each user's candidates exactly: (B, K, d) float64 interests, the float32 table, (B, C) item
    indices (0 = no candidate) -> the best min(n, C) by float64 max_k score desc, then item asc:
    (items (B, n') int64 -1-padded, scores (B, n') float64 -inf-padded).  Scores are ``pair_scores``
    per interest, so each equals what ``_exact_scores`` gives that user alone, to the bit."""
    e64 = E32[cands].astype(np.float64)                                     # (B, C, d)
    s = np.full(cands.shape, -np.inf)
    for k in range(U64.shape[1]):
        np.maximum(s, pair_scores(e64, U64[:, k]), out=s)
    s[cands <= 0] = -np.inf
    order = np.lexsort((cands, -s), axis=-1)[:, :n]
    items, scores = np.take_along_axis(cands, order, 1), np.take_along_axis(s, order, 1)
    items[scores == -np.inf] = -1
    return items, scores


def _propose_torch(uv: torch.Tensor, E: torch.Tensor, excl: list[np.ndarray], m: int):
    """Candidates per user from a float32 matmul + topk of max_k scores.

    Returns (candidates (B, C) int64, 0 = none; bound (B,)), bound = the best float32 score of any
    eligible item not proposed (-inf when every eligible item is proposed).
    """
    B, K, d = uv.shape
    s = (uv.reshape(B * K, d) @ E.T).view(B, K, -1).amax(dim=1)
    s[:, 0] = -math.inf
    lens = np.array([len(x) for x in excl])
    if lens.sum():
        rows = torch.from_numpy(np.repeat(np.arange(B), lens))
        s[rows, torch.from_numpy(np.concatenate(excl))] = -math.inf
    m = min(m, s.shape[1])
    vals, idx = (t.numpy() for t in torch.topk(s, m, dim=1))
    cands = np.where(vals > -np.inf, idx, 0).astype(np.int64)
    bound = np.full(B, -np.inf) if m == s.shape[1] else vals[:, -1].astype(np.float64)
    return cands, bound


def _propose_faiss(index, uv: torch.Tensor, excl: list[np.ndarray], m: int, num_items: int):
    """Candidates per user from faiss: each interest's top (m + |exclude|) items, merged by
    best score, excluded removed, the best m kept (ties by item). An unproposed item either was
    never returned (its score for interest k is <= that list's last score) or was cut (<= the
    best cut score), so bound = the larger of the two.  Returns (candidates (B, C) int64,
    0 = none; bound (B,)); vectorised over the users (no Python loop per user)."""
    B, K, d = uv.shape
    lens = np.array([len(x) for x in excl], dtype=np.int64)
    mk = min(m + int(lens.max(initial=0)), num_items)  # room for excluded hits
    D, I = index.search(np.ascontiguousarray(uv.reshape(B * K, d).numpy()), mk)
    last = np.full(B, -np.inf) if mk == num_items else D.reshape(B, K, mk)[:, :, -1].max(axis=1).astype(np.float64)
    rows = np.repeat(np.arange(B, dtype=np.int64), K * mk)
    items = I.reshape(-1).astype(np.int64) + 1              # index position p holds item p+1; faiss's -1 -> 0
    sc = D.reshape(-1)
    ok = items > 0
    if lens.sum():
        width = num_items + 1
        ok &= ~np.isin(rows * width + items, np.repeat(np.arange(B, dtype=np.int64), lens) * width
                       + np.concatenate(excl))
    rows, items, sc = rows[ok], items[ok], sc[ok]
    order = np.lexsort((-sc, items, rows))                   # by user, item, best score first
    rows, items, sc = rows[order], items[order], sc[order]
    first = np.ones(len(items), dtype=bool)
    first[1:] = (items[1:] != items[:-1]) | (rows[1:] != rows[:-1])
    rows, items, sc = rows[first], items[first], sc[first]
    order = np.lexsort((items, -sc, rows))                   # by user, score desc, item
    rows, items, sc = rows[order], items[order], sc[order]
    counts = np.bincount(rows, minlength=B)
    rank = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    bound = last.copy()
    at_cut = rank == m                                       # the best cut score of each user
    bound[rows[at_cut]] = np.maximum(bound[rows[at_cut]], sc[at_cut])
    keep = rank < m
    cands = np.zeros((B, max(int(min(counts.max(initial=0), m)), 1)), dtype=np.int64)
    cands[rows[keep], rank[keep]] = items[keep]
    return cands, bound


def normalize_exclude(exclude, num_users: int, num_items: int) -> list:
    """Per-user int64 arrays of item indices to leave out (None = none); ValueError if out of 0..num_items."""
    if exclude is None:
        return [np.zeros(0, np.int64)] * num_users
    if len(exclude) != num_users:
        raise ValueError(f"exclude has {len(exclude)} entries for {num_users} users")
    exclude = [np.asarray(x, dtype=np.int64).reshape(-1) for x in exclude]
    for x in exclude:
        if len(x) and (x.min() < 0 or x.max() > num_items):
            bad = x[(x < 0) | (x > num_items)][:5]
            raise ValueError(f"exclude holds item indices outside 0..{num_items}: {bad}")
    return exclude


def retrieve_topk(user_vectors: torch.Tensor, item_embeddings: torch.Tensor, n: int,
                  exclude: list | None = None, use_faiss: bool | None = None,
                  chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Top-n items per user by ``max_k <user_vectors[u, k], item_embeddings[i]>``, i >= 1.

    user_vectors: (U, K, d) interest vectors (K may be 1) or (U, d); a tensor (any device,
    float dtype) or a numpy array, like item_embeddings.
    item_embeddings: (num_items+1, d); row 0 is padding and never returned.
    exclude: per user, item indices never to return (e.g. the seen history).
    use_faiss: True = faiss IndexFlatIP proposes candidates, False = torch, None = faiss when
    importable. Results are identical either way (see the module docstring).
    chunk_size: users per proposal batch (the torch path lowers it to bound memory).

    Returns (items (U, n) int64, scores (U, n) float32), padded with -1 / -inf when fewer
    than n items are eligible.
    """
    uv = torch.as_tensor(user_vectors).detach().to("cpu", torch.float32)
    if uv.dim() == 2:
        uv = uv[:, None, :]
    if uv.dim() != 3:
        raise ValueError(f"user_vectors must be (U, K, d) or (U, d), got {tuple(user_vectors.shape)}")
    E = torch.as_tensor(item_embeddings).detach().to("cpu", torch.float32).contiguous()
    if E.dim() != 2 or E.shape[1] != uv.shape[2]:
        raise ValueError(f"item_embeddings must be (num_items+1, {uv.shape[2]}), got {tuple(E.shape)}")
    if not (torch.isfinite(uv).all() and torch.isfinite(E).all()):
        raise ValueError("user_vectors and item_embeddings must be finite")
    U, K, d = uv.shape
    N = E.shape[0] - 1
    exclude = normalize_exclude(exclude, U, N)
    if use_faiss is None:
        use_faiss = faiss_available()

    items = np.full((U, n), -1, dtype=np.int64)
    scores = np.full((U, n), -np.inf, dtype=np.float32)
    if U == 0 or n <= 0 or N <= 0:
        return items, scores

    E32 = E.numpy()          # rows are rescored in float64 as they are needed: no float64 copy of the catalogue
    U64 = uv.numpy().astype(np.float64)
    e_norm = float(torch.linalg.vector_norm(E[1:], dim=1).max())
    u_norm = torch.linalg.vector_norm(uv, dim=2).amax(dim=1).numpy()
    # |float32 dot - exact dot| <= d * eps * sum|u_i e_i| <= d * eps * |u| |e|; doubled for safety.
    tol = 2.0 * d * _F32_EPS * u_norm * e_norm
    margin = n + max(8, n // 4)
    index = None
    if use_faiss:
        import faiss
        index = faiss.IndexFlatIP(d)
        index.add(np.ascontiguousarray(E[1:].numpy()))
    all_items = np.arange(1, N + 1, dtype=np.int64)

    if index is None:
        # The torch proposal holds a (chunk * K, N+1) float32 score block: cap it at 2**26
        # entries (256 MiB) whatever chunk_size asks for.
        chunk_size = max(1, min(chunk_size, 2**26 // (K * (N + 1))))
    else:
        # faiss returns (chunk * K, m + the longest exclusion) distances and ids, 12 bytes an entry:
        # cap it at 2**22 entries (48 MiB), which a long seen history would otherwise multiply
        longest = max([len(x) for x in exclude] + [0])
        chunk_size = max(1, min(chunk_size, 2**22 // (K * min(margin + longest, N))))
    for start in range(0, U, chunk_size):
        stop = min(start + chunk_size, U)
        excl = exclude[start:stop]
        if index is not None:
            cands, bound = _propose_faiss(index, uv[start:stop], excl, margin, N)
        else:
            cands, bound = _propose_torch(uv[start:stop], E, excl, margin)
        top_i, top_s = top_exact(U64[start:stop], E32, cands, n)
        items[start:stop, :top_i.shape[1]] = top_i
        scores[start:stop, :top_s.shape[1]] = top_s
        nth = top_s[:, n - 1] if top_s.shape[1] == n else np.full(stop - start, -np.inf)
        for b in np.flatnonzero((bound > -np.inf) & ~(nth > bound + tol[start:stop])):
            # An unproposed item might tie or beat the n-th: rank the whole catalogue.
            u = start + b
            cands = np.setdiff1d(all_items, excl[b])
            top_i, top_s = _rank(cands, _exact_scores(U64[u], E32[cands].astype(np.float64)), n)
            items[u], scores[u] = -1, -np.inf
            items[u, :len(top_i)] = top_i
            scores[u, :len(top_s)] = top_s
    return items, scores


# ----------------------------------------------------------------------------- the merge rules

MERGES = ("max", "quota", "diverse")
DEFAULT_CANDIDATES = 200
_BITMASK_WORDS = 4          # category vocabularies up to 256 ids are tested with uint64 bitmasks


def check_merge(merge: str = "max", diversity: float = 0.0, n: Optional[int] = None,
                num_items: Optional[int] = None, candidates: Optional[int] = None) -> tuple[str, float]:
    """Validate the merge arguments; returns (merge, diversity as float).  ValueError names the argument."""
    if not isinstance(merge, str) or merge not in MERGES:
        raise ValueError(f"merge must be one of {', '.join(MERGES)}, got {merge!r}")
    try:
        lam = float(diversity)
    except (TypeError, ValueError):
        raise ValueError(f"diversity must be a finite number >= 0, got {diversity!r}") from None
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"diversity must be a finite number >= 0, got {diversity!r}")
    if lam != 0 and merge != "diverse":
        raise ValueError(f"diversity {diversity} only applies to merge 'diverse', got merge {merge!r}")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise ValueError(f"n must be an integer, got {n!r}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if num_items is not None and n > num_items:
            raise ValueError(f"n must be at most the catalogue's {num_items} items, got n={n}")
    if candidates is not None and (isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer))
                                   or candidates < 1):
        raise ValueError(f"candidates must be an integer >= 1, got {candidates!r}")
    return merge, lam


class Categories:
    """Item category sets for ``diverse``'s g: the (num_items + 1, G) category-id matrix of
    ``PreparedData.item_genres`` (0 = none; row 0 = padding), G ids per item at most.

    ``keys(items)`` turns a (U, C) block of item indices into the per-candidate keys the greedy
    compares: (U, C, W) uint64 bitmasks when the id vocabulary fits W <= 4 words, else the (U, C, G)
    id rows themselves.  ``differs(keys, chosen)`` is g's test (disjoint sets) against one chosen
    item per user.
    """

    def __init__(self, ids):
        ids = np.asarray(ids.detach().cpu().numpy() if hasattr(ids, "detach") else ids)
        if ids.ndim == 1:
            ids = ids[:, None]
        if ids.ndim != 2 or (ids.size and ids.min() < 0):
            raise ValueError(f"category ids must be a (num_items + 1, G) matrix of ids >= 0, got shape {ids.shape}")
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)
        vocab = int(self.ids.max()) + 1 if self.ids.size else 1
        words = -(-vocab // 64)
        self.words = words if words <= _BITMASK_WORDS else 0

    @classmethod
    def from_names(cls, genres: Sequence[Sequence[str]]) -> "Categories":
        """From items.json's per-item lists of category names (index-aligned with the item table)."""
        vocab: dict = {}
        rows = [[vocab.setdefault(str(g), len(vocab) + 1) for g in gs] for gs in genres]
        width = max([len(r) for r in rows] + [1])
        ids = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        return cls(ids)

    @property
    def has_any(self) -> bool:
        return bool(self.ids[1:].any())

    def keys(self, items: np.ndarray) -> np.ndarray:
        rows = self.ids[np.where(items > 0, items, 0)]                         # (U, C, G), 0 = no category
        if not self.words:
            return rows
        out = np.zeros(rows.shape[:-1] + (self.words,), dtype=np.uint64)
        bit = np.left_shift(np.uint64(1), (rows % 64).astype(np.uint64))
        for w in range(self.words):
            out[..., w] = np.bitwise_or.reduce(np.where((rows > 0) & (rows // 64 == w), bit, np.uint64(0)), axis=-1)
        return out

    def differs(self, keys: np.ndarray, chosen: np.ndarray) -> np.ndarray:
        """(U, C) bool: candidate c's category set is disjoint from the chosen item's; keys (U, C, X),
        chosen (U, X)."""
        if self.words:
            if self.words == 1:
                return (keys[:, :, 0] & chosen[:, None, 0]) == 0
            return ~((keys & chosen[:, None, :]) != 0).any(-1)
        eq = (keys[:, :, :, None] == chosen[:, None, None, :]) & (chosen[:, None, None, :] != 0)
        return ~eq.any((2, 3))


def best_scores(vectors64: np.ndarray, active: np.ndarray, table64: np.ndarray, items: np.ndarray) -> np.ndarray:
    """f(u, i) = max over active k of e_i . v_k, float64, for a (U, C) block of items (-inf where item < 1).

    vectors64 (U, K, d), active (U, K) bool, table64 (N + 1, d).  Each (user, item) pair is an
    ``pair_scores`` (``retrieve_topk``'s rescoring), so the value does not depend on
    the other items or users of the block and equals the score the ``max`` rule gives the item.
    """
    E = table64[np.where(items > 0, items, 0)]                                  # (U, C, d)
    f = np.full(items.shape, -np.inf)
    for k in range(vectors64.shape[1]):
        s = pair_scores(E, vectors64[:, k])
        np.maximum(f, np.where(active[:, k, None], s, -np.inf), out=f)
    f[items < 1] = -np.inf
    return f


def _rank_rows(items: np.ndarray, scores: np.ndarray, m: int) -> np.ndarray:
    """Per row of (R, P): the first m items by (score desc, item asc), -1 where score is -inf."""
    key_items = np.where(np.isfinite(scores), items, np.iinfo(np.int64).max)
    order = np.lexsort((key_items, -scores), axis=-1)[..., :m]
    out = np.take_along_axis(items, order, -1)
    out[~np.isfinite(np.take_along_axis(scores, order, -1))] = -1
    return out


def interest_candidates(vectors, active, table: np.ndarray, m: int, exclude=None, index=None,
                        chunk_size: int = 32) -> np.ndarray:
    """Each active interest's own top-m items (module docstring): (U, K, m) int64, -1 padded, each
    row ordered by (e_i . v_k desc, item asc); inactive interests' rows are all -1.

    vectors (U, K, d) float32 (tensor or array), active (U, K) bool, table (N + 1, d) float32,
    exclude per-user item indices or None, index a ``mind.ann.AnnIndex`` (None: a torch matmul).
    """
    uv = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
    U, K, d = uv.shape
    N = table.shape[0] - 1
    exclude = normalize_exclude(exclude, U, N)
    act = np.asarray(active, dtype=bool).reshape(U, K)
    out = np.full((U, K, m), -1, dtype=np.int64)
    if U == 0 or N < 1:
        return out
    E = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32))
    table64 = table.astype(np.float64)
    V64 = uv.numpy().astype(np.float64)
    P = min(m + max(8, m // 4), N)
    if index is None:
        chunk_size = max(1, min(chunk_size, 2**26 // (K * (N + 1))))
    for s in range(0, U, chunk_size):
        e = min(s + chunk_size, U)
        excl = exclude[s:e]
        B = e - s
        lens = np.array([len(x) for x in excl])
        if index is None:
            sc = (uv[s:e].reshape(B * K, d) @ E.T).view(B, K, N + 1)
            sc[:, :, 0] = -math.inf
            if lens.sum():
                rows = torch.from_numpy(np.repeat(np.arange(B), lens))
                sc[rows, :, torch.from_numpy(np.concatenate(excl))] = -math.inf
            vals, idx = torch.topk(sc, min(P, N + 1), dim=2)
            ids = idx.numpy().astype(np.int64)
            ids[~np.isfinite(vals.numpy())] = -1
        else:
            ids = index.propose(uv[s:e], min(P + int(lens.max(initial=0)), N))   # mind.ann.AnnIndex
            if lens.sum():
                key = np.repeat(np.arange(B), lens) * (N + 1) + np.concatenate(excl)
                own = np.arange(B)[:, None, None] * (N + 1) + np.where(ids > 0, ids, 0)
                ids[np.isin(own, key)] = -1
        ids[~act[s:e]] = -1
        s64 = pair_scores(table64[np.where(ids > 0, ids, 0)], V64[s:e])         # (B, K, P')
        s64[ids < 1] = -np.inf
        got = _rank_rows(ids, s64, m)
        out[s:e, :, :got.shape[2]] = got
    return out


def candidate_pool(per_interest: np.ndarray, vectors64: np.ndarray, active: np.ndarray,
                   table64: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The union of the per-interest lists (U, K, m), duplicates removed, ordered by (f desc, item asc):
    (items (U, C) int64 -1 padded, f (U, C) float64 -inf padded), C = the most distinct items of a user."""
    U = per_interest.shape[0]
    flat = np.sort(per_interest.reshape(U, -1), axis=1)
    dup = np.zeros(flat.shape, dtype=bool)
    dup[:, 1:] = flat[:, 1:] == flat[:, :-1]
    flat[dup | (flat < 1)] = -1
    width = int((flat > 0).sum(1).max(initial=0))
    f = best_scores(vectors64, active, table64, flat)
    key_items = np.where(flat > 0, flat, np.iinfo(np.int64).max)
    order = np.lexsort((key_items, -f), axis=1)[:, :width]
    return np.take_along_axis(flat, order, 1), np.take_along_axis(f, order, 1)


def greedy_diverse(items: np.ndarray, f: np.ndarray, n: int, diversity: float,
                   categories: Optional[Categories] = None, table: Optional[np.ndarray] = None,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """ComiRec's greedy over a pool (module docstring) for a (U, C) block of users x candidates.

    items (U, C) int64, -1 = no candidate; f (U, C) float64 relevance, the pool ordered by
    (f desc, item asc) (``candidate_pool``); g from ``categories`` when it has any category, else
    from the cosine of ``table``'s rows (N + 1, d).  Returns (items (U, n), f (U, n)), -1 / -inf padded.
    """
    U, C = items.shape
    out_i = np.full((U, n), -1, dtype=np.int64)
    out_f = np.full((U, n), -np.inf)
    steps = min(n, C)
    if U == 0 or steps == 0:
        return out_i, out_f
    avail = items > 0
    if diversity == 0:                              # obj = f: the pool's own order
        out_i[:, :steps], out_f[:, :steps] = items[:, :steps], f[:, :steps]
        out_i[:, :steps][~avail[:, :steps]] = -1
        out_f[:, :steps][~avail[:, :steps]] = -np.inf
        return out_i, out_f
    rows = np.arange(U)
    off = rows * C                                   # flat positions: row u, column j -> off[u] + j
    acc = np.zeros((U, C))                           # sum of g over the chosen items, in the order chosen
    if categories is not None and categories.has_any:
        keys = categories.keys(items)
        if keys.shape[-1] == 1 and categories.words:
            keys1 = np.ascontiguousarray(keys[:, :, 0])
            flat_keys = keys1.reshape(-1, 1)
            both = np.empty((U, C), dtype=np.uint64)
            disjoint = np.empty((U, C), dtype=bool)

            def add_g(flat_j):                       # g = 1 where the bitmasks share no bit
                np.bitwise_and(keys1, flat_keys[flat_j], out=both)
                np.equal(both, 0, out=disjoint)
                np.add(acc, disjoint, out=acc)
        else:
            def add_g(flat_j):
                np.add(acc, categories.differs(keys, keys[rows, flat_j - off]), out=acc)
    else:
        if table is None:
            raise ValueError("greedy_diverse needs categories with at least one category, or the item table")
        E = np.asarray(table, dtype=np.float64)[np.where(items > 0, items, 0)]
        norm = np.sqrt(np.einsum("ucd,ucd->uc", E, E))[:, :, None]
        unit = np.divide(E, norm, out=np.zeros_like(E), where=norm > 0)
        flat_unit = unit.reshape(U * C, -1)

        def add_g(flat_j):                           # g = (1 - cos) / 2
            cos = np.matmul(unit, flat_unit[flat_j][:, :, None])[:, :, 0]   # one matrix-vector product per user
            np.add(acc, (1.0 - cos) * 0.5, out=acc)
    # obj = f + lambda * acc; chosen and missing candidates sit at -inf in base
    base = np.where(avail, f, -np.inf)
    flat_base = base.reshape(-1)
    obj = np.empty((U, C))
    picked = []
    for t in range(steps):
        np.multiply(acc, diversity, out=obj)
        np.add(obj, base, out=obj)
        j = obj.argmax(1)
        picked.append(j)
        flat_j = off + j
        flat_base[flat_j] = -np.inf
        if t + 1 < steps:
            add_g(flat_j)
    picked = np.stack(picked, 1)
    ok = np.arange(steps)[None, :] < avail.sum(1)[:, None]      # a user with c < n candidates stops at c
    out_i[:, :steps] = np.where(ok, np.take_along_axis(items, picked, 1), -1)
    out_f[:, :steps] = np.where(ok, np.take_along_axis(f, picked, 1), -np.inf)
    return out_i, out_f


def quota_merge(per_interest: np.ndarray, active: np.ndarray, n: int) -> np.ndarray:
    """The ``quota`` rule (module docstring) for (U, K, m) per-interest lists: (U, n) int64, -1 padded."""
    U, K, m = per_interest.shape
    out = np.full((U, n), -1, dtype=np.int64)
    if U == 0:
        return out
    act = np.asarray(active, dtype=bool).reshape(U, K)
    taken = (per_interest < 1) | ~act[:, :, None]
    rank = np.cumsum(act, 1) - 1                      # position of interest k in the user's turn order
    a = np.maximum(act.sum(1), 1)
    turn = np.zeros(U, dtype=np.int64)
    rows = np.arange(U)
    for t in range(n):
        avail = ~taken
        has = avail.any(-1)                           # (U, K)
        if not has.any():
            break
        pos = avail.argmax(-1)
        dist = np.where(has, (rank - turn[:, None]) % a[:, None], K + 1)
        k = dist.argmin(1)
        ok = has[rows, k]
        item = per_interest[rows, k, pos[rows, k]]
        out[ok, t] = item[ok]
        taken |= (per_interest == np.where(ok, item, -2)[:, None, None])
        turn = np.where(ok, (rank[rows, k] + 1) % a, turn)
    return out


def merged_topn(vectors, n: int, *, table, active=None, exclude=None, merge: str = "max",
                diversity: float = 0.0, categories: Optional[Categories] = None,
                candidates: int = DEFAULT_CANDIDATES, index=None, use_faiss: Optional[bool] = False,
                chunk_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A user's merged top-n under ``merge`` (module docstring), for a batch of users.

    vectors: (U, K, d) interest vectors (tensor or array; (U, d) is K = 1); active: (U, K) bool or
    None (all active); table: (N + 1, d) item vectors, row 0 padding; exclude: per user, item
    indices never to return, or None; categories: :class:`Categories` for ``diverse``'s g (None or
    without any category: the embedding cosine); candidates: m, items per interest in the pool
    (at least n is used); index: a ``mind.ann.AnnIndex`` to retrieve through (None: exact);
    use_faiss: the ``max`` rule's exact proposal (``retrieve_topk``; identical results either way).

    Returns (items (U, n) int64 -1 padded, scores (U, n) float32 -inf padded), scores = f(u, i).
    """
    table = np.ascontiguousarray(np.asarray(table.detach().cpu().numpy() if hasattr(table, "detach") else table,
                                            dtype=np.float32))
    merge, lam = check_merge(merge, diversity, n, table.shape[0] - 1, candidates)
    uv = torch.as_tensor(vectors).detach().to("cpu", torch.float32)
    if uv.dim() == 2:
        uv = uv[:, None, :]
    if uv.dim() != 3 or uv.shape[2] != table.shape[1]:
        raise ValueError(f"vectors must be (U, K, {table.shape[1]}) or (U, {table.shape[1]}), "
                         f"got {tuple(torch.as_tensor(vectors).shape)}")
    U, K, _ = uv.shape
    act = np.ones((U, K), dtype=bool) if active is None else \
        np.asarray(active.detach().cpu().numpy() if hasattr(active, "detach") else active, dtype=bool).reshape(U, K)
    if U and not act[:, 0].all():
        raise ValueError("active: interest 0 must be active for every user")
    if merge == "max":
        vr = torch.where(torch.from_numpy(act)[:, :, None], uv, uv[:, :1, :])   # inactive = copies of interest 0
        if index is None:
            return retrieve_topk(vr, table, n, exclude=exclude, use_faiss=use_faiss)
        return index.search(vr, n, exclude=exclude)          # mind.ann.AnnIndex: mind.ann.search
    m = max(int(candidates), n)
    items = np.full((U, n), -1, dtype=np.int64)
    scores = np.full((U, n), -np.inf, dtype=np.float32)
    for s in range(0, U, chunk_size):
        e = min(s + chunk_size, U)
        per = interest_candidates(uv[s:e], act[s:e], table, m, None if exclude is None else exclude[s:e], index)
        items[s:e], scores[s:e] = merge_candidates(per, uv[s:e], act[s:e], table, n, merge, lam, categories)
    return items, scores


def merge_candidates(per_interest: np.ndarray, vectors, active: np.ndarray, table: np.ndarray, n: int,
                     merge: str, diversity: float = 0.0, categories: Optional[Categories] = None,
                     chunk_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The ``quota`` or ``diverse`` rule from the per-interest lists of :func:`interest_candidates`
    (U, K, m): (items (U, n) int64 -1 padded, f (U, n) float32 -inf padded), ``chunk_size`` users at a time."""
    U = per_interest.shape[0]
    V64 = np.asarray(vectors, dtype=np.float64)
    table64 = np.asarray(table, dtype=np.float64)
    items = np.full((U, n), -1, dtype=np.int64)
    scores = np.full((U, n), -np.inf, dtype=np.float32)
    for s in range(0, U, chunk_size):
        e = min(s + chunk_size, U)
        if merge == "quota":
            got = quota_merge(per_interest[s:e], active[s:e], n)
            f = best_scores(V64[s:e], active[s:e], table64, got)
        elif merge == "diverse":
            pool_i, pool_f = candidate_pool(per_interest[s:e], V64[s:e], active[s:e], table64)
            got, f = greedy_diverse(pool_i, pool_f, n, diversity, categories, table)
        else:
            raise ValueError(f"merge_candidates serves merge 'quota' or 'diverse', got {merge!r}")
        items[s:e], scores[s:e] = got, f.astype(np.float32)
    return items, scores
