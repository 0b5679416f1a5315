"""mind_kernels.best_interest_cross_entropy: the fused loss (compiled CPU kernel and its torch-ops twin)
against the unfused reference: loss and both gradients, float64 / float32 / bf16 products, masks, odd
shapes, ties, gradcheck, bad input, no_grad, torch.compile, and the training loss that uses it."""

import numpy as np
import pytest
import torch

from mind_kernels import best_interest_cross_entropy
from mind_kernels.losses import best_interest_cross_entropy_reference, fused_kernel_unavailable_reason

pytestmark = pytest.mark.usefixtures("one_thread")

HAVE_KERNEL = fused_kernel_unavailable_reason("cpu") is None
BACKENDS = ["auto", "torch"]


def _inputs(B, K, N, d, dtype=torch.float64, masked=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(B, K, d, generator=g, dtype=dtype).requires_grad_()
    E = torch.randn(N, d, generator=g, dtype=dtype).requires_grad_()
    t = torch.randint(0, N, (B,), generator=g)
    mask = None
    if masked:
        mask = torch.rand(B, K, generator=g) < 0.6
        mask[:, 0] = True
    return V, E, t, mask


def _loss_and_grads(fn, V, E, t, mask, **kw):
    loss = fn(V, E, t, mask, **kw)
    return (loss, *torch.autograd.grad(loss, (V, E)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(7, 4, 30, 5), (1, 1, 3, 2), (9, 5, 17, 8), (33, 3, 101, 16)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("pad", [1, 16])
def test_matches_the_reference_in_float64(backend, shape, masked, pad):
    V, E, t, mask = _inputs(*shape, masked=masked)
    want = _loss_and_grads(best_interest_cross_entropy_reference, V, E, t, mask)
    got = _loss_and_grads(best_interest_cross_entropy, V, E, t, mask, backend=backend, pad_multiple=pad)
    for a, b in zip(got, want):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_float32_within_routing_tolerances_of_float64(backend, masked):
    V, E, t, mask = _inputs(64, 4, 200, 16, dtype=torch.float64, masked=masked, seed=3)
    want = _loss_and_grads(best_interest_cross_entropy_reference, V, E, t, mask)
    V32, E32 = V.detach().float().requires_grad_(), E.detach().float().requires_grad_()
    got = _loss_and_grads(best_interest_cross_entropy, V32, E32, t, mask, backend=backend)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)


def test_bfloat16_products_kernel_equals_torch_ops_and_stays_near_float32():
    V, E, t, mask = _inputs(48, 4, 300, 32, dtype=torch.float32, masked=True, seed=5)
    kw = dict(product_dtype=torch.bfloat16)
    a = _loss_and_grads(best_interest_cross_entropy, V, E, t, mask, backend="auto", **kw)
    b = _loss_and_grads(best_interest_cross_entropy, V, E, t, mask, backend="torch", **kw)
    f = _loss_and_grads(best_interest_cross_entropy_reference, V, E, t, mask)
    for x, y, z in zip(a, b, f):
        assert x.dtype == torch.float32
        # the same bf16 scores, the same winners: only the float32 pass differs (exp, summation order)
        torch.testing.assert_close(x, y, atol=2e-6 * max(1.0, float(y.detach().abs().max())), rtol=1e-3)
        # 8-bit mantissa products: ~1% of the scale against float32
        torch.testing.assert_close(x, z, atol=0.03 * float(z.detach().abs().max()), rtol=0.03)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    V, E, t, mask = _inputs(4, 3, 11, 3, masked=True, seed=7)
    assert torch.autograd.gradcheck(
        lambda v, e: best_interest_cross_entropy(v, e, t, mask, backend=backend, pad_multiple=4), (V, E))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tie_between_interests_sends_the_gradient_to_the_lowest(backend):
    V, E, t, _ = _inputs(3, 4, 9, 5, seed=9)
    same = V.detach()[:, :1].expand(3, 4, 5).clone().requires_grad_()   # all K interests equal: every score tied
    loss = best_interest_cross_entropy(same, E, t, backend=backend)
    (dV,) = torch.autograd.grad(loss, same)
    assert dV[:, 0].abs().sum() > 0
    assert torch.equal(dV[:, 1:], torch.zeros_like(dV[:, 1:]))
    # and the value is the one-interest loss
    one = best_interest_cross_entropy_reference(same.detach()[:, :1], E, t)
    torch.testing.assert_close(loss.detach(), one.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_inactive_interests_get_no_gradient_and_do_not_score(backend):
    V, E, t, _ = _inputs(5, 4, 13, 6, seed=11)
    mask = torch.zeros(5, 4, dtype=torch.bool)
    mask[:, 0] = True
    loss = best_interest_cross_entropy(V, E, t, mask, backend=backend)
    (dV,) = torch.autograd.grad(loss, V)
    assert torch.equal(dV[:, 1:], torch.zeros_like(dV[:, 1:]))
    torch.testing.assert_close(loss, best_interest_cross_entropy_reference(V[:, :1], E, t))


def test_no_grad_gives_the_same_loss_without_gradients():
    V, E, t, mask = _inputs(6, 4, 20, 4, masked=True, seed=13)
    with_grad = best_interest_cross_entropy(V, E, t, mask)
    with torch.no_grad():
        plain = best_interest_cross_entropy(V, E, t, mask)
    assert not plain.requires_grad
    torch.testing.assert_close(plain, with_grad.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_gets_a_named_error(backend):
    V, E, t, mask = _inputs(4, 3, 10, 5)
    cases = [
        ((V, E, t + 10, None), "outside the 10 classes"),
        ((V, E, t - 10, None), "outside the 10 classes"),
        ((V, E, t, torch.zeros(4, 3, dtype=torch.bool)), "no active interest"),
        ((V, E, t, torch.ones(4, 2, dtype=torch.bool)), r"interest_mask must be \(B, K\)"),
        ((V, E[:, :4], t, None), r"want interests \(B, K, d\) and item_table \(N, d\)"),
        ((V, E, t.int(), None), "targets must be int64"),
        ((V[:0], E, t[:0], None), "empty batch"),
        ((V, E[:0], t, None), "no rows"),
        ((V, E.float(), t, None), "share one floating dtype"),
        ((V.long(), E.long(), t, None), "share one floating dtype"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            best_interest_cross_entropy(*args, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        best_interest_cross_entropy(V, E, t, backend="cuda")
    with pytest.raises(ValueError, match="pad_multiple"):
        best_interest_cross_entropy(V, E, t, pad_multiple=0)


@pytest.mark.skipif(not HAVE_KERNEL, reason="the compiled extension is not built")
def test_kernel_op_checks_its_own_input():
    s = torch.randn(3, 2, 8)
    with pytest.raises(RuntimeError, match="outside the 5 classes"):
        torch.ops.mind_kernels.best_interest_ce(s, torch.tensor([0, 5, 1]), None, 5, 1.0)
    with pytest.raises(RuntimeError, match="no active interest"):
        torch.ops.mind_kernels.best_interest_ce(s, torch.tensor([0, 1, 1]), torch.zeros(3, 2, dtype=torch.bool), 5, 1.0)
    with pytest.raises(RuntimeError, match="num_classes"):
        torch.ops.mind_kernels.best_interest_ce(s, torch.tensor([0, 1, 1]), None, 9, 1.0)
    # a NaN score gives a NaN loss (as the unfused form), not a silent number
    s[1, 0, 3] = float("nan")
    rows, _ = torch.ops.mind_kernels.best_interest_ce(s, torch.tensor([0, 1, 1]), None, 5, 1.0)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()


@pytest.mark.skipif(not HAVE_KERNEL, reason="the compiled extension is not built")
def test_large_score_range_stays_finite():
    # logits far apart (exp underflows for all but the best): no NaN, the loss is the gap to the best
    V, E, t, _ = _inputs(4, 2, 50, 4, dtype=torch.float32, seed=17)
    V = (V.detach() * 40).requires_grad_()
    got = _loss_and_grads(best_interest_cross_entropy, V, E, t, None)
    want = _loss_and_grads(best_interest_cross_entropy_reference, V, E, t, None)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-4 * max(1.0, float(b.detach().abs().max())), rtol=1e-4)


def test_torch_compile_fullgraph():
    V, E, t, mask = _inputs(5, 3, 21, 4, dtype=torch.float32, masked=True, seed=19)

    def f(v, e):
        return best_interest_cross_entropy(v, e, t, mask, pad_multiple=8)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = _loss_and_grads(lambda v, e, *_: compiled(v, e), V, E, t, mask)
    want = _loss_and_grads(lambda v, e, *_: f(v, e), V, E, t, mask)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_training_loss_equals_the_unfused_formula(tiny):
    from mind.loss import SoftmaxLoss, best_interest_scores, interest_similarity_penalty
    from mind.train import TrainConfig, build_model, training_loss
    hist = torch.as_tensor(np.asarray(tiny.train_histories[:24]))[:, -10:]
    users = torch.as_tensor(np.asarray(tiny.train_users[:24]))
    feats = torch.as_tensor(np.asarray(tiny.user_features))[users]
    tgt = torch.as_tensor(np.asarray(tiny.train_targets[:24]))
    cfg = TrainConfig(dim=16, max_len=10, loss="full", backend="cpp", dynamic_interests=True)
    torch.manual_seed(0)
    model = build_model(tiny, cfg)
    loss_fn = SoftmaxLoss("full", np.asarray(tiny.item_counts), 20, "max")      # float32 products

    def unfused():
        table = model.item_embeddings()
        V, mask = model(hist, feats, item_table=table)
        logits = best_interest_scores(V, mask, table[1:])
        return (torch.nn.functional.cross_entropy(logits, tgt - 1)
                + cfg.diversity_lambda * interest_similarity_penalty(V, mask))

    out = []
    for step in (lambda: training_loss(model, model, loss_fn, cfg, hist, feats, tgt), unfused):
        model.zero_grad()
        torch.manual_seed(1)
        loss = step()
        loss.backward()
        out.append((loss.detach(), model.item_id_embedding.weight.grad.clone(), model.extractor.weight.grad.clone(),
                    model.h_layers[0].weight.grad.clone()))
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_runs_the_torch_ops_form_and_matches_the_cpu():
    assert fused_kernel_unavailable_reason("cuda") is not None      # no CUDA kernel: torch ops serve it
    V, E, t, mask = _inputs(64, 4, 300, 32, dtype=torch.float32, masked=True, seed=21)
    cpu = _loss_and_grads(best_interest_cross_entropy, V, E, t, mask)
    Vg, Eg = V.detach().cuda().requires_grad_(), E.detach().cuda().requires_grad_()
    got = _loss_and_grads(best_interest_cross_entropy, Vg, Eg, t.cuda(), mask.cuda())
    for a, b in zip(got, cpu):
        assert a.is_cuda
        torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_class_non_contiguous_inputs_and_one_side_requiring_grad(backend):
    V, E, t, mask = _inputs(6, 3, 1, 4, masked=True, seed=23)       # one class: the loss is 0, so is the gradient
    loss, dV, dE = _loss_and_grads(best_interest_cross_entropy, V, E, t, mask, backend=backend)
    assert float(loss) == 0.0 and float(dV.abs().max()) == 0.0 and float(dE.abs().max()) == 0.0
    V, E, t, mask = _inputs(6, 3, 19, 4, masked=True, seed=29)
    Et = E.detach().t().contiguous().t()                                # (N, d) with strides (1, N)
    Vt = V.detach().transpose(0, 1).contiguous().transpose(0, 1)        # (B, K, d), not contiguous
    want = best_interest_cross_entropy_reference(V, E, t, mask)
    got = best_interest_cross_entropy(Vt.requires_grad_(), Et, t, mask, backend=backend)   # table needs no grad
    (dV,) = torch.autograd.grad(got, Vt)
    (dV_want,) = torch.autograd.grad(want, V)
    torch.testing.assert_close(got, want.detach())
    torch.testing.assert_close(dV, dV_want)
