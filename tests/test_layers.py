"""B2IRouting (the module) and the dynamic interest count."""

import pytest
import torch

from mind_kernels import B2IRouting, b2i_routing, dynamic_interest_mask


@pytest.mark.parametrize(
    "n,k_expected",
    # K'_u = max(1, min(4, floor(log2 n))), worked out by hand: log2 of 3 is 1.58, of 7 is 2.81, of 1000 is 9.97.
    [(0, 1), (1, 1), (2, 1), (3, 1), (4, 2), (7, 2), (8, 3), (1000, 4)],
)
def test_dynamic_interest_count(n, k_expected):
    L = max(n, 1)
    mask = torch.zeros(1, L, dtype=torch.bool)
    mask[0, :n] = True
    got = dynamic_interest_mask(mask, 4)
    assert got.dtype == torch.bool and got.shape == (1, 4)
    assert got[0].tolist() == [j < k_expected for j in range(4)]


def test_dynamic_interest_mask_exact_at_powers_of_two():
    counts = [2**k - 1 for k in range(1, 12)] + [2**k for k in range(1, 12)]
    mask = torch.arange(2048)[None, :] < torch.tensor(counts)[:, None]
    got = dynamic_interest_mask(mask, 20).sum(1).tolist()
    want = [max(1, min(20, c.bit_length() - 1)) for c in counts]
    assert got == want


def test_inactive_interests_output_zeros():
    torch.manual_seed(0)
    layer = B2IRouting(6, 5, 4, dynamic_interests=True).eval()
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, :4] = True  # K' = 2
    mask[1, :9] = True  # K' = 3
    out = layer(torch.randn(2, 9, 6), mask)
    assert out[0, 2:].abs().max() == 0 and out[0, :2].abs().min() > 0
    assert out[1, 3:].abs().max() == 0 and out[1, :3].abs().min() > 0


def test_eval_mode_is_deterministic_and_training_mode_draws_afresh():
    torch.manual_seed(0)
    layer = B2IRouting(8, 8, 4)
    E = torch.randn(3, 10, 8)
    layer.train()
    a, b = layer(E), layer(E)
    assert not torch.allclose(a, b)
    layer.eval()
    c, d = layer(E), layer(E)
    assert torch.equal(c, d)


def test_eval_logits_do_not_depend_on_padding():
    torch.manual_seed(1)
    layer = B2IRouting(5, 4, 3).eval()
    E = torch.randn(2, 7, 5)
    mask = torch.ones(2, 7, dtype=torch.bool)
    short = layer(E, mask)
    for extra in (3, 400):  # 400 extends the buffer past its initial length
        E_long = torch.cat([E, torch.randn(2, extra, 5)], dim=1)
        mask_long = torch.cat([mask, torch.zeros(2, extra, dtype=torch.bool)], dim=1)
        torch.testing.assert_close(layer(E_long, mask_long), short, atol=1e-6, rtol=1e-5)


def test_eval_logits_are_saved_and_restored():
    torch.manual_seed(2)
    a = B2IRouting(5, 4, 3).eval()
    torch.manual_seed(3)
    b = B2IRouting(5, 4, 3).eval()
    E = torch.randn(2, 6, 5)
    assert not torch.allclose(a(E), b(E))
    assert "eval_logits" in a.state_dict() and "eval_seed" in a.state_dict()
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(E), b(E))
    # an extended buffer (longer L seen before saving) loads too
    a(torch.randn(1, 300, 5))
    c = B2IRouting(5, 4, 3)
    c.load_state_dict(a.state_dict())
    assert c.eval_logits.shape == a.eval_logits.shape


def test_seeded_construction_is_reproducible():
    torch.manual_seed(4)
    a = B2IRouting(5, 4, 3)
    torch.manual_seed(4)
    b = B2IRouting(5, 4, 3)
    assert torch.equal(a.eval_logits, b.eval_logits) and torch.equal(a.weight, b.weight)


def test_module_equals_functional_op():
    torch.manual_seed(5)
    layer = B2IRouting(6, 3, 2, num_iters=2, softmax_over="behaviors").eval()
    E = torch.randn(4, 5, 6)
    mask = torch.rand(4, 5) > 0.3
    want = b2i_routing(E, layer.weight, layer.eval_logits[:, :5], mask, num_iters=2, softmax_over="behaviors")
    torch.testing.assert_close(layer(E, mask), want)


def test_training_logits_have_init_std():
    torch.manual_seed(6)
    layer = B2IRouting(4, 4, 8, init_std=0.5)
    b0 = layer.initial_logits(64, 50, torch.device("cpu"))
    assert b0.shape == (64, 8, 50)
    assert abs(b0.std().item() - 0.5) < 0.02
    assert abs(layer.eval_logits.std().item() - 0.5) < 0.1


def test_gradients_reach_the_bilinear_map():
    layer = B2IRouting(4, 3, 2)
    E = torch.randn(3, 5, 4, requires_grad=True)
    layer(E).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert E.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs", [{"num_interests": 0}, {"num_iters": 0}, {"softmax_over": "x"}, {"init_std": 0.0},
                                    {"logit_scale": 0.0}, {"logit_scale": -1.0}, {"logit_scale": float("nan")},
                                    {"logit_scale": float("inf")}])
def test_constructor_rejects_bad_arguments(kwargs):
    args = {"in_dim": 4, "out_dim": 4, "num_interests": 2}
    args.update(kwargs)
    with pytest.raises(ValueError):
        B2IRouting(**args)


def test_logit_scale_is_a_plain_attribute_passed_to_the_op():
    torch.manual_seed(7)
    layer = B2IRouting(5, 4, 3, num_iters=3, logit_scale=20).eval()
    assert isinstance(layer.logit_scale, float) and layer.logit_scale == 20.0
    assert "logit_scale=20.0" in repr(layer)
    assert all("logit_scale" not in name for name, _ in layer.named_parameters())
    assert all("logit_scale" not in name for name in layer.state_dict())
    E = torch.randn(4, 6, 5)
    mask = torch.rand(4, 6) > 0.3
    want = b2i_routing(E, layer.weight, layer.eval_logits[:, :6], mask, num_iters=3, logit_scale=20.0)
    torch.testing.assert_close(layer(E, mask), want)
    layer.logit_scale = 1.0  # a plain attribute: changing it changes the routing
    torch.testing.assert_close(layer(E, mask), b2i_routing(E, layer.weight, layer.eval_logits[:, :6], mask))
    assert B2IRouting(5, 4, 3).logit_scale == 1.0
