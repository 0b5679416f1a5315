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


def _check_sizes(num_items: int, num_clusters: int, interests_per_user, seq_len) -> None:
    """The argument checks both generators share."""
    lo_k, hi_k = interests_per_user
    lo_l, hi_l = seq_len
    if not 1 <= lo_k <= hi_k <= num_clusters:
        raise ValueError(f"interests_per_user={interests_per_user} must lie in 1..num_clusters={num_clusters}")
    if not 1 <= lo_l <= hi_l:
        raise ValueError(f"seq_len={seq_len} must satisfy 1 <= low <= high")
    if num_items < num_clusters:
        raise ValueError(f"num_items={num_items} < num_clusters={num_clusters}: a cluster would be empty")


def make_synthetic(num_users: int = 300, num_items: int = 400, num_clusters: int = 8,
                   interests_per_user: tuple[int, int] = (2, 3), seq_len: tuple[int, int] = (20, 40),
                   seed: int = 0) -> tuple[RawData, dict]:
    """Return ``(raw, truth)``; ``truth = {"user_clusters": {user: [clusters]},
    "item_cluster": {item: cluster}}`` with raw ids as python ints.

    Users have no profile features (``raw.users`` has no columns).
    """
    lo_k, hi_k = interests_per_user
    lo_l, hi_l = seq_len
    _check_sizes(num_items, num_clusters, interests_per_user, seq_len)
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



# ----------------------------------------------------------------------------- planted (hard)


def _spread_points(rng: np.random.Generator, n: int, dim: int, pool: int = 20) -> np.ndarray:
    """``n`` unit vectors of R^dim spread evenly: farthest-point sampling from ``pool * n`` random ones."""
    cand = rng.standard_normal((pool * n, dim))
    cand /= np.linalg.norm(cand, axis=1, keepdims=True)
    chosen = [int(rng.integers(len(cand)))]
    best = cand @ cand[chosen[0]]           # max cosine of each candidate to the chosen set
    for _ in range(n - 1):
        j = int(np.argmin(best))
        chosen.append(j)
        best = np.maximum(best, cand @ cand[j])
    return cand[chosen]


def make_planted(num_users: int = 4000, num_items: int = 2048, num_clusters: int = 128,
                 latent_dim: int = 3, interests_per_user: tuple[int, int] = (2, 3),
                 min_angle: float = 90.0, kappa: float = float("inf"), seq_len: tuple[int, int] = (20, 40),
                 super_genres: int = 0, seed: int = 0) -> tuple[RawData, dict]:
    """A planted-interest positive control: one user vector provably cannot serve these users.

    Returns ``(raw, truth)`` like `make_synthetic`; ``truth`` adds ``"centres"``
    ``(num_clusters, latent_dim)`` and ``"user_centres"`` {user: (k, latent_dim)}.

    Generative story (all draws from ``numpy.random.default_rng(seed)``):

    * ``num_clusters`` cluster centres on the unit sphere of a LOW-dimensional latent space
      R^latent_dim (default 3), spread evenly (farthest-point sampling): with 128 clusters
      on S^2, neighbours are ~18 degrees apart, so clusters overlap in direction (nothing like
      orthogonal). Items are shuffled and dealt round-robin into the clusters (sizes differ
      by at most one); item latent position = its cluster's centre.
    * Items carry NO cluster label: no genre by default (``super_genres=0``), so the model must
      learn the clusters from co-occurrence. ``super_genres=G > 0`` gives each item a coarse
      genre ``"g<j>"``, the nearest of G evenly spread anchors to its centre (a region, not
      the cluster).
    * User ``u`` draws ``k ~ U{interests_per_user}`` interests, each a cluster, mutually far
      apart: cluster j is drawn uniformly among the clusters at an angle >= ``min_angle``
      (default 90 degrees) from every cluster already drawn.
    * Each behaviour picks ONE of the user's interests uniformly (interests are interleaved,
      so every stretch of the sequence, the last-20% test targets included, mixes all of
      them: a retriever must cover all k interests at once, which max-over-K does and one
      vector cannot); interest mu emits a cluster: its own with ``kappa = inf`` (default,
      hard clusters), else c with probability ∝ exp(kappa * mu . centre_c) (a von Mises-Fisher
      bump spilling onto neighbours; kappa = 40 keeps ~60% in the own cluster with 128
      clusters on S^2); then an item of that cluster uniformly, preferring items the user has
      not seen yet (seen items are excluded from retrieval: repeats would be unreachable).
    * Timestamps strictly increase along a user's sequence (base + cumulative gaps in 1..3600).

    Why K interests suffice and one vector cannot:

    * K >= k vectors: each interest is one cluster; a vector pointing at it ranks its items
      first, and max_k <u_k, e_i> puts all k clusters' items on top.
    * One vector u, item vectors laid out like the latent centres: u's top-N is a spherical
      cap around u. If each of the user's k unit interests mu_j had cosine >= t > 0 with u,
      then k t <= u . sum_j mu_j <= |sum_j mu_j| <= sqrt(k) (pairwise cosines <= 0 by
      ``min_angle >= 90``), so t <= 1/sqrt(k): some planted interest is >= 45 degrees (k = 2)
      or >= 54.7 degrees (k = 3) from u. A cap reaching it covers (1 - cos)/2 = 15% / 21% of
      S^2, ~19 / ~27 of 128 clusters (~300 / ~430 items) ranked with or above it, for 50
      slots. The mean of the user's interests points at OTHER clusters (those around the
      mean direction) before any of its own: ranking by it gives Recall@50 0.025 on the
      default data, vs 0.856 for the K-vector oracle.
    * Any other item layout (one vector per user, free item vectors in R^d): the user x cluster
      score matrix has rank <= d, while the target (which k of the C clusters a user has, all
      far-apart k-sets occurring) has rank C. This is the softmax bottleneck, and it bites when
      C >> d: on the default data (C = 128) the best rank-17 / rank-33 / rank-65 approximation
      of the users' log-probabilities (SVD, a proxy for a one-vector model with d = 16 / 32 / 64)
      ranks for Recall@50 0.49 / 0.70 / 0.84 against 0.856 for K vectors. So the control needs
      d well below C: ``--dim 16`` with 128 clusters (measured: K=4 0.71 vs K=1 0.32).
      With kappa < inf the bumps are smooth on S^2, their log-probabilities are nearly low-rank
      (spherical harmonics) and one vector of d >= 32 comes close: keep kappa = inf for the
      control.

    The old `make_synthetic` (8 clusters, d = 64, cluster = genre) is the opposite case: the
    cluster directions can be orthogonal and their mean ranks all of a user's clusters first.
    """
    lo_k, hi_k = interests_per_user
    lo_l, hi_l = seq_len
    if latent_dim < 2:
        raise ValueError(f"latent_dim={latent_dim} must be >= 2")
    _check_sizes(num_items, num_clusters, interests_per_user, seq_len)
    if not 0 <= min_angle <= 180:
        raise ValueError(f"min_angle={min_angle} must be in degrees, 0..180")
    rng = np.random.default_rng(seed)

    centres = _spread_points(rng, num_clusters, latent_dim)
    cos = centres @ centres.T
    far = cos <= np.cos(np.radians(min_angle)) + 1e-12          # (C, C) far enough apart
    if np.isfinite(kappa):
        emit = np.exp(kappa * (cos - 1.0))
        emit /= emit.sum(axis=1, keepdims=True)
    else:
        emit = np.eye(num_clusters)                              # hard clusters: no spill-over                      # row c: P(cluster | interest c)
    emit_cdf = np.cumsum(emit, axis=1)

    item_ids = np.arange(1, num_items + 1)
    shuffled = rng.permutation(item_ids)
    members = [np.sort(shuffled[c::num_clusters]) for c in range(num_clusters)]
    item_cluster = {int(i): c for c in range(num_clusters) for i in members[c]}

    users, items, times, user_clusters, user_centres = [], [], [], {}, {}
    for u in range(1, num_users + 1):
        k = int(rng.integers(lo_k, hi_k + 1))
        for _ in range(100):
            clusters = [int(rng.integers(num_clusters))]
            while len(clusters) < k:
                ok = np.flatnonzero(far[clusters].all(axis=0))
                if not len(ok):
                    break
                clusters.append(int(rng.choice(ok)))
            if len(clusters) == k:
                break
        else:
            raise ValueError(f"cannot place {k} interests pairwise >= {min_angle} degrees apart among "
                             f"{num_clusters} clusters in {latent_dim} latent dimensions")
        length = int(rng.integers(lo_l, hi_l + 1))
        which = rng.integers(0, k, size=length)
        emitted = [int(np.searchsorted(emit_cdf[clusters[j]], rng.random() * emit_cdf[clusters[j], -1]))
                   for j in which]
        # per user, each cluster's items in a random order, cycled: no repeat until exhausted
        order, used = {}, {}
        seq = []
        for c in emitted:
            if c not in order:
                order[c], used[c] = rng.permutation(members[c]), 0
            seq.append(int(order[c][used[c] % len(order[c])]))
            used[c] += 1
        ts = 1_000_000_000 + np.cumsum(rng.integers(1, 3601, size=length))
        users += [u] * length
        items += seq
        times += ts.tolist()
        user_clusters[u] = sorted(clusters)
        user_centres[u] = centres[sorted(clusters)]

    if super_genres > 0:
        anchors = _spread_points(np.random.default_rng([seed, 1]), super_genres, latent_dim)
        region = np.argmax(centres @ anchors.T, axis=1)
        genres = [[f"g{region[item_cluster[int(i)]]}"] for i in item_ids]
    else:
        genres = [[] for _ in item_ids]
    inter = _inter_frame(users, items, times)
    items_df = _items_frame(item_ids.tolist(), [f"item {i}" for i in item_ids], genres)
    users_df = _users_frame(list(range(1, num_users + 1)), {})
    truth = {"user_clusters": user_clusters, "item_cluster": item_cluster, "centres": centres,
             "user_centres": user_centres}
    return RawData("planted", inter, items_df, users_df), truth


#: (users, items) of each generated dataset when the caller does not say (`python -m mind --users/--items`)
GENERATED_SIZES = {"synthetic": (300, 400), "planted": (4000, 2048)}


def generated_size(kind: str, users: int | None = None, items: int | None = None) -> dict:
    """``num_users`` / ``num_items`` for :func:`make_synthetic` (kind "synthetic") or :func:`make_planted`
    ("planted"): the given counts, else the dataset's defaults."""
    default_users, default_items = GENERATED_SIZES[kind]
    return {"num_users": users or default_users, "num_items": items or default_items}
