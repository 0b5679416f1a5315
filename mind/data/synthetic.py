"""A synthetic dataset with planted interests, for tests and for checking that MIND finds them.

Generative story (all draws from ``numpy.random.default_rng(seed)``):

* Items ``1..num_items`` are shuffled and dealt round-robin into ``num_clusters`` clusters,
  so cluster sizes differ by at most one; item genre = ``f"c{cluster}"``.
* User ``u`` in ``1..num_users`` draws ``k ~ U{interests_per_user[0]..[1]}`` distinct
  clusters (its interests) and a length ``L ~ U{seq_len[0]..[1]}``.
* Each of its ``L`` behaviours picks one of its clusters uniformly, then an item of that
  cluster uniformly (repeats allowed).
* Timestamps strictly increase along a user's sequence (base + cumulative gaps in 1..3600).
"""

from __future__ import annotations

import numpy as np

from .loaders import RawData, _inter_frame, _items_frame, _users_frame


def make_synthetic(num_users: int = 300, num_items: int = 400, num_clusters: int = 8,
                   interests_per_user: tuple[int, int] = (2, 3), seq_len: tuple[int, int] = (20, 40),
                   seed: int = 0) -> tuple[RawData, dict]:
    """Return ``(raw, truth)``; ``truth = {"user_clusters": {user: [clusters]},
    "item_cluster": {item: cluster}}`` with raw ids as python ints.

    Users have no profile features (``raw.users`` has no columns).
    """
    lo_k, hi_k = interests_per_user
    lo_l, hi_l = seq_len
    if not 1 <= lo_k <= hi_k <= num_clusters:
        raise ValueError(f"interests_per_user={interests_per_user} must lie in 1..num_clusters={num_clusters}")
    if not 1 <= lo_l <= hi_l:
        raise ValueError(f"seq_len={seq_len} must satisfy 1 <= low <= high")
    if num_items < num_clusters:
        raise ValueError(f"num_items={num_items} < num_clusters={num_clusters}: a cluster would be empty")
    rng = np.random.default_rng(seed)

    item_ids = np.arange(1, num_items + 1)
    shuffled = rng.permutation(item_ids)
    members = [np.sort(shuffled[k::num_clusters]) for k in range(num_clusters)]
    item_cluster = {int(i): k for k in range(num_clusters) for i in members[k]}

    users, items, times, user_clusters = [], [], [], {}
    for u in range(1, num_users + 1):
        k = int(rng.integers(lo_k, hi_k + 1))
        clusters = np.sort(rng.choice(num_clusters, size=k, replace=False))
        length = int(rng.integers(lo_l, hi_l + 1))
        picks = clusters[rng.integers(0, k, size=length)]
        seq = [int(members[c][rng.integers(0, len(members[c]))]) for c in picks]
        ts = 1_000_000_000 + np.cumsum(rng.integers(1, 3601, size=length))
        users += [u] * length
        items += seq
        times += ts.tolist()
        user_clusters[u] = [int(c) for c in clusters]

    inter = _inter_frame(users, items, times)
    items_df = _items_frame(item_ids.tolist(), [f"item {i}" for i in item_ids],
                            [[f"c{item_cluster[int(i)]}"] for i in item_ids])
    users_df = _users_frame(list(range(1, num_users + 1)), {})
    truth = {"user_clusters": user_clusters, "item_cluster": item_cluster}
    return RawData("synthetic", inter, items_df, users_df), truth

