"""Serving exports: one user tower (:mod:`mind.export.tower`), three formats.

``python -m mind export --checkpoint RUN/best.pt --out FOLDER --to {native,aoti,onnx} [--index KIND]``
writes FOLDER with::

    meta.json             {"format": "mind-export/1" | "mind-export-aoti/1" | "mind-export-onnx/1",
                           "max_len", "dim", "num_interests", "num_items" (aoti / onnx), "user_feature_names",
                           "user_feature_cardinalities", "dataset", "item_index": {...},
                           "tower": {"file", "inputs", "outputs"} (aoti / onnx)}   (mind/export/meta.py)
    item_embeddings.npy   } the item side (mind/export/items.py): table, raw-id catalogue, faiss index;
    items.json            } the same for every format
    items.faiss           }
    model.pt              native: state_dict + config, served by mind.serve.load (mind/export/native.py)
    user_tower.pt2        aoti: AOTInductor package, needs torch + mind_kernels (mind/export/aoti.py)
    user_tower.onnx       onnx: standard ONNX ops, needs onnxruntime only (mind/export/onnx.py)

The tower of every format maps (history_ids, history_mask, user_features) to (interests (B, K, d),
interest_mask (B, K)) with a dynamic batch and history length and equals native serving
(``Recommender.interests``); :mod:`mind.export.tower` states the contract.  ``mind.serve.load``
serves all three folders, reading them with :mod:`mind.export.native` (model.pt) and
:mod:`mind.export.load` (the compiled towers).

Modules: ``errors`` (ModelFormatError, raised by every reader), ``meta`` (the format names and the
one meta.json writer), ``items``, ``native``, ``tower``, ``aoti``, ``onnx``, ``graph_routing``,
``load``.  Dependencies go one way: ``mind.serve`` imports ``mind.export``; nothing here imports
``mind.serve``.
"""

from __future__ import annotations

import pathlib
from typing import Optional

from .meta import FORMAT_NAMES

FORMATS = tuple(FORMAT_NAMES)  # ("native", "aoti", "onnx")


def export(model, data, folder, to: str = "native", index: Optional[str] = "exact",
           threads: int | None = None) -> pathlib.Path:
    """Write a serving folder of format ``to`` for a trained MIND and its data (see the module docstring).

    ``index``: the items.faiss kind ("exact", "ivf", "hnsw"; mind.ann's defaults), None for no index
    file.  ``threads``: the thread count compiled into an aoti package (None: torch's current one).
    """
    if to not in FORMATS:
        raise ValueError(f"export format must be one of {FORMATS}, got {to!r}")
    if to == "native":
        from .native import export as export_native

        return export_native(model, data, folder, index=index)

    from .items import write_item_side
    from .meta import clear_meta, tower_entry, write_meta
    from .tower import UserTower

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clear_meta(folder)
    model = model.eval()
    tower = UserTower(model, int(data.max_len))
    item_index = write_item_side(tower.item_table.numpy(), data, folder, index)
    if to == "aoti":
        from .aoti import write
        path = write(tower, folder, threads=threads)
    else:
        from .onnx import write
        path = write(tower, folder)
    write_meta(folder, to, model, data, item_index=item_index, tower=tower_entry(tower, path.name))  # last
    return folder
