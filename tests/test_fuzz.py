"""Property-based fuzzing of the public op ``mind_kernels.b2i_routing`` on the CPU backends.

Every drawn call must either match the float64 reference evaluated on the same (dtype-rounded)
inputs, or raise a clear ``ValueError`` / ``TypeError``; never crash, never return a wrong
number.  Backends: "reference" always, "cpp" when its kernel is built (Triton is left to
tests/test_triton.py: its CPU path is the interpreter, far too slow to fuzz).

Tolerances (ROUTING.md, "Accuracy"), with ``oracle`` = float64 reference on the same inputs:

* float64: atol 1e-10, rtol 1e-8 (same math, same precision);
* float32: atol 1e-5, rtol 1e-4;
* float16 / bfloat16: max|got - oracle| <= 2 * max|ref_dtype - oracle| + floor, where
  ``ref_dtype`` is the reference run in that dtype and floor = 2 eps(dtype) * max(1, max|oracle|)
  (one rounding of the result to the dtype, which the reference may get lucky on).

Non-finite inputs (reference.py's contract): NaN/+Inf/-Inf injected into a valid behaviour, a
padded behaviour, the logits, or S.  Per user u: if the oracle's capsules of u are finite, the
backend's must be finite and match; if not, the backend's must be non-finite too.  The
contract itself is checked on the oracle: users other than the injected one stay finite (when
S is finite), and in "interests" mode whatever sits in masked positions, or in the logits of
masked positions / inactive interests, leaves the user's capsules unchanged.

Inputs come in odd layouts: transposed views and strided slices whose gaps hold NaN (a kernel
that ignores strides reads them and fails the comparison), (K, L) or (B, K, L) logits,
bool or integer masks, users with no valid behaviour, users with no active interest, B = 0.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mind_kernels import b2i_routing, ops  # noqa: E402
from mind_kernels.reference import b2i_routing_reference  # noqa: E402

CPP_REASON = ops.kernel_unavailable_reason("cpu")
needs_cpp = pytest.mark.skipif(CPP_REASON is not None, reason=f"cpp backend unavailable: {CPP_REASON}")
BACKENDS = ["reference", pytest.param("cpp", marks=needs_cpp)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NONFINITE = [float("nan"), float("inf"), float("-inf")]

# CI draws the same examples on every run (derandomize): a red CI then means a change, never a lucky
# draw. HYPOTHESIS_PROFILE=explore draws fresh examples, for hunting with more time.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                print_blob=True)


# ----------------------------------------------------------------------------- drawing cases


def _strided(t: torch.Tensor, how: str, fill) -> torch.Tensor:
    """The values of ``t`` in a non-contiguous layout: "T" a transposed view of the last two
    axes, "slice" every other element of a twice-as-wide buffer whose gaps hold ``fill``."""
    if how == "T" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "slice":
        big = torch.full((*t.shape[:-1], 2 * t.shape[-1]), fill, dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    return t


@st.composite
def routing_cases(draw, nonfinite: str = "any", padding_in_interests: bool = True,
                  padded_logits_in_behaviors: bool = True):
    """A dict describing one call.  ``nonfinite``: "none", "any" (maybe inject), or
    "padding_interests" (always: interests mode, non-finite in padded behaviours only).
    ``padding_in_interests=False`` never draws that last sub-case; ``nonfinite="padded_logits_behaviors"``
    always draws behaviors mode with NaN/+Inf logits at a padded position, and
    ``padded_logits_in_behaviors=False`` never draws that one."""
    c = dict(
        B=draw(st.integers(0, 6)), L=draw(st.integers(1, 9)), D_in=draw(st.integers(1, 7)),
        D_out=draw(st.integers(1, 7)), K=draw(st.integers(1, 5)), r=draw(st.integers(1, 4)),
        dtype=draw(st.sampled_from(DTYPES)), softmax_over=draw(st.sampled_from(["interests", "behaviors"])),
        logits3d=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
        mask=draw(st.sampled_from(["none", "bool", "int"])), imask=draw(st.sampled_from(["none", "bool", "int"])),
        empty_users=draw(st.booleans()), no_interest_users=draw(st.booleans()),
        layout_E=draw(st.sampled_from(["", "T", "slice"])), layout_S=draw(st.sampled_from(["", "T", "slice"])),
        layout_b=draw(st.sampled_from(["", "T", "slice"])), layout_mask=draw(st.sampled_from(["", "slice"])),
        detach=draw(st.sampled_from([True, True, True, False])), grad=draw(st.sampled_from(["", "", "random", "sum"])),
    )
    c["weight_f32"] = c["dtype"] in (torch.float16, torch.bfloat16) and draw(st.booleans())
    inject = []
    if nonfinite == "padding_interests":
        c["softmax_over"] = "interests"
        c["B"] = max(c["B"], 1)
        c["L"] = max(c["L"], 2)
        c["mask"] = draw(st.sampled_from(["bool", "int"]))
        c["grad"] = ""
        inject = [("E_pad", draw(st.integers(0, c["B"] - 1)), draw(st.sampled_from(NONFINITE)))]
    elif nonfinite == "padded_logits_behaviors":
        c.update(softmax_over="behaviors", B=max(c["B"], 1), L=max(c["L"], 2), grad="",
                 mask=draw(st.sampled_from(["bool", "int"])))
        inject = [("logits_pad", draw(st.integers(0, c["B"] - 1)), draw(st.sampled_from(NONFINITE[:2])))]
    elif nonfinite == "any" and c["B"] > 0 and draw(st.booleans()):
        c["grad"] = ""  # gradients of non-finite inputs are not compared
        targets = ["E_valid", "logits_valid", "logits_valid", "S"]
        if c["mask"] != "none":
            if padding_in_interests or c["softmax_over"] == "behaviors":
                targets.append("E_pad")
            targets.append("logits_pad")
        for _ in range(draw(st.integers(1, 2))):
            kind, value = draw(st.sampled_from(targets)), draw(st.sampled_from(NONFINITE))
            if (kind == "logits_pad" and c["softmax_over"] == "behaviors" and value != float("-inf")
                    and not padded_logits_in_behaviors):
                value = float("-inf")  # that sub-case has its own test below
            if (kind.startswith("logits") and c["softmax_over"] == "behaviors" and value != float("-inf")
                    and not padded_logits_in_behaviors):
                c["logits3d"] = True  # (K, L) logits would put it in other users' padding: that sub-case
            inject.append((kind, draw(st.integers(0, c["B"] - 1)), value))
    c["inject"] = inject
    return c


def _make_inputs(c):
    """Tensors for case ``c``: (E, S, b0, mask, imask) as the backend gets them, plus the
    float64 copies (same values) for the oracle and the set of users a non-finite touches."""
    g = torch.Generator().manual_seed(c["seed"])
    B, L, D_in, D_out, K, dtype = c["B"], c["L"], c["D_in"], c["D_out"], c["K"], c["dtype"]
    E = torch.randn(B, L, D_in, generator=g, dtype=torch.float64).to(dtype)
    S = (torch.randn(D_out, D_in, generator=g, dtype=torch.float64) / math.sqrt(D_in)).to(
        torch.float32 if c["weight_f32"] else dtype)
    b0 = torch.randn(*((B,) if c["logits3d"] else ()), K, L, generator=g).to(
        torch.float64 if dtype == torch.float64 else torch.float32)
    mask = imask = None
    valid = torch.ones(B, L, dtype=torch.bool)
    if c["mask"] != "none":
        valid = torch.rand(B, L, generator=g) < 0.7
        if c["empty_users"] and B:
            valid[torch.randint(0, B, (1,), generator=g)] = False
        if any(kind in ("E_pad", "logits_pad") for kind, _, _ in c["inject"]):
            for _, u, _ in c["inject"]:  # make sure the user has padding to put the value in
                valid[u, -1] = False
        mask = valid if c["mask"] == "bool" else valid.to(torch.int64)
    active = torch.ones(B, K, dtype=torch.bool)
    if c["imask"] != "none":
        active = torch.rand(B, K, generator=g) < 0.7
        if c["no_interest_users"] and B:
            active[torch.randint(0, B, (1,), generator=g)] = False
        imask = active if c["imask"] == "bool" else active.to(torch.int32)

    touched = set()
    must_propagate = set()  # users whose capsules the contract says turn non-finite
    # (tensor, index, value, users): a later injection may overwrite an earlier one at the same element,
    # so what must propagate is decided on the values that are there once every injection is done.
    pending = []
    for kind, u, value in c["inject"]:
        if kind == "E_valid" or kind == "E_pad":
            pos = (valid[u] if kind == "E_valid" else ~valid[u]).nonzero().flatten()
            if len(pos) == 0:
                continue
            i = int(pos[torch.randint(0, len(pos), (1,), generator=g)])
            index = (u, i, int(torch.randint(0, D_in, (1,), generator=g)))
            E[index] = value
            if active[u].any() and (kind == "E_valid" or c["softmax_over"] == "behaviors"):
                pending.append((E, index, value, [u]))
        elif kind in ("logits_valid", "logits_pad"):
            pos = (valid[u] if kind == "logits_valid" else ~valid[u]).nonzero().flatten()
            if len(pos) == 0:
                continue
            i = int(pos[torch.randint(0, len(pos), (1,), generator=g)])
            j = int(torch.randint(0, K, (1,), generator=g))
            users = [u] if b0.dim() == 3 else list(range(B))
            index = (u, j, i) if b0.dim() == 3 else (j, i)
            b0[index] = value
            if b0.dim() == 2:
                u = "all"
            # NaN/+Inf logits of an active interest at a position in the softmax: a valid one, or
            # (behaviors mode) any; -Inf is a legal logit (weight 0) and need not propagate
            pending.append((b0, index, value, [
                v for v in users
                if value != float("-inf") and active[v, j] and valid[v].any()
                and (valid[v, i] or c["softmax_over"] == "behaviors")
            ]))
        else:
            S[int(torch.randint(0, D_out, (1,), generator=g)), int(torch.randint(0, D_in, (1,), generator=g))] = value
            u = "all"
        touched.add(u)
    for tensor, index, value, users in pending:
        now = float(tensor[index])
        if now == value or (math.isnan(now) and math.isnan(value)):  # not overwritten since
            must_propagate.update(users)

    oracle_in = (E.double(), S.double(), b0.double(), mask, imask)
    nan = float("nan")
    E = _strided(E, c["layout_E"], nan)
    S = _strided(S, c["layout_S"], nan)
    b0 = _strided(b0, c["layout_b"], nan)
    if mask is not None:
        mask = _strided(mask, c["layout_mask"], 1)
    return (E, S, b0, mask, imask), oracle_in, (touched, must_propagate)


# ----------------------------------------------------------------------------- comparing


def _eps(dtype):
    return torch.finfo(dtype).eps


def _assert_close(got, oracle, ref_dtype, dtype, what):
    """ROUTING.md's per-dtype tolerance; ``ref_dtype`` = the reference's own result in ``dtype``."""
    got64 = got.detach().double()
    if dtype == torch.float64:
        torch.testing.assert_close(got64, oracle, atol=1e-10, rtol=1e-8, msg=lambda m: f"{what}: {m}")
    elif dtype == torch.float32:
        torch.testing.assert_close(got64, oracle, atol=1e-5, rtol=1e-4, msg=lambda m: f"{what}: {m}")
    else:
        if got64.numel() == 0:
            return
        err = (got64 - oracle).abs().max().item()
        ref_err = (ref_dtype.detach().double() - oracle).abs().max().item()
        floor = 2 * _eps(dtype) * max(1.0, oracle.abs().max().item())
        assert err <= 2 * ref_err + floor, f"{what}: error {err:.3g} > 2 x reference's {ref_err:.3g} + {floor:.3g}"


def _compare_per_user(got, oracle, ref_dtype, dtype, what):
    """Users whose oracle is finite must match it; the others must be non-finite in ``got``."""
    fin = torch.isfinite(oracle).flatten(1).all(1)
    got_fin = torch.isfinite(got.detach()).flatten(1).all(1)
    bad = (~fin & got_fin).nonzero().flatten().tolist()
    assert not bad, f"{what}: users {bad} are non-finite in the float64 reference but finite here"
    bad = (fin & ~got_fin).nonzero().flatten().tolist()
    assert not bad, f"{what}: users {bad} are finite in the float64 reference but not here"
    if fin.any():
        _assert_close(got[fin], oracle[fin], ref_dtype[fin], dtype, what)


def _run(backend, c, tensors, grad_output=None):
    E, S, b0, mask, imask = tensors
    kw = dict(num_iters=c["r"], softmax_over=c["softmax_over"], detach_routing=c["detach"],
              return_weights=True, backend=backend)
    if grad_output is None:
        return b2i_routing(E, S, b0, mask, imask, **kw), None
    E = E.detach().requires_grad_(True)
    S = S.detach().requires_grad_(True)
    caps, w = b2i_routing(E, S, b0, mask, imask, **kw)
    if grad_output == "sum":
        dE, dS = torch.autograd.grad(caps.sum(), (E, S))  # a stride-0 gradient reaches backward
    else:
        dE, dS = torch.autograd.grad(caps, (E, S), grad_outputs=grad_output)
    return (caps, w), (dE, dS)


def _check_case(backend, c):
    tensors, oracle_in, (touched, must_propagate) = _make_inputs(c)
    if backend == "cpp" and not c["detach"]:
        # the fused backward is the detached one: an explicit request must be refused, clearly
        # (for B = 0 too: the backend is chosen before the empty shortcut)
        with pytest.raises(ValueError, match="detach_routing=False"):
            b2i_routing(*tensors, num_iters=c["r"], softmax_over=c["softmax_over"], detach_routing=False,
                        backend="cpp")
        return
    B, K, D_out, dtype = c["B"], c["K"], c["D_out"], c["dtype"]
    grad_output = None
    if c["grad"] and B > 0:
        grad_output = "sum"
        if c["grad"] == "random":
            g = torch.Generator().manual_seed(c["seed"] + 1)
            grad_output = _strided(torch.randn(B, K, D_out, generator=g, dtype=torch.float64).to(dtype),
                                   "T", float("nan"))
    (caps, w), grads = _run(backend, c, tensors, grad_output)
    assert caps.shape == (B, K, D_out) and caps.dtype == dtype
    assert w.shape == (B, K, c["L"])
    if B == 0:
        return

    oracle_go = None if grad_output is None else ("sum" if grad_output == "sum" else grad_output.double())
    (o_caps, o_w), o_grads = _run("reference", c, oracle_in, oracle_go)
    (r_caps, r_w), r_grads = (o_caps, o_w), o_grads
    if dtype != torch.float64:
        (r_caps, r_w), r_grads = _run("reference", c, tensors, grad_output)
    o_caps, o_w = o_caps.detach(), o_w.detach()

    # the contract, on the oracle itself
    if "all" not in touched:
        for u in range(B):
            if u not in touched:
                assert torch.isfinite(o_caps[u]).all(), f"non-finite leaked to untouched user {u}"
    for u in sorted(must_propagate):
        assert not torch.isfinite(o_caps[u]).all(), f"float64 reference swallowed the non-finite input of user {u}"
        assert not torch.isfinite(caps[u]).all(), f"{backend} swallowed the non-finite input of user {u}"
    if c["inject"] and c["softmax_over"] == "interests" and "all" not in touched:
        clean_in, _, _ = _make_inputs({**c, "inject": [(k, u, 0.0) for k, u, _ in c["inject"]]})
        (clean, _), _ = _run("reference", {**c, "inject": []}, tuple(
            t.double() if t is not None and t.is_floating_point() else t for t in clean_in))
        for kind, u, _ in c["inject"]:
            if kind == "E_pad" and all(k == "E_pad" for k, uu, _ in c["inject"] if uu == u):
                # padding of u holds the only non-finite of u: u's capsules are the clean ones
                torch.testing.assert_close(o_caps[u], clean.detach()[u], atol=1e-12, rtol=1e-10)

    _compare_per_user(caps, o_caps, r_caps, dtype, f"{backend} capsules")
    _compare_per_user(w, o_w, r_w, torch.float64 if dtype == torch.float64 else torch.float32,
                      f"{backend} coupling weights")
    if grads is not None:
        for name, got, want, ref in zip(("dE", "dS"), grads, o_grads, r_grads):
            assert got.shape == want.shape and got.dtype == ref.dtype, name
            # half inputs: the 2x-the-reference's-own-error rule, also for a float32 S's gradient
            gdt = dtype if dtype in (torch.float16, torch.bfloat16) else got.dtype
            _assert_close(got, want.double(), ref, gdt, f"{backend} {name}")


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(c=routing_cases(nonfinite="any", padded_logits_in_behaviors=False))
def test_fuzz_matches_float64_reference(backend, c):
    _check_case(backend, c)


# The cpp kernel leaked NaN padding through 0 * NaN here until d8dd3b2 (found by this test).
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None, print_blob=True)
@given(c=routing_cases(nonfinite="padding_interests"))
def test_fuzz_nonfinite_padding_ignored_in_interests_mode(backend, c):
    _check_case(backend, c)


@pytest.mark.parametrize("backend", [
    "reference",
    pytest.param("cpp", marks=needs_cpp),
])
@settings(max_examples=40, deadline=None, print_blob=True)
@given(c=routing_cases(nonfinite="padded_logits_behaviors"))
def test_fuzz_nonfinite_padded_logits_propagate_in_behaviors_mode(backend, c):
    _check_case(backend, c)


ERRORS = ["meta_one", "meta_all", "E_int", "S_dtype", "mask_float", "imask_float", "logits_int",
          "logits_L", "S_Din", "mask_shape", "imask_shape", "E_2d", "iters_zero", "iters_float",
          "iters_bool", "axis", "backend_name", "logits_B", "not_tensor", "D_zero", "K_zero"]


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=80, deadline=None, print_blob=True)
@given(c=routing_cases(nonfinite="none"), error=st.sampled_from(ERRORS), which=st.integers(0, 4))
def test_fuzz_invalid_inputs_raise_clear_errors(backend, c, error, which):
    c = {**c, "B": max(c["B"], 1), "mask": "bool", "imask": "bool", "logits3d": True}
    (E, S, b0, mask, imask), _, _ = _make_inputs(c)  # noqa: F841
    args = dict(behaviors=E, weight=S, init_logits=b0, mask=mask, interest_mask=imask)
    kw = dict(num_iters=c["r"], softmax_over=c["softmax_over"], backend=backend)
    meta = torch.device("meta")
    if error == "meta_one":
        name = list(args)[which]
        args[name] = args[name].to(meta)
        expected = ValueError
    elif error == "meta_all":
        args = {k: v.to(meta) for k, v in args.items()}
        expected = ValueError
    elif error == "E_int":
        args["behaviors"] = (E.double() * 10).to(torch.int32)
        expected = TypeError
    elif error == "S_dtype":
        # float32 S is allowed with any E; anything else must be E's dtype
        other = {torch.float32: torch.float64, torch.float64: torch.float16, torch.float16: torch.bfloat16,
                 torch.bfloat16: torch.float16}[c["dtype"]]
        args["weight"] = S.to(other)
        expected = TypeError
    elif error == "mask_float":
        args["mask"] = mask.float()
        expected = TypeError
    elif error == "imask_float":
        args["interest_mask"] = imask.double()
        expected = TypeError
    elif error == "logits_int":
        args["init_logits"] = b0.to(torch.int64)
        expected = TypeError
    elif error == "logits_L":
        args["init_logits"] = torch.zeros(c["B"], c["K"], c["L"] + 1 + which)
        expected = ValueError
    elif error == "logits_B":
        args["init_logits"] = torch.zeros(c["B"] + 1 + which, c["K"], c["L"])
        expected = ValueError
    elif error == "S_Din":
        args["weight"] = torch.zeros(c["D_out"], c["D_in"] + 1 + which, dtype=S.dtype)
        expected = ValueError
    elif error == "mask_shape":
        args["mask"] = torch.ones(c["B"], c["L"] + 1 + which, dtype=torch.bool)
        expected = ValueError
    elif error == "imask_shape":
        args["interest_mask"] = torch.ones(c["B"] + 1 + which, c["K"], dtype=torch.bool)
        expected = ValueError
    elif error == "E_2d":
        args["behaviors"] = E[0]
        expected = ValueError
    elif error == "iters_zero":
        kw["num_iters"] = -which
        expected = ValueError
    elif error == "iters_float":
        kw["num_iters"] = float(c["r"])
        expected = TypeError
    elif error == "iters_bool":
        kw["num_iters"] = True
        expected = TypeError
    elif error == "axis":
        kw["softmax_over"] = ["users", "Interests", "", "behaviours", None][which]
        expected = ValueError
    elif error == "backend_name":
        kw["backend"] = ["cuda_graph", "CPP", "", "torch", "fast"][which]
        expected = ValueError
    elif error == "not_tensor":
        name = list(args)[which]
        args[name] = args[name].tolist()
        expected = TypeError
    elif error == "D_zero":
        args["weight"] = torch.zeros(0, c["D_in"], dtype=S.dtype)
        expected = ValueError
    else:  # K_zero
        args["init_logits"] = torch.zeros(c["B"], 0, c["L"])
        args["interest_mask"] = None
        expected = ValueError
    with pytest.raises(expected, match="b2i_routing"):
        b2i_routing(**args, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_users_give_empty_outputs(backend):
    # B = 0 with every optional input present and in odd layouts: empty results of the right shape
    E = torch.zeros(0, 5, 3).transpose(1, 2).contiguous().transpose(1, 2)
    S = torch.randn(4, 3)
    caps, w = b2i_routing(E, S, torch.randn(0, 2, 5), torch.zeros(0, 5, dtype=torch.bool),
                          torch.zeros(0, 2, dtype=torch.bool), return_weights=True, backend=backend)
    assert caps.shape == (0, 2, 4) and w.shape == (0, 2, 5) and caps.dtype == torch.float32


def test_oracle_is_the_reference_function():
    # the oracle path (b2i_routing(..., backend="reference") in float64) is the spec function itself
    g = torch.Generator().manual_seed(0)
    E, S, b0 = torch.randn(3, 4, 2, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g,
                                                                                    dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(b2i_routing(E, S, b0, backend="reference"), b2i_routing_reference(E, S, b0),
                               atol=0, rtol=0)
