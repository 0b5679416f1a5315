"""meta.json: the one place that names the export formats and writes an export's metadata.

Keys, in the order written (``json.dumps(meta, indent=2)``)::

    format                      "mind-export/1" (native) | "mind-export-aoti/1" | "mind-export-onnx/1"
    max_len, dim, num_interests the history length served and the interests' shape (K, d)
    num_items                   aoti / onnx only (native's model.pt carries it in its model_config)
    user_feature_names, user_feature_cardinalities, dataset
    item_index                  items.faiss: {"file", "kind", "params", "metric", "position_offset",
                                "ntotal"} (mind.export.items.write_index); absent when no index was written
    tower                       aoti / onnx only: {"file", "inputs", "outputs"} (:func:`tower_entry`)

meta.json is written last, in one replace, and removed first (:func:`clear_meta`) when a folder is
(re)written: a folder without it is not loadable, so a half-written export never looks whole.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Optional

META = "meta.json"
#: export format ("--to") -> the "format" string in meta.json
FORMAT_NAMES = {"native": "mind-export/1", "aoti": "mind-export-aoti/1", "onnx": "mind-export-onnx/1"}
NATIVE_FORMAT = FORMAT_NAMES["native"]


def tower_entry(tower, file: str) -> dict:
    """meta.json's "tower" entry for a compiled user tower (:class:`mind.export.tower.UserTower`) in ``file``."""
    B, L, K, d, F = "batch", "length", tower.num_interests, tower.dim, tower.num_features
    return {"file": file,
            "inputs": [{"name": "history_ids", "dtype": "int64", "shape": [B, L]},
                       {"name": "history_mask", "dtype": "bool", "shape": [B, L]},
                       {"name": "user_features", "dtype": "int64", "shape": [B, F]}],
            "outputs": [{"name": "interests", "dtype": "float32", "shape": [B, K, d]},
                        {"name": "interest_mask", "dtype": "bool", "shape": [B, K]}]}


def clear_meta(folder) -> None:
    """Remove ``folder``'s meta.json before rewriting the folder (a stale one would make it loadable)."""
    (pathlib.Path(folder) / META).unlink(missing_ok=True)


def write_meta(folder, to: str, model, data, item_index: Optional[dict] = None,
               tower: Optional[dict] = None) -> dict:
    """Write ``folder/meta.json`` for an export of format ``to`` ("native", "aoti", "onnx") of ``model``
    trained on ``data``; ``item_index``: the items.faiss entry (None: no index file); ``tower``: the
    compiled tower's entry (aoti / onnx).  Returns the dict written."""
    if to not in FORMAT_NAMES:
        raise ValueError(f"export format must be one of {tuple(FORMAT_NAMES)}, got {to!r}")
    meta = {"format": FORMAT_NAMES[to], "max_len": int(data.max_len), "dim": int(model.dim),
            "num_interests": int(model.num_interests)}
    if to != "native":
        meta["num_items"] = int(model.num_items)
    meta.update({"user_feature_names": list(data.user_feature_names),
                 "user_feature_cardinalities": [int(c) for c in data.user_feature_cardinalities],
                 "dataset": str(data.name)})
    if item_index is not None:
        meta["item_index"] = item_index
    if tower is not None:
        meta["tower"] = tower
    path = pathlib.Path(folder) / META
    tmp = path.with_name(META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, path)
    return meta
