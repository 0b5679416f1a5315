"""The hard planted-interest generator (`make_planted`), the recovery measure, and the positive
control: on data one user vector cannot serve, MIND with K=4 interests beats K=1 and its
interests land on the planted clusters."""

import math

import numpy as np
import pytest
import torch

from mind.data import make_planted, prepare
from mind.planted import interest_recovery, model_interest_recovery
from mind.train import TrainConfig, train


pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = dict(num_users=60, num_items=256, num_clusters=32, interests_per_user=(2, 3), seq_len=(10, 20))


def test_planted_is_deterministic_and_shaped():
    raw, truth = make_planted(**SMALL, seed=5)
    again, truth2 = make_planted(**SMALL, seed=5)
    other, _ = make_planted(**SMALL, seed=6)
    assert raw.inter.equals(again.inter) and truth["user_clusters"] == truth2["user_clusters"]
    assert np.array_equal(truth["centres"], truth2["centres"])
    assert not other.inter.equals(raw.inter)
    assert len(raw.items) == 256 and raw.inter.user.nunique() == 60
    assert truth["centres"].shape == (32, 3)
    assert np.allclose(np.linalg.norm(truth["centres"], axis=1), 1)
    sizes = np.bincount(list(truth["item_cluster"].values()), minlength=32)
    assert sizes.tolist() == [8] * 32
    # no cluster label on the items
    assert all(g == [] for g in raw.items.genres)
    for u, g in raw.inter.groupby("user"):
        ks = truth["user_clusters"][u]
        assert 2 <= len(ks) <= 3 and 10 <= len(g) <= 20
        assert np.allclose(truth["user_centres"][u], truth["centres"][ks])
        # hard clusters (kappa = inf): every behaviour comes from one of the user's clusters
        assert {truth["item_cluster"][i] for i in g.item} <= set(ks)
        assert (np.diff(g.timestamp.to_numpy()) > 0).all()


def test_planted_geometry_overlapping_clusters_far_apart_interests():
    raw, truth = make_planted(num_users=500, num_items=2048, num_clusters=128, seed=0)
    C = truth["centres"]
    cos = C @ C.T
    np.fill_diagonal(cos, -1)
    # 128 clusters on S^2: far from orthogonal, each has a neighbour within ~25 degrees...
    nearest = np.degrees(np.arccos(cos.max(axis=1)))
    assert nearest.max() < 25 and nearest.min() > 8         # ... and they are spread evenly
    # a user's interests are pairwise >= 90 degrees apart
    for u, ks in truth["user_clusters"].items():
        assert len(set(ks)) == len(ks)
        G = C[ks] @ C[ks].T
        assert (G[~np.eye(len(ks), dtype=bool)] <= 1e-9).all(), (u, G)
    # and the mean of a user's interests points at foreign clusters: for most users, several
    # other clusters are closer to the mean direction than the user's nearest own cluster
    closer = []
    for ks in truth["user_clusters"].values():
        m = C[ks].mean(0)
        s = C @ m
        closer.append((np.delete(s, ks) > s[ks].max()).sum())
    assert np.median(closer) >= 5, np.median(closer)
    # the users' interests interleave: the last 20% (the test targets) mixes >= 2 of them
    mixed = [len({truth["item_cluster"][i] for i in g.item[int(0.8 * len(g)):]}) >= 2
             for _, g in raw.inter.groupby("user")]
    assert np.mean(mixed) > 0.9


def test_planted_spill_over_and_super_genres():
    raw, truth = make_planted(num_users=200, num_items=1024, num_clusters=64, kappa=20.0, super_genres=4, seed=1)
    own = np.mean([truth["item_cluster"][i] in truth["user_clusters"][u] for u, i in zip(raw.inter.user, raw.inter.item)])
    assert 0.2 < own < 0.95                     # kappa spills onto neighbouring clusters
    genres = {g[0] for g in raw.items.genres}
    assert genres <= {"g0", "g1", "g2", "g3"} and len(genres) >= 2
    # a super-genre is a region: all items of a cluster share it
    by_cluster = {}
    for item, gs in raw.items.genres.items():
        by_cluster.setdefault(truth["item_cluster"][int(item)], set()).add(gs[0])
    assert all(len(s) == 1 for s in by_cluster.values())


def test_planted_rejects_bad_arguments():
    with pytest.raises(ValueError, match="interests"):
        make_planted(num_users=5, num_items=64, num_clusters=8, interests_per_user=(2, 9))
    with pytest.raises(ValueError, match="cannot place"):
        # 5 vectors pairwise >= 120 degrees do not fit on S^2
        make_planted(num_users=5, num_items=64, num_clusters=32, interests_per_user=(5, 5), min_angle=120)
    with pytest.raises(ValueError, match="empty"):
        make_planted(num_users=5, num_items=10, num_clusters=32)


def test_interest_recovery_measure():
    # 3 clusters of 4 items along the axes of R^3
    E = torch.zeros(13, 3)
    cl = np.array([-1] + [0] * 4 + [1] * 4 + [2] * 4)
    for i in range(1, 13):
        E[i, cl[i]] = 1.0 + 0.01 * i
    axes = torch.eye(3)
    V = torch.stack([torch.stack([axes[0], axes[1]]),          # user 0: both planted clusters found
                     torch.stack([axes[0], axes[0]]),          # user 1: one of two
                     torch.stack([axes[2], axes[2]])])         # user 2: a foreign cluster
    r = interest_recovery(V, E, cl, [[0, 1], [0, 1], [0]], top=4)
    assert r["purity"] == 1.0
    assert r["recovered"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert r["all_recovered"] == pytest.approx(1 / 3)
    assert r["on_planted"] == pytest.approx(4 / 6)
    # an interest between two clusters: its top-8 is half one, half the other
    mixed = interest_recovery(torch.tensor([[[1.0, 1.0, 0.0]]]), E, cl, [[0]], top=8)
    assert mixed["purity"] == 0.5


def _cfg(tmp_path, name, k, **kw):
    # the default recipe (python -m mind train) for both; d = 8 << 64 clusters, so one vector cannot
    # hold a user's 2-3 far-apart clusters (with d = 16 the K=1 default already reaches 0.70 here)
    base = dict(dim=8, num_interests=k, max_len=20, batch_size=128, epochs=24, num_negatives=64, lr=1e-2,
                patience=20, seed=0, progress=False, write_files=False, out_dir=str(tmp_path / name))
    base.update(kw)
    return TrainConfig(**base)


def test_k4_beats_k1_and_recovers_the_planted_interests(tmp_path):
    raw, truth = make_planted(num_users=1500, num_items=1024, num_clusters=64, seed=0)
    data = prepare(raw, max_len=20)
    k4 = train(data, _cfg(tmp_path, "k4", 4), log=lambda *_: None)
    k1 = train(data, _cfg(tmp_path, "k1", 1), log=lambda *_: None)
    r4, r1 = k4.test_metrics["recall@50"], k1.test_metrics["recall@50"]
    se = math.hypot(k4.test_metrics["recall@50_se"], k1.test_metrics["recall@50_se"])
    assert r4 > r1 + max(0.15, 4 * se), (r4, r1, se)   # measured: 0.77 vs 0.41
    rec = model_interest_recovery(k4.model, data, truth, "test", top=10)
    assert rec["recovered"] > 0.75 and rec["purity"] > 0.6, rec   # measured: 0.91, 0.83
    # K = 1 can recover at most one cluster per user (2-3 planted)
    rec1 = model_interest_recovery(k1.model, data, truth, "test", top=10)
    assert rec1["recovered"] < 0.5, rec1
