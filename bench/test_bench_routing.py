"""Routing op benchmark on CPU: fused C++ vs eager reference vs torch.compile vs torch-rechub.

    pytest bench/ --benchmark-only --benchmark-json=bench/results/routing_cpu.json
    python bench/report.py bench/results/routing_cpu.json

One benchmark group per (mode, case), so the backends of a case sit side by side;
B in {1, 16, 256, 1024, 4096}, L=50, D=64, K=4, r=3, float32.
"""

import pytest
import torch

from cases import Case, make_callable, unavailable
from common import git_revision
from memory import peak_bytes

BATCHES = (1, 16, 256, 1024, 4096)
BACKENDS = ("cpp", "reference", "compile", "rechub")
MODES = ("fwd", "fwd+bwd")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("mode", MODES)
def test_routing(benchmark, backend, batch, mode):
    case = Case(batch)
    why = unavailable(backend, case)
    if why:
        pytest.skip(f"{backend}: {why}")
    fn = make_callable(backend, case, mode)
    fn()  # warm-up: compilation, lazy init, caches
    benchmark.group = f"{mode} {case.name}"
    benchmark.extra_info.update(
        backend=backend, mode=mode, batch=batch, case=case.name, device=case.device,
        torch=torch.__version__, git=git_revision(), threads=torch.get_num_threads(),
        peak_bytes=peak_bytes(fn, case.device),
    )
    benchmark.pedantic(fn, rounds=max(5, min(50, 20000 // batch)), iterations=1, warmup_rounds=1)
