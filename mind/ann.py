"""Approximate (and exact) multi-interest retrieval for large catalogues, on faiss.

``mind.evaluate.retrieve_topk`` scores every item for every user: exact, and the right tool
for evaluation, but its cost grows with the catalogue.  This module builds a faiss index
once and searches it many times:

* ``kind="exact"``: ``IndexFlatIP``, brute force, searched as ``retrieve_topk``'s torch proposal
  (a float32 matmul + topk over the table, faster than the flat index's own search).  Results
  equal ``retrieve_topk``'s, item for item and score for score (same float64 rescoring, same
  tie-breaking, same fallback to the whole catalogue when a near-tie might have been cut; see below).
* ``kind="ivf"``: ``IndexIVFFlat`` with inner product.  ``nlist`` inverted lists (k-means
  centroids, trained on a sample of ``train_size`` items), ``nprobe`` lists scanned per
  query.  ``nprobe == nlist`` scans everything and is exact up to the order of ties.
* ``kind="hnsw"``: ``IndexHNSWFlat`` with ``METRIC_INNER_PRODUCT``; ``M`` links per node,
  ``efConstruction`` at build time, ``efSearch`` (the beam width) at query time.

Retrieval rule (MIND's serving, as in ``retrieve_topk``): for a user with interest vectors
u_1 .. u_K (a (U, d) input is K = 1), each interest retrieves its top-m items from the index
(m = n + the user's number of excluded items, so that n survive the exclusion), the K lists
are merged, duplicates removed, padding (row 0) and excluded items dropped, and the n best
kept.  Every kept candidate is scored in float64 as

    score(i) = max_k <u_k, e_i>

(the item's best score over *all* interests, i.e. its true merged score even when an
approximate search missed it in one list), ordered by (score desc, item asc).  So an
approximate index can only *miss* items; it never misorders or misscores what it returns.

Exactness of ``kind="exact"``: a float32 matmul over the table proposes the best (n + margin)
eligible items by max_k score, exactly as ``retrieve_topk``'s torch path does; a user whose n-th
float64 score does not beat the best unproposed float32 score by a rounding bound is rescored
over the whole catalogue (in blocks, so a million-item catalogue never needs a float64 copy).

Returns ``(items (U, n) int64, scores (U, n) float32)``, padded with -1 / -inf when fewer
than n items are eligible: the format of ``retrieve_topk``.

That is the ``max`` merge of :mod:`mind.merge`.  Its ``quota`` and ``diverse`` rules take each
interest's own top-m from the index through :func:`propose_per_interest` (then drop the excluded
items and rescore in float64 there), so serving through an index works with every rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .merge import _F32_EPS, _exact_scores, _propose_torch, _rank, normalize_exclude, top_exact

KINDS = ("exact", "ivf", "hnsw")
_FULL_BLOCK = 65536  # catalogue rows per float64 block in the exact fallback (32 MiB at d = 64)


@dataclass
class AnnIndex:
    """A built index over items 1..N (faiss position p holds item p + 1).

    ``embeddings`` is the (N+1, d) float32 table (row 0 = padding), kept to rescore candidates
    in float64; ``params`` records what the index was built with (for reports).
    """

    kind: str
    index: object
    embeddings: np.ndarray
    params: dict = field(default_factory=dict)
    max_item_norm: float = 0.0

    @property
    def num_items(self) -> int:
        return self.embeddings.shape[0] - 1

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def search(self, user_vectors, n: int, exclude: list | None = None, chunk_size: int = 1024):
        """:func:`search` on this index (what ``mind.merge`` calls for the ``max`` rule)."""
        return search(self, user_vectors, n, exclude=exclude, chunk_size=chunk_size)

    def propose(self, user_vectors, p: int) -> np.ndarray:
        """:func:`propose_per_interest` on this index (``mind.merge``'s ``quota`` and ``diverse`` candidates)."""
        return propose_per_interest(self, user_vectors, p)

    def set_search_params(self, **params) -> None:
        """Change query-time knobs in place: ``nprobe`` (ivf) or ``efSearch`` (hnsw)."""
        for key, value in params.items():
            if self.kind == "ivf" and key == "nprobe":
                self.index.nprobe = int(min(max(1, value), self.index.nlist))
            elif self.kind == "hnsw" and key == "efSearch":
                self.index.hnsw.efSearch = int(max(1, value))
            else:
                raise ValueError(f"{key!r} is not a search parameter of a {self.kind!r} index")
            self.params[key] = int(value)


def _as_table(item_embeddings) -> np.ndarray:
    E = torch.as_tensor(item_embeddings).detach().to("cpu", torch.float32).numpy()
    if E.ndim != 2 or E.shape[0] < 1 or E.shape[1] < 1:
        raise ValueError(f"item_embeddings must be (num_items+1, d), got shape {tuple(E.shape)}")
    if not np.isfinite(E).all():
        raise ValueError("item_embeddings must be finite")
    return np.ascontiguousarray(E)


def match_threads(n: int | None = None) -> None:
    """Give faiss's OpenMP runtime (its own copy, not torch's) ``n`` threads, default torch's count, for
    the calling thread: OpenMP's thread count is per calling thread, and faiss's default (one per core)
    leaves the extra threads spinning between searches, on cores the rest of the process needs.
    A no-op without faiss."""
    try:
        import faiss
    except ImportError:
        return
    if n is None:
        n = torch.get_num_threads()
    faiss.omp_set_num_threads(max(1, int(n)))


def build_index(item_embeddings, kind: str = "exact", **params) -> AnnIndex:
    """Build a faiss index over rows 1..N of ``item_embeddings`` (N+1, d) float32; row 0 is padding.

    kind="exact": no parameters.
    kind="ivf": ``nlist`` (default ~4 sqrt(N), at most N), ``nprobe`` (default min(16, nlist)),
    ``train_size`` (items sampled to train the k-means quantizer, default min(N, 64 nlist)),
    ``seed`` (default 0).
    kind="hnsw": ``M`` (default 32), ``efConstruction`` (default 40), ``efSearch`` (default 64).
    """
    import faiss

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    E = _as_table(item_embeddings)
    N, d = E.shape[0] - 1, E.shape[1]
    items = E[1:]
    allowed = {"exact": set(), "ivf": {"nlist", "nprobe", "train_size", "seed"},
               "hnsw": {"M", "efConstruction", "efSearch"}}[kind]
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(f"unknown parameters for kind={kind!r}: {sorted(unknown)} (allowed: {sorted(allowed)})")

    if kind == "exact":
        index = faiss.IndexFlatIP(d)
        index.add(items)
        used = {}
    elif kind == "ivf":
        if N < 1:
            raise ValueError("an ivf index needs at least one item to train on")
        nlist = int(params.get("nlist", max(1, min(N, round(4 * math.sqrt(N))))))
        if not 1 <= nlist <= N:
            raise ValueError(f"nlist must be in 1..{N} (the number of items), got {nlist}")
        nprobe = int(params.get("nprobe", min(16, nlist)))
        train_size = int(min(N, params.get("train_size", 64 * nlist)))
        rng = np.random.default_rng(params.get("seed", 0))
        sample = items if train_size >= N else items[np.sort(rng.choice(N, train_size, replace=False))]
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = int(params.get("seed", 0))
        index.cp.min_points_per_centroid = 1  # small test catalogues: no "too few points" noise
        index.cp.max_points_per_centroid = max(1, -(-len(sample) // nlist))  # we sampled already
        index.train(np.ascontiguousarray(sample))
        index.add(items)
        index.nprobe = min(max(1, nprobe), nlist)
        used = {"nlist": nlist, "nprobe": index.nprobe, "train_size": len(sample)}
    else:
        M = int(params.get("M", 32))
        index = faiss.IndexHNSWFlat(d, M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params.get("efConstruction", 40))
        index.hnsw.efSearch = int(params.get("efSearch", 64))
        if N:
            index.add(items)
        used = {"M": M, "efConstruction": index.hnsw.efConstruction, "efSearch": index.hnsw.efSearch}
    max_norm = float(np.sqrt((items.astype(np.float64) ** 2).sum(axis=1).max())) if N else 0.0
    return AnnIndex(kind, index, E, used, max_norm)


def _full_catalogue_top(u64: np.ndarray, E: np.ndarray, excl: np.ndarray, n: int):
    """Exact top-n over items 1..N minus ``excl`` in float64 blocks (bit-identical to scoring
    the whole catalogue at once: ``_exact_scores`` scores each row independently)."""
    best_i = np.zeros(0, np.int64)
    best_s = np.zeros(0, np.float64)
    N = E.shape[0] - 1
    for start in range(1, N + 1, _FULL_BLOCK):
        cands = np.arange(start, min(start + _FULL_BLOCK, N + 1), dtype=np.int64)
        if len(excl):
            cands = cands[~np.isin(cands, excl)]
        s = _exact_scores(u64, E[cands].astype(np.float64))
        best_i, best_s = _rank(np.concatenate([best_i, cands]), np.concatenate([best_s, s]), n)
    return best_i, best_s


def search(index: AnnIndex, user_vectors, n: int, exclude: list | None = None,
           chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Top-n items per user under MIND's multi-interest rule (module docstring).

    user_vectors: (U, K, d) interest vectors or (U, d); tensor or numpy array, finite.
    n: items per user.
    exclude: per user, item indices never to return (e.g. the seen history), or None.
    chunk_size: users per faiss call.

    Returns (items (U, n) int64 -1-padded, scores (U, n) float32 -inf-padded); scores are
    max_k <u_k, e_i> computed in float64 then cast.
    """
    uv = torch.as_tensor(user_vectors).detach().to("cpu", torch.float32)
    if uv.dim() == 2:
        uv = uv[:, None, :]
    if uv.dim() != 3 or uv.shape[2] != index.dim:
        raise ValueError(f"user_vectors must be (U, K, {index.dim}) or (U, {index.dim}), "
                         f"got {tuple(torch.as_tensor(user_vectors).shape)}")
    if not torch.isfinite(uv).all():
        raise ValueError("user_vectors must be finite")
    U, K, d = uv.shape
    N = index.num_items
    exclude = normalize_exclude(exclude, U, N)

    items = np.full((U, n), -1, dtype=np.int64)
    scores = np.full((U, n), -np.inf, dtype=np.float32)
    if U == 0 or n <= 0 or N <= 0:
        return items, scores

    E = index.embeddings
    U64 = uv.numpy().astype(np.float64)
    if index.kind == "exact":
        # retrieve_topk's torch proposal (a float32 matmul + topk over the table, 1.7-6.9x faster than
        # IndexFlatIP's own search: bench/bench_propose.py), margin and rounding bound, so the results
        # are identical; its (chunk * K, N + 1) score block is capped at 2**26 entries (256 MiB)
        u_norm = torch.linalg.vector_norm(uv, dim=2).amax(dim=1).numpy()
        tol = 2.0 * d * _F32_EPS * u_norm * index.max_item_norm
        margin = n + max(8, n // 4)
        table = torch.from_numpy(E)
        chunk_size = max(1, min(chunk_size, 2**26 // (K * (N + 1))))
    for start in range(0, U, chunk_size):
        stop = min(start + chunk_size, U)
        excl = exclude[start:stop]
        if index.kind == "exact":
            cands, bound = _propose_torch(uv[start:stop], table, excl, margin)
        else:
            cands, bound = _propose_approx(index.index, uv[start:stop], excl, n, N)
        top_i, top_s = top_exact(U64[start:stop], E, cands, n)
        items[start:stop, :top_i.shape[1]] = top_i
        scores[start:stop, :top_s.shape[1]] = top_s
        if index.kind != "exact":
            continue
        nth = top_s[:, n - 1] if top_s.shape[1] == n else np.full(stop - start, -np.inf)
        for b in np.flatnonzero((bound > -np.inf) & ~(nth > bound + tol[start:stop])):
            u = start + b           # an unproposed item might tie or beat the n-th: the whole catalogue
            top_i, top_s = _full_catalogue_top(U64[u], E, excl[b], n)
            items[u], scores[u] = -1, -np.inf
            items[u, :len(top_i)] = top_i
            scores[u, :len(top_s)] = top_s
    return items, scores


def _propose_approx(index, uv: torch.Tensor, excl: list, n: int, num_items: int):
    """Each interest's top (n + max |exclude|) from the approximate index, merged: the distinct
    items, padding (faiss's -1 for an unfilled slot becomes 0 here) and excluded removed.
    Returns (candidates (B, C) int64, 0 = none; bound (B,) all -inf: an approximate index makes
    no completeness promise)."""
    B, K, d = uv.shape
    mk = min(n + max([len(x) for x in excl] + [0]), num_items)
    _, I = index.search(np.ascontiguousarray(uv.reshape(B * K, d).numpy()), mk)
    I = I.reshape(B, K * mk).astype(np.int64) + 1
    if any(len(x) for x in excl):
        for b in range(B):
            I[b, np.isin(I[b], excl[b])] = 0
    I.sort(axis=1)
    I[:, 1:][I[:, 1:] == I[:, :-1]] = 0                     # repeats (an item in several interests' lists)
    return I, np.full(B, -np.inf)


def propose_per_interest(index: AnnIndex, uv, p: int) -> np.ndarray:
    """Each interest vector's top-p items from the index, unranked and unfiltered: (U, K, p) int64
    item indices (faiss position + 1; 0 where faiss returned nothing).  ``mind.merge`` removes the
    excluded items, rescores in float64 and ranks (the ``quota`` and ``diverse`` rules' candidates)."""
    uv = torch.as_tensor(uv).detach().to("cpu", torch.float32)
    if uv.dim() == 2:
        uv = uv[:, None, :]
    B, K, d = uv.shape
    if d != index.dim:
        raise ValueError(f"user_vectors must be (U, K, {index.dim}), got {tuple(uv.shape)}")
    p = int(min(max(p, 1), index.num_items))
    if B == 0 or index.num_items == 0:
        return np.zeros((B, K, p), dtype=np.int64)
    _, I = index.index.search(np.ascontiguousarray(uv.reshape(B * K, d).numpy()), p)
    return (I.reshape(B, K, p) + 1).astype(np.int64)
