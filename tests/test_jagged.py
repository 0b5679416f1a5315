"""The jagged form of the routing op (ROUTING.md, "Jagged batches"): values (N, D_in) + offsets (B + 1,).

Every backend against the float64 reference with ROUTING.md's tolerances (mind_kernels.checks), and
against the padded op on the same users; gradients to values and S; gradcheck in float64; empty users,
B = 0, B = 1; nested tensors; the layer's ``forward_jagged``; bad input errors; torch.library opcheck
and torch.compile of the CPU op.

Triton (its kernels with ``JAGGED=True``) runs under its interpreter in a child process
(``TRITON_INTERPRET=1`` must be set before triton's first import; tests/test_triton.py does the same):
``test_triton_interpreter_suite`` re-runs this file's ``interp`` tests there.  The cuda backend's jagged kernels are checked in tests/test_cuda_kernel.py (on a GPU, and through
the CPU emulation of the kernels); ``via_padding`` (its fallback for an extension built without them,
and the reference's path) is checked here with the CPU padded kernel inside.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from mind_kernels import B2IRouting, b2i_routing, b2i_routing_jagged, checks, dispatch, ops
from mind_kernels.jagged import coupling_to_jagged, jagged_from_padded, pad, via_padding
from mind_kernels.reference import b2i_routing_jagged_reference

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CPP = ops.jagged_kernel_unavailable_reason("cpu") is None
needs_cpp = pytest.mark.skipif(not HAS_CPP or INTERPRETING, reason=f"jagged CPU kernel: "
                               f"{ops.jagged_kernel_unavailable_reason('cpu')} (or the interpreter child)")
interp = pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 child process")
F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16


def make_jagged(lengths, D_in, D_out, K, L_max=None, dtype=F32, per_user_b0=True, imask=None, seed=0):
    """(values, offsets, S, b0, interest_mask, G) for histories of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    n = torch.tensor(lengths, dtype=torch.int64)
    B = len(lengths)
    L_max = L_max or max(1, max(lengths, default=1))
    offsets = torch.zeros(B + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(n, 0)
    N = int(offsets[-1])
    V = torch.randn(N, D_in, generator=g).to(dtype)
    S = (torch.randn(D_out, D_in, generator=g) / D_in**0.5).to(dtype)
    b0 = torch.randn(B, K, L_max, generator=g) if per_user_b0 else torch.randn(K, L_max, generator=g)
    im = None
    if imask == "random":
        im = torch.rand(B, K, generator=g) > 0.4
        if B:
            im[torch.arange(B), torch.randint(0, K, (B,), generator=g)] = True
        if B > 2:
            im[2] = False  # a user with every interest inactive
    G = torch.randn(B, K, D_out, generator=g).to(dtype)
    return V, offsets, S, b0, im, G


def run_jagged(backend, V, offsets, S, b0, im, G, r=3, over="interests", scale=1.0):
    """(capsules, w (N, K), dvalues, dS) of one jagged call with gradient G on the capsules."""
    V = V.detach().clone().requires_grad_()
    S = S.detach().clone().requires_grad_()
    c, w = b2i_routing_jagged(V, offsets, S, b0, im, r, over, logit_scale=scale, return_weights=True,
                              backend=backend)
    if not c.requires_grad:  # B = 0: fresh zeros without a graph
        return c.detach(), w, torch.zeros_like(V), torch.zeros_like(S)
    c.backward(G)
    return c.detach(), w.detach(), V.grad, S.grad


def check_against_reference(backend, V, offsets, S, b0, im, G, r, over, scale):
    got = run_jagged(backend, V, offsets, S, b0, im, G, r, over, scale)
    oracle = run_jagged("reference", V.double(), offsets, S.double(), b0.double(), im, G.double(), r, over, scale)
    same = None
    if V.dtype in checks.HALF_DTYPES:
        same = run_jagged("reference", V, offsets, S, b0, im, G, r, over, scale)
    checks.assert_within_tolerance(got, oracle, same, V.dtype)
    c, w, dV, dS = got
    assert c.dtype == V.dtype and dV.dtype == V.dtype and dS.dtype == S.dtype
    assert w.dtype == (F64 if V.dtype == F64 else F32) and w.shape == (V.shape[0], b0.shape[-2])
    return got


LENGTHS = {
    "random": [5, 0, 9, 1, 7, 3, 9, 2],  # an empty user, a user at L_max, odd lengths
    "B=1": [6],
    "all equal": [4, 4, 4],
    "one empty": [0],
}


# ------------------------------------------------------------------ the CPU kernel against the reference


@needs_cpp
@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=str)
@pytest.mark.parametrize("over", ["interests", "behaviors"])
@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_cpp_matches_reference(dtype, over, scale):
    V, off, S, b0, im, G = make_jagged(LENGTHS["random"], 7, 9, 3, L_max=11, dtype=dtype, imask="random")
    c, w, dV, dS = check_against_reference("cpp", V, off, S, b0, im, G, 3, over, scale)
    assert (c[1] == 0).all() and (c[2] == 0).all()  # empty user; user with no active interest
    n2 = slice(int(off[2]), int(off[3]))
    assert (w[n2] == 0).all() and (dV[n2] == 0).all()


@needs_cpp
@pytest.mark.parametrize("case", sorted(LENGTHS))
@pytest.mark.parametrize("over", ["interests", "behaviors"])
@pytest.mark.parametrize("r", [1, 3])
def test_cpp_shapes_and_iterations(case, over, r):
    # D_in < 2 D_out goes through Q = S^T S, D_in >= 2 D_out through S (csrc/routing_math.h: uses_gram).
    for D_in, D_out, K in ((3, 6, 2), (12, 5, 5), (1, 1, 1)):
        V, off, S, b0, im, G = make_jagged(LENGTHS[case], D_in, D_out, K, per_user_b0=False, seed=D_in)
        check_against_reference("cpp", V, off, S, b0, im, G, r, over, 1.0)


@needs_cpp
@pytest.mark.parametrize("over", ["interests", "behaviors"])
def test_cpp_paper_shape_random_lengths(over):
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 51, (24,), generator=g).tolist()
    V, off, S, b0, im, G = make_jagged(lengths, 64, 64, 4, L_max=50, imask="random", seed=4)
    check_against_reference("cpp", V, off, S, b0, im, G, 3, over, 1.0)


@needs_cpp
@pytest.mark.parametrize("over", ["interests", "behaviors"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_cpp_equals_the_padded_op_on_the_same_users(over, dtype):
    """Forward bits equal the padded CPU kernel's; gradients within tolerance (dS sums in another chunking)."""
    V, off, S, b0, im, G = make_jagged(LENGTHS["random"], 16, 16, 4, L_max=12, dtype=dtype, imask="random")
    c, w, dV, dS = run_jagged("cpp", V, off, S, b0, im, G, 3, over, 20.0)
    E, mask = pad(V, off, 12)
    Ep = E.detach().clone().requires_grad_()
    Sp = S.detach().clone().requires_grad_()
    cp, wp = b2i_routing(Ep, Sp, b0, mask, im, 3, over, logit_scale=20.0, return_weights=True, backend="cpp")
    cp.backward(G)
    assert torch.equal(c, cp.detach())
    assert torch.equal(w, coupling_to_jagged(wp, off, V.shape[0]))
    assert torch.equal(dV, Ep.grad[mask])
    torch.testing.assert_close(dS.float(), Sp.grad.float(), atol=1e-5, rtol=1e-4)


@needs_cpp
def test_behaviors_mode_depends_on_l_max_like_the_padded_op():
    """Padding sits in the softmax over behaviours: L_max changes the result, exactly as L does when padded."""
    V, off, S, b0, im, G = make_jagged([3, 5], 8, 8, 2, L_max=20)
    short = b2i_routing_jagged(V, off, S, b0[..., :5], softmax_over="behaviors", backend="cpp")
    long = b2i_routing_jagged(V, off, S, b0, softmax_over="behaviors", backend="cpp")
    assert not torch.allclose(short, long)
    E, mask = pad(V, off, 20)
    assert torch.equal(long, b2i_routing(E, S, b0, mask, softmax_over="behaviors", backend="cpp"))
    # "interests" mode reads only the first n_u columns: a longer b0 changes nothing.
    a = b2i_routing_jagged(V, off, S, b0[..., :5], backend="cpp")
    assert torch.equal(a, b2i_routing_jagged(V, off, S, b0, backend="cpp"))


@needs_cpp
def test_batch_zero_one_and_all_empty():
    V, off, S, b0, _, _ = make_jagged([], 4, 5, 3, L_max=6)
    assert V.shape == (0, 4) and off.tolist() == [0]
    for backend in ("cpp", "reference"):
        c, w = b2i_routing_jagged(V, off, S, b0, return_weights=True, backend=backend)
        assert c.shape == (0, 3, 5) and w.shape == (0, 3)
    V, off, S, b0, _, G = make_jagged([0, 0, 0], 4, 5, 3, L_max=6)
    c, w, dV, dS = run_jagged("cpp", V, off, S, b0, None, G)
    assert c.shape == (3, 3, 5) and (c == 0).all() and dV.shape == (0, 4) and (dS == 0).all()
    V, off, S, b0, _, G = make_jagged([1], 4, 5, 3)
    check_against_reference("cpp", V, off, S, b0, None, G, 3, "interests", 1.0)


@needs_cpp
def test_gradcheck_float64():
    """Finite differences of the true function equal the detached gradient only at r = 1 (tests/test_reference.py);
    r > 1 is checked against the reference's (closed-form-tested) gradient above, and without detach below."""
    V, off, S, b0, im, _ = make_jagged([3, 0, 4, 2], 3, 4, 2, L_max=5, dtype=F64, imask="random")
    for backend in ("reference", "cpp"):
        for over in ("interests", "behaviors"):
            def f(v, s):
                return b2i_routing_jagged(v, off, s, b0, im, 1, over, backend=backend)

            assert torch.autograd.gradcheck(f, (V.clone().requires_grad_(), S.clone().requires_grad_()))


@pytest.mark.parametrize("over", ["interests", "behaviors"])
def test_gradcheck_reference_without_detach(over):
    V, off, S, b0, _, _ = make_jagged([3, 0, 1], 3, 3, 2, L_max=4, dtype=F64)

    def f(v, s):
        return b2i_routing_jagged(v, off, s, b0, None, 3, over, detach_routing=False, logit_scale=2.0,
                                  backend="reference")

    assert torch.autograd.gradcheck(f, (V.clone().requires_grad_(), S.clone().requires_grad_()))


def test_reference_is_the_padded_reference():
    V, off, S, b0, im, _ = make_jagged(LENGTHS["random"], 5, 6, 3, L_max=10, dtype=F64, imask="random")
    E, mask = pad(V, off, 10)
    for over in ("interests", "behaviors"):
        c, w = b2i_routing_jagged(V, off, S, b0, im, 3, over, return_weights=True, backend="reference")
        cp, wp = b2i_routing(E, S, b0, mask, im, 3, over, return_weights=True, backend="reference")
        assert torch.equal(c, cp) and torch.equal(w, coupling_to_jagged(wp, off, V.shape[0]))
    assert torch.equal(jagged_from_padded(E, mask)[0], V) and torch.equal(jagged_from_padded(E, mask)[1], off)


@needs_cpp
def test_results_do_not_depend_on_threads():
    V, off, S, b0, im, G = make_jagged(torch.randint(0, 30, (64,)).tolist(), 16, 16, 4, L_max=30)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_jagged("cpp", V, off, S, b0, im, G)
        torch.set_num_threads(2)
        two = run_jagged("cpp", V, off, S, b0, im, G)
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


# ------------------------------------------------------------------ the GPU backends' jagged path on CPU


@needs_cpp
@pytest.mark.parametrize("over", ["interests", "behaviors"])
def test_via_padding_serves_a_padded_backend(over):
    """The padding path (the reference's; cuda's without jagged kernels), with the CPU padded kernel inside."""
    V, off, S, b0, im, G = make_jagged(LENGTHS["random"], 6, 8, 3, L_max=10, imask="random")
    padded_cpp = dispatch.BACKENDS["cpp"].run
    Vg = V.clone().requires_grad_()
    Sg = S.clone().requires_grad_()
    c, w = via_padding(padded_cpp, Vg, off, Sg, b0, im, 3, over, True, 20.0)
    c.backward(G)
    oracle = run_jagged("reference", V.double(), off, S.double(), b0.double(), im, G.double(), 3, over, 20.0)
    checks.assert_within_tolerance((c.detach(), w, Vg.grad, Sg.grad), oracle, None, F32)


def test_every_backend_has_a_jagged_path():
    for name, backend in dispatch.BACKENDS.items():
        assert backend.run_jagged is not None, name


@needs_cpp
def test_auto_picks_cpp_on_cpu_and_refusals_name_the_jagged_op():
    call = dispatch.RoutingCall("cpu", F32, F32, True, "interests", 4, 10, 3, 8, 8, jagged=True)
    assert dispatch.select(call).name == "cpp"
    call = call._replace(detach_routing=False)
    assert dispatch.select(call).name == "reference"
    with pytest.raises(ValueError, match="b2i_routing_jagged: backend='cpp' cannot serve.*detach_routing=False"):
        dispatch.select(call, "cpp")


# ------------------------------------------------------------------ nested tensors and the layer


@needs_cpp
def test_nested_jagged_tensor_input():
    V, off, S, b0, _, G = make_jagged([3, 1, 4], 5, 6, 2, L_max=4)
    nt = torch.nested.nested_tensor_from_jagged(V.clone().requires_grad_(), off)
    c = b2i_routing_jagged(nt, None, S, b0, backend="cpp")
    assert torch.equal(c, b2i_routing_jagged(V, off, S, b0, backend="cpp"))
    parts = [V[int(off[u]):int(off[u + 1])] for u in range(3)]
    nt2 = torch.nested.nested_tensor(parts, layout=torch.jagged)
    assert torch.equal(b2i_routing_jagged(nt2, None, S, b0, backend="cpp"), c)
    with pytest.raises(ValueError, match="offsets=None"):
        b2i_routing_jagged(nt, off, S, b0)


@needs_cpp
@pytest.mark.parametrize("over", ["interests", "behaviors"])
@pytest.mark.parametrize("training", [True, False])
def test_layer_forward_jagged_equals_forward_on_the_padded_batch(over, training):
    torch.manual_seed(0)
    layer = B2IRouting(8, 6, 4, softmax_over=over, dynamic_interests=True, logit_scale=5.0).train(training)
    V, off, _, _, _, _ = make_jagged([5, 0, 9, 2, 16], 8, 6, 4)
    E, mask = pad(V, off, 16)
    torch.manual_seed(1)
    padded = layer(E, mask)
    torch.manual_seed(1)
    jag = layer.forward_jagged(V, off)
    torch.testing.assert_close(jag, padded, atol=1e-6, rtol=1e-5)
    torch.manual_seed(1)
    c, w = layer.forward_jagged(V, off, max_len=16, return_weights=True)
    assert w.shape == (V.shape[0], 4)
    with pytest.raises(ValueError, match="max_len"):
        layer.forward_jagged(V, off, max_len=0)


# ------------------------------------------------------------------ bad input


def _good():
    V, off, S, b0, _, _ = make_jagged([2, 3], 4, 5, 3, L_max=4)
    return V, off, S, b0


@pytest.mark.parametrize(
    "change,exc,pattern",
    [
        (lambda V, o, S, b: (V, o.int(), S, b), TypeError, "`offsets` must be int64"),
        (lambda V, o, S, b: (V, o + 1, S, b), ValueError, "must start at 0"),
        (lambda V, o, S, b: (V, torch.tensor([0, 3, 2, 5]), S, b[:0].new_zeros(3, 4), ), ValueError, "non-decreasing"),
        (lambda V, o, S, b: (V, torch.tensor([0, 2, 4]), S, b), ValueError, "must end at N = values.shape\\[0\\] = 5"),
        (lambda V, o, S, b: (V, o, S, b[..., :2]), ValueError, "more than L_max = 2"),
        (lambda V, o, S, b: (V[None], o, S, b), ValueError, "`values` must be 2-D"),
        (lambda V, o, S, b: (V, o[None], S, b), ValueError, "`offsets` must be 1-D"),
        (lambda V, o, S, b: (V, o, S[:, :3], b), ValueError, "`weight` must be \\(D_out, D_in\\)"),
        (lambda V, o, S, b: (V, o, S.double(), b), TypeError, "`weight` must have the dtype"),
        (lambda V, o, S, b: (V, o, S, b[None]), ValueError, "`init_logits` must be"),
        (lambda V, o, S, b: (V, o, S, b[0].expand(3, 3, 4)), ValueError, "has B = 3"),
        (lambda V, o, S, b: (V.int(), o, S, b), TypeError, "`values` must be float32"),
        (lambda V, o, S, b: (V, o.to("meta"), S, b), ValueError, "`offsets` is on meta"),
    ],
)
def test_bad_input_errors(change, exc, pattern):
    V, off, S, b0 = _good()
    V, off, S, b0 = change(V, off, S, b0)
    with pytest.raises(exc, match=pattern):
        b2i_routing_jagged(V, off, S, b0)


def test_bad_options():
    V, off, S, b0 = _good()
    with pytest.raises(ValueError, match="interest_mask"):
        b2i_routing_jagged(V, off, S, b0, interest_mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_iters"):
        b2i_routing_jagged(V, off, S, b0, num_iters=0)
    with pytest.raises(ValueError, match="softmax_over"):
        b2i_routing_jagged(V, off, S, b0, softmax_over="users")
    with pytest.raises(ValueError, match="logit_scale"):
        b2i_routing_jagged(V, off, S, b0, logit_scale=0.0)
    with pytest.raises(ValueError, match="backend"):
        b2i_routing_jagged(V, off, S, b0, backend="tpu")
    with pytest.raises(ValueError, match="cuda runs on cuda"):
        b2i_routing_jagged(V, off, S, b0, backend="cuda")


@needs_cpp
def test_the_cpp_op_checks_offsets_itself():
    V, off, S, b0 = _good()
    op = torch.ops.mind_kernels.routing_jagged_forward
    for bad, pattern in ((torch.tensor([0, 3, 2]), "non-decreasing"), (torch.tensor([1, 2, 5]), "start at 0"),
                         (torch.tensor([0, 2, 4]), "end at N"), (off.int(), "int64")):
        with pytest.raises(RuntimeError, match=pattern):
            op(V, bad, S, b0, None, 3, False, 1.0)
    with pytest.raises(RuntimeError, match="longer than L_max"):
        op(V, off, S, b0[..., :2], None, 3, False, 1.0)


# ------------------------------------------------------------------ torch.library


@needs_cpp
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("over", [False, True])
def test_opcheck(dtype, over):
    V, off, S, b0, im, G = make_jagged([3, 0, 5], 6, 7, 3, dtype=dtype, imask="random")
    b0 = b0.to(F64 if dtype == F64 else F32)
    torch.library.opcheck(torch.ops.mind_kernels.routing_jagged_forward,
                          (V.requires_grad_(), off, S.requires_grad_(), b0, im, 3, over, 2.0))
    _, w, z = torch.ops.mind_kernels.routing_jagged_forward(V.detach(), off, S.detach(), b0, im, 3, over, 2.0)
    torch.library.opcheck(torch.ops.mind_kernels.routing_jagged_backward, (G, V.detach(), off, S.detach(), w, z,
                                                                            b0.shape[-1]))


@needs_cpp
def test_torch_compile_fullgraph():
    V, off, S, b0, im, G = make_jagged([3, 0, 5, 2], 6, 7, 3)

    def f(v, o, s, b):
        return torch.ops.mind_kernels.routing_jagged_forward(v, o, s, b, None, 3, False, 1.0)[0].sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    Vg = V.clone().requires_grad_()
    compiled(Vg, off, S, b0).backward()
    Ve = V.clone().requires_grad_()
    f(Ve, off, S, b0).backward()
    assert torch.equal(Vg.grad, Ve.grad)


@needs_cpp
def test_torch_export():
    """The fake kernel gives every output size from the input sizes: torch.export keeps the op in the graph."""

    class Extractor(torch.nn.Module):
        def __init__(self, S):
            super().__init__()
            self.S = torch.nn.Parameter(S)

        def forward(self, v, o, b):
            return torch.ops.mind_kernels.routing_jagged_forward(v, o, self.S, b, None, 3, False, 1.0)[0]

    V, off, S, b0, _, _ = make_jagged([3, 0, 4], 5, 6, 2, per_user_b0=False)
    m = Extractor(S)
    ep = torch.export.export(m, (V, off, b0))
    assert "mind_kernels.routing_jagged_forward.default" in [str(n.target) for n in ep.graph.nodes]
    assert torch.equal(ep.module()(V, off, b0), m(V, off, b0))


@needs_cpp
def test_torch_compile_fullgraph_of_the_public_api():
    """Under torch.compile the offsets' values are left to the kernel's own checks: no graph break."""
    V, off, S, b0, im, G = make_jagged([3, 0, 5, 2], 6, 7, 3, imask="random")

    def f(v, o, s, b, m):
        return b2i_routing_jagged(v, o, s, b, m, backend="cpp")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(V, off, S, b0, im), f(V, off, S, b0, im))


# ------------------------------------------------------------------ Triton, under the interpreter


@pytest.mark.skipif(INTERPRETING, reason="this is the parent; the child runs the interpreter tests")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-x", "-k", "interp_", "-p",
         "no:cacheprovider"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, "interpreter suite failed:\n" + out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed is not None and int(passed.group(1)) >= 5, "interpreter suite ran too few tests:\n" + out[-3000:]


@interp
@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("over", ["interests", "behaviors"])
def test_interp_triton_matches_reference(dtype, over):
    V, off, S, b0, im, G = make_jagged([3, 0, 5, 1], 3, 6, 3, L_max=5, dtype=dtype, imask="random")
    c, w, dV, dS = check_against_reference("triton", V, off, S, b0, im, G, 3, over, 20.0 if dtype == F32 else 1.0)
    assert (c[1] == 0).all() and (c[2] == 0).all()


@interp
def test_interp_triton_batch_zero_and_one():
    V, off, S, b0, _, G = make_jagged([], 3, 6, 3, L_max=4)
    assert b2i_routing_jagged(V, off, S, b0, backend="triton").shape == (0, 3, 6)
    V, off, S, b0, _, G = make_jagged([4], 3, 6, 3)
    check_against_reference("triton", V, off, S, b0, None, G, 3, "behaviors", 1.0)


@interp
@pytest.mark.parametrize("over", ["interests", "behaviors"])
def test_interp_triton_equals_padded_triton_on_the_same_users(over):
    V, off, S, b0, im, G = make_jagged([2, 0, 6, 3], 4, 6, 3, L_max=7, imask="random", seed=5)
    c, w, dV, dS = run_jagged("triton", V, off, S, b0, im, G, 3, over, 20.0)
    E, mask = pad(V, off, 7)
    Ep, Sp = E.clone().requires_grad_(), S.clone().requires_grad_()
    cp, wp = b2i_routing(Ep, Sp, b0, mask, im, 3, over, logit_scale=20.0, return_weights=True, backend="triton")
    cp.backward(G)
    torch.testing.assert_close(c, cp.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w, coupling_to_jagged(wp, off, V.shape[0]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dV, Ep.grad[mask], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dS, Sp.grad, atol=1e-6, rtol=1e-5)


@interp
def test_interp_triton_through_s_shared_logits_and_empty_users():
    # D_in >= 2 D_out: the iterations go through S, not Q; b0 shared (K, L_max); users with no behaviour.
    V, off, S, b0, im, G = make_jagged([0, 3, 0, 5], 8, 3, 2, L_max=6, per_user_b0=False, seed=6)
    for over in ("interests", "behaviors"):
        c, *_ = check_against_reference("triton", V, off, S, b0, im, G, 3, over, 1.0)
        assert (c[0] == 0).all() and (c[2] == 0).all()
    V, off, S, b0, im, G = make_jagged([0, 0], 3, 4, 2, L_max=3)
    c, w, dV, dS = run_jagged("triton", V, off, S, b0, im, G)
    assert (c == 0).all() and w.shape == (0, 2) and (dS == 0).all()
