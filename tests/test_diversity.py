"""mind/diversity.py: hand-computed cases for each measure, and evaluate_model carrying them."""

import json
import math

import numpy as np
import pytest
import torch

from mind.diversity import (beyond_accuracy, coverage_at_n, diversity_at_n, entropy_terciles, genre_entropy,
                            genre_matrix, interest_cosine)
from mind.evaluate import evaluate_rankings, retrieve_topk, write_metrics
from mind.model import retrieval_vectors
from mind.evaluate import evaluate_model, user_interests, user_vectors
from mind.train import TrainConfig, build_model, train

# items 1..6: 1 {1}, 2 {1, 2}, 3 {2}, 4 {3}, 5 {} , 6 {}   (row 0 = padding)
GENRES = torch.tensor([[0, 0], [1, 0], [1, 2], [2, 0], [3, 0], [0, 0], [0, 0]])


def test_genre_matrix():
    m = genre_matrix(GENRES)
    assert m.shape == (7, 4)
    assert m[:, 0].sum() == 0
    assert m[2].tolist() == [False, True, True, False]
    assert m[5].sum() == 0


def test_interest_cosine_hand_computed():
    V = np.array([
        [[1, 0], [0, 1], [1, 1]],     # cos 0, 1/sqrt2, 1/sqrt2 -> sqrt2 / 3
        [[1, 0], [-1, 0], [5, 5]],    # third inactive -> -1
        [[1, 0], [0, 1], [1, 1]],     # one active -> NaN
        [[2, 0], [1, 0], [0, 3]],     # pair (0, 2) only -> 0; scale does not matter
    ], dtype=np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 0, 1]], dtype=bool)
    got = interest_cosine(V, mask)
    assert got[0] == pytest.approx(math.sqrt(2) / 3)
    assert got[1] == pytest.approx(-1.0)
    assert math.isnan(got[2])
    assert got[3] == pytest.approx(0.0)
    # no mask = all active; user 3 then has pairs 1, 0, 0 -> 1/3
    assert interest_cosine(V)[3] == pytest.approx(1 / 3)
    # K = 1: undefined for everyone
    assert np.isnan(interest_cosine(V[:, :1])).all()


def test_diversity_hand_computed():
    ranked = np.array([
        [1, 3, 4, 5],     # all 6 pairs disjoint -> 1
        [1, 2, 3, -1],    # (1,2) share 1, (2,3) share 2, (1,3) disjoint -> 1/3 over the 3 real items
        [5, 6, 1, 2],     # genre-less items differ from everything; only (1,2) same -> 5/6
        [1, -1, -1, -1],  # one item -> NaN
        [5, 5, 1, 2],     # same item twice is the same category: (5,5), (1,2) same -> 4/6
    ])
    got = diversity_at_n(ranked, GENRES, 4)
    assert got[0] == pytest.approx(1.0)
    assert got[1] == pytest.approx(1 / 3)
    assert got[2] == pytest.approx(5 / 6)
    assert math.isnan(got[3])
    assert got[4] == pytest.approx(4 / 6)
    two = diversity_at_n(ranked, GENRES, 2)
    assert two[0] == 1.0 and two[1] == 0.0 and two[2] == 1.0 and two[4] == 0.0
    with pytest.raises(ValueError):
        diversity_at_n(ranked, GENRES, 5)


def test_coverage_hand_computed():
    ranked = np.array([[1, 2, -1], [2, 3, 4]])
    assert coverage_at_n(ranked, 2, 10) == pytest.approx(0.3)
    assert coverage_at_n(ranked, 3, 10) == pytest.approx(0.4)
    assert coverage_at_n(ranked, 3, 4) == pytest.approx(1.0)


def test_genre_entropy_hand_computed():
    hist = torch.tensor([[0, 0, 1, 3],   # {1}, {2} -> (1/2, 1/2) -> ln 2
                         [0, 0, 0, 2],   # {1,2} weighted 1/2 each -> ln 2
                         [0, 0, 1, 1],   # one genre -> 0
                         [0, 5, 6, 0],   # no genres -> 0
                         [0, 0, 1, 2]])  # g1 1.5, g2 0.5 -> (3/4, 1/4)
    got = genre_entropy(hist, GENRES)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert got.tolist() == pytest.approx([math.log(2), math.log(2), 0.0, 0.0, h])
    # ragged per-user lists give the same answer
    assert genre_entropy([np.array([1, 3]), np.array([1, 2, 0])], GENRES).tolist() == pytest.approx(
        [math.log(2), h])


def test_entropy_terciles():
    assert entropy_terciles([0.5, 0.1, 0.1, 0.9, 0.3, 0.7]).tolist() == [1, 0, 0, 2, 1, 2]
    assert entropy_terciles([0.0, 0.0, 0.0, 0.0]).tolist() == [0, 0, 1, 2]  # ties: split order
    assert np.bincount(entropy_terciles(np.arange(7)[::-1])).tolist() == [3, 2, 2]
    assert entropy_terciles([]).tolist() == []


def test_beyond_accuracy_hand_computed():
    hist = torch.tensor([[0, 1, 1], [0, 1, 3], [0, 1, 2]])  # H = 0, ln 2, 0.56 -> low, high, mid
    targets = [np.array([4]), np.array([3, 6]), np.array([4])]
    ranked = np.array([[4, 5], [3, 1], [1, 2]])  # recall@2: 1, 1/2, 0
    out = beyond_accuracy(ranked, targets, hist, GENRES, 6, ns=(2,))
    assert "interest_cosine" not in out
    assert out["recall@2_entropy_low"] == pytest.approx(1.0)
    assert out["recall@2_entropy_mid"] == pytest.approx(0.0)
    assert out["recall@2_entropy_high"] == pytest.approx(0.5)
    assert out["recall@2_entropy_low_se"] == 0.0
    assert out["diversity@2"] == pytest.approx(2 / 3)   # 1, 1, 0
    assert out["coverage@2"] == pytest.approx(5 / 6)
    V = torch.randn(3, 1, 4)
    k1 = beyond_accuracy(ranked, targets, hist, GENRES, 6, ns=(2,), vectors=V, mask=torch.ones(3, 1, dtype=bool))
    assert k1["interest_cosine"] is None and k1["interest_cosine_se"] is None
    json.dumps(k1, allow_nan=False)  # strict JSON: None, not NaN


NEW_KEYS = ["interest_cosine", "interest_cosine_se"] + [
    f"{m}@{n}{s}" for n in (20, 50) for m, s in
    [("diversity", ""), ("diversity", "_se"), ("coverage", "")]
    + [("recall", f"_entropy_{t}{e}") for t in ("low", "mid", "high") for e in ("", "_se")]]


def test_evaluate_model_carries_new_measures(tiny, tmp_path, one_thread):
    cfg = TrainConfig(dim=16, num_interests=4, max_len=10, batch_size=64, epochs=1, num_negatives=20,
                      seed=3, progress=False, write_files=False, out_dir=str(tmp_path / "run"))
    model = train(tiny, cfg, log=lambda *_: None).model
    split = tiny.test
    got = evaluate_model(model, tiny, split, ns=(20, 50))
    assert set(NEW_KEYS) <= set(got), set(NEW_KEYS) - set(got)
    assert -1.0 <= got["interest_cosine"] <= 1.0
    for n in (20, 50):
        assert 0.0 <= got[f"diversity@{n}"] <= 1.0
        assert 0.0 < got[f"coverage@{n}"] <= 1.0
    assert got["coverage@20"] <= got["coverage@50"]
    # the terciles partition the users: their size-weighted recall is the overall recall
    U = len(split)
    sizes = np.bincount((3 * np.arange(U)) // U, minlength=3)
    mix = sum(s * got[f"recall@50_entropy_{t}"] for s, t in zip(sizes, ("low", "mid", "high"))) / U
    assert mix == pytest.approx(got["recall@50"])

    # retrieval is unchanged: same numbers as ranking user_vectors directly
    feats = tiny.user_features[split.user_index]
    uv = user_vectors(model, split.histories, feats)
    V, mask = user_interests(model, split.histories, feats)
    assert torch.equal(uv, retrieval_vectors(V, mask))
    with torch.no_grad():
        ranked, _ = retrieve_topk(uv.numpy(), model.item_embeddings().numpy(), 50, exclude=split.full_histories)
    assert {k: got[k] for k in evaluate_rankings(ranked, split.targets)} == evaluate_rankings(ranked, split.targets)
    ic = interest_cosine(V, mask)
    assert got["interest_cosine"] == pytest.approx(float(np.nanmean(ic)))

    # K = 1: interest_cosine is None and the rows stay strict JSON
    k1 = evaluate_model(build_model(tiny, TrainConfig(dim=16, num_interests=1, max_len=10)), tiny, split)
    assert k1["interest_cosine"] is None and "diversity@50" in k1
    jp, _ = write_metrics([{"split": "test", **k1}, {"split": "test", **got}], tmp_path / "m")
    rows = json.loads(jp.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert rows[0]["interest_cosine"] is None


def test_diversity_and_entropy_equal_the_dense_genre_matrix_forms():
    """The pairwise / (user, genre) forms against the multi-hot (items x genres) matrix they replaced."""
    from mind.diversity import diversity_at_n, genre_entropy
    rng = np.random.default_rng(0)
    for _ in range(50):
        N, G, V = int(rng.integers(5, 60)), int(rng.integers(1, 5)), int(rng.integers(2, 12 if _ < 25 else 200))
        genres = rng.integers(0, V, (N + 1, G))
        genres[0] = 0
        genres[rng.random(N + 1) < 0.2] = 0                       # items without genres
        M = genre_matrix(genres).astype(np.float64)
        n = int(rng.integers(2, 12))
        ranked = rng.integers(-1, N + 1, (int(rng.integers(1, 40)), n + 2))
        want = np.full(len(ranked), np.nan)
        for u, row in enumerate(ranked[:, :n]):
            items = row[row > 0]
            k = len(items)
            if k >= 2:
                same = (M[items] @ M[items].T > 0) | (items[:, None] == items[None, :])
                want[u] = (~same[np.triu_indices(k, 1)]).sum() / (k * (k - 1) / 2)
        np.testing.assert_allclose(diversity_at_n(ranked, genres, n, chunk=7), want, equal_nan=True)
        hist = rng.integers(0, N + 1, (int(rng.integers(1, 30)), 9))
        per_item = M / np.maximum(M.sum(1, keepdims=True), 1)
        want = []
        for h in hist:
            mass = per_item[h[h > 0]].sum(0)
            p = mass[mass > 0] / mass.sum() if mass.sum() > 0 else np.zeros(0)
            want.append(float(-(p * np.log(p)).sum()))
        np.testing.assert_allclose(genre_entropy(hist, genres), want, atol=1e-12)
        np.testing.assert_allclose(genre_entropy(list(hist), genres), want, atol=1e-12)
