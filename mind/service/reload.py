"""One loaded export (:class:`ModelState`): the Recommender, its model id, and the checks a hot swap makes.

The service never holds a Recommender directly: it holds a ``ModelState``, replaced as a whole on a
reload (one attribute assignment, atomic under the GIL).  A request keeps the state it was admitted
with until it is answered, so requests in flight finish on the model they started on.

Model id (``ModelState.model_id``, the ``"model"`` of every answer and the ``model`` label of
``/metrics``): ``<format>-<12 hex digits>``, the first 48 bits of the SHA-256 of the export's files
that decide its answers, in this order: meta.json, items.json, item_embeddings.npy and the user tower
(model.pt, or meta.json's ``tower.file``).  Content, not path or mtime: the same export copied to
another folder, or written again from the same checkpoint by a deterministic exporter, keeps its id;
any change to the weights, the catalogue or the metadata changes it.  items.faiss is left out: the
service builds its index from item_embeddings.npy (see ``index`` below).

Index: ``mind.serve.load`` builds any faiss index from item_embeddings.npy (it does not read
items.faiss).  ``index="export"`` (the default of ``python -m mind serve``) builds the kind and
parameters meta.json records for items.faiss, so the service answers as the export's own index would;
``"none"`` is the exact brute-force retrieval; ``"exact"``, ``"ivf"``, ``"hnsw"`` pick a kind with
mind.ann's default parameters.
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..export.errors import ModelFormatError
from ..serve import Recommender, load

INDEX_CHOICES = ("export", "none", "exact", "ivf", "hnsw")


class IncompatibleExport(ValueError):
    """An export that loads but would change what clients' requests mean (its user features differ)."""


class _Tap:
    """Stands in for ``Recommender.model``: forwards ``interests`` and keeps what it returned.

    ``Recommender.recommend_batch`` computes the interest vectors and throws them away; the service
    needs them for each item's ``interest`` and each user's K'_u, and a second tower call would double
    the tower's cost.  Only the batch worker thread calls the Recommender, so one list suffices.
    """

    def __init__(self, model):
        self._model = model
        self.seen: list = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def eval(self):
        self._model.eval()
        return self

    def interests(self, *args, **kwargs):
        out = self._model.interests(*args, **kwargs)
        self.seen.append(out)
        return out


def model_id(folder, meta: dict) -> str:
    """``<format>-<hash>`` of the export in ``folder`` (module docstring)."""
    folder = pathlib.Path(folder)
    tower = meta.get("tower", {}).get("file") if isinstance(meta.get("tower"), dict) else None
    names = ["meta.json", "items.json", "item_embeddings.npy", str(tower) if tower else "model.pt"]
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0")
        with open(folder / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    fmt = str(meta.get("format", "?")).removeprefix("mind-export-").removeprefix("mind-export").split("/")[0]
    return f"{fmt or 'native'}-{h.hexdigest()[:12]}"


@dataclass
class ModelState:
    """A loaded export as the service serves it."""

    folder: pathlib.Path
    rec: Recommender
    model_id: str
    meta: dict
    index: str
    loaded_at: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def num_items(self) -> int:
        return self.rec.num_items

    @property
    def feature_names(self) -> list:
        return list(self.meta.get("user_feature_names", []))

    @property
    def feature_cardinalities(self) -> list:
        return [int(c) for c in self.meta.get("user_feature_cardinalities", [])]

    @property
    def supports_merge(self) -> bool:
        """Whether this Recommender takes ``merge=`` / ``diversity=`` (mind.serve with merge rules)."""
        if not hasattr(self, "_supports_merge"):
            import inspect

            params = inspect.signature(self.rec.recommend_batch).parameters
            self._supports_merge = "merge" in params and "diversity" in params
        return self._supports_merge

    def describe(self) -> dict:
        """What /readyz and the page show about the model."""
        return {"model": self.model_id, "folder": str(self.folder), "format": self.meta.get("format"),
                "index": self.index, "items": self.num_items, "max_len": self.rec.max_len,
                "num_interests": self.meta.get("num_interests"), "user_features": self.feature_names,
                "user_feature_cardinalities": self.feature_cardinalities, "dataset": self.meta.get("dataset"),
                "loaded_at": self.loaded_at}

    def run(self, histories: list, n: int, user_features: Optional[np.ndarray], exclude_history: bool,
            merge_kwargs: dict) -> list[dict]:
        """``Recommender.recommend_batch`` for the users of one batch, each answer with its items'
        interests: ``[{"items": [{"id", "title", "score", "interest"}], "interests": K'_u}, ...]``.

        ``interest`` is the active interest k that scores the item best (score = max_k V_k . e_i);
        ``interests`` is the number of active interests.  Serialised by ``lock``: the tap keeps the
        vectors of one call at a time.
        """
        rec = self.rec
        with self.lock:
            tap = rec.model
            tap.seen.clear()
            lists = rec.recommend_batch(histories, n, exclude_history=exclude_history,
                                        user_features=user_features, **merge_kwargs)
            seen, tap.seen = tap.seen, []
            if sum(len(v) for v, _ in seen) == len(histories):
                vectors = np.concatenate([v.float().numpy() for v, _ in seen])
                masks = np.concatenate([np.asarray(m.numpy(), dtype=bool) for _, m in seen])
            else:  # not one interests call per chunk (a future Recommender): ask for the vectors
                vectors, masks = rec.interests(histories, user_features, return_mask=True)
                masks = np.asarray(masks, dtype=bool)
                tap.seen.clear()
        # each listed item's best active interest, for all users at once: (U, n, K) scores of the listed rows
        lens = [len(items) for items in lists]
        best = np.zeros((len(lists), max(lens, default=0)), dtype=np.int64)
        if sum(lens):
            rows = rec.map_history([raw for items in lists for raw, _, _ in items])   # raw id -> row, all known
            users = np.repeat(np.arange(len(lists)), lens)
            starts = np.cumsum([0] + lens[:-1])
            grid = np.zeros_like(best)
            grid[users, np.arange(len(rows)) - np.repeat(starts, lens)] = rows
            per_k = np.einsum("und,ukd->unk", rec.item_table[grid], vectors)
            per_k[~np.broadcast_to(masks[:, None, :], per_k.shape)] = -np.inf
            best = per_k.argmax(2)
        out = []
        for u, items in enumerate(lists):
            ks = best[u].tolist()
            out.append({"items": [{"id": raw, "title": title, "score": score if math.isfinite(score) else None,
                                   "interest": k} for (raw, title, score), k in zip(items, ks)],
                        "interests": int(masks[u].sum())})
        return out


def _index_args(meta: dict, index: str) -> tuple[Optional[str], dict]:
    if index == "none":
        return None, {}
    if index == "export":
        entry = meta.get("item_index")
        if not isinstance(entry, dict) or "kind" not in entry:
            return None, {}
        return str(entry["kind"]), dict(entry.get("params") or {})
    return index, {}


def load_state(folder, index: str = "export", probe: bool = True) -> ModelState:
    """Load the export in ``folder`` through ``mind.serve.load`` and serve one probe user with it.

    Raises what ``mind.serve.load`` raises for a missing or damaged export (``ModelFormatError`` or
    ``CheckpointError`` naming the file), and ``ModelFormatError`` when the probe fails.
    """
    if index not in INDEX_CHOICES:
        raise ValueError(f"index must be one of {INDEX_CHOICES}, got {index!r}")
    folder = pathlib.Path(folder).resolve()
    rec = load(folder)         # every check of the folder's files is mind.serve.load's
    meta = dict(rec.meta)
    kind, params = _index_args(meta, index)
    if kind is not None:
        rec.use_index(kind, **params)
    rec.model = _Tap(rec.model)
    try:
        mid = model_id(folder, meta)
    except OSError as e:
        raise ModelFormatError(f"{e.filename}: {e.strerror}; the export is incomplete") from None
    state = ModelState(folder=folder, rec=rec, model_id=mid, meta=meta, index=kind or "none")
    if probe and rec.num_items:
        try:
            state.run([[rec.raw_ids[1]]], 1, None, False, {})
        except Exception as e:  # noqa: BLE001 - a tower that loads but cannot serve: refuse the export
            from ..export.errors import first_line

            raise ModelFormatError(f"{folder}: the export loads but fails to serve a probe user "
                                   f"({type(e).__name__}: {first_line(e, 200)})") from None
    return state


def check_compatible(old: Optional[ModelState], new: ModelState) -> None:
    """IncompatibleExport when ``new`` would change what a request means: other user features
    (names or cardinalities) than ``old``'s.  A new catalogue, dim, K or format is a new model version
    and is accepted."""
    if old is None:
        return
    if (old.feature_names, old.feature_cardinalities) != (new.feature_names, new.feature_cardinalities):
        raise IncompatibleExport(
            f"{new.folder / 'meta.json'}: user features {new.feature_names} with cardinalities "
            f"{new.feature_cardinalities} differ from the serving model's {old.feature_names} "
            f"{old.feature_cardinalities}; requests' user_features would change meaning (pass \"force\": true)")


def meta_summary(state: ModelState) -> str:
    """One line naming the model, for logs."""
    return json.dumps({"model": state.model_id, "folder": str(state.folder), "format": state.meta.get("format"),
                       "items": state.num_items, "index": state.index})
