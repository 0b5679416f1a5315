"""mind.evaluate: metrics on hand-computed cases, retrieval semantics, faiss == torch."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from mind.evaluate import (evaluate_rankings, faiss_available, hit_rate_at_n, most_popular_rankings,
                           ndcg_at_n, recall_at_n, retrieve_topk, write_metrics)

L3, L5 = 1 / math.log2(3), 1 / math.log2(5)  # discounts at 0-based ranks 1 and 3

# ----------------------------------------------------------------------------- metrics


def test_metrics_hand_case():
    ranked = np.array([[5, 3, 9, 1]])
    targets = [np.array([3, 1, 7])]  # hits at ranks 1 and 3
    assert recall_at_n(ranked, targets, 4).tolist() == [2 / 3]
    assert hit_rate_at_n(ranked, targets, 4).tolist() == [1.0]
    idcg = 1 + L3 + 0.5  # min(3, 4) = 3 ideal positions
    assert ndcg_at_n(ranked, targets, 4) == pytest.approx([(L3 + L5) / idcg])
    # only the first n entries count
    assert recall_at_n(ranked, targets, 1).tolist() == [0.0]
    assert hit_rate_at_n(ranked, targets, 1).tolist() == [0.0]
    assert ndcg_at_n(ranked, targets, 2) == pytest.approx([L3 / (1 + L3)])


def test_ndcg_more_targets_than_n():
    ranked = np.array([[5, 3, 9, 1]])
    targets = [np.array([5, 3, 9, 1, 2, 8])]
    assert recall_at_n(ranked, targets, 2).tolist() == [2 / 6]
    assert ndcg_at_n(ranked, targets, 2) == pytest.approx([1.0])  # IDCG over min(6, 2) ranks
    assert ndcg_at_n(ranked, [np.array([3, 2, 8])], 2) == pytest.approx([L3 / (1 + L3)])


def test_ndcg_fewer_targets_than_n():
    ranked = np.array([[5, 3, 9, 1]])
    assert ndcg_at_n(ranked, [np.array([1])], 4) == pytest.approx([L5])  # IDCG = 1
    assert ndcg_at_n(ranked, [np.array([5])], 4) == pytest.approx([1.0])


def test_repeated_targets_padding_and_repeated_ranked_items():
    ranked = np.array([[-1, 3, 3, -1]])
    targets = [np.array([3, 3, -1 + 100])]  # set {3, 99}: repeated 3 counts once
    assert recall_at_n(ranked, targets, 4).tolist() == [0.5]
    assert ndcg_at_n(ranked, targets, 4) == pytest.approx([L3 / (1 + L3)])


def test_evaluate_rankings_means_and_standard_errors():
    ranked = np.array([[1, 2], [3, 4]])
    targets = [np.array([1]), np.array([9])]
    m = evaluate_rankings(ranked, targets, ns=(1, 2))
    assert m["num_users"] == 2
    assert m["recall@1"] == 0.5 and m["hit_rate@2"] == 0.5 and m["ndcg@1"] == 0.5
    # per-user values 1 and 0: sample std sqrt(0.5), divided by sqrt(2) -> 0.5
    assert m["recall@1_se"] == pytest.approx(0.5) and m["ndcg@2_se"] == pytest.approx(0.5)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="fewer than n"):
        recall_at_n(np.array([[1, 2]]), [np.array([1])], 3)
    with pytest.raises(ValueError, match="no targets"):
        recall_at_n(np.array([[1, 2]]), [np.array([], dtype=np.int64)], 2)


def test_write_metrics(tmp_path):
    rows = [{"model": "mind", "recall@20": 0.25, "n": np.int64(3)}, {"model": "pop", "extra": "x"}]
    jp, cp = write_metrics(rows, tmp_path / "out" / "metrics")
    assert jp.name == "metrics.json" and cp.name == "metrics.csv"
    assert json.loads(jp.read_text()) == [{"model": "mind", "recall@20": 0.25, "n": 3},
                                          {"model": "pop", "extra": "x"}]
    with open(cp) as f:
        got = list(csv.reader(f))
    assert got == [["model", "recall@20", "n", "extra"], ["mind", "0.25", "3", ""], ["pop", "", "", "x"]]


# ----------------------------------------------------------------------------- MostPopular


def test_most_popular():
    counts = np.array([99, 5, 9, 9, 1])  # [0] is padding and never ranked
    assert most_popular_rankings(counts, 2, 3).tolist() == [[2, 3, 1], [2, 3, 1]]
    got = most_popular_rankings(counts, 2, 5, exclude=[np.array([3]), np.array([2, 1, 4])])
    assert got.tolist() == [[2, 1, 4, -1, -1], [3, -1, -1, -1, -1]]


# ----------------------------------------------------------------------------- retrieval

# d = 2; item 0 is padding with a huge vector (must never come back).
ITEMS = torch.tensor([[100.0, 100.0], [1, 0], [0, 1], [1, 1], [-1, 0], [0.5, 0.5]])
# interest a = (1, 0) scores items 1..5 as 1, 0, 1, -1, .5; interest b = (0, 2): 0, 2, 2, 0, 1.
# a's top 3: 1, 3, 5; b's top 3: 2, 3, 5. Merged with best score: 2:2 3:2 1:1 5:1.
USER = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])


@pytest.mark.parametrize("use_faiss", [False, True])
def test_multi_interest_merge_dedup_exclude(use_faiss):
    if use_faiss and not faiss_available():
        pytest.skip("faiss not installed")
    items, scores = retrieve_topk(USER, ITEMS, 3, use_faiss=use_faiss)
    assert items.tolist() == [[2, 3, 1]] and scores.tolist() == [[2.0, 2.0, 1.0]]
    assert items.dtype == np.int64 and scores.dtype == np.float32
    items, scores = retrieve_topk(USER, ITEMS, 3, exclude=[np.array([3])], use_faiss=use_faiss)
    assert items.tolist() == [[2, 1, 5]] and scores.tolist() == [[2.0, 1.0, 1.0]]
    # asking for more than there are: -1 / -inf padding, item 0 never returned
    items, scores = retrieve_topk(USER, ITEMS, 7, exclude=[np.array([0, 4])], use_faiss=use_faiss)
    assert items.tolist() == [[2, 3, 1, 5, -1, -1, -1]]
    assert scores[0, :4].tolist() == [2.0, 2.0, 1.0, 1.0] and np.isneginf(scores[0, 4:]).all()
    # (U, d) single-interest input: (1, 0) scores 1, 0, 1, -1, .5
    items, _ = retrieve_topk(USER[:, 0], ITEMS, 3, use_faiss=use_faiss)
    assert items.tolist() == [[1, 3, 5]]
    # numpy inputs are accepted too
    items, _ = retrieve_topk(USER.numpy(), ITEMS.numpy(), 3, use_faiss=use_faiss)
    assert items.tolist() == [[2, 3, 1]]


def _brute_force(uv, E, n, exclude):
    # Correctly rounded dot products (math.fsum of float64 products, exact for float32
    # inputs): a matmul may score two identical item rows differently in the last bit.
    uu, ee = uv.double().tolist(), E.double().tolist()
    s = np.array([[max(math.fsum(a * b for a, b in zip(uk, e)) for uk in interests) for e in ee]
                  for interests in uu])  # (U, N+1)
    out = np.full((len(uv), n), -1)
    for u in range(len(uv)):
        ok = np.setdiff1d(np.arange(1, len(E)), exclude[u])
        best = ok[np.lexsort((ok, -s[u, ok]))][:n]
        out[u, :len(best)] = best
    return out


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
@pytest.mark.parametrize("seed", range(6))
def test_faiss_and_torch_identical_with_ties(seed):
    rng = np.random.default_rng(seed)
    U, K, d, N, n = 40, int(rng.integers(1, 5)), 6, int(rng.integers(5, 120)), int(rng.integers(1, 25))
    if seed % 2 == 0:  # small integers: exact scores and many ties
        E = torch.from_numpy(rng.integers(-2, 3, size=(N + 1, d)).astype(np.float32))
        uv = torch.from_numpy(rng.integers(-2, 3, size=(U, K, d)).astype(np.float32))
    else:  # continuous values, ties only from duplicated rows
        E = torch.from_numpy(rng.standard_normal((N + 1, d)).astype(np.float32))
        uv = torch.from_numpy(rng.standard_normal((U, K, d)).astype(np.float32))
    E[rng.integers(1, N + 1, N // 3)] = E[rng.integers(1, N + 1, N // 3)].clone()  # duplicate rows
    exclude = [rng.choice(N + 1, size=int(rng.integers(0, N // 2 + 1)), replace=False) for _ in range(U)]
    a = retrieve_topk(uv, E, n, exclude, use_faiss=True, chunk_size=7)
    b = retrieve_topk(uv, E, n, exclude, use_faiss=False, chunk_size=16)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], _brute_force(uv, E, n, exclude))
    for u in range(U):  # never an excluded item, never padding, no duplicates
        got = a[0][u][a[0][u] >= 0]
        assert not np.isin(got, exclude[u]).any() and 0 not in got and len(set(got)) == len(got)


def test_all_equal_scores_break_ties_by_item_index():
    E = torch.zeros(9, 3)
    uv = torch.ones(2, 2, 3)
    items, scores = retrieve_topk(uv, E, 4, exclude=[np.array([1, 3]), np.array([], dtype=np.int64)],
                                  use_faiss=False)
    assert items.tolist() == [[2, 4, 5, 6], [1, 2, 3, 4]]
    assert (scores == 0).all()


def test_retrieve_rejects_bad_exclude():
    with pytest.raises(ValueError, match="outside"):
        retrieve_topk(USER, ITEMS, 2, exclude=[np.array([6])], use_faiss=False)
