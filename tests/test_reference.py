"""The pure-PyTorch reference against hand-worked cases, gradcheck and the closed-form gradient."""

import math

import pytest
import torch

from mind_kernels import b2i_routing
from mind_kernels.reference import b2i_routing_reference, squash


def _hand_routing(E, S, b0, mask, r, over_behaviors, scale=1.0):
    """Scalar, list-based transcription of ROUTING.md for one user (no torch), for tiny cases.

    ``scale`` is the routing logit scale s: b_ij += s * (c_j . u_i)."""
    L, K = len(E), len(b0)
    u = [[sum(S[o][d] * E[i][d] for d in range(len(E[i]))) for o in range(len(S))] for i in range(L)]
    b = [row[:] for row in b0]
    for t in range(1, r + 1):
        w = [[0.0] * L for _ in range(K)]
        if over_behaviors:
            for j in range(K):
                tot = sum(math.exp(b[j][i]) for i in range(L))
                for i in range(L):
                    w[j][i] = math.exp(b[j][i]) / tot if mask[i] else 0.0
        else:
            for i in range(L):
                if mask[i]:
                    tot = sum(math.exp(b[j][i]) for j in range(K))
                    for j in range(K):
                        w[j][i] = math.exp(b[j][i]) / tot
        c = []
        for j in range(K):
            z = [sum(w[j][i] * u[i][o] for i in range(L)) for o in range(len(S))]
            n2 = sum(x * x for x in z)
            c.append([n2 / (1 + n2) * x / math.sqrt(n2 + 1e-9) for x in z])
        if t < r:
            for j in range(K):
                for i in range(L):
                    b[j][i] += scale * sum(c[j][o] * u[i][o] for o in range(len(S)))
    return c, w


@pytest.mark.parametrize("scale", [1.0, 0.5, 20.0])
@pytest.mark.parametrize("softmax_over", ["interests", "behaviors"])
def test_hand_worked_case_k2_l3_d2_r2(softmax_over, scale):
    E = [[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]]
    S = [[0.5, 1.0], [-1.0, 0.25]]
    b0 = [[1.0, 0.0, -0.5], [0.0, 0.5, 0.0]]
    mask = [True, True, False]
    want_c, want_w = _hand_routing(E, S, b0, mask, r=2, over_behaviors=softmax_over == "behaviors", scale=scale)
    c, w = b2i_routing(
        torch.tensor([E], dtype=torch.float64),
        torch.tensor(S, dtype=torch.float64),
        torch.tensor(b0, dtype=torch.float64),
        mask=torch.tensor([mask]),
        num_iters=2,
        softmax_over=softmax_over,
        logit_scale=scale,
        return_weights=True,
        backend="reference",
    )
    torch.testing.assert_close(c[0], torch.tensor(want_c, dtype=torch.float64), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(w[0], torch.tensor(want_w, dtype=torch.float64), atol=1e-12, rtol=1e-10)
    assert w[0, :, 2].abs().max() == 0  # the masked position carries no weight


def test_first_round_by_hand_interests():
    """One iteration with S = I: w = softmax over interests of b0 per position, c = squash(sum_i w_ij e_i)."""
    E = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    b0 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    c = b2i_routing(E, torch.eye(2, dtype=torch.float64), b0, num_iters=1, backend="reference")
    p = math.e / (math.e + 1)  # softmax(1, 0)[0]
    z1 = [p + 0.5, 0.5 + 0.5]  # p*e1 + 0.5*e2 + 0.5*e3
    z2 = [(1 - p) + 0.5, 1.0]
    for j, z in enumerate((z1, z2)):
        n2 = z[0] ** 2 + z[1] ** 2
        want = [n2 / (1 + n2) * x / math.sqrt(n2 + 1e-9) for x in z]
        assert c[0, j].tolist() == pytest.approx(want, rel=1e-12)


def _inputs(B=3, L=5, D_in=4, D_out=3, K=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(B, L, D_in, generator=g, dtype=dtype)
    S = torch.randn(D_out, D_in, generator=g, dtype=dtype) * 0.7
    b0 = torch.randn(B, K, L, generator=g, dtype=dtype)
    mask = torch.rand(B, L, generator=g) > 0.3
    mask[:, 0] = True
    return E, S, b0, mask


@pytest.mark.parametrize("detach,r,scale", [(True, 1, 1.0), (False, 1, 1.0), (False, 3, 1.0), (False, 3, 20.0),
                                           (False, 3, 0.5)])
@pytest.mark.parametrize("softmax_over", ["interests", "behaviors"])
def test_gradcheck_float64(detach, r, scale, softmax_over):
    """gradcheck compares with finite differences of the true function, which the detached surrogate
    gradient equals only when no routing round depends on E and S (r = 1); detach=True with r > 1 is
    checked against ROUTING.md's closed form below instead.  With detach=False and r > 1 the logit
    scale s enters the derivative (b_ij += s * c_j . u_i depends on E and S)."""
    E, S, b0, mask = _inputs()
    E.requires_grad_(True)
    S.requires_grad_(True)
    imask = torch.tensor([[True, True], [True, False], [True, True]])

    def f(E, S):
        return b2i_routing(E, S, b0, mask, imask, num_iters=r, softmax_over=softmax_over,
                           detach_routing=detach, logit_scale=scale, backend="reference")

    assert torch.autograd.gradcheck(f, (E, S), eps=1e-6, atol=1e-6)


def _closed_form_grads(E, S, w, G):
    """ROUTING.md: dz = squash'(z)^T G, du_i = sum_j w_ij dz_j, dE_i = S^T du_i, dS = sum du_i e_i^T."""
    u = E @ S.t()
    z = w @ u
    n2 = (z * z).sum(-1, keepdim=True)
    s = torch.sqrt(n2 + 1e-9)
    a = n2 / ((1 + n2) * s)
    da = 1 / ((1 + n2) ** 2 * s) - n2 / (2 * (1 + n2) * s**3)
    dz = a * G + 2 * da * (z * G).sum(-1, keepdim=True) * z
    du = w.transpose(1, 2) @ dz
    return du @ S, torch.einsum("bio,bid->od", du, E)


@pytest.mark.parametrize("softmax_over", ["interests", "behaviors"])
@pytest.mark.parametrize("r,scale", [(1, 1.0), (3, 1.0), (3, 20.0)])
def test_detached_gradient_equals_closed_form(softmax_over, r, scale):
    # The closed form uses the final w only, whatever the logit scale that produced it.
    E, S, b0, mask = _inputs(B=4, L=6, D_in=5, D_out=3, K=3, seed=1)
    E.requires_grad_(True)
    S.requires_grad_(True)
    c, w = b2i_routing(E, S, b0, mask, num_iters=r, softmax_over=softmax_over, logit_scale=scale,
                       return_weights=True, backend="reference")
    G = torch.randn_like(c)
    (c * G).sum().backward()
    dE, dS = _closed_form_grads(E.detach(), S.detach(), w, G)
    torch.testing.assert_close(E.grad, dE, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(S.grad, dS, atol=1e-12, rtol=1e-9)
    assert E.grad[~mask].abs().max() == 0  # masked rows get no gradient


def test_no_gradient_to_logits_and_detach_false_differs():
    E, S, b0, mask = _inputs(seed=2)
    b0.requires_grad_(True)
    S1 = S.clone().requires_grad_(True)
    b2i_routing(E, S1, b0, mask, backend="reference").sum().backward()
    assert b0.grad is None
    S2 = S.clone().requires_grad_(True)
    b2i_routing(E, S2, b0, mask, detach_routing=False, backend="reference").sum().backward()
    assert not torch.allclose(S1.grad, S2.grad)  # differentiating through the iterations changes dS


def test_interests_mode_ignores_padding_content():
    """Appending padded positions with arbitrary embeddings and logits leaves the output unchanged."""
    E, S, b0, mask = _inputs(B=3, L=5, seed=3)
    mask[:] = True
    out = b2i_routing(E, S, b0, mask, num_iters=3, backend="reference")
    pad = 4
    E2 = torch.cat([E, 100 * torch.randn(3, pad, E.shape[2], dtype=E.dtype)], dim=1)
    b02 = torch.cat([b0, 50 * torch.randn(3, b0.shape[1], pad, dtype=b0.dtype)], dim=2)
    mask2 = torch.cat([mask, torch.zeros(3, pad, dtype=torch.bool)], dim=1)
    out2 = b2i_routing(E2, S, b02, mask2, num_iters=3, backend="reference")
    torch.testing.assert_close(out, out2, atol=1e-12, rtol=1e-12)


def test_behaviors_mode_padding_inside_denominator():
    """One round in "behaviors" mode: w_ij = exp(b_ij) / sum over all L positions, zero where masked."""
    E, S, b0, mask = _inputs(B=2, L=6, seed=4)
    c, w = b2i_routing(E, S, b0, mask, num_iters=1, softmax_over="behaviors", return_weights=True,
                       backend="reference")
    want = torch.exp(b0) / torch.exp(b0).sum(dim=2, keepdim=True) * mask[:, None, :]
    torch.testing.assert_close(w, want, atol=1e-12, rtol=1e-12)
    assert (w.sum(-1) < 1 - 1e-6).any()  # padding took some of the mass
    # And the padded content does matter in this mode (unlike "interests"):
    E2 = E.clone()
    E2[~mask] += 5
    c2 = b2i_routing(E2, S, b0, mask, num_iters=3, softmax_over="behaviors", backend="reference")
    c3 = b2i_routing(E, S, b0, mask, num_iters=3, softmax_over="behaviors", backend="reference")
    assert not torch.allclose(c2, c3)


@pytest.mark.parametrize("softmax_over", ["interests", "behaviors"])
def test_empty_user_and_inactive_interests_give_zeros(softmax_over):
    E, S, b0, mask = _inputs(B=3, L=4, K=3, seed=5)
    mask[1] = False  # user 1 has no behaviour
    imask = torch.tensor([[True, False, True], [True, True, True], [False, False, False]])
    E.requires_grad_(True)
    out = b2i_routing(E, S, b0, mask, imask, softmax_over=softmax_over, backend="reference")
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0
    assert out[0, 1].abs().max() == 0
    assert out[2].abs().max() == 0
    assert out[0, 0].abs().max() > 0
    out.sum().backward()
    assert torch.isfinite(E.grad).all()


def test_squash_of_zero_is_zero():
    assert squash(torch.zeros(2, 3)).abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype):
    E, S, b0, mask = _inputs(B=4, L=7, seed=6, dtype=torch.float32)
    out = b2i_routing(E.to(dtype), S.to(dtype), b0, mask, backend="reference")
    assert out.dtype == dtype
    want = b2i_routing(E.to(dtype).double(), S.to(dtype).double(), b0.double(), mask, backend="reference")
    tol = 1e-2 if dtype == torch.float16 else 2e-2
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    # weight may stay float32 with half behaviours
    out32 = b2i_routing(E.to(dtype), S, b0, mask, backend="reference")
    assert out32.dtype == dtype


def test_broadcast_logits_equal_expanded():
    E, S, b0, mask = _inputs(seed=7)
    b2 = b0[0]
    a = b2i_routing(E, S, b2, mask, backend="reference")
    b = b2i_routing(E, S, b2.expand(E.shape[0], -1, -1), mask, backend="reference")
    torch.testing.assert_close(a, b)


def test_integer_mask_equals_bool_mask():
    E, S, b0, mask = _inputs(seed=8)
    a = b2i_routing(E, S, b0, mask, backend="reference")
    b = b2i_routing(E, S, b0, mask.long(), backend="reference")
    torch.testing.assert_close(a, b)


def test_reference_function_directly_matches_api():
    E, S, b0, mask = _inputs(seed=9)
    torch.testing.assert_close(b2i_routing_reference(E, S, b0, mask), b2i_routing(E, S, b0, mask, backend="reference"))


def test_non_finite_padding_is_ignored_in_interests_mode_and_confined_to_its_user():
    E, S, b0, mask = _inputs(B=3, L=5, seed=10)
    clean = b2i_routing(E, S, b0, mask, backend="reference")
    E2 = E.clone()
    E2[0][~mask[0]] = float("nan")  # padding of user 0 holds NaN
    mask_all = mask.clone()
    E2[1, 0] = float("inf")  # a valid behaviour of user 1 holds Inf
    out = b2i_routing(E2, S, b0, mask_all, backend="reference")
    if (~mask[0]).any():
        torch.testing.assert_close(out[0], clean[0])
    assert not torch.isfinite(out[1]).all()
    torch.testing.assert_close(out[2], clean[2])


def test_nan_padding_leaves_gradients_finite_in_interests_mode():
    E, S, b0, mask = _inputs(B=3, L=5, seed=11)
    mask[0, -2:] = False
    E = E.clone()
    E[0, -2:] = float("nan")
    E.requires_grad_(True)
    S.requires_grad_(True)
    b2i_routing(E, S, b0, mask, backend="reference").sum().backward()
    assert torch.isfinite(S.grad).all() and torch.isfinite(E.grad).all()


@pytest.mark.parametrize("softmax_over", ["interests", "behaviors"])
def test_logit_scale_one_is_bit_identical_and_other_scales_differ(softmax_over):
    E, S, b0, mask = _inputs(B=3, L=6, seed=12, dtype=torch.float32)
    imask = torch.tensor([[True, True], [True, False], [True, True]])
    plain = b2i_routing_reference(E, S, b0, mask, imask, 3, softmax_over, True, True)
    ones = b2i_routing_reference(E, S, b0, mask, imask, 3, softmax_over, True, True, logit_scale=1.0)
    for x, y in zip(plain, ones):
        assert torch.equal(x, y)
    c20 = b2i_routing_reference(E, S, b0, mask, imask, 3, softmax_over, logit_scale=20.0)
    assert not torch.allclose(plain[0], c20)
    # One iteration never updates the logits: the scale cannot matter.
    c1 = b2i_routing_reference(E, S, b0, mask, imask, 1, softmax_over)
    assert torch.equal(c1, b2i_routing_reference(E, S, b0, mask, imask, 1, softmax_over, logit_scale=20.0))
