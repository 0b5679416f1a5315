"""Peak memory of one call: CUDA's allocator statistics on a GPU, the profiler's allocation trace on CPU."""

from __future__ import annotations

import torch


def peak_bytes(fn, device: str) -> int:
    """Peak bytes allocated by torch during one call of ``fn`` (above what was allocated before it)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocations are charged to the op that made them (self usage, so nested ops count once) and
    # frees appear as "[memory]" records; in time order, the running sum's maximum is the peak.
    deltas = []
    for e in prof.events():
        delta = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if delta:
            deltas.append((e.time_range.start, delta))
    running = peak = 0
    for _, delta in sorted(deltas, key=lambda t: t[0]):
        running += delta
        peak = max(peak, running)
    return peak
