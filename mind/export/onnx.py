"""``--to onnx``: the user tower as an ONNX model (``user_tower.onnx``, opset 18).

The tower is traced with ``backend="graph"`` (:mod:`mind.export.graph_routing`): the B2I routing
becomes standard ONNX ops (MatMul, Softmax, Mul, ...), the r iterations unrolled, the behaviour and
interest masks and the model's softmax axis ("interests" or "behaviors") as in
``mind_kernels.reference``, in fewer nodes than the reference's own ops (onnxruntime pays per node).
Batch and history length are dynamic axes ("batch", "length").  Inputs and outputs::

    history_ids (batch, length) int64, history_mask (batch, length) bool, user_features (batch, F) int64
    -> interests (batch, K, d) float32, interest_mask (batch, K) bool

Run it with onnxruntime alone::

    import onnxruntime as ort
    tower = ort.InferenceSession("user_tower.onnx", providers=["CPUExecutionProvider"])
    interests, interest_mask = tower.run(None, {"history_ids": ids, "history_mask": mask, "user_features": f})

onnxruntime refuses a wrong dtype or rank with INVALID_ARGUMENT naming the input.

Why ``optimize=False``: with onnxscript 0.7.2 the exporter's graph optimizer dropped the ``+ 1e-9``
of squash's sqrt(|z|^2 + 1e-9), which turned an inactive interest's 0 / sqrt(0) into NaN;
onnxruntime still optimizes the graph when the session starts.
"""

from __future__ import annotations

import pathlib
import warnings

import numpy as np
import torch

FILE = "user_tower.onnx"
OPSET = 18
INPUTS = ("history_ids", "history_mask", "user_features")
OUTPUTS = ("interests", "interest_mask")


def write(tower, folder, routing: str = "graph") -> pathlib.Path:
    """Export ``tower`` (its routing switched to plain ops for the trace) to ``folder/user_tower.onnx``.

    ``routing``: "graph" (:mod:`mind.export.graph_routing`, the default) or "reference" (the spec's own
    ops, more nodes; ``bench/bench_export.py`` compares the two)."""
    if routing not in ("graph", "reference"):
        raise ValueError(f"routing must be 'graph' or 'reference', got {routing!r}")
    from .aoti import dynamic_shapes

    path = pathlib.Path(folder) / FILE
    backend = tower.backend
    tower.backend = routing
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the exporter warns that "batch" / "length" name the same axes twice (they do, on purpose)
            warnings.filterwarnings("ignore", message=".*axis name.*", category=UserWarning)
            program = torch.onnx.export(tower, tower.example_inputs(2, tower.max_len + 2), dynamo=True,
                                        opset_version=OPSET, optimize=False, verbose=False,
                                        input_names=list(INPUTS), output_names=list(OUTPUTS),
                                        dynamic_shapes=dynamic_shapes())
        program.save(str(path))
    finally:
        tower.backend = backend
    return path


def open_runner(path, threads: int = 0):
    """Open ``path`` in an onnxruntime CPU session; returns run(ids, mask, features) -> torch tensors.

    ``threads``: onnxruntime's intra-op threads (0 = its default, one per core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # no constant-folding chatter at load
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(ids: torch.Tensor, mask: torch.Tensor, features: torch.Tensor):
        feed = {"history_ids": np.ascontiguousarray(ids.numpy()), "history_mask": np.ascontiguousarray(mask.numpy()),
                "user_features": np.ascontiguousarray(features.numpy())}
        vectors, interest_mask = session.run(list(OUTPUTS), feed)
        return torch.from_numpy(vectors), torch.from_numpy(interest_mask)

    return run
