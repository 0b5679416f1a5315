"""Load an aoti / onnx export's user tower so ``mind.serve.Recommender`` can serve it like native.

``load_tower(folder, meta)`` returns a :class:`CompiledTower`, which stands in for the MIND model:
``interests(histories (B, L) int64, user_features (B, F) or None) -> (V, interest_mask)``.  The raw
ids, the unknown-id warnings, the refusals of empty histories and the top-n retrieval stay
Recommender's, so bad input is handled exactly as native serving handles it.

A missing, truncated or corrupt tower file, a missing runtime (onnxruntime) or a tower whose
outputs do not match meta.json raises :class:`mind.export.errors.ModelFormatError` (also
``mind.serve.ModelFormatError``) naming the file.
"""

from __future__ import annotations

import pathlib

import torch

from .errors import ModelFormatError, first_line
from .meta import FORMAT_NAMES

#: meta.json "format" -> export format, for the compiled towers
TOWER_FORMATS = {name: fmt for fmt, name in FORMAT_NAMES.items() if fmt != "native"}


class CompiledTower:
    """An exported user tower behind MIND's ``interests`` signature (no coupling weights)."""

    def __init__(self, run, fmt: str, path: pathlib.Path, num_features: int, num_interests: int, dim: int):
        self._run, self.format, self.path = run, fmt, path
        self.num_features, self.num_interests, self.dim = num_features, num_interests, dim

    def eval(self) -> "CompiledTower":
        return self

    def interests(self, histories: torch.Tensor, user_features=None, return_weights: bool = False):
        if return_weights:
            raise ValueError(f"{self.path} is a compiled user tower ({self.format}): it gives no coupling weights; "
                             f"explain needs the native export (python -m mind export --to native)")
        B = histories.shape[0]
        if user_features is None:
            user_features = torch.zeros(B, self.num_features, dtype=torch.int64)
        if tuple(user_features.shape) != (B, self.num_features):
            raise ValueError(f"user_features must be ({B}, {self.num_features}), got {tuple(user_features.shape)}")
        ids = histories.to(torch.int64).contiguous()
        vectors, interest_mask = self._run(ids, ids != 0, user_features.to(torch.int64).contiguous())
        return vectors, interest_mask


def load_tower(folder, meta: dict) -> CompiledTower:
    """The user tower of the export in ``folder`` whose meta.json is ``meta`` (format in TOWER_FORMATS)."""
    folder = pathlib.Path(folder)
    fmt = TOWER_FORMATS[meta["format"]]
    try:
        tower_meta = meta["tower"]
        path = folder / str(tower_meta["file"])
        K, d, F = int(meta["num_interests"]), int(meta["dim"]), len(meta["user_feature_cardinalities"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFormatError(f"{folder / 'meta.json'} is corrupt: {type(e).__name__} {e} in the tower's entries; "
                               f"re-export the model") from None
    if not path.is_file():
        raise ModelFormatError(f"{path} is missing: the export is incomplete (re-export with "
                               f"`python -m mind export --to {fmt}`)")
    if fmt == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ModelFormatError(f"{path} is an ONNX user tower: serving it needs onnxruntime "
                                   f"(pip install onnxruntime)") from None
        from .onnx import open_runner
    else:
        from .aoti import open_runner
    try:
        # onnxruntime gets torch's thread count (`--threads`, torch.set_num_threads): one setting for every
        # format; its own default, a thread per core, cost an ML-100k user 6.8 ms against 2.7 ms on 1 thread
        # on the 2-core machine where other work shares the cores (docs/results/service.md)
        run = open_runner(path, threads=torch.get_num_threads()) if fmt == "onnx" else open_runner(path)
        # one probe user: the tower loads, runs and has the shapes meta.json promises
        probe = torch.ones(1, 1, dtype=torch.int64)
        v, m = run(probe, probe != 0, torch.zeros(1, F, dtype=torch.int64))
        ok = tuple(v.shape) == (1, K, d) and tuple(m.shape) == (1, K) and v.dtype == torch.float32
    except Exception as e:  # a damaged file fails deep inside the runtime: say which file, not where
        what = {"aoti": "an AOTInductor", "onnx": "an ONNX"}.get(fmt, f"a {fmt}")
        raise ModelFormatError(f"{path} is truncated, corrupt or not {what} user tower this runtime can load "
                               f"({first_line(e, 200)}); re-export the model") from None
    if not ok:
        raise ModelFormatError(f"{path} gives interests of shape {tuple(v.shape)} and a mask of {tuple(m.shape)}, "
                               f"but meta.json says K = {K}, d = {d}; re-export the model")
    return CompiledTower(run, fmt, path, F, K, d)
