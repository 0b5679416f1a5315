"""Full-corpus retrieval and top-N metrics (Recall, HitRate, NDCG @ N), plus MostPopular.

Retrieval rule (MIND's serving): each of a user's K interest vectors retrieves its top-n
items by inner product, the K lists are merged, an item keeps its best score, and the n
best remain. That equals ranking every item by ``max_k <u_k, e_i>`` (an item in the merged
top-n is in the top-n of the interest that gives its best score), which is what is
computed. Ties are broken by the lower item index.

Exactness and identical results with and without faiss: both paths only *propose*
candidates (faiss IndexFlatIP or a torch float32 matmul + topk, over-fetching a few). The
candidates are then rescored in float64 by one shared function (float32 products are exact
in float64) and ordered by (score desc, item asc). A user whose proposal may have missed an
item that would tie or beat the n-th score (the best unproposed float32 score, plus a
float32 rounding bound, reaches it) is rescored over the whole catalogue instead. So both
paths return the exact top-n under the float64 scores, with the same tie-breaking.

Metrics, per user, with T = set(targets) (repeated targets count once) and the first n
entries of the ranking (-1 = padding, never a hit):

* recall@n   = |hits| / |T|
* hit_rate@n = 1 if hits else 0
* ndcg@n     = sum_{hit at 0-based rank r} 1/log2(r+2)  /  sum_{r < min(|T|, n)} 1/log2(r+2)
"""

from __future__ import annotations

import csv
import json
import math
import pathlib

import numpy as np
import torch

from .diversity import beyond_accuracy
from .metrics import evaluate_rankings, hit_rate_at_n, ndcg_at_n, recall_at_n  # noqa: F401 (re-exported)
from .model import MIND, retrieval_vectors

_F32_EPS = float(np.finfo(np.float32).eps)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _exact_scores(u64: np.ndarray, e64: np.ndarray) -> np.ndarray:
    """(K, d) interests x (C, d) items -> (C,) float64 max_k <u_k, e_c>.

    Elementwise product then a row sum, one interest at a time, so a (user, item) pair gets
    bit-identical scores whichever other items are scored with it (a matmul's blocking
    could change the rounding).
    """
    out = np.full(len(e64), -np.inf)
    for k in range(len(u64)):
        np.maximum(out, (e64 * u64[k]).sum(axis=1), out=out)
    return out


def _rank(items: np.ndarray, scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Best n of (items, scores) by score desc, then item asc."""
    order = np.lexsort((items, -scores))[:n]
    return items[order], scores[order]


def _propose_torch(uv: torch.Tensor, E: torch.Tensor, excl: list[np.ndarray], m: int):
    """Candidates per user from a float32 matmul + topk of max_k scores.

    Returns [(candidate items, bound)], bound = the best float32 score of any eligible item
    not proposed (-inf when every eligible item is proposed).
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
    exhaustive = m == s.shape[1]
    return [(idx[b][vals[b] > -np.inf].astype(np.int64),
             -math.inf if exhaustive else float(vals[b, -1])) for b in range(B)]


def _propose_faiss(index, uv: torch.Tensor, excl: list[np.ndarray], m: int, num_items: int):
    """Candidates per user from faiss: each interest's top (m + |exclude|) items, merged by
    best score, excluded removed, the best m kept. An unproposed item either was never
    returned (its score for interest k is <= that list's last score) or was cut (<= the
    best cut score), so bound = the larger of the two."""
    B, K, d = uv.shape
    mk = min(m + max([len(x) for x in excl] + [0]), num_items)  # room for excluded hits
    D, I = index.search(np.ascontiguousarray(uv.reshape(B * K, d).numpy()), mk)
    D, I = D.reshape(B, K * mk), I.reshape(B, K * mk) + 1  # index position p holds item p+1
    last = -np.inf if mk == num_items else D.reshape(B, K, mk)[:, :, -1].max(axis=1)
    out = []
    for b in range(B):
        ok = (I[b] > 0) & ~np.isin(I[b], excl[b])
        items, sc = I[b][ok], D[b][ok]
        order = np.lexsort((-sc, items))  # by item, best score first
        items, sc = items[order], sc[order]
        first = np.ones(len(items), dtype=bool)
        first[1:] = items[1:] != items[:-1]
        items, sc = items[first], sc[first]
        bound = -math.inf if mk == num_items else float(last[b])
        if len(items) > m:
            top = np.argpartition(-sc, m)
            bound = max(bound, float(sc[top[m:]].max()))
            items = items[top[:m]]
        out.append((items.astype(np.int64), bound))
    return out


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

    E64 = E.numpy().astype(np.float64)
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
    for start in range(0, U, chunk_size):
        stop = min(start + chunk_size, U)
        excl = exclude[start:stop]
        if index is not None:
            proposals = _propose_faiss(index, uv[start:stop], excl, margin, N)
        else:
            proposals = _propose_torch(uv[start:stop], E, excl, margin)
        for b, (cands, bound) in enumerate(proposals):
            u = start + b
            top_i, top_s = _rank(cands, _exact_scores(U64[u], E64[cands]), n)
            nth = top_s[-1] if len(top_s) == n else -np.inf
            if bound > -np.inf and not nth > bound + tol[u]:
                # An unproposed item might tie or beat the n-th: rank the whole catalogue.
                cands = np.setdiff1d(all_items, excl[b])
                top_i, top_s = _rank(cands, _exact_scores(U64[u], E64[cands]), n)
            items[u, :len(top_i)] = top_i
            scores[u, :len(top_s)] = top_s
    return items, scores


def most_popular_rankings(item_counts: np.ndarray, num_users: int, n: int,
                          exclude: list | None = None) -> np.ndarray:
    """MostPopular baseline: items 1..N by count desc (ties: lower index), per user minus
    ``exclude[u]``; (num_users, n) int64, -1 padded. ``item_counts[0]`` (padding) is ignored."""
    counts = np.asarray(item_counts)
    idx = np.arange(1, len(counts), dtype=np.int64)
    order = idx[np.lexsort((idx, -counts[1:]))]
    out = np.full((num_users, n), -1, dtype=np.int64)
    if exclude is None:
        out[:, :min(n, len(order))] = order[:n]
        return out
    if len(exclude) != num_users:
        raise ValueError(f"exclude has {len(exclude)} entries for {num_users} users")
    for u, x in enumerate(exclude):
        x = np.asarray(x, dtype=np.int64)
        head = order[:n + len(x)]  # enough that n survive the exclusion when possible
        head = head[~np.isin(head, x)][:n]
        out[u, :len(head)] = head
    return out


def write_metrics(rows: list, path_prefix) -> tuple[pathlib.Path, pathlib.Path]:
    """Write rows (dicts) to ``<prefix>.json`` (a list) and ``<prefix>.csv`` (columns in
    first-seen order, missing cells empty); returns both paths."""
    prefix = pathlib.Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path = prefix.with_name(prefix.name + ".json")
    csv_path = prefix.with_name(prefix.name + ".csv")
    with open(json_path, "w") as f:
        json.dump(rows, f, indent=1, default=_json_default)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        for row in rows:
            w.writerow(row)
    return json_path, csv_path


def _json_default(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x.tolist()
    raise TypeError(f"cannot write {type(x).__name__} as JSON")


# ----------------------------------------------------------------------------- a model on a split


def _long(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.long)


@torch.no_grad()
def user_interests(model: MIND, histories, user_features, batch_size: int = 1024):
    """Raw interests in eval mode: V (U, K, d) and the interest mask (U, K) bool, on the CPU.

    histories (U, L) item indices with 0 padding; user_features (U, F).  The model's training
    mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    histories, user_features = _long(histories), _long(user_features)
    device = model.item_genres.device
    vs, ms = [], []
    for s in range(0, histories.shape[0], batch_size):
        v, imask = model.interests(histories[s:s + batch_size].to(device), user_features[s:s + batch_size].to(device))
        vs.append(v.cpu())
        ms.append(imask.cpu())
    model.train(was_training)
    if not vs:
        return (torch.zeros(0, model.num_interests, model.dim),
                torch.zeros(0, model.num_interests, dtype=torch.bool))
    return torch.cat(vs), torch.cat(ms)


@torch.no_grad()
def user_vectors(model: MIND, histories, user_features, batch_size: int = 1024) -> torch.Tensor:
    """Retrieval-ready user vectors (U, K, d) in eval mode (inactive interests = copies of interest 0)."""
    return retrieval_vectors(*user_interests(model, histories, user_features, batch_size))


@torch.no_grad()
def evaluate_model(model: MIND, data, split, ns=(20, 50), batch_size: int = 1024) -> dict:
    """Recall / HitRate / NDCG @ns on an EvalSplit with full-catalogue retrieval, seen items excluded,
    plus mind.diversity.beyond_accuracy: interest_cosine, diversity@N, coverage@N and
    recall@N_entropy_{low,mid,high} (None where undefined, e.g. interest_cosine for K=1)."""
    feats = _long(data.user_features)[_long(split.user_index)]
    interests, imask = user_interests(model, split.histories, feats, batch_size)
    vectors = retrieval_vectors(interests, imask)
    was_training = model.training
    model.eval()
    table = model.item_embeddings()
    model.train(was_training)
    ranked, _ = retrieve_topk(vectors.numpy(), table.cpu().numpy(), max(ns), exclude=split.full_histories)
    metrics = evaluate_rankings(ranked, split.targets, ns=tuple(ns))
    metrics.update(beyond_accuracy(ranked, split.targets, split.histories, data.item_genres, int(data.num_items),
                                   ns=tuple(ns), vectors=interests, mask=imask))
    return metrics
