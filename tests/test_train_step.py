"""The training step's forms: each equals the plain formula it replaces (values and gradients), and
training and serving compute the same forms (mind.model, mind.loss, mind.train)."""

import numpy as np
import pytest
import torch

from mind.config import TrainConfig
from mind.loss import SoftmaxLoss, auto_product_dtype, best_interest_scores
from mind.model import h_layers_forward
from mind.train import build_loss, build_model, routes_jagged, training_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(data, n=32, max_len=10):
    hist = torch.as_tensor(np.asarray(data.train_histories[:n]))[:, -max_len:]
    users = torch.as_tensor(np.asarray(data.train_users[:n]))
    feats = torch.as_tensor(np.asarray(data.user_features))[users]
    return hist, feats, torch.as_tensor(np.asarray(data.train_targets[:n]))


def _setup(data, loss, **kw):
    cfg = TrainConfig(dim=16, max_len=10, num_negatives=20, loss=loss, backend="cpp", **kw)
    torch.manual_seed(0)
    model = build_model(data, cfg)
    return cfg, model, SoftmaxLoss(loss, np.asarray(data.item_counts), 20, cfg.scoring)


@pytest.mark.parametrize("masked", [False, True])
def test_best_interest_scores_match_autograd_of_the_formula(masked):
    g = torch.Generator().manual_seed(0)
    V = torch.randn(5, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    E = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 1], [1, 1, 1]], dtype=torch.bool) if masked else None
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    got = best_interest_scores(V, mask, E)
    dV, dE = torch.autograd.grad((got * w).sum(), (V, E))
    s = torch.einsum("bkd,nd->bkn", V, E)
    if masked:
        s = s.masked_fill(~mask[:, :, None], float("-inf"))
    want = s.max(dim=1).values
    wV, wE = torch.autograd.grad((want * w).sum(), (V, E))
    assert torch.equal(got, want)
    assert torch.allclose(dV, wV) and torch.allclose(dE, wE)
    assert torch.autograd.gradcheck(lambda v, e: best_interest_scores(v, mask, e), (V, E))



def test_best_interest_scores_tie_sends_the_gradient_to_the_lowest_interest():
    # Interests 1 and 2 are the same vector, so they tie on every item wherever they win
    # (small integers: every product and sum is exact, whatever order the mm adds in).
    g = torch.Generator().manual_seed(1)
    V = torch.randint(-3, 4, (4, 3, 5), generator=g).double()
    V[:, 2] = V[:, 1]
    V[:, 0] = -10 * V[:, 1].abs() - 1                 # interest 0 loses to 1 and 2 on positive items
    V.requires_grad_(True)
    E = torch.randint(1, 4, (6, 5), generator=g).double().requires_grad_(True)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    dV, dE = torch.autograd.grad((best_interest_scores(V, None, E) * w).sum(), (V, E))
    want_dV = torch.zeros_like(V)
    want_dV[:, 1] = w @ E.detach()                    # all of it to interest 1, none to its twin
    assert torch.allclose(dV, want_dV)
    assert torch.allclose(dE, w.t() @ V.detach()[:, 1])

def test_item_table_path_gives_the_embed_path_values(tiny):
    cfg, model, _ = _setup(tiny, "full")
    hist, feats, _ = _batch(tiny)
    with torch.no_grad():
        a, _ = model(hist, feats)
        torch.manual_seed(0)
        v1, _ = model.interests(hist, feats)
        torch.manual_seed(0)
        v2, _ = model.interests(hist, feats, item_table=model.item_embeddings())
    assert torch.equal(model.embed_items(hist), model.item_embeddings()[hist])
    assert torch.equal(v1, v2)


def test_split_h_layers_equal_the_concatenated_form_in_values_and_gradients():
    g = torch.Generator().manual_seed(5)
    h = torch.nn.Sequential(torch.nn.Linear(8 + 3, 12), torch.nn.ReLU(), torch.nn.Linear(12, 8)).double()
    caps = torch.randn(5, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    profile = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    got = h_layers_forward(h, caps, profile)
    want = h(torch.cat([caps, profile[:, None, :].expand(5, 4, 3)], dim=2))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    w = torch.randn_like(got)
    params = [caps, profile, *h.parameters()]
    for a, b in zip(torch.autograd.grad((got * w).sum(), params), torch.autograd.grad((want * w).sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # no profile features (F = 0): the first layer is the capsule part alone
    h0 = torch.nn.Sequential(torch.nn.Linear(8, 8)).double()
    torch.testing.assert_close(h_layers_forward(h0, caps, profile[:, :0]), h0(caps))


def test_genre_matmul_equals_the_mean_of_the_gathered_genre_rows(tiny):
    _, model, _ = _setup(tiny, "full")
    items = torch.arange(model.num_items + 1)
    assert model.genre_embedding.num_embeddings <= model.item_genres.shape[1] * model.dim   # the matmul form
    genres = model.item_genres[items]
    valid = (genres != 0).double()
    table = model.genre_embedding.weight.double()
    want = (table[genres] * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
    got = model.genre_pooling_matrix(items).double() @ table
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    P = model.genre_pooling_matrix(items)
    has = valid.bool().any(1)
    assert torch.allclose(P.sum(1)[has], torch.ones(int(has.sum()))) and P[:, 0].abs().sum() == 0


def test_training_and_serving_compute_the_same_interests(tiny):
    _, model, _ = _setup(tiny, "full")
    hist, feats, _ = _batch(tiny)
    model.eval()
    with torch.no_grad():
        served = model.interests(hist, feats)[0]
        b0 = model.extractor.initial_logits(hist.shape[0], hist.shape[1], hist.device)
    # training mode draws b0 afresh; with the eval buffer's logits in its place, the same bits
    model.train()
    model.extractor.initial_logits = lambda B, L, device: b0
    with torch.no_grad():
        trained = model.interests(hist, feats, item_table=model.item_embeddings())[0]
    assert torch.equal(served, trained)


def test_routes_jagged_when_at_most_half_the_slots_hold_an_item(tiny):
    positions = np.asarray(tiny.train_positions)
    for max_len in (5, 20, 200):
        fill = float((tiny.train_histories[:, -max_len:] != 0).float().mean()) if max_len <= tiny.max_len else \
            float(np.minimum(positions, max_len).mean()) / max_len
        jagged, got = routes_jagged(tiny, max_len)
        assert got == pytest.approx(fill) and jagged == (fill <= 0.5)
    assert routes_jagged(tiny, 10_000)[0] is True


def test_jagged_training_loss_matches_padded_on_left_aligned_batch(tiny):
    cfg, model, loss_fn = _setup(tiny, "full")
    hist, feats, tgt = _batch(tiny)
    n = (hist != 0).sum(1, keepdim=True)
    cols = torch.arange(hist.shape[1])[None]
    # the same behaviours moved to the left: position i of user u = its i-th real item
    left = torch.zeros_like(hist)
    left[cols < n] = hist[hist != 0]
    torch.manual_seed(3)
    got = training_loss(model, model, loss_fn, cfg, hist, feats, tgt, jagged=True)
    torch.manual_seed(3)
    want = training_loss(model, model, loss_fn, cfg, left, feats, tgt)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bfloat16_score_products_stay_close_to_float32():
    g = torch.Generator().manual_seed(2)
    V = torch.randn(6, 4, 16, generator=g, requires_grad=True)
    table = torch.randn(38, 16, generator=g)
    table[0] = 0
    table.requires_grad_(True)
    mask = torch.rand(6, 4, generator=g) < 0.7
    mask[:, 0] = True
    targets = torch.randint(1, 38, (6,), generator=g)
    model = type("Table", (), {"item_embeddings": lambda self: table})()
    out = {}
    for dtype in (None, torch.bfloat16):
        loss = SoftmaxLoss("full", np.ones(38), 5, "max", product_dtype=dtype)((V, mask), model, targets)
        out[dtype] = (loss, *torch.autograd.grad(loss, (V, table)))
        assert all(t.dtype == torch.float32 for t in out[dtype])
    for a, b in zip(out[None], out[torch.bfloat16]):      # an 8-bit mantissa: ~1% of the scale
        torch.testing.assert_close(b, a, atol=0.05 * float(a.detach().abs().max()), rtol=0.02)
    with pytest.raises(ValueError, match="product_dtype"):
        SoftmaxLoss("full", np.ones(5), 5, "max", product_dtype=torch.float16)


def test_auto_product_dtype_is_bfloat16_only_on_cpus_that_multiply_it_natively(tiny):
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert auto_product_dtype() == (torch.bfloat16 if native else None)
    assert auto_product_dtype("cuda:0") is None
    assert build_loss(tiny, TrainConfig()).product_dtype == auto_product_dtype()


def test_gather_rows_equals_f_embedding_values_and_gradient():
    from mind.model import gather_rows
    g = torch.Generator().manual_seed(4)
    table = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 9, (4, 7), generator=g)
    idx[0, :3] = 2                                                      # repeated rows accumulate
    w = torch.randn(4, 7, 5, generator=g, dtype=torch.float64)
    a = gather_rows(table, idx)
    b = torch.nn.functional.embedding(idx, table)
    assert torch.equal(a, b)
    (ga,) = torch.autograd.grad((a * w).sum(), table)
    (gb,) = torch.autograd.grad((b * w).sum(), table)
    torch.testing.assert_close(ga, gb, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda t: gather_rows(t, idx), (table,))
