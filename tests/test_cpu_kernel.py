"""The fused CPU C++ kernels (csrc/routing_cpu.cpp) against the reference evaluated in float64.

Tolerances are ROUTING.md's: float32 and float64 within atol 1e-5 / rtol 1e-4 of the float64 reference;
float16 / bfloat16 no more than 2x the error of the reference run in that same dtype (plus a tiny
absolute floor for cases where the reference happens to be almost exact).
"""

from __future__ import annotations

import pytest
import torch

import mind_kernels
from mind_kernels import ops
from mind_kernels.reference import compute_dtype

pytestmark = pytest.mark.skipif(
    ops.kernel_unavailable_reason("cpu") is not None,
    reason=f"CPU routing kernel not available: {ops.kernel_unavailable_reason('cpu')}",
)

HALF_DTYPES = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The tiny absolute floor of the low-precision comparison, in float32 epsilons (times the output's
# magnitude): both backends accumulate in float32, so where the half-precision reference is (by luck)
# almost exact, float32 rounding differences must still pass.
HALF_FLOOR_F32_EPS = 16.0


def make_inputs(B, L, D_in, D_out, K, dtype, *, seed=0, mask_p=0.3, empty_users=(), per_user_logits=False,
                interest_mask=None, weight_dtype=None):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(B, L, D_in, generator=g).to(dtype)
    S = (torch.randn(D_out, D_in, generator=g) / max(1, D_in) ** 0.5).to(weight_dtype or dtype)
    shape = (B, K, L) if per_user_logits else (K, L)
    b0 = torch.randn(*shape, generator=g).to(compute_dtype(dtype))
    mask = None
    if mask_p is not None:
        mask = torch.rand(B, L, generator=g) > mask_p
        for u in empty_users:
            if u < B:
                mask[u] = False
    if interest_mask == "random":
        interest_mask = torch.rand(B, K, generator=g) > 0.3
    elif interest_mask == "dynamic":
        full = mask if mask is not None else torch.ones(B, L, dtype=torch.bool)
        interest_mask = mind_kernels.dynamic_interest_mask(full, K)
    return E, S, b0, mask, interest_mask


def run(E, S, b0, mask, imask, r, axis, backend, grad_out, logit_scale=1.0):
    """(capsules, coupling, dE, dS) for one backend, with the loss sum(capsules * grad_out)."""
    E = E.detach().clone().requires_grad_(True)
    S = S.detach().clone().requires_grad_(True)
    c, w = mind_kernels.b2i_routing(
        E, S, b0, mask, imask, num_iters=r, softmax_over=axis, logit_scale=logit_scale, return_weights=True,
        backend=backend,
    )
    if c.numel():
        (c.to(grad_out.dtype) * grad_out).sum().backward()
        dE, dS = E.grad, S.grad
    else:
        dE, dS = torch.zeros_like(E), torch.zeros_like(S)
    return c, w, dE, dS


def compare_with_reference(E, S, b0, mask, imask, r, axis, logit_scale=1.0):
    """Run cpp in E's dtype, the reference in float64 (and in E's dtype for half), and check tolerances."""
    dtype = E.dtype
    B, _, _ = E.shape
    K, D_out = b0.shape[-2], S.shape[0]
    grad_out = torch.randn(B, K, D_out, generator=torch.Generator().manual_seed(123), dtype=torch.float64)

    got = run(E, S, b0, mask, imask, r, axis, "cpp", grad_out.to(compute_dtype(dtype)), logit_scale)
    want = run(E.double(), S.double(), b0.double(), mask, imask, r, axis, "reference", grad_out, logit_scale)

    c, w, dE, dS = got
    assert c.dtype == dtype and c.shape == (B, K, D_out)
    assert w.dtype == compute_dtype(dtype) and w.shape == (B, K, E.shape[1])
    assert dE.dtype == dtype and dS.dtype == S.dtype
    for t in got:
        assert torch.isfinite(t.double()).all()

    names = ("capsules", "coupling", "dE", "dS")
    if dtype in HALF_DTYPES:
        low = run(E, S, b0, mask, imask, r, axis, "reference", grad_out.float(), logit_scale)
        # The logit update multiplies the float32 rounding of either side by the logit scale s.
        floor = HALF_FLOOR_F32_EPS * torch.finfo(torch.float32).eps * max(1.0, logit_scale)
        for name, g_, w_, l_ in zip(names, got, want, low):
            err = (g_.double() - w_).abs().max().item() if g_.numel() else 0.0
            ref_err = (l_.double() - w_).abs().max().item() if l_.numel() else 0.0
            scale = max(1.0, w_.abs().max().item()) if w_.numel() else 1.0
            assert err <= 2 * ref_err + floor * scale, f"{name}: cpp error {err:.3g} vs reference-{dtype} error {ref_err:.3g}"
    else:
        for name, g_, w_ in zip(names, got, want):
            torch.testing.assert_close(g_.double(), w_, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("axis", ["interests", "behaviors"])
@pytest.mark.parametrize(
    "B,L,D_in,D_out,K",
    [
        (4, 50, 16, 16, 4),
        (3, 1, 5, 5, 2),  # L = 1
        (3, 7, 1, 1, 3),  # D = 1
        (2, 6, 4, 4, 1),  # K = 1
        (5, 37, 3, 3, 3),  # D = 3, L = 37
        (4, 11, 9, 6, 5),  # D_out != D_in, K > 4 tail
        (1, 20, 13, 17, 4),  # B = 1
        (3, 10, 12, 5, 3),  # D_in >= 2 D_out: every iteration through S, not through Q = S^T S
        (2, 50, 64, 64, 4),  # the paper's sizes
    ],
)
def test_matches_reference(B, L, D_in, D_out, K, axis, dtype):
    E, S, b0, mask, imask = make_inputs(B, L, D_in, D_out, K, dtype, seed=B * 100 + L, empty_users=(1,))
    compare_with_reference(E, S, b0, mask, imask, 3, axis)


@pytest.mark.parametrize("r", [1, 2, 3, 5])
@pytest.mark.parametrize("axis", ["interests", "behaviors"])
@pytest.mark.parametrize("imask", [None, "random", "dynamic"])
def test_iterations_and_interest_masks(r, axis, imask):
    E, S, b0, mask, im = make_inputs(6, 23, 12, 10, 4, torch.float32, seed=r, empty_users=(0,), interest_mask=imask)
    if im is not None and imask == "random":
        im[2] = False  # a user with every interest inactive
    compare_with_reference(E, S, b0, mask, im, r, axis)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("axis", ["interests", "behaviors"])
@pytest.mark.parametrize("logit_scale", [0.5, 20.0])
@pytest.mark.parametrize(
    "B,L,D_in,D_out,K",
    [
        (5, 23, 12, 10, 4),  # iterations t < r through Q = S^T S
        (4, 17, 12, 5, 5),  # D_in >= 2 D_out: through S
    ],
)
def test_logit_scale_matches_reference(B, L, D_in, D_out, K, logit_scale, axis, dtype):
    E, S, b0, mask, imask = make_inputs(B, L, D_in, D_out, K, dtype, seed=L, empty_users=(0,), interest_mask="random")
    imask[1] = False  # a user with every interest inactive
    compare_with_reference(E, S, b0, mask, imask, 3, axis, logit_scale)


@pytest.mark.parametrize("axis", ["interests", "behaviors"])
def test_logit_scale_through_s_switch_and_one_is_bit_identical(axis, monkeypatch):
    E, S, b0, mask, imask = make_inputs(4, 20, 16, 16, 4, torch.float32, seed=9, interest_mask="random")
    for through_s in ("0", "1"):
        monkeypatch.setenv("MIND_KERNELS_ROUTE_THROUGH_S", through_s)
        compare_with_reference(E, S, b0, mask, imask, 3, axis, 20.0)
        plain = mind_kernels.b2i_routing(E, S, b0, mask, imask, softmax_over=axis, return_weights=True, backend="cpp")
        ones = mind_kernels.b2i_routing(E, S, b0, mask, imask, softmax_over=axis, logit_scale=1.0,
                                        return_weights=True, backend="cpp")
        for x, y in zip(plain, ones):
            assert torch.equal(x, y)
        op = torch.ops.mind_kernels.routing_forward
        for x, y in zip(op(E, S, b0, mask, imask, 3, axis == "behaviors"),
                        op(E, S, b0, mask, imask, 3, axis == "behaviors", 1.0)):
            assert torch.equal(x, y)
        scaled = mind_kernels.b2i_routing(E, S, b0, mask, imask, softmax_over=axis, logit_scale=20.0, backend="cpp")
        assert not torch.allclose(scaled, plain[0])


def test_cpp_refuses_a_bad_logit_scale():
    E, S, b0, _, _ = make_inputs(2, 5, 4, 4, 2, torch.float32)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="logit_scale"):
            torch.ops.mind_kernels.routing_forward(E, S, b0, None, None, 3, False, bad)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_float32_weight_with_half_behaviors(dtype):
    E, S, b0, mask, _ = make_inputs(5, 19, 8, 12, 3, dtype, weight_dtype=torch.float32)
    assert S.dtype == torch.float32
    compare_with_reference(E, S, b0, mask, None, 3, "interests")


@pytest.mark.parametrize("axis", ["interests", "behaviors"])
def test_per_user_initial_logits_and_no_mask(axis):
    E, S, b0, _, _ = make_inputs(4, 15, 8, 8, 3, torch.float32, per_user_logits=True, mask_p=None)
    assert b0.shape == (4, 3, 15)
    compare_with_reference(E, S, b0, None, None, 3, axis)


def test_empty_users_and_inactive_interests_give_zeros():
    E, S, b0, mask, _ = make_inputs(3, 9, 6, 6, 3, torch.float32)
    mask[0] = False
    imask = torch.ones(3, 3, dtype=torch.bool)
    imask[1] = False
    imask[2, 1] = False
    for axis in ("interests", "behaviors"):
        c, w = mind_kernels.b2i_routing(E, S, b0, mask, imask, softmax_over=axis, return_weights=True, backend="cpp")
        assert torch.isfinite(c).all() and torch.isfinite(w).all()
        assert (c[0] == 0).all() and (w[0] == 0).all()
        assert (c[1] == 0).all() and (w[1] == 0).all()
        assert (c[2, 1] == 0).all() and (w[2, 1] == 0).all()
        assert c[2, 0].abs().sum() > 0


def test_a_user_gets_the_same_bits_alone_or_in_a_batch():
    """Per-user results depend on the user's inputs and the shapes only (not B, threads or the path's
    cost model): what online serving (B = 1) returns is what a training batch computes."""
    E, S, b0, mask, imask = make_inputs(9, 23, 16, 16, 4, torch.float32, per_user_logits=True, interest_mask="random")
    for axis in ("interests", "behaviors"):
        batch = mind_kernels.b2i_routing(E, S, b0, mask, imask, softmax_over=axis, backend="cpp")
        for u in range(E.shape[0]):
            alone = mind_kernels.b2i_routing(
                E[u : u + 1], S, b0[u : u + 1], mask[u : u + 1], imask[u : u + 1], softmax_over=axis, backend="cpp"
            )
            assert torch.equal(alone[0], batch[u]), (axis, u)


def test_results_do_not_depend_on_the_previous_weight():
    """The forward caches Q = S^T S per thread, keyed by the contents and shape of S: a different S in
    between, an in-place change of S, or the same bytes under another shape must all be seen."""
    E, S, b0, mask, _ = make_inputs(4, 12, 8, 6, 3, torch.float32)

    def route(E_, S_):
        return mind_kernels.b2i_routing(E_, S_, b0, mask, num_iters=3, backend="cpp")

    first = route(E, S)
    route(E, torch.randn_like(S))  # evicts S
    assert torch.equal(route(E, S), first)
    assert torch.equal(route(E, S), first)  # served from the cache: the same bits

    S2 = S.clone()
    assert torch.equal(route(E, S2), first)  # S2's contents are cached now ...
    S2[2, 5] += 0.5  # ... and change in place: same storage, same address
    changed = route(E, S2)
    assert not torch.equal(changed, first)
    want = mind_kernels.b2i_routing(E.double(), S2.double(), b0.double(), mask, num_iters=3, backend="reference")
    torch.testing.assert_close(changed.double(), want, atol=1e-5, rtol=1e-4)

    S_t = S.reshape(8, 6)  # the same bytes as (D_out, D_in) = (8, 6)
    E_t = E[..., :6].contiguous()
    got = route(E_t, S_t)
    want = mind_kernels.b2i_routing(E_t.double(), S_t.double(), b0.double(), mask, num_iters=3, backend="reference")
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


def test_concurrent_calls_with_different_weights():
    """The per-thread cache of S's forms (S^T, Q) under calls from several Python threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    E, _, b0, mask, imask = make_inputs(6, 20, 16, 16, 4, torch.float32)
    weights = [torch.randn(16, 16, generator=torch.Generator().manual_seed(k)) / 4 for k in range(4)]

    def route(S):
        return mind_kernels.b2i_routing(E, S, b0, mask, imask, num_iters=3, backend="cpp")

    want = [route(S) for S in weights]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(route, [weights[i % 4] for i in range(64)]))
    for i, c in enumerate(got):
        assert torch.equal(c, want[i % 4]), i


def test_route_through_s_switch(monkeypatch):
    """MIND_KERNELS_ROUTE_THROUGH_S=1 keeps every iteration on S: same answer within tolerance, other bits."""
    E, S, b0, mask, imask = make_inputs(3, 20, 16, 16, 4, torch.float32)
    through_q = mind_kernels.b2i_routing(E, S, b0, mask, imask, num_iters=3, backend="cpp")
    monkeypatch.setenv("MIND_KERNELS_ROUTE_THROUGH_S", "1")
    through_s = mind_kernels.b2i_routing(E, S, b0, mask, imask, num_iters=3, backend="cpp")
    want = mind_kernels.b2i_routing(E.double(), S.double(), b0.double(), mask, imask, num_iters=3, backend="reference")
    for got in (through_q, through_s):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    assert not torch.equal(through_q, through_s)  # the switch did change the path


def test_batch_zero():
    E = torch.randn(0, 5, 4)
    S = torch.randn(3, 4)
    b0 = torch.randn(2, 5)
    c, w, z = torch.ops.mind_kernels.routing_forward(E, S, b0, None, None, 3, False)
    assert c.shape == (0, 2, 3) and w.shape == (0, 2, 5) and z.shape == (0, 2, 3)
    dE, dS = torch.ops.mind_kernels.routing_backward(torch.zeros(0, 2, 3), E, S, w, z)
    assert dE.shape == (0, 5, 4) and dS.shape == (3, 4) and (dS == 0).all()
    assert mind_kernels.b2i_routing(E, S, b0, backend="cpp").shape == (0, 2, 3)


def test_hypothesis_random_shapes():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=30, deadline=None, derandomize=True)
    @hypothesis.given(
        B=st.integers(1, 5), L=st.integers(1, 20), D_in=st.integers(1, 20), D_out=st.integers(1, 20),
        K=st.integers(1, 6), r=st.integers(1, 4), axis=st.sampled_from(["interests", "behaviors"]),
        mask_p=st.sampled_from([None, 0.0, 0.5, 0.9]), imask=st.sampled_from([None, "random", "dynamic"]),
        per_user=st.booleans(), seed=st.integers(0, 2**16),
    )
    def check(B, L, D_in, D_out, K, r, axis, mask_p, imask, per_user, seed):
        E, S, b0, mask, im = make_inputs(B, L, D_in, D_out, K, torch.float32, seed=seed, mask_p=mask_p,
                                         per_user_logits=per_user, interest_mask=imask)
        compare_with_reference(E, S, b0, mask, im, r, axis)

    check()


# ---------------------------------------------------------------------------------------------- layout


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(7)
    E = torch.randn(6, 12, 2 * 9, generator=g)[::2, :, ::2]  # (3, 12, 9), strided slice
    S = torch.randn(9, 7, generator=g).t()  # (7, 9), transposed view
    b0 = torch.randn(12, 3, generator=g).t()  # (3, 12), transposed view
    mask = (torch.rand(12, 6, generator=g) > 0.3).t()[::2]  # (3, 12)
    imask = (torch.rand(3, 6, generator=g) > 0.2).t()[::2]  # (3, 3)
    assert not E.is_contiguous() and not S.is_contiguous() and not b0.is_contiguous() and not mask.is_contiguous()
    compare_with_reference(E, S, b0, mask, imask, 3, "interests")
    compare_with_reference(E, S, b0, mask, imask, 3, "behaviors")


def test_stride_zero_gradient_from_sum():
    E, S, b0, mask, _ = make_inputs(4, 10, 6, 5, 3, torch.float32)
    Ec, Sc = E.clone().requires_grad_(), S.clone().requires_grad_()
    mind_kernels.b2i_routing(Ec, Sc, b0, mask, backend="cpp").sum().backward()
    Er, Sr = E.double().requires_grad_(), S.double().requires_grad_()
    mind_kernels.b2i_routing(Er, Sr, b0.double(), mask, backend="reference").sum().backward()
    torch.testing.assert_close(Ec.grad.double(), Er.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(Sc.grad.double(), Sr.grad, atol=1e-5, rtol=1e-4)


def test_dispatch_auto_uses_cpp_on_cpu():
    E, S, b0, mask, _ = make_inputs(2, 5, 4, 4, 2, torch.float32)
    assert mind_kernels.backends(E, S, b0, mask).selected == "cpp"


# ---------------------------------------------------------------------------------------------- determinism


def test_weight_gradient_is_bit_identical_across_runs():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # B large enough for several fixed chunks of users (a chunk carries ~8 MFLOP of work).
        E, S, b0, mask, _ = make_inputs(2000, 20, 16, 16, 4, torch.float32, seed=3)
        c, w, z = torch.ops.mind_kernels.routing_forward(E, S, b0, mask, None, 3, False)
        G = torch.randn_like(c)
        results = [torch.ops.mind_kernels.routing_backward(G, E, S, w, z) for _ in range(3)]
        torch.set_num_threads(1)
        results.append(torch.ops.mind_kernels.routing_backward(G, E, S, w, z))
    finally:
        torch.set_num_threads(old)
    for dE, dS in results[1:]:
        assert torch.equal(dS, results[0][1]), "dS differs between runs / thread counts"
        assert torch.equal(dE, results[0][0])


# ---------------------------------------------------------------------------------------------- torch.library


def _sample_args(dtype, per_user=False, with_masks=True):
    E, S, b0, mask, imask = make_inputs(3, 7, 5, 4, 3, dtype, per_user_logits=per_user, interest_mask="random")
    if not with_masks:
        mask, imask = None, None
    return E, S, b0, mask, imask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("per_user,with_masks,over", [(False, True, False), (True, False, True), (True, True, True)])
def test_opcheck_forward(dtype, per_user, with_masks, over):
    E, S, b0, mask, imask = _sample_args(dtype, per_user, with_masks)
    E.requires_grad_()
    S.requires_grad_()
    torch.library.opcheck(torch.ops.mind_kernels.routing_forward.default, (E, S, b0, mask, imask, 3, over))
    torch.library.opcheck(torch.ops.mind_kernels.routing_forward.default, (E, S, b0, mask, imask, 3, over, 20.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_backward(dtype):
    E, S, b0, mask, imask = _sample_args(dtype)
    c, w, z = torch.ops.mind_kernels.routing_forward(E, S, b0, mask, imask, 2, False)
    G = torch.randn_like(c)
    torch.library.opcheck(torch.ops.mind_kernels.routing_backward.default, (G, E, S, w, z))


class _Routing(torch.nn.Module):
    def __init__(self, S, b0, direct):
        super().__init__()
        self.weight = torch.nn.Parameter(S.clone())
        self.register_buffer("b0", b0)
        self.direct = direct

    def forward(self, E, mask):
        if self.direct:
            return torch.ops.mind_kernels.routing_forward(E, self.weight, self.b0, mask, None, 3, False)[0]
        # through the API with a logit scale (a float argument of the op); directly with its default
        return mind_kernels.b2i_routing(E, self.weight, self.b0, mask, logit_scale=20.0, backend="cpp")


@pytest.mark.parametrize(
    "direct",
    [False, True],
    ids=["b2i_routing", "torch.ops"],
)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(direct, backend):
    torch._dynamo.reset()
    E, S, b0, mask, _ = make_inputs(4, 9, 6, 5, 3, torch.float32)
    eager, compiled_src = _Routing(S, b0, direct), _Routing(S, b0, direct)
    compiled = torch.compile(compiled_src, fullgraph=True, backend=backend)
    outs, grads = [], []
    for module in (eager, compiled):
        Ei = E.clone().requires_grad_()
        out = module(Ei, mask)
        (out * torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        outs.append(out.detach())
        grads.append((Ei.grad, module.weight.grad))
    torch.testing.assert_close(outs[1], outs[0])
    torch.testing.assert_close(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][1], grads[0][1])


# ---------------------------------------------------------------------------------------------- errors


def test_cpp_checks_shapes():
    E = torch.randn(2, 5, 4)
    S = torch.randn(3, 6)  # D_in mismatch
    b0 = torch.randn(2, 5)
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.mind_kernels.routing_forward(E, S, b0, None, None, 3, False)
    with pytest.raises(RuntimeError, match="init_logits"):
        torch.ops.mind_kernels.routing_forward(E, torch.randn(3, 4), torch.randn(2, 6), None, None, 3, False)
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.mind_kernels.routing_forward(E, torch.randn(3, 4), b0, torch.ones(2, 4, dtype=torch.bool), None, 3,
                                               False)
    with pytest.raises(RuntimeError, match="preactivation"):
        torch.ops.mind_kernels.routing_backward(
            torch.randn(2, 2, 3), E, torch.randn(3, 4), torch.rand(2, 2, 5), torch.randn(2, 2, 7)
        )


# ---------------------------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_padding_is_ignored_in_interests_mode(dtype):
    """The reference's non-finite contract: in "interests" mode masked rows take no part at all."""
    E, S, b0, mask, _ = make_inputs(4, 12, 6, 5, 3, dtype, seed=11)
    mask[:, -3:] = False
    mask[2] = False  # an empty user, all padding
    E_nan = E.clone()
    E_nan[~mask] = float("nan")
    E_nan[0, -1] = float("inf")
    compare_with_reference(E, S, b0, mask, None, 3, "interests")  # finite padding: the reference's answer
    grad_out = torch.randn(4, 3, 5, dtype=compute_dtype(dtype))
    got = run(E_nan, S, b0, mask, None, 3, "interests", "cpp", grad_out)
    want = run(E, S, b0, mask, None, 3, "interests", "cpp", grad_out)
    for g_, w_ in zip(got, want):
        assert torch.isfinite(g_.double()).all()
        assert torch.equal(g_, w_)


@pytest.mark.parametrize("softmax_over", ["interests", "behaviors"])
def test_all_minus_inf_logits_give_zero_weights_like_the_reference(softmax_over):
    E, S, b0, mask, _ = make_inputs(3, 6, 5, 4, 3, torch.float32, per_user_logits=True)
    assert b0.shape == (3, 3, 6)
    b0 = b0.clone()
    b0[1] = float("-inf")  # user 1: every logit -inf, nothing to normalise over
    got = mind_kernels.b2i_routing(E, S, b0, mask, num_iters=1, softmax_over=softmax_over,
                                   return_weights=True, backend="cpp")
    want = mind_kernels.b2i_routing(E, S, b0, mask, num_iters=1, softmax_over=softmax_over,
                                    return_weights=True, backend="reference")
    for g, w in zip(got, want):
        assert torch.isfinite(w).all()
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
