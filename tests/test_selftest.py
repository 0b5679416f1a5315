"""``python -m mind_kernels.selftest``, the tolerance rule it shares with the tests, the
verified-hardware record and the once-per-process note on the first GPU call."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from mind_kernels import checks, dispatch, ops, selftest
from mind_kernels.dispatch import RoutingCall

HAS_CPP = ops.kernel_unavailable_reason("cpu") is None
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"CPU kernel not built: {ops.kernel_unavailable_reason('cpu')}")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _selftest(*args, interpret=False, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MIND_KERNELS_BACKEND")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "mind_kernels.selftest", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------ the command


@needs_cpp
def test_quick_selftest_passes_on_cpu(tmp_path):
    report = tmp_path / "selftest.json"
    rc, out = _selftest("--quick", "--device", "cpu", "--json", str(report))
    assert rc == 0, out[-4000:]
    assert "capsules coupling       dE       dS tol used  result" in out
    rows = [line for line in out.splitlines() if line.startswith("cpp     cpu  ")]
    assert len(rows) >= 10 and all(line.rstrip().endswith("PASS") for line in rows), out
    assert "FAIL" not in out
    assert "timing cpp    cpu  B=1024 L=50 D=64 K=4 r=3 float32: forward" in out and "eager reference" in out
    assert "self-test passed" in out
    data = json.loads(report.read_text())
    assert data["passed"] is True and data["tested"] == [{"backend": "cpp", "device": "cpu"}]
    assert all(r["ok"] for r in data["rows"]) and data["timings"][0]["backend"] == "cpp"
    cases = {(r["case"], r["dtype"], r["over"], r["scale"]) for r in data["rows"]}
    for dtype in ("float32", "float16", "bfloat16"):
        for over in ("interests", "behaviors"):
            assert ("paper", dtype, over, 1.0) in cases
    assert ("paper", "float32", "interests", 20.0) in cases
    assert {"B=0", "B=1"} <= {r["case"] for r in data["rows"]}


@needs_cpp
def test_a_broken_backend_fails(monkeypatch, capsys):
    """A backend 1e-3 off on every capsule: FAIL rows, exit status 1 (B = 0 never reaches the kernel)."""
    backend = dispatch.BACKENDS["cpp"]
    run = backend.run

    def broken(*args, **kwargs):
        capsules, coupling = run(*args, **kwargs)
        return capsules + 1e-3, coupling

    monkeypatch.setattr(backend, "run", broken)
    real_grid = selftest.grid

    def small_grid(b, d, quick=False):  # three cases of the real grid, then B = 0
        cases = [c for c in real_grid(b, d, quick) if 1 < c.B <= 16 and c.L > 1][:3]
        return cases + [selftest.Case("B=0", 0, 50, 64, 64, 4, torch.float32)]

    monkeypatch.setattr(selftest, "grid", small_grid)
    rc = selftest.main(["--quick", "--device", "cpu", "--backend", "cpp", "--no-timing"])
    out = capsys.readouterr().out
    assert rc == 1, out
    rows = [line for line in out.splitlines() if line.startswith("cpp     cpu  ")]
    assert len(rows) == 4
    assert all("  FAIL" in line for line in rows[:3]), out
    assert rows[3].startswith("cpp     cpu  B=0") and rows[3].rstrip().endswith("PASS")
    assert "self-test FAILED: 3 of 4 cases" in out
    assert dispatch._gpu_note_logged is False  # main() restores the note's flag


def test_an_exception_is_a_failed_row(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(dispatch.BACKENDS["reference"], "run", boom)
    row = selftest.run_case("reference", "cpu", selftest.Case("tiny", *selftest.TINY, torch.float32))
    assert not row.ok and "illegal memory access" in row.note
    assert "FAIL" in selftest.format_table([row])


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batch_zero(dtype):
    row = selftest.run_case("cpp", "cpu", selftest.Case("B=0", 0, 50, 64, 64, 4, dtype))
    assert row.ok, row
    assert row.errors == {"capsules": 0.0, "coupling": 0.0, "dE": 0.0, "dS": 0.0}
    # and through the shared helper: zero gradients of the right shapes, no backward through nothing
    E, S, b0, mask, im, G = selftest.make_inputs(selftest.Case("B=0", 0, 7, 5, 3, 2, dtype), "cpu")
    c, w, dE, dS = checks.run_op(selftest._api("cpp"), E, S, b0, mask, im, G, 3, "interests")
    assert c.shape == (0, 2, 3) and w.shape == (0, 2, 7) and dE.shape == (0, 7, 5) and dS.shape == (3, 5)


def test_nothing_to_test_is_exit_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert selftest.main(["--device", "cuda", "--backend", "cuda"]) == 2
    assert "skipped cuda on cuda" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_interpreter_on_tiny_shapes():
    rc, out = _selftest("--device", "cpu", "--backend", "triton", interpret=True, timeout=120)
    assert rc == 0, out[-4000:]
    rows = [line for line in out.splitlines() if line.startswith("triton  cpu  ")]
    assert len(rows) >= 8 and all(line.rstrip().endswith("PASS") for line in rows), out
    assert any(" B=0 " in line for line in rows) and any(" float16 " in line for line in rows)
    assert "not timed" in out and "bfloat16 is not run under the interpreter" in out


def test_grid_covers_the_issue():
    """The full GPU grid: paper shape in three dtypes, both axes, s in {1, 20}; odd shapes; B = 0, 1; masks."""
    cases = selftest.grid("cuda", "cuda")
    paper = {(c.dtype, c.over, c.scale) for c in cases if c.label == "paper"}
    assert len(paper) == 12
    assert all(c.imask == "dynamic" and c.masks for c in cases if c.label == "paper")
    assert {0, 1} <= {c.B for c in cases}
    assert any(c.imask == "random" for c in cases) and any(not c.masks for c in cases)
    assert any(c.D_in >= 2 * c.D_out for c in cases) and any(c.L == 1 for c in cases)  # through S; L = 1
    assert len(selftest.grid("cuda", "cuda", quick=True)) < len(cases)
    tiny = selftest.grid("triton", "cpu")
    assert max(c.B * c.L * c.D_in for c in tiny) <= 400 and torch.bfloat16 not in {c.dtype for c in tiny}


# ------------------------------------------------------------------------------------ the tolerance rule


def test_tolerance_rule():
    ref = torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64)
    f32 = torch.float32
    ok = checks.tolerance_used("c", (ref + 5e-6).float(), ref, None, f32)
    assert ok.used <= 1 and ok.max_err == pytest.approx(5e-6, rel=1e-2)
    assert checks.tolerance_used("c", (ref + 2e-5).float(), ref, None, f32).used > 1
    # float16: 2x the same-dtype reference's error on top of the float32 tolerance
    own = ref + 1e-3
    assert checks.tolerance_used("c", ref + 2e-3, ref, own, torch.float16).used <= 1
    assert checks.tolerance_used("c", ref + 2.2e-3, ref, own, torch.float16).used > 1
    with pytest.raises(ValueError):
        checks.tolerance_used("c", ref, ref, None, torch.bfloat16)
    nan = checks.tolerance_used("c", torch.tensor([float("nan"), 0, 0]), ref, None, f32)
    assert nan.used == float("inf") and "non-finite" in nan.note
    assert "shape" in checks.tolerance_used("c", ref[:2], ref, None, f32).note
    with pytest.raises(AssertionError, match="capsules"):
        checks.assert_within_tolerance([ref + 1, ref, ref, ref], [ref] * 4, None, f32)


# ------------------------------------------------------------------------------------ verified, and the note


def test_verified_record_and_info(capsys):
    assert set(selftest.VERIFIED) == {"cpp", "cuda", "triton"}
    assert all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in selftest.VERIFIED.values())
    assert selftest.VERIFIED["cpp"] == ["cpu: this project's CI (tests/test_cpu_kernel.py and this self-test, every run)"]
    from mind_kernels import info

    info.main()
    out = capsys.readouterr().out
    assert "verified on real hardware" in out and "python -m mind_kernels.selftest" in out
    for name in ("cuda", "triton"):
        want = "; ".join(selftest.VERIFIED[name]) or "not yet"
        assert any(line.split()[:1] == [name] and want in line for line in out.splitlines()), out


def _cuda_call():
    return RoutingCall("cuda", torch.float32, torch.float32, True, "interests", 8, 50, 4, 64, 64)


def test_first_gpu_call_is_noted_once(caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "_gpu_note_logged", False)
    cpu_call = _cuda_call()._replace(device_type="cpu")
    with caplog.at_level(logging.WARNING, logger="mind_kernels"):
        dispatch.note_first_gpu_call(dispatch.BACKENDS["cpp"], cpu_call)  # a CPU call: nothing
        dispatch.note_first_gpu_call(dispatch.BACKENDS["reference"], _cuda_call())  # the reference on CUDA: nothing
        assert not caplog.records and dispatch._gpu_note_logged is False
        dispatch.note_first_gpu_call(dispatch.BACKENDS["cuda"], _cuda_call())
        dispatch.note_first_gpu_call(dispatch.BACKENDS["triton"], _cuda_call())
        dispatch.note_first_gpu_call(dispatch.BACKENDS["cuda"], _cuda_call())
    notes = [r for r in caplog.records if r.name == "mind_kernels"]
    assert len(notes) == 1 and notes[0].levelno == logging.WARNING
    msg = notes[0].getMessage()
    assert "'cuda' backend" in msg and "not been verified on this GPU" in msg
    assert "python -m mind_kernels.selftest" in msg


def test_dispatch_notes_the_first_gpu_call(caplog, monkeypatch):
    """Through select(), with the CUDA backend made available (no GPU here): one note, then none."""
    fake = dataclasses.replace(dispatch.BACKENDS["cuda"], unavailable=lambda d: None)
    monkeypatch.setitem(dispatch.BACKENDS, "cuda", fake)
    monkeypatch.setattr(dispatch, "_selection_cache", {})
    monkeypatch.setattr(dispatch, "_gpu_note_logged", False)
    with caplog.at_level(logging.WARNING, logger="mind_kernels"):
        assert dispatch.select(_cuda_call()).name == "cuda"
        assert dispatch.select(_cuda_call()).name == "cuda"  # cached
        assert dispatch.select(_cuda_call()._replace(batch=3)).name == "cuda"  # a new call: no second note
        assert dispatch.select(_cuda_call(), "cuda").name == "cuda"  # asked for by name
    notes = [r for r in caplog.records if "not been verified on this GPU" in r.getMessage()]
    assert len(notes) == 1
    assert dispatch._gpu_note_logged is True
