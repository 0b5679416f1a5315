"""Full-corpus retrieval and top-N metrics (Recall, HitRate, NDCG @ N), plus MostPopular.

Retrieval rule (MIND's serving, the ``max`` merge of :mod:`mind.merge`; ``evaluate_model(...,
merge="quota" | "diverse")`` scores the other rules through the same module): each of a user's K
interest vectors retrieves its top-n
items by inner product, the K lists are merged, an item keeps its best score, and the n
best remain. That equals ranking every item by ``max_k <u_k, e_i>`` (an item in the merged
top-n is in the top-n of the interest that gives its best score), which is what is
computed. Ties are broken by the lower item index.

The retrieval (``retrieve_topk`` and its helpers) is implemented in :mod:`mind.merge`, beside the
other merge rules, and re-exported here.

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
import pathlib

import numpy as np
import torch

from .diversity import beyond_accuracy
# the retrieval (the ``max`` merge) lives with the other merge rules in mind/merge.py; re-exported here
from .merge import (_F32_EPS, _exact_scores, _propose_faiss, _propose_torch, _rank,  # noqa: F401
                    Categories, faiss_available, merged_topn, normalize_exclude, pair_scores, retrieve_topk)
from .metrics import evaluate_rankings, hit_rate_at_n, ndcg_at_n, recall_at_n  # noqa: F401 (re-exported)
from .model import MIND, retrieval_vectors

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


def split_rankings(model: MIND, data, split, n: int, batch_size: int = 1024, merge: str = "max",
                   diversity: float = 0.0, candidates: int = 200, interests=None) -> np.ndarray:
    """The (U, n) ranked lists (-1 padded) of a split's users with full-catalogue retrieval, seen items
    excluded, merged by ``merge`` (``mind.merge.merged_topn``: the rule serving uses; ``diverse``'s g from
    ``data.item_genres``, else the item-vector cosine).  ``interests``: (V, mask) of
    :func:`user_interests` when already computed."""
    if interests is None:
        feats = _long(data.user_features)[_long(split.user_index)]
        interests = user_interests(model, split.histories, feats, batch_size)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        table = model.item_embeddings().cpu().numpy()
    model.train(was_training)
    cats = Categories(np.asarray(data.item_genres)) if merge == "diverse" else None
    ranked = np.full((len(split.full_histories), n), -1, dtype=np.int64)   # a catalogue under n items: padded
    got, _ = merged_topn(interests[0], min(n, table.shape[0] - 1), table=table, active=interests[1],
                         exclude=split.full_histories, merge=merge, diversity=diversity, candidates=candidates,
                         categories=cats, use_faiss=None)
    ranked[:, :got.shape[1]] = got
    return ranked


@torch.no_grad()
def evaluate_model(model: MIND, data, split, ns=(20, 50), batch_size: int = 1024, merge: str = "max",
                   diversity: float = 0.0, candidates: int = 200) -> dict:
    """Recall / HitRate / NDCG @ns on an EvalSplit with full-catalogue retrieval, seen items excluded,
    plus mind.diversity.beyond_accuracy: interest_cosine, diversity@N, coverage@N and
    recall@N_entropy_{low,mid,high} (None where undefined, e.g. interest_cosine for K=1).

    ``merge``, ``diversity``, ``candidates``: how the K lists are merged (``mind.merge``; the lists
    are the ones ``mind.serve.Recommender.recommend_batch`` returns for the same interests)."""
    feats = _long(data.user_features)[_long(split.user_index)]
    interests, imask = user_interests(model, split.histories, feats, batch_size)
    ranked = split_rankings(model, data, split, max(ns), batch_size, merge, diversity, candidates,
                            interests=(interests, imask))
    metrics = evaluate_rankings(ranked, split.targets, ns=tuple(ns))
    metrics.update(beyond_accuracy(ranked, split.targets, split.histories, data.item_genres, int(data.num_items),
                                   ns=tuple(ns), vectors=interests, mask=imask))
    return metrics
