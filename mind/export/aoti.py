"""``--to aoti``: the user tower as an AOTInductor package (``user_tower.pt2``).

``torch.export`` traces :class:`mind.export.tower.UserTower` with the fused routing op inside
(``mind_kernels::routing_forward``, a torch.library op with a fake kernel), with a dynamic batch
(1..65536) and history length (1..4096); ``torch._inductor.aoti_compile_and_package`` compiles the
rest to C++ and packages it with the weights.  Loading needs torch and the op's library only::

    import torch, mind_kernels.ops            # mind_kernels.ops registers mind_kernels::routing_forward
    tower = torch._inductor.aoti_load_package("user_tower.pt2")
    interests, interest_mask = tower(history_ids, history_mask, user_features)   # int64, bool, int64

(or libtorch's ``torch::inductor::AOTIModelPackageLoader`` from C++, with libmind_kernels' _C loaded).

Notes:

* The compiled kernels use the number of threads torch had when the package was compiled
  (``threads``); the routing op uses torch's intra-op pool at run time.
* AOTInductor checks input dtypes and shapes only when ``AOTI_RUNTIME_CHECK_INPUTS=1`` is set in
  the serving process; without it a wrong dtype is read as int64 / bool.  ``mind.serve.load``
  always passes the right dtypes.
* The package is specific to the torch version and CPU architecture that built it.
"""

from __future__ import annotations

import pathlib

import torch

FILE = "user_tower.pt2"
MAX_BATCH, MAX_LENGTH = 65536, 4096


def dynamic_shapes():
    """Dynamic batch and history length for (history_ids, history_mask, user_features)."""
    from torch.export import Dim

    batch, length = Dim("batch", min=1, max=MAX_BATCH), Dim("length", min=1, max=MAX_LENGTH)
    return ({0: batch, 1: length}, {0: batch, 1: length}, {0: batch})


def write(tower, folder, threads: int | None = None) -> pathlib.Path:
    """Export and AOT-compile ``tower`` (backend "auto": the fused op) to ``folder/user_tower.pt2``."""
    import torch._inductor

    path = pathlib.Path(folder) / FILE
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)  # inductor bakes the thread count into its parallel loops
    try:
        with torch.no_grad():
            program = torch.export.export(tower, tower.example_inputs(2, tower.max_len + 2),
                                          dynamic_shapes=dynamic_shapes(), strict=False)
            # check_lowerbound off: the runtime input check (AOTI_RUNTIME_CHECK_INPUTS=1) would
            # otherwise refuse batch 1 / length 1, which the compiled code serves correctly (tested).
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(path), inductor_configs={"aot_inductor.check_lowerbound": False})
    finally:
        torch.set_num_threads(old)
    return path


def open_runner(path):
    """Load ``path``; returns run(ids, mask, features) -> (interests, interest_mask) tensors."""
    import torch._inductor

    import mind_kernels.ops  # noqa: F401  (registers the op the package calls)

    package = torch._inductor.aoti_load_package(str(path))

    def run(ids: torch.Tensor, mask: torch.Tensor, features: torch.Tensor):
        vectors, interest_mask = package(ids, mask, features)
        return vectors, interest_mask

    return run
