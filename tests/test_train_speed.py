"""Issue 13's training-step levers: one graph under torch.compile, the lean best-interest scores,
the item-table path, and the row-wise embedding optimizer (exactly resumable)."""

import numpy as np
import pytest
import torch

from mind.checkpoint import load_checkpoint
from mind.loss import SoftmaxLoss, best_interest_scores
from mind.optim import RowWiseAdamW, build_optimizer
from mind.train import TrainConfig, build_model, train, training_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(data, n=32, max_len=10):
    hist = torch.as_tensor(np.asarray(data.train_histories[:n]))[:, -max_len:]
    users = torch.as_tensor(np.asarray(data.train_users[:n]))
    feats = torch.as_tensor(np.asarray(data.user_features))[users]
    return hist, feats, torch.as_tensor(np.asarray(data.train_targets[:n]))


def _setup(data, loss, fused=False, **kw):
    cfg = TrainConfig(dim=16, max_len=10, num_negatives=20, loss=loss, backend="cpp", **kw)
    torch.manual_seed(0)
    model = build_model(data, cfg)
    return cfg, model, SoftmaxLoss(loss, np.asarray(data.item_counts), 20, scoring=cfg.scoring, fused=fused)


@pytest.mark.parametrize("loss", ["full", "full fused", "sampled"])
def test_training_forward_and_loss_is_one_graph(tiny, loss):
    cfg, model, loss_fn = _setup(tiny, loss.split()[0], fused=loss.endswith("fused"))
    batch = _batch(tiny)

    def step(h, f, t):
        return training_loss(model, model, loss_fn, cfg, h, f, t)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(*batch)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    # fullgraph=True raises on any break; the "eager" backend keeps the test fast (no codegen)
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    torch.manual_seed(1)
    got = compiled(*batch)
    got.backward()
    torch.manual_seed(1)
    want = step(*batch)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got, want)
    assert model.extractor.weight.grad is not None and model.item_id_embedding.weight.grad.abs().sum() > 0
    torch._dynamo.reset()


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


def test_rowwise_optimizer_updates_touched_rows_only_and_matches_adamw_on_them():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4)
    ref = torch.nn.Embedding(10, 4)
    ref.load_state_dict(emb.state_dict())
    lin = torch.nn.Linear(4, 1)
    opt = RowWiseAdamW(lin.parameters(), [emb.weight], lr=0.1, weight_decay=0.01)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.1, weight_decay=0.01)
    before = emb.weight.detach().clone()
    rows = torch.tensor([1, 3, 3, 7])
    for _ in range(3):           # the same rows every step: lazy Adam = AdamW on them
        for m, o in ((emb, opt), (ref, ref_opt)):
            o.zero_grad()
            (m(rows) ** 2).sum().backward()
            o.step()
    untouched = torch.tensor([0, 2, 4, 5, 6, 8, 9])
    assert torch.equal(emb.weight[untouched], before[untouched])
    assert not torch.equal(emb.weight[rows], before[rows])
    assert torch.allclose(emb.weight[rows], ref.weight[rows], atol=1e-6)
    with pytest.raises(ValueError, match="other optimizer"):
        opt.load_state_dict(ref_opt.state_dict())
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer(lin, "sgd", 0.1, 0.0)


def test_rowwise_optimizer_resume_matches_uninterrupted_run(tiny, tmp_path):
    def cfg(out, epochs):
        return TrainConfig(dim=16, num_interests=4, max_len=10, batch_size=64, epochs=epochs, num_negatives=20,
                           loss="sampled", optimizer="rowwise", patience=5, seed=3, progress=False,
                           out_dir=str(tmp_path / out))
    full = train(tiny, cfg("a", 2), log=lambda *_: None)
    train(tiny, cfg("b", 1), log=lambda *_: None)
    resumed = train(tiny, cfg("b", 2), resume=True, log=lambda *_: None)
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for x, y in zip(a["optimizer"]["exp_avg_sq"], b["optimizer"]["exp_avg_sq"]):
        assert torch.equal(x, y)
    assert a["optimizer"]["step"] == b["optimizer"]["step"] > 0
    assert full.test_metrics == resumed.test_metrics
    # the optimizer is part of the optimisation: resuming a rowwise run with adamw is refused
    with pytest.raises(Exception, match="optimizer"):
        train(tiny, TrainConfig(**{**cfg("b", 3).to_dict(), "optimizer": "adamw", "eval_ns": (20, 50)}),
              resume=True, log=lambda *_: None)


# ----- second round: split H, genre matmul, padded exact softmax, item table rule, allocator

def _pair(data, **kw):
    """Two models with the same weights: round-1 forms (levers off) and the given levers."""
    cfg0, m0, _ = _setup(data, "full", split_h=False, genre_matmul=False, h_dtype="float32")
    cfg1, m1, _ = _setup(data, "full", **{"h_dtype": "float32", **kw})
    m1.load_state_dict(m0.state_dict())
    return m0, m1


def test_split_h_and_genre_matmul_equal_the_concatenated_and_gathered_forms(tiny):
    m0, m1 = _pair(tiny, split_h=True, genre_matmul=True)
    assert m1.split_h and m1.genre_matmul and not m0.split_h
    hist, feats, _ = _batch(tiny)
    torch.manual_seed(0)
    v0, _ = m0(hist, feats, item_table=m0.item_embeddings())
    torch.manual_seed(0)
    v1, _ = m1(hist, feats, item_table=m1.item_embeddings())
    assert torch.allclose(v0, v1, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(v0)
    g0 = torch.autograd.grad((v0 * w).sum(), list(m0.parameters()), allow_unused=True)
    g1 = torch.autograd.grad((v1 * w).sum(), list(m1.parameters()), allow_unused=True)
    for (name, _), a, b in zip(m0.named_parameters(), g0, g1):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name
    # the genre matrix: rows sum to 1 for items with genres, column 0 (padding) is 0
    P = m1.genre_pooling_matrix(torch.arange(m1.num_items + 1))
    has = (m1.item_genres != 0).any(1)
    assert torch.allclose(P.sum(1)[has], torch.ones(int(has.sum()))) and P[:, 0].abs().sum() == 0
    # eval mode (serving, export) keeps the round-1 forms: bit-identical outputs
    m0.eval(), m1.eval()
    assert torch.equal(m0.interests(hist, feats)[0], m1.interests(hist, feats)[0])
    assert torch.equal(m0.item_embeddings(), m1.item_embeddings())


@pytest.mark.parametrize("masked", [False, True])
def test_padded_exact_softmax_equals_the_unpadded_one(masked):
    g = torch.Generator().manual_seed(0)
    V = torch.randn(6, 3, 8, generator=g, requires_grad=True)
    table = torch.randn(12, 8, generator=g)          # 11 items + padding row 0: 12 rows, padded to 16
    table[0] = 0
    table.requires_grad_(True)
    mask = torch.tensor([[1, 1, 0]] * 6, dtype=torch.bool) if masked else None
    targets = torch.tensor([1, 5, 11, 3, 3, 7])
    from mind.loss import padded_best_interest_logits
    logits = padded_best_interest_logits(V, mask, table, 16)
    assert logits.shape == (6, 16) and torch.isinf(logits[:, 0]).all() and torch.isinf(logits[:, 12:]).all()
    got = torch.nn.functional.cross_entropy(logits, targets)
    want = torch.nn.functional.cross_entropy(best_interest_scores(V, mask, table[1:]), targets - 1)
    assert torch.allclose(got, want, atol=1e-6)
    gV, gT = torch.autograd.grad(got, (V, table))
    wV, wT = torch.autograd.grad(want, (V, table))
    assert torch.allclose(gV, wV, atol=1e-6) and torch.allclose(gT, wT, atol=1e-6)
    with pytest.raises(ValueError, match="pad_items"):
        SoftmaxLoss("full", np.ones(12), pad_items=0)


def test_item_table_auto_gives_the_same_sampled_loss(tiny):
    from mind.train import build_loss, use_item_table
    hist, feats, tgt = _batch(tiny)
    losses = []
    for rule in ("loss", "auto"):
        cfg, model, _ = _setup(tiny, "sampled", item_table=rule)
        loss_fn = build_loss(tiny, cfg)
        assert use_item_table(model, loss_fn, cfg, hist) == (rule == "auto")   # tiny: N + 1 <= B L
        torch.manual_seed(3)
        losses.append(training_loss(model, model, loss_fn, cfg, hist, feats, tgt))
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    with pytest.raises(ValueError, match="item_table"):
        build_loss(tiny, TrainConfig(item_table="always"))


def test_keep_freed_memory_applies_on_glibc_only():
    import platform
    from mind.allocator import keep_freed_memory
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc
    assert keep_freed_memory() is glibc          # idempotent


def test_resolve_jagged_rules():
    from mind.train import resolve_jagged
    sparse = torch.tensor([[0, 0, 0, 1], [0, 0, 2, 3]])                 # 3 of 8 slots filled
    dense = torch.tensor([[0, 4, 5, 1], [1, 2, 2, 3]])                  # 7 of 8
    assert resolve_jagged(TrainConfig(), sparse) == (True, 3 / 8)
    assert resolve_jagged(TrainConfig(), dense) == (False, 7 / 8)
    assert resolve_jagged(TrainConfig(compile=True), sparse)[0] is False
    assert resolve_jagged(TrainConfig(jagged="on"), dense)[0] is True
    assert resolve_jagged(TrainConfig(jagged="off"), sparse)[0] is False
    with pytest.raises(ValueError, match="cannot be compiled"):
        resolve_jagged(TrainConfig(jagged="on", compile=True), dense)
    with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
        resolve_jagged(TrainConfig(jagged="yes"), dense)


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


def test_bfloat16_score_products_stay_close_to_float32_and_float32_is_unchanged():
    g = torch.Generator().manual_seed(2)
    V = torch.randn(6, 4, 16, generator=g, requires_grad=True)
    E = torch.randn(37, 16, generator=g, requires_grad=True)
    mask = torch.rand(6, 4, generator=g) < 0.7
    mask[:, 0] = True
    w = torch.randn(6, 37, generator=g)
    out = {}
    for dtype in (None, torch.bfloat16):
        s = best_interest_scores(V, mask, E, product_dtype=dtype)
        out[dtype] = (s, *torch.autograd.grad((s * w).sum(), (V, E)))
        assert all(t.dtype == torch.float32 for t in out[dtype])
    # float32: the very same bits as without the argument
    s = best_interest_scores(V, mask, E)
    assert torch.equal(s, out[None][0])
    # bfloat16 products: an 8-bit mantissa, so ~1% of the scale
    for a, b in zip(out[None], out[torch.bfloat16]):
        torch.testing.assert_close(b, a, atol=0.05 * float(a.abs().max()), rtol=0.02)
    with pytest.raises(ValueError, match="score_dtype"):
        SoftmaxLoss("full", np.ones(5), score_dtype="float16")


def test_resolve_score_dtype_rules():
    from mind.train import resolve_score_dtype
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert resolve_score_dtype(TrainConfig()) == ("bfloat16" if native else "float32")
    assert resolve_score_dtype(TrainConfig(), device="cuda:0") == "float32"
    assert resolve_score_dtype(TrainConfig(score_dtype="float32")) == "float32"
    assert resolve_score_dtype(TrainConfig(score_dtype="bfloat16"), device="cuda:0") == "bfloat16"
    with pytest.raises(ValueError, match="score_dtype"):
        resolve_score_dtype(TrainConfig(score_dtype="half"))


def test_bfloat16_h_layers_stay_close_to_float32_and_eval_is_unchanged(tiny):
    m0, m1 = _pair(tiny, split_h=True, genre_matmul=True, h_dtype="bfloat16")
    assert m0.h_dtype is None and m1.h_dtype == torch.bfloat16
    m0.split_h = m0.genre_matmul = True
    hist, feats, _ = _batch(tiny)
    torch.manual_seed(0)
    v0, _ = m0(hist, feats, item_table=m0.item_embeddings())
    torch.manual_seed(0)
    v1, _ = m1(hist, feats, item_table=m1.item_embeddings())
    assert v1.dtype == torch.float32
    scale = float(v0.abs().max())
    torch.testing.assert_close(v1, v0, atol=0.03 * scale, rtol=0.03)
    w = torch.randn_like(v0)
    g0 = torch.autograd.grad((v0 * w).sum(), list(m0.parameters()), allow_unused=True)
    g1 = torch.autograd.grad((v1 * w).sum(), list(m1.parameters()), allow_unused=True)
    for (name, p), a, b in zip(m0.named_parameters(), g0, g1):
        if a is not None:
            assert b.dtype == p.dtype == torch.float32, name      # weights and their gradients stay float32
            # bf16 products: an 8-bit mantissa (0.4% per value); summed gradients cancel and pass back
            # through the routing, so whole tensors are compared (measured up to 3.7% here); whether
            # training suffers is the valid-recall study's question (README, "Training speed")
            assert float((b - a).norm()) <= 0.06 * float(a.norm()) + 1e-6, (name, float((b - a).norm() / a.norm()))
    m0.eval(), m1.eval()   # serving: float32 whatever h_dtype
    assert torch.equal(m0.interests(hist, feats)[0], m1.interests(hist, feats)[0])


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


def test_embed_items_with_index_add_gather_equals_advanced_indexing(tiny):
    m0, m1 = _pair(tiny, split_h=True, genre_matmul=True)
    m0.gather_index_add, m1.gather_index_add = False, True
    m0.genre_matmul = True
    items = torch.as_tensor(np.asarray(tiny.train_histories[:16]))[:, -10:]
    e0, e1 = m0.embed_items(items), m1.embed_items(items)
    assert torch.equal(e0, e1)
    w = torch.randn_like(e0)
    g0 = torch.autograd.grad((e0 * w).sum(), [m0.item_id_embedding.weight, m0.genre_embedding.weight])
    g1 = torch.autograd.grad((e1 * w).sum(), [m1.item_id_embedding.weight, m1.genre_embedding.weight])
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
