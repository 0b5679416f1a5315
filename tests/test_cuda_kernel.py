"""The fused CUDA C++ routing kernels (csrc/cuda/routing.cu) against the reference.

GPU tests (``@pytest.mark.gpu``) are skipped without a CUDA device or when the
extension was built without the CUDA kernels.  They compare the op's outputs
(capsules, coupling w) and gradients (dE, dS) with the reference evaluated in
float64 on the same (rounded) inputs, with ROUTING.md's tolerances:

* float32 (and float64): atol 1e-5, rtol 1e-4 (float64: 1e-9 / 1e-9).
* float16 / bfloat16: max error at most 2x the max error of the reference run in
  that dtype, with the float32 tolerance as a floor: the kernel and the
  reference both accumulate in float32, so where the reference's own error is
  ~0 (coupling w, or dS for a float32 S) the float32 rounding of either side is
  the honest bound.

Jagged batches (values + offsets, the same kernels with the offsets set) are checked the same way,
on the GPU and through the emulation, against the jagged reference.

Shapes cover L = 1, D = 1, K = 1, odd sizes (D = 3, L = 37, K = 3, 5), D_out != D_in,
K > 4 (two interest chunks), B = 1, a large B (more users than thread blocks,
grid-stride), sizes whose workspace / E / S / dS accumulator do not fit in
shared memory (the kernel's global-memory paths), both softmax axes, empty
users, users with every interest inactive, and num_iters in {1, 2, 3, 5}.

Without a GPU:

* when the extension was built with CUDA (``_build_info.json``), the CUDA
  dispatch key must have a kernel for both ops;
* the emulation tests (``slow``: one ~1.5 min C++ compile) compile the kernels'
  device source (``csrc/cuda/routing_kernels.cuh``) as host C++ through
  ``csrc/cuda/routing_emulation.cpp``, which runs every CUDA thread of a block as
  a host thread with real barriers and shuffles, NaN-fills shared memory, scratch
  and outputs, and lets the test force every shared-memory staging plan.  They
  check the kernels' indexing, layouts and synchronisation against the float64
  reference; what they cannot check is GPU timing and ``--use_fast_math``
  rounding, which the GPU tests cover.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import mind_kernels
from mind_kernels import b2i_routing, dynamic_interest_mask, ops
from mind_kernels.reference import b2i_routing_reference
from routing_checks import assert_within_tolerance, run_op

HAS_CUDA_KERNEL = ops.kernel_unavailable_reason("cuda") is None
needs_cuda_kernel = pytest.mark.skipif(
    not torch.cuda.is_available() or not HAS_CUDA_KERNEL,
    reason="needs a CUDA device and mind_kernels._C built with the CUDA kernels "
    f"({ops.kernel_unavailable_reason('cuda') or 'no CUDA device'})",
)

LOW = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------- helpers


def make_case(B, L, D_in, D_out, K, dtype, weight_dtype=None, batched_logits=True, masks=True, seed=0, device="cuda"):
    """Inputs on ``device``; with masks, user 0 has no behaviour and user 1 (B > 2) has every interest inactive."""
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(B, L, D_in, generator=g).to(dtype)
    S = (torch.randn(D_out, D_in, generator=g) / D_in**0.5).to(weight_dtype or dtype)
    b0 = torch.randn(B, K, L, generator=g) if batched_logits else torch.randn(K, L, generator=g)
    mask = interest_mask = None
    if masks:
        mask = torch.rand(B, L, generator=g) > 0.3
        mask[:, -1] = True
        if B > 1:
            mask[0] = False
        interest_mask = dynamic_interest_mask(mask, K) | (torch.rand(B, K, generator=g) > 0.5)
        if B > 2:
            interest_mask[1] = False
    G = torch.randn(B, K, D_out, generator=g).to(dtype)
    return [None if t is None else t.to(device) for t in (E, S, b0, mask, interest_mask, G)]


def cuda_fn(E, S, b0, mask, interest_mask, r, over, logit_scale=1.0):
    return b2i_routing(E, S, b0, mask, interest_mask, r, "behaviors" if over else "interests",
                       logit_scale=logit_scale, return_weights=True, backend="cuda")


def reference_fn(E, S, b0, mask, interest_mask, r, over, logit_scale=1.0):
    return b2i_routing_reference(E, S, b0, mask, interest_mask, r, "behaviors" if over else "interests", True, True,
                                 logit_scale=logit_scale)


NAMES = ("capsules", "coupling", "dE", "dS")


def check_against_reference(E, S, b0, mask, interest_mask, G, r, over, long_reductions=False, logit_scale=1.0):
    """Run the CUDA op and the float64 reference; assert ROUTING.md's tolerances. Returns the op's results.

    ``long_reductions``: for float32 cases whose sums run over tens of thousands of terms (dS over
    B * L rows, ebar over L = 8000), float32 rounding alone exceeds atol 1e-5 on entries that cancel
    to ~0, for the reference run in float32 as much as for any kernel.  There the float32 kernel is
    held to the low-precision rule instead: beyond the float32 tolerance, at most 2x the error of the
    reference run in float32.
    """
    kw = dict(logit_scale=logit_scale)
    got = run_op(cuda_fn, E, S, b0, mask, interest_mask, G, r, over, **kw)
    oracle = run_op(reference_fn, E.double(), S.double(), b0.double(), mask, interest_mask, G.double(), r, over, **kw)
    acc = torch.float64 if E.dtype == torch.float64 else torch.float32
    for name, x, ref in zip(NAMES, got, oracle):
        assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
        assert torch.isfinite(x).all(), f"{name} has non-finite values"
    assert got[0].dtype == E.dtype and got[1].dtype == acc
    assert got[2].dtype == E.dtype and got[3].dtype == S.dtype
    if E.dtype == torch.float64:
        for name, x, ref in zip(NAMES, got, oracle):
            torch.testing.assert_close(x, ref, atol=1e-9, rtol=1e-9, msg=lambda m: f"{name}: {m}")
    elif E.dtype == torch.float32 and not long_reductions:
        for name, x, ref in zip(NAMES, got, oracle):
            torch.testing.assert_close(x.double(), ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    else:
        own = run_op(reference_fn, E, S, b0, mask, interest_mask, G, r, over, **kw)
        for name, x, mine, ref in zip(NAMES, got, own, oracle):
            ref_err = (mine.double() - ref).abs().max().item()
            excess = ((x.double() - ref).abs() - (1e-5 + 1e-4 * ref.abs())).max().item()
            assert excess <= 2 * ref_err, (
                f"{name}: error beyond the fp32 tolerance {excess:.3g} > 2 x the reference's {E.dtype} error "
                f"{ref_err:.3g}"
            )
    if mask is not None and E.shape[0] > 1:
        # user 0 has no behaviour: zero capsules, zero coupling, zero dE
        assert (got[0][0] == 0).all() and (got[1][0] == 0).all() and (got[2][0] == 0).all()
    if interest_mask is not None and E.shape[0] > 2:
        # user 1 has every interest inactive
        assert (got[0][1] == 0).all() and (got[1][1] == 0).all() and (got[2][1] == 0).all()
    return got


# ----------------------------------------------------------------- GPU: correctness

SHAPES = [
    # B, L, D_in, D_out, K
    (1, 1, 1, 1, 1),
    (5, 37, 3, 5, 3),
    (6, 50, 64, 64, 4),
    (4, 13, 32, 48, 8),  # K = 8: two chunks of four interests
    (3, 7, 130, 20, 5),  # D_in > block size, K = 5 (padded chunk)
    (3, 2, 128, 128, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("over", [False, True], ids=["interests", "behaviors"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.gpu
@needs_cuda_kernel
def test_matches_reference(shape, over, dtype):
    check_against_reference(*make_case(*shape, dtype), r=3, over=over)


@pytest.mark.parametrize("r", [1, 2, 3, 5])
@pytest.mark.parametrize("over", [False, True], ids=["interests", "behaviors"])
@pytest.mark.gpu
@needs_cuda_kernel
def test_num_iters(r, over):
    check_against_reference(*make_case(7, 20, 16, 24, 4, torch.float32, seed=r), r=r, over=over)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("over", [False, True], ids=["interests", "behaviors"])
@pytest.mark.gpu
@needs_cuda_kernel
def test_float32_weight_with_low_precision_behaviors(dtype, over):
    got = check_against_reference(*make_case(5, 19, 24, 40, 4, dtype, weight_dtype=torch.float32), r=3, over=over)
    assert got[3].dtype == torch.float32


@pytest.mark.parametrize("over", [False, True], ids=["interests", "behaviors"])
@pytest.mark.gpu
@needs_cuda_kernel
def test_float64(over):
    check_against_reference(*make_case(5, 23, 17, 9, 3, torch.float64), r=3, over=over)


@pytest.mark.parametrize("over", [False, True], ids=["interests", "behaviors"])
@pytest.mark.gpu
@needs_cuda_kernel
def test_broadcast_logits_without_masks(over):
    check_against_reference(*make_case(6, 31, 20, 12, 4, torch.float32, batched_logits=False, masks=False), r=3,
                            over=over)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("over", [False, True], ids=["interests", "behaviors"])
@pytest.mark.parametrize("shape", [(6, 50, 64, 64, 4), (5, 37, 33, 6, 5)], ids=["through_Q", "through_S"])
@pytest.mark.parametrize("logit_scale", [0.5, 20.0])
@pytest.mark.gpu
@needs_cuda_kernel
def test_logit_scale_matches_reference(logit_scale, shape, over, dtype):
    check_against_reference(*make_case(*shape, dtype, seed=3), r=3, over=over, logit_scale=logit_scale)


@pytest.mark.parametrize("over", [False, True], ids=["interests", "behaviors"])
@pytest.mark.gpu
@needs_cuda_kernel
def test_logit_scale_one_is_bit_identical(over):
    E, S, b0, mask, imask, _ = make_case(64, 50, 64, 64, 4, torch.float32, seed=4)
    op = torch.ops.mind_kernels.routing_forward
    for x, y in zip(op(E, S, b0, mask, imask, 3, over), op(E, S, b0, mask, imask, 3, over, 1.0)):
        assert torch.equal(x, y)
    with pytest.raises(RuntimeError, match="logit_scale"):
        op(E, S, b0, mask, imask, 3, over, 0.0)


@pytest.mark.gpu
@needs_cuda_kernel
def test_large_batch_grid_stride():
    # More users than resident thread blocks: blocks loop over users and dS sums many block partials.
    check_against_reference(*make_case(3000, 50, 64, 64, 4, torch.float32), r=3, over=False, long_reductions=True)


@pytest.mark.parametrize(
    "shape",
    [
        (3, 8000, 40, 40, 6),  # logits / coupling workspace exceeds shared memory -> global scratch
        (2, 300, 180, 200, 2),  # staged E and S do not fit together
        (3, 5, 300, 310, 2),  # S (and the dS accumulator) exceed shared memory
    ],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.gpu
@needs_cuda_kernel
def test_sizes_beyond_shared_memory(shape):
    check_against_reference(*make_case(*shape, torch.float32), r=2, over=True, long_reductions=True)
    check_against_reference(*make_case(*shape, torch.float32, seed=1), r=2, over=False, long_reductions=True)


@pytest.mark.gpu
@needs_cuda_kernel
def test_stride_zero_gradient():
    # c.sum().backward() hands the backward an expanded (stride-0) gradient.
    E, S, b0, mask, imask, _ = make_case(4, 11, 8, 6, 3, torch.float32)
    grads = []
    for fn, cast in ((cuda_fn, lambda t: t), (reference_fn, lambda t: t.double())):
        e = cast(E).detach().requires_grad_()
        s = cast(S).detach().requires_grad_()
        c, _ = fn(e, s, cast(b0), mask, imask, 3, False)
        c.sum().backward()
        grads.append((e.grad, s.grad))
    for x, ref in zip(grads[0], grads[1]):
        torch.testing.assert_close(x.double(), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@needs_cuda_kernel
def test_dS_deterministic():
    E, S, b0, mask, imask, G = make_case(2048, 50, 64, 64, 4, torch.float32)
    first = run_op(cuda_fn, E, S, b0, mask, imask, G, 3, False)
    second = run_op(cuda_fn, E, S, b0, mask, imask, G, 3, False)
    for name, x, y in zip(NAMES, first, second):
        assert torch.equal(x, y), f"{name} differs between two identical runs"


@pytest.mark.gpu
@needs_cuda_kernel
def test_empty_batch():
    E = torch.randn(0, 5, 8, device="cuda")
    S = torch.randn(6, 8, device="cuda")
    b0 = torch.randn(3, 5, device="cuda")
    c, w, z = torch.ops.mind_kernels.routing_forward(E, S, b0, None, None, 3, False)
    assert c.shape == (0, 3, 6) and w.shape == (0, 3, 5) and z.shape == (0, 3, 6)
    dE, dS = torch.ops.mind_kernels.routing_backward(torch.zeros(0, 3, 6, device="cuda"), E, S, w, z)
    assert dE.shape == (0, 5, 8)
    assert dS.shape == (6, 8) and dS.dtype == S.dtype and (dS == 0).all()


@pytest.mark.gpu
@needs_cuda_kernel
def test_preactivation_is_final_aggregation():
    # z is the pre-squash aggregation of the last iteration: capsules == squash(z).
    E, S, b0, mask, imask, _ = make_case(5, 9, 12, 10, 3, torch.float32)
    c, w, z = torch.ops.mind_kernels.routing_forward(E, S, b0, mask, imask, 3, False)
    n2 = (z * z).sum(-1, keepdim=True)
    torch.testing.assert_close(c, n2 / (1 + n2) * z / torch.sqrt(n2 + 1e-9), atol=1e-6, rtol=1e-5)
    # and z == w S e (the final aggregation with the returned coupling)
    torch.testing.assert_close(z, w @ (E @ S.t()), atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@needs_cuda_kernel
def test_kernel_refuses_bad_input():
    E = torch.randn(2, 5, 8, device="cuda")
    S = torch.randn(6, 7, device="cuda")  # D_in mismatch
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.mind_kernels.routing_forward(E, S, torch.randn(3, 5, device="cuda"), None, None, 3, False)


# ----------------------------------------------------------------- GPU: composition


@pytest.mark.parametrize("over", [False, True], ids=["interests", "behaviors"])
@pytest.mark.gpu
@needs_cuda_kernel
def test_opcheck(over):
    E, S, b0, mask, imask, G = make_case(3, 6, 5, 4, 3, torch.float32)
    E.requires_grad_()
    S.requires_grad_()
    torch.library.opcheck(torch.ops.mind_kernels.routing_forward.default, (E, S, b0, mask, imask, 2, over))
    torch.library.opcheck(torch.ops.mind_kernels.routing_forward.default, (E, S, b0, mask, imask, 3, over, 20.0))
    c, w, z = torch.ops.mind_kernels.routing_forward(E.detach(), S.detach(), b0, mask, imask, 2, over)
    torch.library.opcheck(torch.ops.mind_kernels.routing_backward.default, (G, E.detach(), S.detach(), w, z))


class _Routing(torch.nn.Module):
    def __init__(self, S):
        super().__init__()
        self.S = torch.nn.Parameter(S.clone())

    def forward(self, E, b0, mask, imask):
        return mind_kernels.b2i_routing(E, self.S, b0, mask, imask, 3, "interests", backend="cuda")


@pytest.mark.gpu
@needs_cuda_kernel
def test_torch_compile_fullgraph():
    E, S, b0, mask, imask, G = make_case(6, 10, 16, 8, 4, torch.float32)
    eager, compiled_mod = _Routing(S), _Routing(S)
    compiled = torch.compile(compiled_mod, fullgraph=True)
    results = []
    for mod in (eager, compiled):
        e = E.clone().requires_grad_()
        c = mod(e, b0, mask, imask)
        c.backward(G)
        results.append((c.detach(), e.grad, mod.S.grad))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@needs_cuda_kernel
def test_nan_padding_is_ignored_in_interests_mode():
    # Reference's non-finite contract: in "interests" mode masked rows take no part at all.
    E, S, b0, mask, imask, G = make_case(4, 12, 6, 5, 3, torch.float32, seed=11)
    mask[:, -3:] = False
    E_nan = E.clone()
    E_nan[~mask] = float("nan")
    E_nan[0, -1] = float("inf")
    got = run_op(cuda_fn, E_nan, S, b0, mask, imask, G, 3, False)
    want = run_op(cuda_fn, E, S, b0, mask, imask, G, 3, False)
    for name, x, y in zip(NAMES, got, want):
        assert torch.isfinite(x).all(), name
        assert torch.equal(x, y), name


# ----------------------------------------------------------------- no GPU needed


def test_cuda_kernels_registered_when_built_with_cuda():
    if ops.extension_error() is not None:
        pytest.skip(ops.extension_error())
    if not ops.build_info().get("built_cuda"):
        pytest.skip("mind_kernels._C was built without the CUDA kernels")
    for op in ("routing_forward", "routing_backward", "routing_jagged_forward", "routing_jagged_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mind_kernels::{op}", "CUDA"), op
    assert ops.kernel_unavailable_reason("cuda") is None
    assert ops.jagged_kernel_unavailable_reason("cuda") is None


# ----------------------------------------------------------------- CPU emulation of the kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG_SMEM = 227 * 1024  # an H100 / H200's opt-in shared memory per block


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler to build the emulation harness")
    from torch.utils.cpp_extension import load

    return load(
        name="mk_cuda_emulation",
        sources=[os.path.join(REPO, "csrc", "cuda", "routing_emulation.cpp")],
        extra_include_paths=[os.path.join(REPO, "csrc"), os.path.join(REPO, "csrc", "cuda")],
        extra_cflags=["-O2", "-std=c++20"],
        build_directory=str(tmp_path_factory.mktemp("mk_cuda_emulation")),
        verbose=False,
    )


def make_cpu_case(*args, **kwargs):
    return make_case(*args, **kwargs, device="cpu")


def emulated_fn(emu, grid, max_smem):
    """The emulated op with the reference's call shape: (capsules, w) and an autograd backward."""

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, E, S, b0, mask, imask, r, over, logit_scale):
            acc = torch.float64 if E.dtype == torch.float64 else torch.float32
            c, w, z = emu.forward(E, S, b0.to(acc), mask, imask, r, over, logit_scale, grid, max_smem)
            ctx.save_for_backward(E, S, w, z)
            ctx.mark_non_differentiable(w)
            return c, w

        @staticmethod
        def backward(ctx, G, _gw):
            E, S, w, z = ctx.saved_tensors
            dE, dS = emu.backward(G.contiguous(), E, S, w, z, grid, max_smem)
            return dE, dS, None, None, None, None, None, None

    def fn(E, S, b0, mask, imask, r, over, logit_scale=1.0):
        return Op.apply(E, S, b0, mask, imask, r, over, logit_scale)

    return fn


def check_emulated(emu, case, r, over, grid, max_smem, logit_scale=1.0):
    E, S, b0, mask, imask, G = case
    kw = dict(logit_scale=logit_scale)
    got = run_op(emulated_fn(emu, grid, max_smem), E, S, b0, mask, imask, G, r, over, **kw)
    oracle = run_op(reference_fn, E.double(), S.double(), b0.double(), mask, imask, G.double(), r, over, **kw)
    for name, x, ref in zip(NAMES, got, oracle):
        assert x.shape == ref.shape, name
        assert torch.isfinite(x).all(), f"{name} has non-finite values (an unwritten or NaN-garbage read?)"
    if E.dtype == torch.float64:
        tol = dict(atol=1e-10, rtol=1e-10)
    else:
        tol = dict(atol=1e-5, rtol=1e-4)
    if E.dtype in (torch.float64, torch.float32):
        for name, x, ref in zip(NAMES, got, oracle):
            torch.testing.assert_close(x.double(), ref, **tol, msg=lambda m: f"{name}: {m}")
    else:
        own = run_op(reference_fn, E, S, b0, mask, imask, G, r, over, **kw)
        for name, x, mine, ref in zip(NAMES, got, own, oracle):
            ref_err = (mine.double() - ref).abs().max().item()
            excess = ((x.double() - ref).abs() - (1e-5 + 1e-4 * ref.abs())).max().item()
            assert excess <= 2 * ref_err, f"{name}: {excess:.3g} > 2 x {ref_err:.3g}"
    return got


EMU_SHAPES = [
    (5, 40, 33, 6, 5),  # L > 32 (multi-pass warp loops), D_in > 32, K = 5 (two chunks, padded)
    (4, 9, 3, 12, 3),  # D_out > D_in
    (3, 1, 1, 1, 1),  # L = D = K = 1
    (3, 12, 40, 24, 4),  # D_in < 2 D_out with D_in > 32: the iterations t < r through Q = S^T S, multi-pass lanes
]


@pytest.mark.slow
@pytest.mark.parametrize("max_smem", [BIG_SMEM, 0, 3000], ids=["smem", "global", "mixed"])
@pytest.mark.parametrize("over", [False, True], ids=["interests", "behaviors"])
@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_kernels_match_reference(emu, shape, over, max_smem):
    # float64: the kernel's algorithm and indexing are exact up to float64 rounding; grid 2 < B
    # exercises the grid-stride loop over users and the dS partial reduction over blocks.
    check_emulated(emu, make_cpu_case(*shape, torch.float64), 3, over, grid=2, max_smem=max_smem)


@pytest.mark.slow
def test_emulated_staging_plans(emu):
    # The budgets above force the paths they are named after (shape 5x40x33x6x5). Flags: forward
    # (workspace, S, E), backward (workspace, dS accumulator, S, E) in shared memory.
    for float64 in (False, True):
        assert emu.staging_plan(40, 33, 6, 5, BIG_SMEM, float64) == [True] * 7
        assert emu.staging_plan(40, 33, 6, 5, 0, float64) == [False] * 7
    assert emu.staging_plan(40, 33, 6, 5, 3000, False) == [False, True, False, False, True, True, False]
    assert emu.staging_plan(40, 33, 6, 5, 3000, True) == [False, True, False, False, False, True, False]
    # the benchmark shape (L=50, D=64, K=4, float32) fits entirely in shared memory
    assert emu.staging_plan(50, 64, 64, 4, BIG_SMEM, False) == [True] * 7


@pytest.mark.slow
def test_emulated_many_blocks_two_level_dS_reduction(emu):
    # 70 blocks > 32 rows per slice: block partials -> 3 slice sums (32, 32, 6 rows) -> dS.
    case = make_cpu_case(70, 6, 5, 4, 2, torch.float64, seed=3)
    check_emulated(emu, case, 2, False, grid=70, max_smem=BIG_SMEM)


@pytest.mark.slow
@pytest.mark.parametrize("r", [1, 2, 5])
def test_emulated_num_iters(emu, r):
    check_emulated(emu, make_cpu_case(4, 10, 8, 7, 3, torch.float64, seed=r), r, False, grid=3, max_smem=BIG_SMEM)
    check_emulated(emu, make_cpu_case(4, 10, 8, 7, 3, torch.float64, seed=r), r, True, grid=1, max_smem=BIG_SMEM)


@pytest.mark.slow
@pytest.mark.parametrize("over", [False, True], ids=["interests", "behaviors"])
def test_emulated_float32_and_half(emu, over):
    check_emulated(emu, make_cpu_case(4, 21, 16, 10, 4, torch.float32), 3, over, grid=2, max_smem=BIG_SMEM)
    got = check_emulated(emu, make_cpu_case(4, 21, 16, 10, 4, torch.float16, weight_dtype=torch.float32), 3, over,
                         grid=2, max_smem=BIG_SMEM)
    assert got[0].dtype == torch.float16 and got[2].dtype == torch.float16 and got[3].dtype == torch.float32
    check_emulated(emu, make_cpu_case(4, 21, 16, 10, 4, torch.bfloat16), 3, over, grid=2, max_smem=0)


@pytest.mark.slow
@pytest.mark.parametrize("over", [False, True], ids=["interests", "behaviors"])
def test_emulated_paper_shape(emu, over):
    # The GPU goal's sizes (L=50, D=64, K=4, r=3: iterations through Q = S^T S), float32 and bfloat16.
    check_emulated(emu, make_cpu_case(3, 50, 64, 64, 4, torch.float32, seed=50), 3, over, grid=2, max_smem=BIG_SMEM)
    check_emulated(emu, make_cpu_case(3, 50, 64, 64, 4, torch.bfloat16, seed=51), 3, over, grid=2, max_smem=BIG_SMEM)


@pytest.mark.slow
def test_emulated_route_through_s_switch(emu, monkeypatch):
    case = make_cpu_case(3, 12, 16, 16, 4, torch.float32, seed=5)
    through_q = check_emulated(emu, case, 3, False, grid=2, max_smem=BIG_SMEM)
    monkeypatch.setenv("MIND_KERNELS_ROUTE_THROUGH_S", "1")
    through_s = check_emulated(emu, case, 3, False, grid=2, max_smem=BIG_SMEM)
    assert not torch.equal(through_q[0], through_s[0])  # the switch did change the path


@pytest.mark.slow
@pytest.mark.parametrize("logit_scale", [0.5, 20.0])
@pytest.mark.parametrize("max_smem", [BIG_SMEM, 0], ids=["smem", "global"])
@pytest.mark.parametrize("over", [False, True], ids=["interests", "behaviors"])
@pytest.mark.parametrize("shape", [(3, 12, 40, 24, 4), (4, 9, 8, 3, 3)], ids=["through_Q", "through_S"])
def test_emulated_logit_scale(emu, shape, over, max_smem, logit_scale):
    # b_ij += s * (c_j . u_i) in both paths of the iterations t < r; float64 (the algorithm) and float32.
    check_emulated(emu, make_cpu_case(*shape, torch.float64, seed=6), 3, over, grid=2, max_smem=max_smem,
                   logit_scale=logit_scale)
    check_emulated(emu, make_cpu_case(*shape, torch.float32, seed=7), 3, over, grid=2, max_smem=max_smem,
                   logit_scale=logit_scale)


@pytest.mark.slow
def test_emulated_broadcast_logits_without_masks(emu):
    case = make_cpu_case(3, 6, 5, 4, 2, torch.float64, batched_logits=False, masks=False)
    check_emulated(emu, case, 3, False, grid=2, max_smem=BIG_SMEM)
    check_emulated(emu, case, 3, True, grid=2, max_smem=0)


@pytest.mark.slow
@pytest.mark.parametrize("max_smem", [BIG_SMEM, 0], ids=["smem", "global"])
def test_emulated_nan_padding_is_ignored_in_interests_mode(emu, max_smem):
    E, S, b0, mask, imask, G = make_cpu_case(4, 12, 6, 5, 3, torch.float64, seed=11)
    mask[:, -3:] = False
    E_nan = E.clone()
    E_nan[~mask] = float("nan")
    E_nan[0, -1] = float("inf")
    fn = emulated_fn(emu, 2, max_smem)
    got = run_op(fn, E_nan, S, b0, mask, imask, G, 3, False)
    want = run_op(fn, E, S, b0, mask, imask, G, 3, False)
    for name, x, y in zip(NAMES, got, want):
        assert torch.isfinite(x).all(), name
        assert torch.equal(x, y), name


@pytest.mark.slow
@pytest.mark.parametrize("over", [False, True], ids=["interests", "behaviors"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_emulated_non_finite_logits_propagate_like_the_reference(emu, over, bad):
    # The reference's non-finite contract: a NaN / +Inf logit inside a softmax poisons that softmax.
    E, S, b0, mask, imask, _ = make_cpu_case(4, 9, 5, 6, 3, torch.float64, masks=False, seed=5)
    b0[2, 1, 4] = bad
    c, w = emulated_fn(emu, 2, BIG_SMEM)(E, S, b0, mask, imask, 3, over)
    c_ref, w_ref = reference_fn(E, S, b0, mask, imask, 3, over)
    assert not torch.isfinite(c_ref[2]).all()  # the case does exercise the contract
    torch.testing.assert_close(c, c_ref, atol=1e-10, rtol=1e-10, equal_nan=True)
    torch.testing.assert_close(w, w_ref, atol=1e-10, rtol=1e-10, equal_nan=True)


@pytest.mark.slow
@pytest.mark.parametrize("max_smem", [BIG_SMEM, 0], ids=["packed", "global"])
def test_emulated_packed_rows_interests_mode(emu, max_smem):
    # "interests" mode with a mask and E in shared memory routes only the valid rows, packed (ballot
    # over L = 70 > 2 warps' worth): scattered masks, a user with one valid row, an empty user.
    E, S, b0, mask, imask, G = make_cpu_case(5, 70, 7, 9, 3, torch.float64, seed=8)
    mask = torch.rand(5, 70, generator=torch.Generator().manual_seed(1)) > 0.6
    mask[0] = False
    mask[2] = False
    mask[2, 37] = True
    assert emu.staging_plan(70, 7, 9, 3, max_smem, True)[2] == (max_smem > 0)  # E staged -> packed
    E_nan = E.clone()
    E_nan[~mask] = float("nan")
    got = check_emulated(emu, (E_nan, S, b0, mask, imask, G), 3, False, grid=2, max_smem=max_smem)
    assert (got[1][~mask[:, None, :].expand_as(got[1])] == 0).all()  # masked positions: w = 0


@pytest.mark.slow
def test_emulated_empty_batch(emu):
    E = torch.randn(0, 5, 8)
    S = torch.randn(6, 8)
    c, w, z = emu.forward(E, S, torch.randn(3, 5), None, None, 3, False, 1.0, 4, BIG_SMEM)
    assert c.shape == (0, 3, 6) and w.shape == (0, 3, 5) and z.shape == (0, 3, 6)
    dE, dS = emu.backward(torch.zeros(0, 3, 6), E, S, w, z, 4, BIG_SMEM)
    assert dE.shape == (0, 5, 8) and (dS == 0).all()


# ----------------------------------------------------------------- jagged batches (values + offsets)


def make_jagged_case(lengths, D_in, D_out, K, L_max, dtype, seed=0, device="cpu", weight_dtype=None):
    """(values, S, b0, offsets, interest_mask, G): user 2 (when there) has every interest inactive."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    offsets = torch.zeros(B + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    V = torch.randn(int(offsets[-1]), D_in, generator=g).to(dtype)
    S = (torch.randn(D_out, D_in, generator=g) / D_in**0.5).to(weight_dtype or dtype)
    b0 = torch.randn(B, K, L_max, generator=g)
    imask = torch.rand(B, K, generator=g) > 0.4
    imask[:, 0] = True
    if B > 2:
        imask[2] = False
    G = torch.randn(B, K, D_out, generator=g).to(dtype)
    return [t.to(device) for t in (V, S, b0, offsets, imask, G)]


def jagged_reference_fn(V, S, b0, offsets, imask, r, over, logit_scale=1.0):
    return mind_kernels.b2i_routing_jagged(V, offsets, S, b0, imask, r, "behaviors" if over else "interests",
                                           logit_scale=logit_scale, return_weights=True, backend="reference")


def emulated_jagged_fn(emu, grid, max_smem):
    """The emulated jagged op with run_op's call shape (the offsets in the mask slot); w is (N, K)."""

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, V, S, b0, offsets, imask, r, over, logit_scale):
            acc = torch.float64 if V.dtype == torch.float64 else torch.float32
            c, w, z = emu.jagged_forward(V, offsets, S, b0.to(acc), imask, r, over, logit_scale, grid, max_smem)
            ctx.save_for_backward(V, offsets, S, w, z)
            ctx.max_len = b0.shape[-1]
            ctx.mark_non_differentiable(w)
            return c, w

        @staticmethod
        def backward(ctx, G, _gw):
            V, offsets, S, w, z = ctx.saved_tensors
            dV, dS = emu.jagged_backward(G.contiguous(), V, offsets, S, w, z, ctx.max_len, grid, max_smem)
            return dV, dS, None, None, None, None, None, None

    def fn(V, S, b0, offsets, imask, r, over, logit_scale=1.0):
        return Op.apply(V, S, b0, offsets, imask, r, over, logit_scale)

    return fn


def check_jagged_emulated(emu, case, r, over, grid, max_smem, logit_scale=1.0):
    V, S, b0, offsets, imask, G = case
    got = run_op(emulated_jagged_fn(emu, grid, max_smem), V, S, b0, offsets, imask, G, r, over,
                 logit_scale=logit_scale)
    oracle = run_op(jagged_reference_fn, V.double(), S.double(), b0.double(), offsets, imask, G.double(), r, over,
                    logit_scale=logit_scale)
    same = run_op(jagged_reference_fn, V, S, b0, offsets, imask, G, r, over, logit_scale=logit_scale) \
        if V.dtype in LOW else None
    for name, x in zip(NAMES, got):
        assert torch.isfinite(x).all(), f"{name} has non-finite values (an unwritten or NaN-garbage read?)"
    if V.dtype == torch.float64:
        for name, x, ref in zip(NAMES, got, oracle):
            torch.testing.assert_close(x, ref, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")
    else:
        assert_within_tolerance(got, oracle, same, V.dtype)
    return got


JAGGED_EMU = [
    ([5, 0, 40, 1, 17], 33, 6, 5, 40),  # an empty user, one at L_max > 32, K = 5 (two chunks), through S
    ([3, 9, 0, 12], 12, 40, 4, 14),  # through Q = S^T S, L_max above every length
    ([1, 1, 1], 1, 1, 1, 1),  # L = D = K = 1
]


@pytest.mark.slow
@pytest.mark.parametrize("max_smem", [BIG_SMEM, 0, 3000], ids=["smem", "global", "mixed"])
@pytest.mark.parametrize("over", [False, True], ids=["interests", "behaviors"])
@pytest.mark.parametrize("shape", JAGGED_EMU, ids=["through_S", "through_Q", "ones"])
def test_emulated_jagged_kernels_match_reference(emu, shape, over, max_smem):
    # float64, grid 2 < B: the grid-stride loop over users, rows read at each user's offset, w as (N, K).
    check_jagged_emulated(emu, make_jagged_case(*shape, torch.float64), 3, over, grid=2, max_smem=max_smem,
                          logit_scale=20.0 if over else 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("over", [False, True], ids=["interests", "behaviors"])
def test_emulated_jagged_paper_shape_low_precision(emu, over):
    lengths = [50, 0, 7, 33, 50, 21]
    check_jagged_emulated(emu, make_jagged_case(lengths, 64, 64, 4, 50, torch.float32, seed=1), 3, over, grid=2,
                          max_smem=BIG_SMEM)
    got = check_jagged_emulated(emu, make_jagged_case(lengths, 64, 64, 4, 50, torch.bfloat16, seed=2,
                                                      weight_dtype=torch.float32), 3, over, grid=3, max_smem=0)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16 and got[3].dtype == torch.float32


@pytest.mark.slow
def test_emulated_jagged_equals_emulated_padded_on_the_same_users(emu):
    """The jagged kernel's capsules equal the padded kernel's on the zero-padded batch (interests mode)."""
    from mind_kernels.jagged import pad

    V, S, b0, offsets, imask, G = make_jagged_case([4, 0, 9, 2], 8, 8, 3, 9, torch.float64, seed=4)
    E, mask = pad(V, offsets, 9)
    for over in (False, True):
        c, w = emulated_jagged_fn(emu, 2, BIG_SMEM)(V, S, b0, offsets, imask, 3, over)
        cp, wp = emulated_fn(emu, 2, BIG_SMEM)(E, S, b0, mask, imask, 3, over)
        torch.testing.assert_close(c, cp, atol=1e-12, rtol=1e-12)


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("over", [False, True], ids=["interests", "behaviors"])
def test_cuda_jagged_matches_reference(dtype, over):
    from mind_kernels.checks import run_op as run

    V, S, b0, offsets, imask, G = make_jagged_case([50, 0, 7, 33, 50, 21] * 20, 64, 64, 4, 50, dtype, device="cuda")

    def cuda_jagged(V, S, b0, offsets, imask, r, over_, logit_scale=1.0):
        return mind_kernels.b2i_routing_jagged(V, offsets, S, b0, imask, r, "behaviors" if over_ else "interests",
                                               logit_scale=logit_scale, return_weights=True, backend="cuda")

    got = run(cuda_jagged, V, S, b0, offsets, imask, G, 3, over, logit_scale=20.0)
    oracle = run(jagged_reference_fn, V.double(), S.double(), b0.double(), offsets, imask, G.double(), 3, over,
                 logit_scale=20.0)
    same = run(jagged_reference_fn, V, S, b0, offsets, imask, G, 3, over, logit_scale=20.0) if dtype in LOW else None
    assert_within_tolerance(got, oracle, same, dtype)
