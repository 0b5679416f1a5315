"""Serving exports: one user tower (:mod:`mind.export.tower`), three formats.

``python -m mind export --checkpoint RUN/best.pt --out FOLDER --to {native,aoti,onnx} [--index KIND]``
writes FOLDER with::

    meta.json             {"format": "mind-export/1" | "mind-export-aoti/1" | "mind-export-onnx/1",
                           "max_len", "dim", "num_interests", "num_items", "user_feature_names",
                           "user_feature_cardinalities", "dataset", "item_index": {...},
                           "tower": {"file", "inputs", "outputs"} (aoti / onnx)}
    item_embeddings.npy   } the item side (mind/export/items.py): table, raw-id catalogue, faiss index;
    items.json            } the same for every format
    items.faiss           }
    model.pt              native: state_dict + config, served by mind.serve.load (needs this package)
    user_tower.pt2        aoti: AOTInductor package, needs torch + mind_kernels (mind/export/aoti.py)
    user_tower.onnx       onnx: standard ONNX ops, needs onnxruntime only (mind/export/onnx.py)

The tower of every format maps (history_ids, history_mask, user_features) to (interests (B, K, d),
interest_mask (B, K)) with a dynamic batch and history length and equals native serving
(``Recommender.interests``); :mod:`mind.export.tower` states the contract.  ``mind.serve.load``
serves all three folders.
"""

from __future__ import annotations

import json
import pathlib

FORMATS = ("native", "aoti", "onnx")


def _tower_meta(tower, file: str) -> dict:
    B, L, K, d, F = "batch", "length", tower.num_interests, tower.dim, tower.num_features
    return {"file": file,
            "inputs": [{"name": "history_ids", "dtype": "int64", "shape": [B, L]},
                       {"name": "history_mask", "dtype": "bool", "shape": [B, L]},
                       {"name": "user_features", "dtype": "int64", "shape": [B, F]}],
            "outputs": [{"name": "interests", "dtype": "float32", "shape": [B, K, d]},
                        {"name": "interest_mask", "dtype": "bool", "shape": [B, K]}]}


def export(model, data, folder, to: str = "native", index: str = "exact", threads: int | None = None) -> pathlib.Path:
    """Write a serving folder of format ``to`` for a trained MIND and its data (see the module docstring).

    ``index``: the items.faiss kind ("exact", "ivf", "hnsw"; mind.ann's defaults).  ``threads``: the
    thread count compiled into an aoti package (None: torch's current one).
    """
    from ..serve import export as export_native
    from .items import write_index, write_item_side
    from .tower import UserTower

    if to not in FORMATS:
        raise ValueError(f"export format must be one of {FORMATS}, got {to!r}")
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    if to == "native":
        export_native(model, data, folder)
        import numpy as np

        meta = json.loads((folder / "meta.json").read_text())
        meta["item_index"] = write_index(np.load(folder / "item_embeddings.npy"), folder / "items.faiss", kind=index)
        (folder / "meta.json").write_text(json.dumps(meta, indent=2))
        return folder
    (folder / "meta.json").unlink(missing_ok=True)  # a stale one would make a half-written export loadable
    tower = UserTower(model, int(data.max_len))
    item_index = write_item_side(tower.item_table.numpy(), data, folder, index)
    if to == "aoti":
        from .aoti import write
        path = write(tower, folder, threads=threads)
    else:
        from .onnx import write
        path = write(tower, folder)
    meta = {"format": f"mind-export-{to}/1", "max_len": int(data.max_len), "dim": int(model.dim),
            "num_interests": int(model.num_interests), "num_items": int(model.num_items),
            "user_feature_names": list(data.user_feature_names),
            "user_feature_cardinalities": [int(c) for c in data.user_feature_cardinalities],
            "dataset": str(data.name), "item_index": item_index, "tower": _tower_meta(tower, path.name)}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))  # last
    return folder
