"""Export a trained MIND model and serve recommendations from raw item ids.

Export directory layout (``export(model, data, path)``)::

    model.pt              {"model": state_dict, "model_config": MIND.config}  (loads with weights_only=True)
    item_embeddings.npy   (num_items + 1, d) float32, row 0 = padding (zeros)
    items.json            {"raw_ids": [...], "titles": [...], "genres": [[names], ...]}, index-aligned with rows
    meta.json             {"format": "mind-export/1", "max_len", "dim", "num_interests", "user_feature_names",
                           "user_feature_cardinalities", "dataset"}

Serving (``load(path) -> Recommender``) is deterministic: the model runs in eval mode,
whose routing logits are a fixed buffer, so the same history always gives the same
interests and the same list.

Raw ids and unknown items: a history is a list of raw item ids (ints or their string
form).  Ids not in the exported catalogue are dropped with a ``UserWarning`` naming them;
if nothing is left a ``ValueError`` is raised.  Histories longer than ``max_len`` keep the
most recent ``max_len`` items (the last ones in the list); exclusion of seen items uses
the whole history.

Scores: score(i) = max_k V_k . e_i over the user's active interests (the K per-interest
top-n lists merged by score, duplicates removed), via ``mind.evaluate.retrieve_topk``.
"""

from __future__ import annotations

import json
import pathlib
import warnings
from typing import Optional, Sequence

import numpy as np
import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .model import MIND, retrieval_vectors

FORMAT = "mind-export/1"


def export(model: MIND, data, path) -> pathlib.Path:
    """Write everything serving needs (see the module docstring) into directory ``path``."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    with torch.no_grad():
        table = model.item_embeddings().float().numpy()
    save_checkpoint({"model": model.state_dict(), "model_config": model.config}, path / "model.pt")
    np.save(path / "item_embeddings.npy", table)
    genres = np.asarray(data.item_genres)
    items = {
        "raw_ids": [int(x) if np.issubdtype(type(x), np.integer) else str(x) for x in np.asarray(data.item_raw_ids)],
        "titles": [str(t) for t in data.item_titles],
        "genres": [[data.genre_names[g] for g in row if g != 0] for row in genres.tolist()],
    }
    (path / "items.json").write_text(json.dumps(items))
    meta = {"format": FORMAT, "max_len": int(data.max_len), "dim": model.dim, "num_interests": model.num_interests,
            "user_feature_names": list(data.user_feature_names),
            "user_feature_cardinalities": [int(c) for c in data.user_feature_cardinalities],
            "dataset": str(data.name)}
    (path / "meta.json").write_text(json.dumps(meta, indent=2))
    return path


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
        self._index = {str(r): i for i, r in enumerate(raw_ids) if i > 0}

    @property
    def num_items(self) -> int:
        return len(self.raw_ids) - 1

    def map_history(self, history: Sequence) -> np.ndarray:
        """Raw ids -> item indices (all of them, in order); unknown ids dropped with a warning."""
        known, unknown = [], []
        for r in history:
            i = self._index.get(str(r).strip())
            (known if i is not None else unknown).append(i if i is not None else r)
        if unknown:
            warnings.warn(f"dropping {len(unknown)} unknown item id(s) not in the catalogue: {unknown[:10]}"
                          f"{' ...' if len(unknown) > 10 else ''}", UserWarning, stacklevel=3)
        if not known:
            raise ValueError(f"history has no known item (got {len(history)} id(s), none in the "
                             f"{self.num_items}-item catalogue)")
        return np.asarray(known, dtype=np.int64)

    def _batch(self, histories: Sequence[Sequence]) -> tuple[torch.Tensor, list]:
        mapped = [self.map_history(h) for h in histories]
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
                  user_features=None) -> list[tuple]:
        """Top-n items for one raw-id history: a list of (raw item id, title, score), best first."""
        from .evaluate import retrieve_topk

        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        hist, mapped = self._batch([history])
        v, imask = self.model.interests(hist, self._features(user_features, 1))
        vectors = retrieval_vectors(v, imask).float().numpy()
        n = min(n, self.num_items - (len(set(mapped[0].tolist())) if exclude_history else 0))
        if n < 1:
            return []
        exclude = [mapped[0]] if exclude_history else None
        items, scores = retrieve_topk(vectors, self.item_table, n, exclude=exclude, use_faiss=False)
        items, scores = np.asarray(items)[0], np.asarray(scores)[0]
        return [(self.raw_ids[i], self.titles[i], float(s)) for i, s in zip(items.tolist(), scores.tolist()) if i > 0]


def load(path) -> Recommender:
    """Load a directory written by :func:`export`."""
    path = pathlib.Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a MIND export (no meta.json); create one with `python -m mind export`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unsupported export format {meta.get('format')!r} (want {FORMAT!r})")
    state = load_checkpoint(path / "model.pt", required=("model", "model_config"))
    model = MIND.from_config(state["model_config"])
    model.load_state_dict(state["model"])
    items = json.loads((path / "items.json").read_text())
    table = np.load(path / "item_embeddings.npy")
    return Recommender(model, table, items["raw_ids"], items["titles"], items["genres"], meta["max_len"], meta)
