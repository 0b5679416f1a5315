"""The item side of every export: the embedding table, the raw-id catalogue and a faiss index file.

Files written into the export folder (whatever the user-tower format)::

    item_embeddings.npy   (num_items + 1, d) float32, row 0 = padding (zeros): e_i for item index i
    items.json            {"raw_ids": [...], "titles": [...], "genres": [[names], ...]}, index-aligned with rows
    items.faiss           a faiss index over rows 1..num_items (faiss.write_index); faiss position p is
                          item index p + 1; inner-product metric; kind from mind.ann ("exact" = IndexFlatIP,
                          "ivf" = IndexIVFFlat, "hnsw" = IndexHNSWFlat).  Written whenever an index kind is
                          given (always by ``python -m mind export``; not by ``mind.serve.export``)

A serving stack maps raw ids to item indices with items.json, runs the user tower, searches
items.faiss with each active interest vector and merges the K lists by score (score(i) =
max_k V_k . e_i), adding 1 to faiss' positions to get item indices (``mind.ann`` documents the
exact rule, including how many candidates to fetch when seen items are excluded).
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional

import numpy as np

EMBEDDINGS, CATALOGUE, INDEX = "item_embeddings.npy", "items.json", "items.faiss"


def catalogue(data) -> dict:
    """items.json's content: raw ids, titles and genre names, index-aligned with the table's rows."""
    genres = np.asarray(data.item_genres)
    return {
        "raw_ids": [int(x) if np.issubdtype(type(x), np.integer) else str(x) for x in np.asarray(data.item_raw_ids)],
        "titles": [str(t) for t in data.item_titles],
        "genres": [[data.genre_names[g] for g in row if g != 0] for row in genres.tolist()],
    }


def write_index(table: np.ndarray, path, kind: str = "exact", **params) -> dict:
    """Build a ``mind.ann`` index of ``kind`` over rows 1.. of ``table`` and write it to ``path``
    (faiss.write_index); returns what meta.json records about it."""
    import faiss

    from ..ann import build_index

    built = build_index(table, kind=kind, **params)
    faiss.write_index(built.index, str(path))
    return {"file": pathlib.Path(path).name, "kind": kind, "params": dict(built.params), "metric": "inner_product",
            "position_offset": 1, "ntotal": int(built.index.ntotal)}


def write_item_side(table: np.ndarray, data, folder, index: Optional[str] = "exact") -> Optional[dict]:
    """Write item_embeddings.npy, items.json and (unless ``index`` is None) items.faiss into ``folder``;
    returns the index's meta.json entry (None when no index was written)."""
    folder = pathlib.Path(folder)
    table = np.ascontiguousarray(table, dtype=np.float32)
    np.save(folder / EMBEDDINGS, table)
    (folder / CATALOGUE).write_text(json.dumps(catalogue(data)))
    return None if index is None else write_index(table, folder / INDEX, kind=index)
