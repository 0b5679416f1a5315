"""MIND model pieces and losses against hand / direct computations."""

import math

import numpy as np
import pytest
import torch

from mind.loss import (LogUniformSampler, SoftmaxLoss, full_softmax_loss, in_batch_softmax_loss,
                       sampled_softmax_loss)
from mind.model import MIND, label_aware_attention, retrieval_vectors


def _softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


# A single user, K=3, d=2, written out by hand.
V = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
E = np.array([0.5, 0.25])          # inner products: 0.5, 0.5, -0.75


def _attend(p, mask=None):
    m = None if mask is None else torch.tensor([mask])
    out = label_aware_attention(torch.tensor(V[None]), torch.tensor(E[None]), m, p)
    return out[0].numpy()


def test_attention_p0_is_uniform_average():
    np.testing.assert_allclose(_attend(0.0), V.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(_attend(0.0, [True, False, True]), (V[0] + V[2]) / 2, atol=1e-12)


def test_attention_p1_is_softmax_of_inner_products():
    w = _softmax(np.array([0.5, 0.5, -0.75]))
    np.testing.assert_allclose(_attend(1.0), w @ V, atol=1e-12)


def test_attention_p2_preserves_sign():
    # sign(x)|x|^2: 0.25, 0.25, -0.5625 (a plain square would make the third the largest).
    w = _softmax(np.array([0.25, 0.25, -0.5625]))
    np.testing.assert_allclose(_attend(2.0), w @ V, atol=1e-12)


def test_attention_inf_is_argmax_and_respects_mask():
    # ties (0.5, 0.5) go to the lowest index.
    np.testing.assert_allclose(_attend(math.inf), V[0], atol=1e-12)
    np.testing.assert_allclose(_attend(math.inf, [False, True, True]), V[1], atol=1e-12)
    # the masked interest has the largest score but must not be chosen
    np.testing.assert_allclose(_attend(math.inf, [False, False, True]), V[2], atol=1e-12)


def test_attention_masked_interest_gets_zero_weight():
    w = _softmax(np.array([0.5, -0.75]))
    np.testing.assert_allclose(_attend(1.0, [True, False, True]), w[0] * V[0] + w[1] * V[2], atol=1e-12)


def test_retrieval_vectors_copy_first_interest():
    v = torch.arange(12.0).reshape(1, 3, 4)
    out = retrieval_vectors(v, torch.tensor([[True, False, True]]))
    assert torch.equal(out[0, 1], v[0, 0]) and torch.equal(out[0, 2], v[0, 2])


def _tiny_model(**kw):
    torch.manual_seed(0)
    genres = torch.tensor([[0, 0], [1, 0], [1, 2], [0, 0], [3, 2]])
    return MIND(num_items=4, item_genres=genres, user_feature_cardinalities=[3, 5], dim=8, num_interests=3,
                user_feature_dim=4, **kw)


def test_item_embedding_is_id_plus_mean_of_genres():
    m = _tiny_model()
    table = m.item_embeddings().detach()
    idw, gw = m.item_id_embedding.weight.detach(), m.genre_embedding.weight.detach()
    assert torch.all(table[0] == 0)
    torch.testing.assert_close(table[1], idw[1] + gw[1])
    torch.testing.assert_close(table[2], idw[2] + (gw[1] + gw[2]) / 2)
    torch.testing.assert_close(table[3], idw[3])
    torch.testing.assert_close(table[4], idw[4] + (gw[3] + gw[2]) / 2)


def test_interests_shapes_and_eval_determinism():
    m = _tiny_model().eval()
    hist = torch.tensor([[0, 0, 1, 2, 3], [4, 3, 2, 1, 1]])
    feats = torch.tensor([[1, 2], [0, 0]])
    v, imask, w = m.interests(hist, feats, return_weights=True)
    assert v.shape == (2, 3, 8) and imask.shape == (2, 3) and w.shape == (2, 3, 5)
    assert imask.all()
    assert torch.all(w[0, :, :2] == 0)                       # padding routes nowhere
    torch.testing.assert_close(w[0, :, 2:].sum(0), torch.ones(3))  # softmax over interests
    v2, _ = m.interests(hist, feats)
    assert torch.equal(v, v2)
    assert (v < 0).any()                                     # the default head is linear
    relu = _tiny_model(h_out_activation="relu").eval()
    assert (relu.interests(hist, feats)[0] >= 0).all()       # the paper's final ReLU



@pytest.mark.parametrize("train_mode", [True, False])
@pytest.mark.parametrize("dynamic", [False, True])
def test_jagged_interests_equal_the_padded_path_on_the_left_aligned_batch(train_mode, dynamic):
    # Right-aligned histories (as the data holds them), one with a gap and one empty, against the same
    # behaviours left-aligned: the jagged path routes behaviour i of every user on logit column i.
    m = _tiny_model(dynamic_interests=dynamic, backend="cpp").train(train_mode)
    right = torch.tensor([[0, 0, 1, 2, 3], [4, 3, 2, 1, 1], [0, 0, 0, 0, 0], [0, 4, 0, 0, 2]])
    left = torch.tensor([[1, 2, 3, 0, 0], [4, 3, 2, 1, 1], [0, 0, 0, 0, 0], [4, 2, 0, 0, 0]])
    feats = torch.tensor([[1, 2], [0, 0], [2, 4], [1, 1]])
    table = m.item_embeddings()
    torch.manual_seed(5)
    got, got_mask = m.interests(right, feats, item_table=table, jagged=True)
    torch.manual_seed(5)
    want, want_mask = m.interests(left, feats, item_table=table)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert torch.equal(got_mask, want_mask)
    params = [p for p in m.parameters() if p.requires_grad]
    g_got = torch.autograd.grad(got.square().sum(), params, allow_unused=True, retain_graph=True)
    g_want = torch.autograd.grad(want.square().sum(), params, allow_unused=True)
    for a, b in zip(g_got, g_want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="return_weights"):
        m.interests(right, feats, return_weights=True, jagged=True)

def test_dynamic_interest_mask_reported():
    m = _tiny_model(dynamic_interests=True).eval()
    hist = torch.tensor([[0, 0, 0, 1, 2], [4, 3, 2, 1, 1]])   # n = 2 -> K'=1, n = 5 -> K'=2
    _, imask = m.interests(hist)
    assert imask.tolist() == [[True, False, False], [True, True, False]]


def test_state_dict_round_trip_rebuilds_model():
    m = _tiny_model().eval()
    m2 = MIND.from_config(m.config).eval()
    m2.load_state_dict(m.state_dict())
    hist = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(m.interests(hist)[0], m2.interests(hist)[0])


# ---- losses ------------------------------------------------------------------------------

def test_full_softmax_matches_direct():
    g = torch.Generator().manual_seed(1)
    user, table = torch.randn(3, 4, generator=g), torch.randn(6, 4, generator=g)
    targets = torch.tensor([1, 5, 2])
    expected = 0.0
    for b in range(3):
        s = [float(user[b] @ table[i]) for i in range(1, 6)]
        expected += -(s[targets[b] - 1] - math.log(sum(math.exp(x) for x in s)))
    assert abs(float(full_softmax_loss(user, table, targets)) - expected / 3) < 1e-5


def test_sampled_softmax_matches_direct_with_fixed_negatives():
    g = torch.Generator().manual_seed(2)
    user, table = torch.randn(2, 4, generator=g), torch.randn(8, 4, generator=g)
    targets = torch.tensor([3, 5])
    negatives = torch.tensor([1, 3, 7, 7])             # row 0 has an accidental hit (3)
    counts = torch.tensor([0, 10, 50, 5, 5, 30, 1, 2])  # ranks: 2->0, 5->1, 1->2, 3->3, 4->4, 7->5, 6->6
    sampler = LogUniformSampler(counts)
    n = 7
    rank = {2: 0, 5: 1, 1: 2, 3: 3, 4: 4, 7: 5, 6: 6}
    logq = {i: math.log(math.log((r + 2) / (r + 1)) / math.log(n + 1)) for i, r in rank.items()}
    assert torch.allclose(sampler.log_q(torch.tensor([2, 6])), torch.tensor([logq[2], logq[6]]))
    got = sampled_softmax_loss(user, table[targets], targets, table[negatives], negatives,
                               sampler.log_q(targets), sampler.log_q(negatives))
    expected = 0.0
    for b, t in enumerate(targets.tolist()):
        pos = float(user[b] @ table[t]) - logq[t]
        terms = [pos] + [float(user[b] @ table[s]) - logq[s] for s in negatives.tolist() if s != t]
        expected += -(pos - math.log(sum(math.exp(x) for x in terms)))
    assert abs(float(got) - expected / 2) < 1e-5


def test_in_batch_softmax_matches_direct():
    g = torch.Generator().manual_seed(3)
    user, table = torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    targets = torch.tensor([2, 4, 2])                  # rows 0 and 2 share an item
    logq = torch.log(torch.tensor([1.0, 0.1, 0.2, 0.3, 0.4]))
    got = in_batch_softmax_loss(user, table[targets], targets, logq[targets])
    expected = 0.0
    for b in range(3):
        cols = [c for c in range(3) if c == b or targets[c] != targets[b]]
        s = {c: float(user[b] @ table[targets[c]] - logq[targets[c]]) for c in cols}
        expected += -(s[b] - math.log(sum(math.exp(x) for x in s.values())))
    assert abs(float(got) - expected / 3) < 1e-5


def test_log_uniform_sampler_follows_its_distribution():
    counts = torch.tensor([0] + list(range(20, 0, -1)))  # item i has rank i-1
    sampler = LogUniformSampler(counts)
    draws = sampler.sample(200_000, generator=torch.Generator().manual_seed(0))
    assert draws.min() >= 1 and draws.max() <= 20
    freq = torch.bincount(draws, minlength=21)[1:].double() / draws.numel()
    expected = torch.tensor([math.log((r + 2) / (r + 1)) / math.log(21) for r in range(20)], dtype=torch.float64)
    assert abs(float(expected.sum()) - 1.0) < 1e-12
    assert torch.allclose(freq, expected, atol=0.005)
    assert torch.allclose(sampler.log_q(torch.arange(1, 21)).double(), expected.log(), atol=1e-6)


def test_softmax_loss_kinds_run_and_backprop():
    m = _tiny_model()
    hist = torch.tensor([[0, 1, 2], [3, 4, 1]])
    targets = torch.tensor([3, 2])
    counts = torch.tensor([0, 3, 2, 1, 1])
    for kind in SoftmaxLoss.KINDS:
        m.zero_grad()
        loss = SoftmaxLoss(kind, counts, 5, "attention")(m(hist, targets=targets), m, targets)
        assert torch.isfinite(loss)
        loss.backward()
        assert m.item_id_embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="loss must be one of"):
        SoftmaxLoss("bogus", counts, 5, "attention")


# ----- best-interest scoring (the default recipe) and the interest-diversity term -----

def test_best_interest_scores_take_the_max_over_active_interests():
    V = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]])      # (1, K=3, d=2)
    items = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])                 # scores per k: [1, 2, -3], [-1, 0, 3]
    from mind.loss import best_interest_scores
    assert best_interest_scores(V, None, items).tolist() == [[2.0, 3.0]]
    mask = torch.tensor([[True, True, False]])                      # interest 2 inactive
    assert best_interest_scores(V, mask, items).tolist() == [[2.0, 0.0]]
    assert best_interest_scores(V, mask, items[:1], paired=True).tolist() == [2.0]


def test_max_scoring_with_one_interest_equals_the_attention_loss():
    # K = 1: max over one interest is that interest, for every estimator.
    m = _tiny_model()
    hist, targets, counts = torch.tensor([[0, 1, 2], [3, 4, 1]]), torch.tensor([3, 2]), torch.tensor([0, 3, 2, 1, 1])
    V = torch.randn(2, 1, m.dim)
    for kind in SoftmaxLoss.KINDS:
        a = SoftmaxLoss(kind, counts, 5, "attention")
        b = SoftmaxLoss(kind, counts, 5, "max")
        la = a(V[:, 0], m, targets, generator=torch.Generator().manual_seed(0))
        lb = b((V, None), m, targets, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(la, lb, atol=1e-6), (kind, la, lb)


def test_max_scoring_sampled_matches_direct():
    g = torch.Generator().manual_seed(4)
    V, table = torch.randn(2, 3, 4, generator=g), torch.randn(8, 4, generator=g)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    targets, negatives = torch.tensor([3, 5]), torch.tensor([1, 3, 7])
    counts = torch.tensor([0, 10, 50, 5, 5, 30, 1, 2])
    from mind.loss import _sampled_softmax_from_scores, best_interest_scores
    sampler = LogUniformSampler(counts)
    got = _sampled_softmax_from_scores(best_interest_scores(V, mask, table[targets], paired=True),
                                       best_interest_scores(V, mask, table[negatives]), targets, negatives,
                                       sampler.log_q(targets), sampler.log_q(negatives))
    expected = 0.0
    for b, t in enumerate(targets.tolist()):
        k = [j for j in range(3) if mask[b, j]]
        s = lambda i: max(float(V[b, j] @ table[i]) for j in k) - float(sampler.log_q(torch.tensor([i])))  # noqa: E731
        terms = [s(t)] + [s(i) for i in negatives.tolist() if i != t]
        expected += -(s(t) - math.log(sum(math.exp(x) for x in terms)))
    assert abs(float(got) - expected / 2) < 1e-5


def test_softmax_loss_rejects_bad_arguments_naming_them():
    counts = torch.tensor([0, 3, 2, 1, 1])
    with pytest.raises(ValueError, match="scoring"):
        SoftmaxLoss("sampled", counts, 5, "mean")
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="num_negatives"):
            SoftmaxLoss("sampled", counts, bad, "max")


def test_interest_similarity_penalty_is_the_mean_pairwise_cosine():
    from mind.loss import interest_similarity_penalty
    V = torch.tensor([[[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]],        # cosines 0, 1/sqrt2, 1/sqrt2
                      [[1.0, 0.0], [-1.0, 0.0], [5.0, 5.0]]])      # interest 2 inactive: cosine -1
    mask = torch.tensor([[True, True, True], [True, True, False]])
    expected = ((0 + 2 / math.sqrt(2)) / 3 + (-1.0)) / 2
    assert abs(float(interest_similarity_penalty(V, mask)) - expected) < 1e-6
    # users with one active interest do not count; K = 1 gives 0
    one = torch.tensor([[True, False, False], [True, True, False]])
    assert abs(float(interest_similarity_penalty(V, one)) - (-1.0)) < 1e-6
    assert float(interest_similarity_penalty(V[:, :1], None)) == 0.0


def test_linear_h_output_allows_negative_interest_coordinates_and_round_trips():
    m = MIND(num_items=6, dim=8, num_interests=3, h_out_activation="linear")
    V, _ = m.interests(torch.tensor([[1, 2, 3, 4]]))
    assert (V < 0).any()
    relu = MIND(num_items=6, dim=8, num_interests=3, h_out_activation="relu")
    assert (relu.interests(torch.tensor([[1, 2, 3, 4]]))[0] >= 0).all()
    again = MIND.from_config(m.config, m.item_genres)
    again.load_state_dict(m.state_dict())
    assert torch.equal(again.eval().interests(torch.tensor([[1, 2, 3, 4]]))[0], m.eval().interests(torch.tensor([[1, 2, 3, 4]]))[0])
    with pytest.raises(ValueError, match="h_out_activation"):
        MIND(num_items=6, h_out_activation="tanh")
