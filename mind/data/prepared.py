"""A prepared dataset on disk: :func:`write_prepared` once, :func:`load_prepared` memory-mapped everywhere.

``python -m mind prepare --data-dir LOG --format FMT --out PREPARED`` runs the protocol of
:mod:`mind.data.prepare` once (filtering, the ComiRec split, the id maps, the CSR sequences) and
writes plain arrays; ``train``, ``evaluate`` and ``export`` take ``--data-dir PREPARED`` (recognised
by its ``meta.json``) and map the arrays read-only, so every torchrun rank on a machine shares the
same pages of the page cache instead of holding a copy.  The history length is not part of a
prepared folder: windows are cut from the sequences when a batch is drawn.

Layout::

    meta.json            {"format": "mind-prepared/1", "name", "num_items", "settings" (the protocol's
                          parameters), "genre_names", "user_feature_names", "user_feature_cardinalities",
                          "arrays": {name: {"dtype", "shape"}}}; written last
    items.json           {"titles": [...]} (index-aligned with the item rows, row 0 = "<pad>")
    seq_values.npy       (I,) int32      every kept user's time-sorted item rows, users in row order
    seq_offsets.npy      (U + 1,) int64  user row r: seq_values[seq_offsets[r]:seq_offsets[r + 1]]
    train_rows.npy, train_positions.npy  (N,) int32: the training examples (user row, target position)
    split_train.npy, split_valid.npy, split_test.npy   user rows of each part (ascending)
    user_raw_ids.npy (U,), item_raw_ids.npy (num_items + 1,), item_counts.npy (num_items + 1,) int64
    item_genres.npy (num_items + 1, G), user_features.npy (U, F) int64

A folder of another format version, or one with a missing, truncated or mismatching array, is
refused with :class:`mind.data.DataFormatError` naming the file.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch

from .loaders import DataFormatError, DataNotFoundError
from .prepare import PreparedData, eval_split

FORMAT = "mind-prepared/1"
_ARRAYS = ("seq_values", "seq_offsets", "train_rows", "train_positions", "split_train", "split_valid",
           "split_test", "user_raw_ids", "item_raw_ids", "item_counts", "item_genres", "user_features")


def is_prepared(path) -> bool:
    """True when ``path`` is a folder with a meta.json (a prepared dataset, possibly of another version)."""
    return (pathlib.Path(path) / "meta.json").is_file()


def _arrays(data: PreparedData) -> dict:
    rows = {k: np.searchsorted(data.user_raw_ids, np.asarray(v, dtype=np.int64)) for k, v in data.split.items()}
    return {"seq_values": np.asarray(data.seq_values, dtype=np.int32),
            "seq_offsets": np.asarray(data.seq_offsets, dtype=np.int64),
            "train_rows": np.asarray(data.train_rows, dtype=np.int32),
            "train_positions": np.asarray(data.train_positions, dtype=np.int32),
            "split_train": rows["train"], "split_valid": rows["valid"], "split_test": rows["test"],
            "user_raw_ids": np.asarray(data.user_raw_ids, dtype=np.int64),
            "item_raw_ids": np.asarray(data.item_raw_ids, dtype=np.int64),
            "item_counts": np.asarray(data.item_counts, dtype=np.int64),
            "item_genres": data.item_genres.numpy(), "user_features": data.user_features.numpy()}


def write_prepared(data: PreparedData, folder) -> pathlib.Path:
    """Write ``data`` into ``folder`` (see the module docstring); returns the folder.

    A folder that holds anything but an earlier prepared dataset is refused (nothing the user saved
    is overwritten).  meta.json goes first out and last in, so a half-written folder never loads.
    """
    folder = pathlib.Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DataFormatError(folder, None, "exists and is not a folder; choose another --out")
    if folder.is_dir() and any(folder.iterdir()) and not is_prepared(folder):
        raise DataFormatError(folder, None, "exists, is not empty and is not a prepared dataset; "
                                            "choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)
    arrays = _arrays(data)
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", np.ascontiguousarray(array))
    (folder / "items.json").write_text(json.dumps({"titles": list(data.item_titles)}))
    meta = {"format": FORMAT, "name": data.name, "num_items": int(data.num_items), "settings": data.settings,
            "genre_names": list(data.genre_names), "user_feature_names": list(data.user_feature_names),
            "user_feature_cardinalities": [int(c) for c in data.user_feature_cardinalities],
            "arrays": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in arrays.items()}}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return folder


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise DataNotFoundError(f"{path} is missing: the prepared dataset is incomplete "
                                f"(run python -m mind prepare again)")
    try:
        out = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataFormatError(path, None, f"is truncated or corrupt ({type(e).__name__}: {e}); "
                                          f"run python -m mind prepare again") from None
    if not isinstance(out, dict):
        raise DataFormatError(path, None, "is not a JSON object; run python -m mind prepare again")
    return out


def _load_array(folder: pathlib.Path, name: str, spec: dict) -> np.ndarray:
    path = folder / f"{name}.npy"
    if not path.is_file():
        raise DataNotFoundError(f"{path} is missing: the prepared dataset is incomplete "
                                f"(run python -m mind prepare again)")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataFormatError(path, None, f"is truncated or corrupt ({str(e).splitlines()[0][:120]}); "
                                          f"run python -m mind prepare again") from None
    if str(array.dtype) != spec.get("dtype") or list(array.shape) != list(spec.get("shape", [])):
        raise DataFormatError(path, None, f"holds {array.dtype} {list(array.shape)}, but meta.json says "
                                          f"{spec.get('dtype')} {spec.get('shape')}; run python -m mind prepare again")
    return array


def load_prepared(folder, max_len: int = 20) -> PreparedData:
    """The dataset :func:`write_prepared` wrote, its large arrays memory-mapped read-only; ``max_len``
    sizes the evaluation histories (training windows are cut per batch)."""
    folder = pathlib.Path(folder)
    meta = _read_json(folder / "meta.json")
    if meta.get("format") != FORMAT:
        raise DataFormatError(folder / "meta.json", None,
                              f"is a prepared dataset of format {meta.get('format')!r}; this version reads "
                              f"{FORMAT!r}: run python -m mind prepare again")
    try:
        specs = {name: meta["arrays"][name] for name in _ARRAYS}
        name, num_items = str(meta["name"]), int(meta["num_items"])
        genre_names, feature_names = list(meta["genre_names"]), list(meta["user_feature_names"])
        cardinalities = [int(c) for c in meta["user_feature_cardinalities"]]
    except (KeyError, TypeError, ValueError) as e:
        raise DataFormatError(folder / "meta.json", None, f"lacks or garbles {e}; run python -m mind prepare "
                                                          f"again") from None
    a = {k: _load_array(folder, k, spec) for k, spec in specs.items()}
    titles = _read_json(folder / "items.json").get("titles")
    if not isinstance(titles, list) or len(titles) != num_items + 1:
        raise DataFormatError(folder / "items.json", None, f"should hold {num_items + 1} titles; run python -m "
                                                           f"mind prepare again")
    offsets = a["seq_offsets"]
    if len(offsets) != len(a["user_raw_ids"]) + 1 or (len(offsets) and int(offsets[-1]) != len(a["seq_values"])):
        raise DataFormatError(folder / "seq_offsets.npy", None, "does not match seq_values.npy / user_raw_ids.npy; "
                                                                "run python -m mind prepare again")
    users = a["user_raw_ids"]
    split = {k: users[np.asarray(a[f"split_{k}"])].tolist() for k in ("train", "valid", "test")}
    return PreparedData(
        name=name, max_len=int(max_len), num_items=num_items, item_raw_ids=np.asarray(a["item_raw_ids"]),
        item_titles=titles, item_genres=torch.from_numpy(np.array(a["item_genres"], dtype=np.int64)),
        genre_names=genre_names, user_features=torch.from_numpy(np.array(a["user_features"], dtype=np.int64)),
        user_feature_names=feature_names, user_feature_cardinalities=cardinalities,
        user_raw_ids=np.asarray(users), seq_values=a["seq_values"], seq_offsets=offsets,
        train_rows=a["train_rows"], train_positions=a["train_positions"], item_counts=np.array(a["item_counts"]),
        valid=eval_split(a["seq_values"], offsets, users, a["split_valid"], max_len),
        test=eval_split(a["seq_values"], offsets, users, a["split_test"], max_len),
        split=split, settings=dict(meta.get("settings") or {}))
