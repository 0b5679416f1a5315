"""mind.ann: exact / IVF / HNSW multi-interest retrieval against mind.evaluate.retrieve_topk."""

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from mind.ann import build_index, search  # noqa: E402
from mind.evaluate import retrieve_topk  # noqa: E402


def _random_catalogue(N=600, d=12, seed=0):
    rng = np.random.default_rng(seed)
    E = rng.standard_normal((N + 1, d)).astype(np.float32)
    E[0] = 0.0
    return E


def _clustered(N=3000, d=16, clusters=30, U=60, K=3, seed=0):
    """Items around `clusters` Gaussian centres; each user interest near one centre."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    E = np.empty((N + 1, d), np.float32)
    E[0] = 0.0
    E[1:] = centres[rng.integers(0, clusters, N)] + 0.3 * rng.standard_normal((N, d)).astype(np.float32)
    uv = centres[rng.integers(0, clusters, (U, K))] + 0.3 * rng.standard_normal((U, K, d)).astype(np.float32)
    return E, uv


def _random_exclude(U, N, rng, most=15):
    return [rng.integers(0, N + 1, size=rng.integers(0, most)) for _ in range(U)]


@pytest.mark.parametrize("K", [1, 3])
def test_exact_kind_equals_retrieve_topk(K):
    E = _random_catalogue(seed=1)
    rng = np.random.default_rng(2)
    uv = rng.standard_normal((40, K, E.shape[1])).astype(np.float32)
    excl = _random_exclude(40, E.shape[0] - 1, rng)
    index = build_index(E, "exact")
    for n in (1, 7, 30):
        want_i, want_s = retrieve_topk(uv, E, n, excl)
        got_i, got_s = search(index, uv, n, excl)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_array_equal(got_s, want_s)


def test_exact_kind_equals_retrieve_topk_with_ties_and_2d_users():
    # Every item appears three times (rows r, r+200, r+400): every score is a three-way tie,
    # and the tie must go to the lower index, as retrieve_topk does.
    base = _random_catalogue(N=200, d=6, seed=3)[1:]
    E = np.concatenate([np.zeros((1, 6), np.float32), base, base, base])
    uv = np.random.default_rng(4).standard_normal((25, 6)).astype(np.float32)
    index = build_index(E, "exact")
    want_i, want_s = retrieve_topk(uv, E, 10)
    got_i, got_s = search(index, torch.from_numpy(uv), 10)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_s, want_s)
    # the tie really is there: the first three entries are one item's copies
    assert ((got_i[:, 1] - got_i[:, 0]) == 200).all() and ((got_i[:, 2] - got_i[:, 0]) == 400).all()


@pytest.mark.parametrize("kind,params", [("ivf", dict(nlist=16)), ("hnsw", dict(efSearch=16))])
def test_approx_scores_are_true_and_ivf_full_probe_equals_exact(kind, params):
    E, uv = _clustered(seed=5)
    rng = np.random.default_rng(6)
    excl = _random_exclude(len(uv), E.shape[0] - 1, rng)
    n = 25
    want_i, want_s = search(build_index(E, "exact"), uv, n, excl)
    index = build_index(E, kind, **params)
    got_i, got_s = search(index, uv, n, excl)
    # Whatever an approximate index returns is scored by the true max_k <u_k, e_i> (float64
    # then float32) and sorted: it can miss items, never misscore them.
    E64, U64 = E.astype(np.float64), uv.astype(np.float64)
    true = np.einsum("ukd,und->ukn", U64, E64[got_i]).max(axis=1).astype(np.float32)
    np.testing.assert_array_equal(got_s, true)
    assert (np.diff(got_s.astype(np.float64), axis=1) <= 0).all()
    if kind == "ivf":
        index.set_search_params(nprobe=16)  # = nlist: every list scanned, so the search is exhaustive
        got_i, got_s = search(index, uv, n, excl)
        for u in range(len(uv)):
            # equal up to the order of exact ties: same scores, same item sets
            np.testing.assert_allclose(got_s[u], want_s[u], rtol=0, atol=1e-6)
            assert set(got_i[u]) == set(want_i[u])


def test_ivf_few_probes_misses_items_and_more_probes_recover_them():
    E, uv = _clustered(N=4000, clusters=40, seed=7)
    n = 30
    want, _ = search(build_index(E, "exact"), uv, n)
    index = build_index(E, "ivf", nlist=64, nprobe=1)
    recall = lambda got: np.mean([len(set(g) & set(w)) / n for g, w in zip(got, want)])  # noqa: E731
    low = recall(search(index, uv, n)[0])
    index.set_search_params(nprobe=64)
    full = recall(search(index, uv, n)[0])
    assert low < 0.99  # one list of 64 cannot hold every interest's neighbours
    assert full == 1.0


def test_hnsw_recall_on_clustered_catalogue():
    E, uv = _clustered(N=5000, d=16, clusters=50, U=80, K=4, seed=8)
    n = 20
    want, _ = search(build_index(E, "exact"), uv, n)
    index = build_index(E, "hnsw", M=16, efConstruction=40, efSearch=64)
    got, _ = search(index, uv, n)
    recall = np.mean([len(set(g) & set(w)) / n for g, w in zip(got, want)])
    assert recall >= 0.95, recall


@pytest.mark.parametrize("kind,params", [("exact", {}), ("ivf", dict(nlist=4, nprobe=4)), ("hnsw", {})])
def test_dedup_exclusion_and_padding_row(kind, params):
    # Items 1..6 on axes; row 0 (padding) has the largest score of all and must never come back.
    d = 3
    E = np.zeros((7, d), np.float32)
    E[0] = [100.0, 100.0, 100.0]
    E[1], E[2], E[3] = [5, 0, 0], [4, 0, 0], [0, 3, 0]
    E[4], E[5], E[6] = [0, 2, 0], [0, 0, 1], [1, 1, 0]
    # two interests that both rank item 6 highly: it must appear once, with its best score
    uv = np.array([[[1, 0, 0], [0, 1, 0]], [[1, 0, 0], [1, 0, 0]]], np.float32)
    index = build_index(E, kind, **params)
    items, scores = search(index, uv, 4, exclude=[[1], [1, 2, 6, 0]])
    # user 0: scores: 2->4, 3->3, 4->2, 6->1 (best of 1 and 1), 5->0; item 1 excluded
    np.testing.assert_array_equal(items[0], [2, 3, 4, 6])
    np.testing.assert_array_equal(scores[0], [4, 3, 2, 1])
    # user 1 (both interests equal: every item retrieved twice): 3, 4, 5 all score 0, ties by index
    np.testing.assert_array_equal(items[1], [3, 4, 5, -1])
    np.testing.assert_array_equal(scores[1][:3], [0, 0, 0])
    assert scores[1][3] == -np.inf
    for row in items:
        kept = row[row >= 0]
        assert len(set(kept)) == len(kept) and 0 not in kept


def test_n_larger_than_catalogue_pads_and_empty_inputs():
    E = _random_catalogue(N=5, d=4, seed=9)
    index = build_index(E, "hnsw")
    items, scores = search(index, np.ones((2, 4), np.float32), 8)
    assert (np.sort(items[:, :5], axis=1) == np.arange(1, 6)).all()
    assert (items[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
    items, scores = search(index, np.zeros((0, 2, 4), np.float32), 3)
    assert items.shape == (0, 3) and scores.shape == (0, 3)


def test_errors_are_clear():
    E = _random_catalogue(N=20, d=4, seed=10)
    with pytest.raises(ValueError, match="kind"):
        build_index(E, "lsh")
    with pytest.raises(ValueError, match="unknown parameters"):
        build_index(E, "hnsw", nprobe=3)
    with pytest.raises(ValueError, match="nlist"):
        build_index(E, "ivf", nlist=50)
    bad = E.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        build_index(bad, "exact")
    index = build_index(E, "ivf", nlist=4)
    with pytest.raises(ValueError, match="user_vectors"):
        search(index, np.ones((2, 3, 5), np.float32), 3)
    with pytest.raises(ValueError, match="finite"):
        search(index, np.full((2, 4), np.inf, np.float32), 3)
    with pytest.raises(ValueError, match="outside"):
        search(index, np.ones((1, 4), np.float32), 3, exclude=[[21]])
    with pytest.raises(ValueError, match="entries"):
        search(index, np.ones((2, 4), np.float32), 3, exclude=[[1]])
    with pytest.raises(ValueError, match="search parameter"):
        index.set_search_params(efSearch=3)
