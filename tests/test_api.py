"""Validation errors, empty batches and the dispatcher of the public op."""

import logging

import pytest
import torch

import mind_kernels
from mind_kernels import b2i_routing, backends, dispatch


def _ok(B=2, L=4, D_in=3, D_out=5, K=2):
    return torch.randn(B, L, D_in), torch.randn(D_out, D_in), torch.randn(K, L)


@pytest.mark.parametrize(
    "mutate,exc,words",
    [
        (lambda E, S, b: (E[0], S, b, {}), ValueError, ["behaviors", "3-D"]),
        (lambda E, S, b: (E, S[:, :2], b, {}), ValueError, ["weight", "D_in"]),
        (lambda E, S, b: (E, S[None], b, {}), ValueError, ["weight", "2-D"]),
        (lambda E, S, b: (E, S, b[:, :3], {}), ValueError, ["init_logits", "L = 3"]),
        (lambda E, S, b: (E, S, b.expand(3, -1, -1), {}), ValueError, ["init_logits", "B = 3"]),
        (lambda E, S, b: (E, S, b[None, None], {}), ValueError, ["init_logits"]),
        (lambda E, S, b: (E, S, b, {"mask": torch.ones(2, 5, dtype=torch.bool)}), ValueError, ["mask", "(2, 4)"]),
        (lambda E, S, b: (E, S, b, {"mask": torch.ones(2, 4)}), TypeError, ["mask", "float"]),
        (lambda E, S, b: (E, S, b, {"interest_mask": torch.ones(2, 3, dtype=torch.bool)}), ValueError,
         ["interest_mask", "(2, 2)"]),
        (lambda E, S, b: (E.int(), S, b, {}), TypeError, ["behaviors", "int32"]),
        (lambda E, S, b: (E, S.double(), b, {}), TypeError, ["weight", "float64"]),
        (lambda E, S, b: (E, S, b.long(), {}), TypeError, ["init_logits"]),
        (lambda E, S, b: (E, S, b, {"num_iters": 0}), ValueError, ["num_iters"]),
        (lambda E, S, b: (E, S, b, {"num_iters": 2.0}), TypeError, ["num_iters"]),
        (lambda E, S, b: (E, S, b, {"softmax_over": "items"}), ValueError, ["softmax_over", "items"]),
        (lambda E, S, b: (E, S, b, {"backend": "tpu"}), ValueError, ["backend", "tpu"]),
        (lambda E, S, b: (E.numpy(), S, b, {}), TypeError, ["behaviors", "ndarray"]),
        (lambda E, S, b: (E, S, b[:0], {}), ValueError, ["K >= 1"]),
        (lambda E, S, b: (E[:, :0], S, b[:, :0], {}), ValueError, ["L >= 1"]),
        (lambda E, S, b: (E, S, b, {"logit_scale": 0}), ValueError, ["logit_scale", "0"]),
        (lambda E, S, b: (E, S, b, {"logit_scale": -1.0}), ValueError, ["logit_scale", "-1.0"]),
        (lambda E, S, b: (E, S, b, {"logit_scale": float("nan")}), ValueError, ["logit_scale", "nan"]),
        (lambda E, S, b: (E, S, b, {"logit_scale": float("inf")}), ValueError, ["logit_scale", "inf"]),
        (lambda E, S, b: (E, S, b, {"logit_scale": "2"}), TypeError, ["logit_scale", "'2'"]),
        (lambda E, S, b: (E, S, b, {"logit_scale": True}), TypeError, ["logit_scale", "True"]),
    ],
)
def test_validation_errors_name_the_argument(mutate, exc, words):
    E, S, b, kwargs = mutate(*_ok())
    with pytest.raises(exc) as info:
        b2i_routing(E, S, b, **kwargs)
    for w in words:
        assert w in str(info.value)


def test_device_mismatch_is_reported():
    E, S, b = _ok()
    meta = torch.empty(2, 4, device="meta", dtype=torch.bool)
    with pytest.raises(ValueError, match="mask.*meta.*one device"):
        b2i_routing(E, S, b, mask=meta)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_empty_batch_returns_empty(backend):
    E, S, b = _ok(B=0)
    out, w = b2i_routing(E, S, b, return_weights=True, backend=backend)
    assert out.shape == (0, 2, 5) and w.shape == (0, 2, 4)


def test_backends_table_lists_every_backend_and_reasons():
    table = backends()
    names = [s.name for s in table]
    assert names == ["reference", "cpp", "cuda", "triton"]
    ref = table[0]
    assert ref.available["cpu"] is None
    text = str(table)
    assert "reference" in text and "cuda" in text
    E, S, b = _ok()
    per_call = backends(E, S, b, detach_routing=False)
    assert per_call.selected == "reference"
    reasons = {s.name: s.reasons for s in per_call}
    assert reasons["reference"] == []
    assert any("cpu" in r for r in reasons["cuda"])  # a CUDA-only backend says why it refuses CPU tensors
    assert reasons["cpp"]  # not built, or refuses detach_routing=False: either way a reason


def test_explicit_backend_that_cannot_serve_raises_with_reasons():
    E, S, b = _ok()
    with pytest.raises(ValueError, match="backend='cuda' cannot serve.*cpu"):
        b2i_routing(E, S, b, backend="cuda")


def test_env_var_forces_a_backend(monkeypatch):
    E, S, b = _ok()
    monkeypatch.setenv("MIND_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="MIND_KERNELS_BACKEND='cuda'"):
        b2i_routing(E, S, b)
    monkeypatch.setenv("MIND_KERNELS_BACKEND", "reference")
    torch.testing.assert_close(b2i_routing(E, S, b), b2i_routing(E, S, b, backend="reference"))
    monkeypatch.setenv("MIND_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        b2i_routing(E, S, b)


def test_auto_fallback_is_logged_once(caplog, monkeypatch):
    E, S, b = _ok()
    call = mind_kernels.api._call_of(E, S, mind_kernels.api.check_routing_inputs(E, S, b), "interests", False)
    monkeypatch.setattr(dispatch, "_logged_fallbacks", set())
    monkeypatch.setattr(dispatch, "_selection_cache", {})
    with caplog.at_level(logging.WARNING, logger="mind_kernels"):
        assert dispatch.select(call).name == "reference"
        assert dispatch.select(call).name == "reference"
    built = dispatch.BACKENDS["cpp"].unavailable("cpu") is None
    logged = [r for r in caplog.records if "passed over" in r.getMessage()]
    assert len(logged) == (1 if built else 0)  # logged once when a built backend is skipped, never when not built


def test_info_module_prints_table(capsys):
    from mind_kernels import info

    info.main()
    out = capsys.readouterr().out
    assert "torch" in out and "reference" in out and "cpp" in out


def test_empty_batch_still_checks_an_explicit_backend():
    E, S, b = _ok(B=0)
    with pytest.raises(ValueError, match="backend='cuda' cannot serve"):
        b2i_routing(E, S, b, backend="cuda")


def test_logit_scale_follows_detach_routing_positionally_and_reaches_backends():
    E, S, b = _ok()
    # b2i_routing(behaviors, weight, init_logits, mask, interest_mask, num_iters, softmax_over,
    #             detach_routing, logit_scale, return_weights, backend)
    pos = b2i_routing(E, S, b, None, None, 3, "interests", True, 20.0, False, "reference")
    kw = b2i_routing(E, S, b, logit_scale=20.0, backend="reference")
    assert torch.equal(pos, kw)
    assert not torch.allclose(kw, b2i_routing(E, S, b, backend="reference"))
    assert torch.equal(b2i_routing(E, S, b, logit_scale=2, backend="reference"),
                       b2i_routing(E, S, b, logit_scale=2.0, backend="reference"))  # an int is a float
    with pytest.raises(ValueError, match="logit_scale"):
        backends(E, S, b, logit_scale=0.0)
    assert backends(E, S, b, logit_scale=20.0).selected == backends(E, S, b).selected
