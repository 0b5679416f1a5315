"""Serve recommendations from raw item ids out of an export folder written by :mod:`mind.export`.

Export directory layout of ``export(model, data, path)`` (the native format, written by
:func:`mind.export.native.export` without a faiss index; see :mod:`mind.export` for all formats)::

    model.pt              {"model": state_dict, "model_config": MIND.config}  (loads with weights_only=True)
    item_embeddings.npy   (num_items + 1, d) float32, row 0 = padding (zeros)
    items.json            {"raw_ids": [...], "titles": [...], "genres": [[names], ...]}, index-aligned with rows
    meta.json             {"format": "mind-export/1", "max_len", "dim", "num_interests", "user_feature_names",
                           "user_feature_cardinalities", "dataset"}   (mind/export/meta.py)

``python -m mind export --to aoti|onnx`` writes the same folder with a compiled user tower in place
of model.pt (``mind/export/``: user_tower.pt2 or user_tower.onnx, plus items.faiss); ``load`` serves
those too, the tower standing in for the model (no coupling weights: ``explain`` needs native).

This module imports :mod:`mind.export` (the writers, the readers of model.pt and of the towers, and
:class:`ModelFormatError`), never the reverse; ``export``, ``ModelFormatError`` and ``first_line`` are
re-exported here.

Serving (``load(path) -> Recommender``) is deterministic: the model runs in eval mode,
whose routing logits are a fixed buffer, so the same history always gives the same
interests and the same list.

Bad input, and what serving does with it (each case has a test in tests/test_serve.py):

* Raw ids: a history is a list of raw item ids, oldest first (ints or their string form;
  ``"42"`` and ``42`` are the same item).
* Unknown ids (not in the exported catalogue) are dropped with one ``UserWarning`` per call
  naming them (the first 10) and, in a batch, the users they came from; the rest of the
  history is used as is.  The warning is attributed to the caller's line (the first frame
  outside mind/serve.py and mind/explain.py), not to a line of this package; the CLI prints it
  as one ``warning: ...`` line.
* A history whose ids are *all* unknown raises ``ValueError("... has no known item ...")``;
  in a batch the message names the user's position.  The whole call fails rather than
  silently returning a popular-items list for that user.
* An empty history raises ``ValueError("... is empty ...")`` (MIND has nothing to route).
* Histories longer than ``max_len`` keep the most recent ``max_len`` items (the last ones
  in the list), exactly as training did, so the interests and the list equal those of the
  truncated history; exclusion of seen items still uses the whole history.
* ``n < 1`` or ``n`` larger than the catalogue raises ValueError; when fewer than ``n`` items are
  eligible (the rest are in the history) the list is shorter.

* A bad model folder (missing, a checkpoint file in its place, a missing, truncated or corrupt
  meta.json / items.json / item_embeddings.npy) raises :class:`ModelFormatError` naming the file;
  a bad model.pt raises :class:`mind.checkpoint.CheckpointError` (loaded with weights_only=True).

Batches: :meth:`Recommender.recommend_batch` serves many users with one model call per
batch and one retrieval over the batch (``recommend`` is the batch of one), so throughput
scales with the batch (see bench/bench_serving.py).  A user's list equals the one
``recommend`` gives for that user alone up to float rounding: the batched matmuls of the
model round differently for another batch composition (scores agree to ~1e-6 relative), so
only items whose scores tie to that precision could swap places.

Merging the K interests' lists (``merge=``, ``diversity=``, ``candidates=``; one implementation
of each rule in :mod:`mind.merge`, shared with ``mind.evaluate`` and ``mind.explain``):

* ``"max"`` (default): every item ranked by score(i) = max_k V_k . e_i over the user's active
  interests (the K per-interest top-n lists merged by score, duplicates removed), via
  ``mind.evaluate.retrieve_topk`` (or ``mind.ann.search`` with an index);
* ``"quota"``: the active interests take turns, each adding its own best item not yet listed;
* ``"diverse"``: ComiRec's greedy, f(u, i) + diversity * sum over the items already listed of
  g(i, j), from the union of the interests' top ``candidates`` items; g = 1 for items whose
  categories (items.json's genres) are disjoint, or (1 - cos)/2 of the item vectors when the
  catalogue has no categories.  ``diversity=0`` gives the ``max`` list.

The score returned is max_k V_k . e_i for every rule.  ``merge`` not one of these, ``diversity``
< 0 (or > 0 with a rule other than ``diverse``), ``candidates`` < 1 and ``n`` larger than the
catalogue raise ValueError naming the argument.
"""

from __future__ import annotations

import pathlib
import sys
import warnings
from typing import Optional, Sequence

import numpy as np
import torch

from .export.errors import EXPORT_HINT, ModelFormatError, first_line, read_json
from .export.load import TOWER_FORMATS, load_tower
from .export.meta import NATIVE_FORMAT as FORMAT
from .export.native import export, load_model
from .model import MIND

__all__ = ["FORMAT", "ModelFormatError", "Recommender", "export", "first_line", "load"]
_OWN_FILES = {str(pathlib.Path(__file__).with_name(n)) for n in ("serve.py", "explain.py")}


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside mind/serve.py and
    mind/explain.py: the user's own call (``recommend``, ``recommend_batch``, ``explain``...),
    however deep inside serving the warning was raised."""
    frame, level = sys._getframe(1), 1      # level 1 = the function calling warnings.warn
    while frame is not None and (frame.f_code.co_filename in _OWN_FILES
                                 or frame.f_globals.get("__name__", "").startswith("torch.")):  # @no_grad
        frame, level = frame.f_back, level + 1
    return level


class Recommender:
    """A loaded export: raw-id histories in, interest vectors and ranked items out."""

    def __init__(self, model: MIND, item_table: np.ndarray, raw_ids: list, titles: list, genres: list,
                 max_len: int, meta: Optional[dict] = None):
        self.model = model.eval()
        self.item_table = np.ascontiguousarray(item_table, dtype=np.float32)
        self.raw_ids, self.titles, self.genres = raw_ids, titles, genres
        self.max_len = int(max_len)
        self.meta = meta or {}
        # keyed by str so "42" from a command line and 42 from python find the same item
        self._row_of_raw_id = {str(r): i for i, r in enumerate(raw_ids) if i > 0}
        self.index = None  # None: exact retrieval (retrieve_topk); else a faiss index from mind.ann
        self._categories = None

    def use_index(self, kind: str = "exact", **params) -> "Recommender":
        """Retrieve through a faiss index from :mod:`mind.ann` for large catalogues.

        ``kind``: "exact" (IndexFlatIP), "ivf" (nlist, nprobe) or "hnsw" (M, efConstruction, efSearch);
        approximate kinds may miss items (their recall against the exact index is measured by
        ``bench/bench_ann.py``) but never mis-score or mis-order what they return.
        """
        from . import ann  # faiss is needed only when an index is asked for

        self.index = ann.build_index(self.item_table, kind=kind, **params)
        return self

    @property
    def num_items(self) -> int:
        return len(self.raw_ids) - 1

    @property
    def categories(self):
        """items.json's genres as :class:`mind.merge.Categories` (the ``diverse`` merge's g)."""
        if self._categories is None:
            from .merge import Categories

            self._categories = Categories.from_names(self.genres)
        return self._categories

    def _map(self, history: Sequence, who: str) -> tuple[np.ndarray, list]:
        """(known item indices in order, unknown raw ids); ValueError for an empty history."""
        if isinstance(history, (str, bytes)):
            raise ValueError(f"{who} must be a list of raw item ids, got a string {history!r}")
        if len(history) == 0:
            raise ValueError(f"{who} is empty (no known item): need at least one item id")
        index = self._row_of_raw_id
        known, unknown = [], []
        for r in history:
            i = index.get(str(r).strip())
            if i is None:
                unknown.append(r)
            else:
                known.append(i)
        return np.asarray(known, dtype=np.int64), unknown

    def _none_known(self, history: Sequence, who: str) -> ValueError:
        return ValueError(f"{who} has no known item (got {len(history)} id(s), none in the "
                          f"{self.num_items}-item catalogue: {list(history)[:10]})")

    @staticmethod
    def _warn_unknown(unknown: list, users: Optional[list] = None) -> None:
        if unknown:
            where = f" in the histories of users at positions {users[:10]}" if users is not None else ""
            warnings.warn(f"dropping {len(unknown)} unknown item id(s) not in the catalogue{where}: "
                          f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}", UserWarning,
                          stacklevel=_caller_stacklevel())

    def map_history(self, history: Sequence) -> np.ndarray:
        """Raw ids -> item indices (all of them, in order); unknown ids dropped with a warning."""
        known, unknown = self._map(history, "history")
        self._warn_unknown(unknown)
        if not len(known):
            raise self._none_known(history, "history")
        return known

    def _batch(self, histories: Sequence[Sequence]) -> tuple[torch.Tensor, list]:
        if len(histories) == 1:
            mapped = [self.map_history(histories[0])]
        else:
            mapped, unknown, users = [], [], []
            for u, h in enumerate(histories):
                known, unk = self._map(h, f"history {u}")
                mapped.append(known)
                if unk:
                    unknown += unk
                    users.append(u)
            self._warn_unknown(unknown, users)
            for u, (h, known) in enumerate(zip(histories, mapped)):
                if not len(known):
                    raise self._none_known(h, f"history {u}")
        L = self.max_len
        out = np.zeros((len(mapped), L), dtype=np.int64)
        for r, s in enumerate(mapped):
            s = s[-L:]                           # most recent max_len, right-aligned like training
            out[r, L - len(s):] = s
        return torch.from_numpy(out), mapped

    def _features(self, user_features, batch: int) -> Optional[torch.Tensor]:
        if user_features is None:
            return None
        f = torch.as_tensor(np.asarray(user_features), dtype=torch.long)
        return f.reshape(batch, -1)

    @torch.no_grad()
    def interests(self, histories: Sequence[Sequence], user_features=None, return_mask: bool = False):
        """Interest vectors (U, K, d) float32 numpy for raw-id histories.

        ``user_features``: (U, F) feature indices as in ``PreparedData.user_features`` (0 = unknown);
        None = unknown profile.  ``return_mask`` also returns the (U, K) active-interest mask.
        """
        hist, _ = self._batch(histories)
        v, imask = self.model.interests(hist, self._features(user_features, len(histories)))
        v = v.float().numpy()
        return (v, imask.numpy()) if return_mask else v

    @torch.no_grad()
    def recommend(self, history: Sequence, n: int = 50, exclude_history: bool = True,
                  user_features=None, merge: str = "max", diversity: float = 0.0,
                  candidates: int = 200) -> list[tuple]:
        """Top-n items for one raw-id history: a list of (raw item id, title, score), best first.
        ``merge``, ``diversity``, ``candidates``: how the interests' lists are merged (module docstring)."""
        feats = None if user_features is None else np.asarray(user_features).reshape(1, -1)
        return self.recommend_batch([history], n, exclude_history, feats, merge=merge, diversity=diversity,
                                    candidates=candidates)[0]

    @torch.no_grad()
    def recommend_batch(self, histories: Sequence[Sequence], n: int = 50, exclude_history: bool = True,
                        user_features=None, batch_size: int = 4096, merge: str = "max", diversity: float = 0.0,
                        candidates: int = 200) -> list[list[tuple]]:
        """Top-n items for each of many raw-id histories: one list of (raw id, title, score) per user.

        One model call and one retrieval per ``batch_size`` users (no per-user Python model
        loop).  ``user_features``: (U, F) or None.  ``merge``, ``diversity``, ``candidates``: the
        merge rule (module docstring); a user's list is the one ``recommend`` gives it alone.  Bad
        input as in the module docstring; a ValueError names the position of the offending history.
        """
        from .merge import check_merge, merged_topn

        check_merge(merge, diversity, n, self.num_items, candidates)
        U = len(histories)
        feats = None if user_features is None else np.asarray(user_features).reshape(U, -1)
        out: list[list[tuple]] = []
        n_ret = min(n, self.num_items)
        for s in range(0, U, batch_size):
            chunk = histories[s:s + batch_size]
            hist, mapped = self._batch(chunk)
            f = None if feats is None else feats[s:s + len(chunk)]
            v, imask = self.model.interests(hist, self._features(f, len(chunk)))
            exclude = mapped if exclude_history else None
            # every rule pads with -1 when fewer than n items are eligible (those are dropped below)
            items, scores = merged_topn(v.float(), n_ret, table=self.item_table, active=imask, exclude=exclude,
                                        merge=merge, diversity=diversity, candidates=candidates,
                                        categories=self.categories if merge == "diverse" else None,
                                        index=self.index)
            raw_ids, titles = self.raw_ids, self.titles
            for row_i, row_s in zip(np.asarray(items).tolist(), np.asarray(scores).tolist()):
                out.append([(raw_ids[i], titles[i], float(sc)) for i, sc in zip(row_i, row_s) if i > 0])
        return out


def load(path, index: Optional[str] = None, **index_params) -> Recommender:
    """Load a directory written by :func:`export`; ``index`` ("exact", "ivf", "hnsw") builds a faiss index
    (see :meth:`Recommender.use_index`), None keeps the exact brute-force retrieval.

    A missing folder, a file in its place (e.g. a checkpoint), or a missing or damaged file in it
    raises :class:`ModelFormatError` (model.pt: :class:`~mind.checkpoint.CheckpointError`) naming it.
    """
    path = pathlib.Path(path)
    if path.is_file():
        what = "a training checkpoint" if path.suffix == ".pt" else "a file"
        raise ModelFormatError(f"{path} is {what}, not a MIND export folder; {EXPORT_HINT}")
    if not path.is_dir():
        raise ModelFormatError(f"model folder {path} does not exist; {EXPORT_HINT}")
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise ModelFormatError(f"{path} is not a MIND export (no meta.json); {EXPORT_HINT}")
    meta = read_json(meta_path, "the export's metadata")
    if isinstance(meta, dict) and meta.get("format") in TOWER_FORMATS:
        model = load_tower(path, meta)
    elif not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ModelFormatError(f"{meta_path}: unsupported export format {got!r} "
                               f"(want one of {[FORMAT, *TOWER_FORMATS]})")
    else:
        model = load_model(path)
    items = read_json(path / "items.json", "the item catalogue")
    if not isinstance(items, dict) or not all(isinstance(items.get(k), list) for k in ("raw_ids", "titles", "genres")):
        raise ModelFormatError(f"{path / 'items.json'} is corrupt: want lists 'raw_ids', 'titles' and 'genres'")
    npy = path / "item_embeddings.npy"
    if not npy.is_file():
        raise ModelFormatError(f"{npy} is missing: the export is incomplete ({EXPORT_HINT})")
    try:
        table = np.load(npy, allow_pickle=False)
    except (ValueError, EOFError, OSError):
        raise ModelFormatError(f"{npy} is truncated or corrupt ({npy.stat().st_size} bytes, not a whole .npy "
                               f"array); re-export the model") from None
    want = (len(items["raw_ids"]), int(model.dim))
    if table.ndim != 2 or tuple(table.shape) != want:
        raise ModelFormatError(f"{npy} has shape {tuple(table.shape)}, but the export has {want[0]} rows "
                               f"(items + padding) of dim {want[1]}; re-export the model")
    if "max_len" not in meta:
        raise ModelFormatError(f"{meta_path} is corrupt: no 'max_len'")
    rec = Recommender(model, table, items["raw_ids"], items["titles"], items["genres"], meta["max_len"], meta)
    return rec if index is None else rec.use_index(index, **index_params)
