"""The Triton routing backend against the reference (ROUTING.md tolerances).

Three groups:

* Interpreter tests (CPU, ``TRITON_INTERPRET=1``): the interpreter only takes
  effect when the variable is set before triton is first imported, and other
  test files (or torch itself) may import triton earlier in this process.  So
  when this file is collected without the variable, ``test_interpreter_suite``
  re-runs this very file in a fresh ``python -m pytest`` with the variable set
  and asserts that it passed; inside that child the interpreter tests run.
* GPU tests (``@pytest.mark.gpu``, skipped without CUDA or under the
  interpreter): larger shapes, bf16, ``torch.compile(fullgraph=True)`` and
  ``torch.library.opcheck`` (both fail under the interpreter, ARCHITECTURE.md).
* Dispatcher hooks (pure Python, always): ``shape_refusals`` and ``unavailable_reason``.

Comparisons: outputs (capsules, coupling w) and gradients (dE, dS) against the
reference evaluated in float64 on the same (rounded) inputs.  float32: atol
1e-5, rtol 1e-4.  float16 / bfloat16: max error at most 2x the max error of the
reference run in that dtype (plus 1e-6 so two exact answers do not fail; times the
logit scale s, which multiplies the float32 rounding of either side).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from mind_kernels import b2i_routing, dynamic_interest_mask
from routing_checks import run_op
from mind_kernels.dispatch import RoutingCall
from mind_kernels.reference import b2i_routing_reference
from mind_kernels.triton import routing as triton_routing

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None

interp = pytest.mark.skipif(not INTERPRETING, reason="interpreter test: runs in the TRITON_INTERPRET=1 child process")
needs_gpu = pytest.mark.skipif(
    INTERPRETING or not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA and triton (not the interpreter)"
)


# ----------------------------------------------------------------- helpers


def make_case(B, L, D_in, D_out, K, dtype, device="cpu", weight_dtype=None, batched_logits=True, seed=0):
    """Inputs with an empty user (0), a user with every interest inactive (1, when B > 2) and random masks."""
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(B, L, D_in, generator=g).to(dtype)
    S = (torch.randn(D_out, D_in, generator=g) / D_in**0.5).to(weight_dtype or dtype)
    b0 = torch.randn(B, K, L, generator=g) if batched_logits else torch.randn(K, L, generator=g)
    mask = torch.rand(B, L, generator=g) > 0.3
    mask[:, -1] = True  # most users keep a behaviour ...
    if B > 1:
        mask[0] = False  # ... but user 0 has none
    interest_mask = dynamic_interest_mask(mask, K) | (torch.rand(B, K, generator=g) > 0.5)
    if B > 2:
        interest_mask[1] = False
    G = torch.randn(B, K, D_out, generator=g).to(dtype)
    return [t.to(device) for t in (E, S, b0, mask, interest_mask, G)]


def reference_fn(E, S, b0, mask, interest_mask, r, over, logit_scale=1.0):
    return b2i_routing_reference(E, S, b0, mask, interest_mask, r, over, True, True, logit_scale=logit_scale)


def check_against_reference(E, S, b0, mask, interest_mask, G, r, over, logit_scale=1.0):
    """Run the Triton op and the reference (in float64 and in E's dtype); assert ROUTING.md's tolerances."""
    kw = dict(logit_scale=logit_scale)
    got = run_op(triton_routing.routing_triton, E, S, b0, mask, interest_mask, G, r, over, **kw)
    oracle = run_op(reference_fn, E.double(), S.double(), b0.double(), mask, interest_mask, G.double(), r, over,
                    **kw)
    names = ("capsules", "coupling", "dE", "dS")
    for name, x, ref in zip(names, got, oracle):
        assert torch.isfinite(x).all(), f"{name} has non-finite values"
        assert x.shape == ref.shape, name
    assert got[0].dtype == E.dtype and got[1].dtype == torch.float32
    assert got[2].dtype == E.dtype and got[3].dtype == S.dtype
    if E.dtype == torch.float32:
        for name, x, ref in zip(names, got, oracle):
            torch.testing.assert_close(x.double(), ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    else:
        same_dtype = run_op(reference_fn, E, S, b0, mask, interest_mask, G, r, over, **kw)
        floor = 1e-6 * max(1.0, logit_scale)
        for name, x, own, ref in zip(names, got, same_dtype, oracle):
            err = (x.double() - ref).abs().max().item()
            ref_err = (own.double() - ref).abs().max().item()
            assert err <= 2 * ref_err + floor, f"{name}: error {err:.3g} > 2 x reference's {E.dtype} error {ref_err:.3g}"
    return got


# ------------------------------------------------------- interpreter: CPU


@pytest.mark.skipif(INTERPRETING, reason="this is the parent; the child runs the interpreter tests")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-x", "-m", "not gpu", "-p", "no:cacheprovider"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, "interpreter suite failed:\n" + out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed is not None and int(passed.group(1)) >= 22, "interpreter suite ran too few tests:\n" + out[-3000:]


@interp
def test_interpreter_backend_available():
    assert triton_routing.unavailable_reason("cpu") is None
    assert "interpreter" in triton_routing.unavailable_reason("cuda")


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("r", [1, 3])
@pytest.mark.parametrize("over", ["interests", "behaviors"])
def test_odd_shapes_match_reference(over, r, dtype):
    # B=7 with 3 interpreter programs: several users per program and several dS partials.
    E, S, b0, mask, im, G = make_case(7, 5, 3, 6, 3, dtype, seed=r)
    c, w, dE, dS = check_against_reference(E, S, b0, mask, im, G, r, over)
    # The empty user (0) and the all-inactive user (1): zero capsules, zero weights, zero dE.
    assert (c[:2] == 0).all() and (w[:2] == 0).all() and (dE[:2] == 0).all()
    # Masked positions and inactive interests get zero weight; masked rows of dE are zero.
    assert (w.masked_select(~mask[:, None, :].expand_as(w)) == 0).all()
    assert (w.masked_select(~im[:, :, None].expand_as(w)) == 0).all()
    assert (dE[~mask] == 0).all()


@interp
@pytest.mark.parametrize("over", ["interests", "behaviors"])
def test_no_masks_broadcast_logits(over):
    E, S, b0, _, _, G = make_case(4, 6, 4, 5, 2, torch.float32, batched_logits=False, seed=3)
    c, w, _, _ = check_against_reference(E, S, b0, None, None, G, 3, over)
    if over == "interests":  # every position's weights sum to 1 over the K interests
        torch.testing.assert_close(w.sum(1), torch.ones(4, 6))


@interp
@pytest.mark.parametrize("shape", [(3, 1, 1, 1, 1), (2, 17, 8, 16, 4), (5, 9, 7, 2, 5), (2, 6, 20, 12, 3)])
def test_more_shapes(shape):
    B, L, D_in, D_out, K = shape
    E, S, b0, mask, im, G = make_case(B, L, D_in, D_out, K, torch.float32, seed=B + L)
    check_against_reference(E, S, b0, mask, im, G, 2, "interests")
    check_against_reference(E, S, b0, mask, im, G, 3, "behaviors")


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("over", ["interests", "behaviors"])
def test_paper_shape(over, dtype):
    """The tiles the GPU goal runs (L=50 -> 64, D=64, K=4, r=3) through Q = S^T S, in the interpreter.

    Not bfloat16 here: the interpreter rounds float32 -> bfloat16 toward zero whatever
    ``fp_downcast_rounding`` says (the compiled kernel rounds to nearest even), which doubles the
    output's rounding error; the GPU tests cover bfloat16.
    """
    E, S, b0, mask, im, G = make_case(4, 50, 64, 64, 4, dtype, seed=50)
    assert triton_routing.uses_gram(64, 64, 3)
    check_against_reference(E, S, b0, mask, im, G, 3, over)


@interp
def test_route_through_s_switch(monkeypatch):
    E, S, b0, mask, im, G = make_case(3, 9, 8, 8, 3, torch.float32, seed=7)
    through_q = check_against_reference(E, S, b0, mask, im, G, 3, "interests")
    monkeypatch.setenv(triton_routing.ROUTE_THROUGH_S_ENV, "1")
    assert not triton_routing.uses_gram(8, 8, 3)
    through_s = check_against_reference(E, S, b0, mask, im, G, 3, "interests")
    assert not torch.equal(through_q[0], through_s[0])  # the switch did change the path


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("logit_scale", [0.5, 20.0])
@pytest.mark.parametrize("over", ["interests", "behaviors"])
@pytest.mark.parametrize("shape", [(7, 5, 3, 6, 3), (5, 9, 7, 2, 5)], ids=["through_Q", "through_S"])
def test_logit_scale_matches_reference(shape, over, logit_scale, dtype):
    B, L, D_in, D_out, K = shape
    E, S, b0, mask, im, G = make_case(B, L, D_in, D_out, K, dtype, seed=L)
    check_against_reference(E, S, b0, mask, im, G, 3, over, logit_scale=logit_scale)


@interp
@pytest.mark.parametrize("over", ["interests", "behaviors"])
def test_logit_scale_one_is_bit_identical(over):
    E, S, b0, mask, im, G = make_case(5, 6, 4, 5, 3, torch.float32, seed=13)
    plain = run_op(triton_routing.routing_triton, E, S, b0, mask, im, G, 3, over)
    ones = run_op(triton_routing.routing_triton, E, S, b0, mask, im, G, 3, over, logit_scale=1.0)
    api = b2i_routing(E, S, b0, mask, im, 3, over, logit_scale=1.0, return_weights=True, backend="triton")
    for x, y in zip(plain, ones):
        assert torch.equal(x, y)
    assert torch.equal(api[0], plain[0]) and torch.equal(api[1], plain[1])
    scaled = triton_routing.routing_triton(E, S, b0, mask, im, 3, over, 20.0)[0]
    assert not torch.allclose(scaled, plain[0])


@interp
def test_half_behaviors_float32_weight():
    E, S, b0, mask, im, G = make_case(5, 5, 3, 6, 3, torch.float16, weight_dtype=torch.float32, seed=11)
    check_against_reference(E, S, b0, mask, im, G, 3, "interests")


@interp
def test_integer_mask_and_public_api():
    E, S, b0, mask, im, _ = make_case(4, 5, 3, 6, 3, torch.float32, seed=5)
    c, w = b2i_routing(E, S, b0, mask.to(torch.int64), im, 3, return_weights=True, backend="triton")
    c_ref, w_ref = b2i_routing_reference(E.double(), S.double(), b0.double(), mask, im, 3, return_weights=True)
    torch.testing.assert_close(c.double(), c_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.double(), w_ref, atol=1e-5, rtol=1e-4)


@interp
def test_stride_zero_gradient_and_determinism():
    # y.sum().backward() hands the op an expanded (stride-0) gradient.
    E, S, b0, mask, im, _ = make_case(7, 5, 3, 6, 3, torch.float32, seed=9)
    grads = []
    for _ in range(2):
        Eg, Sg = E.clone().requires_grad_(), S.clone().requires_grad_()
        triton_routing.routing_triton(Eg, Sg, b0, mask, im, 3, "interests")[0].sum().backward()
        grads.append((Eg.grad, Sg.grad))
    Er, Sr = E.double().requires_grad_(), S.double().requires_grad_()
    b2i_routing_reference(Er, Sr, b0.double(), mask, im, 3).sum().backward()
    torch.testing.assert_close(grads[0][0].double(), Er.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[0][1].double(), Sr.grad, atol=1e-5, rtol=1e-4)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])  # bitwise


@interp
def test_only_behaviors_need_grad():
    E, S, b0, mask, im, G = make_case(3, 5, 3, 6, 3, torch.float32, seed=2)
    Eg = E.clone().requires_grad_()
    c, _ = triton_routing.routing_triton(Eg, S, b0, mask, im, 3, "interests")
    c.backward(G)
    Er = E.double().requires_grad_()
    b2i_routing_reference(Er, S.double(), b0.double(), mask, im, 3).backward(G.double())
    torch.testing.assert_close(Eg.grad.double(), Er.grad, atol=1e-5, rtol=1e-4)


@interp
@pytest.mark.parametrize("over", ["interests", "behaviors"])
def test_non_finite_padding(over):
    # Reference contract: in "interests" mode masked positions are ignored whatever they hold; in
    # "behaviors" mode padding sits in the softmax denominator, so NaN reaches that user (only).
    E, S, b0, mask, im, G = make_case(5, 6, 3, 4, 2, torch.float32, seed=12)
    im[:] = True
    mask[3] = torch.tensor([True, True, False, True, False, True])
    E[3, 2] = float("nan")
    E[3, 4] = float("inf")
    c, w = triton_routing.routing_triton(E, S, b0, mask, im, 3, over)
    c_ref = b2i_routing_reference(E.double(), S.double(), b0.double(), mask, im, 3, over)
    others = torch.tensor([0, 1, 2, 4])
    torch.testing.assert_close(c[others].double(), c_ref[others], atol=1e-5, rtol=1e-4)
    if over == "interests":
        # Ignored means: the same outputs and gradients as with zero padding.  (Compared with zeroed
        # padding because the reference's own dS is NaN here: autograd's matmul backward forms 0 * NaN.)
        got = run_op(triton_routing.routing_triton, E, S, b0, mask, im, G, 3, over)
        clean = torch.where(mask[:, :, None], E, torch.zeros_like(E)).double()
        want = run_op(reference_fn, clean, S.double(), b0.double(), mask, im, G.double(), 3, over)
        for name, x, ref in zip(("capsules", "coupling", "dE", "dS"), got, want):
            torch.testing.assert_close(x.double(), ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    else:
        assert not torch.isfinite(c[3]).all() and not torch.isfinite(c_ref[3]).all()


# ------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("over", ["interests", "behaviors"])
@pytest.mark.parametrize("shape", [(256, 50, 64, 64, 4), (37, 21, 24, 40, 3), (16, 128, 64, 32, 8)])
def test_gpu_matches_reference(shape, over, dtype):
    B, L, D_in, D_out, K = shape
    assert triton_routing.unavailable_reason("cuda") is None
    E, S, b0, mask, im, G = make_case(B, L, D_in, D_out, K, dtype, device="cuda", seed=B)
    check_against_reference(E, S, b0, mask, im, G, 3, over)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("over", ["interests", "behaviors"])
@pytest.mark.parametrize("shape", [(256, 50, 64, 64, 4), (37, 21, 24, 8, 3)], ids=["through_Q", "through_S"])
def test_gpu_logit_scale_matches_reference(shape, over, dtype):
    E, S, b0, mask, im, G = make_case(*shape, dtype, device="cuda", seed=7)
    check_against_reference(E, S, b0, mask, im, G, 3, over, logit_scale=20.0)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("r", [1, 2])
def test_gpu_small_iters_no_masks(r):
    E, S, b0, _, _, G = make_case(300, 7, 5, 3, 2, torch.float32, device="cuda", batched_logits=False, seed=r)
    check_against_reference(E, S, b0, None, None, G, r, "interests")


@pytest.mark.gpu
@needs_gpu
def test_gpu_public_api_auto_serves():
    E, S, b0, mask, im, _ = make_case(64, 50, 64, 64, 4, torch.float32, device="cuda")
    c = b2i_routing(E, S, b0, mask, im, 3, backend="triton")
    torch.testing.assert_close(c.double(), b2i_routing_reference(E.double(), S.double(), b0.double(), mask, im, 3),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@needs_gpu
def test_gpu_torch_compile_fullgraph():
    E, S, b0, mask, im, G = make_case(64, 50, 64, 64, 4, torch.float32, device="cuda", seed=4)
    triton_routing._ops()  # register before tracing

    def f(E, S):
        return triton_routing.routing_triton(E, S, b0, mask, im, 3, "interests")[0]

    compiled = torch.compile(f, fullgraph=True)
    Ec, Sc = E.clone().requires_grad_(), S.clone().requires_grad_()
    out = compiled(Ec, Sc)
    out.backward(G)
    Ee, Se = E.clone().requires_grad_(), S.clone().requires_grad_()
    ref = f(Ee, Se)
    ref.backward(G)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(Ec.grad, Ee.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(Sc.grad, Se.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@needs_gpu
def test_gpu_opcheck():
    fwd, bwd = triton_routing._ops()
    E, S, b0, mask, im, G = make_case(8, 9, 16, 8, 3, torch.float32, device="cuda", seed=6)
    E.requires_grad_()
    S.requires_grad_()
    torch.library.opcheck(fwd, (E, S, b0, mask, im, 3, False))
    torch.library.opcheck(fwd, (E, S, b0[0], None, None, 2, True))
    torch.library.opcheck(fwd, (E, S, b0, mask, im, 3, True, 20.0))
    _, w, z = fwd(E.detach(), S.detach(), b0, mask, im, 3, False)
    torch.library.opcheck(bwd, (G, E.detach(), S.detach(), w, z))


# ------------------------------------------------- dispatcher hooks (any machine)


def _call(dtype=torch.float32, L=50, K=4, D_in=64, D_out=64):
    return RoutingCall("cuda", dtype, dtype, True, "interests", 8, L, K, D_in, D_out)


def test_shape_refusals_accept_the_paper_shape():
    assert triton_routing.shape_refusals(_call()) == []
    assert triton_routing.shape_refusals(_call(torch.bfloat16, L=5, K=3, D_in=3, D_out=6)) == []


def test_shape_refusals_name_the_limit():
    reasons = triton_routing.shape_refusals(_call(L=512, K=16, D_in=256, D_out=256))
    assert reasons and any(str(triton_routing.MAX_TILE_ELEMENTS) in r for r in reasons)
    assert any("float64" in r for r in triton_routing.shape_refusals(_call(torch.float64)))


@pytest.mark.skipif(INTERPRETING, reason="checks the non-interpreter answer")
def test_unavailable_reason_outside_interpreter():
    why = triton_routing.unavailable_reason("cpu")
    assert why is not None and ("TRITON_INTERPRET" in why or "not installed" in why)
    if not torch.cuda.is_available():
        assert triton_routing.unavailable_reason("cuda") is not None
    assert triton_routing.unavailable_reason("mps") is not None


@pytest.mark.skipif(INTERPRETING or not HAS_TRITON, reason="needs triton's compiler (not the interpreter)")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("over", [False, True], ids=["interests", "behaviors"])
def test_kernels_compile_for_sm90_without_a_gpu(dtype, over):
    """The interpreter does not type-check like the compiler: compile every kernel to a Hopper cubin here."""
    from triton.runtime.jit import JITFunction

    from mind_kernels.triton import kernels

    if not isinstance(kernels.routing_fwd_kernel, JITFunction):
        pytest.skip("triton was imported under the interpreter in this process")
    compiled = triton_routing.compile_for_sm90(dtype, over_behaviors=over)
    assert len(compiled) == 6  # forward through Q, through S and jagged; backward padded and jagged; Gram
    for label, kernel, _ in compiled:
        assert kernel.asm.get("cubin"), f"{label}: no cubin"
        name = label.split()[0]
        assert ".entry " + name in kernel.asm["ptx"], label