"""From `RawData` to tensors: ComiRec's filtering, user split and example construction.

The protocol (Cen et al., "Controllable Multi-Interest Framework for Recommendation",
KDD 2020, and their released preprocessing), step by step:

1. Every interaction is implicit feedback (ratings were already dropped by the loaders).
   Repeated (user, item) interactions are all kept.
2. Each user's interactions are sorted by timestamp, ties by raw item id (then by input
   order, the sort being stable).
3. Filtering, one pass each, in this order: keep items with >= ``min_item_count``
   interactions; then keep users with >= ``min_user_count`` interactions on kept items.
   There is no second round, so an item may end below ``min_item_count``.
4. Kept items are the items that still have interactions after both filters; they get
   indices ``1..num_items`` in ascending raw-id order (0 is padding).
5. Users (ascending raw id, as integers) are shuffled with
   ``numpy.random.default_rng(seed).permutation``; with ``n`` users and ratios (a, b, c):
   the first ``int(n*a)`` are train users, up to ``int(n*(a+b))`` valid users, the rest test.
6. Training examples, from train users only: for every 0-based position
   ``t >= min_target_pos`` of the sorted sequence, history = the up to ``max_len`` items
   before ``t``, target = the item at ``t``. Ordered by raw user id, then ``t``.
7. Valid/test users: the first ``max(1, floor(0.8 * L))`` items are the history (its last
   ``max_len`` are the model input), the remaining items are the targets. Users left with no
   target (possible only when ``min_user_count`` < 2) are listed in ``split`` but not in
   the `EvalSplit`, since recall is undefined for them. Ordered by raw user id.

Storage (memory follows the interactions, not the examples): every kept user's sorted item
indices are one CSR array, ``seq_values`` (int32) with ``seq_offsets`` (int64, num_users + 1;
user row r is ``seq_values[seq_offsets[r]:seq_offsets[r + 1]]``).  A training example is a pair
(``train_rows``: user row, ``train_positions``: t), 8 bytes; its history window is cut when a
batch is drawn (:meth:`PreparedData.batch`).  ``train_histories`` and friends still give the dense
(N, max_len) matrix for small data and tests, built on demand.

Histories are right-aligned: the most recent item is in the last column, 0 pads the left.
User features: one row per kept user (all parts, ascending raw id); each feature's
vocabulary is the sorted set of non-empty values among kept users, indexed from 1; 0 means
unknown (missing user row or empty value). Genres likewise (index 0 = "<pad>"), each item's
genres in file order, deduplicated, right-padded with 0 to the largest genre count.
``item_counts`` counts interactions of train users only (what MostPopular may see).

Every step is vectorised (numpy / pandas): no Python loop per user or per interaction.  Steps 2-4
(:mod:`mind.data.sequences`) run a block of rows at a time and sort one packed int64 key in place, so
preparing holds about 17 bytes per interaction on top of the log's own columns (12 bytes when int32).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .loaders import RawData
from .sequences import counts, sequences

HISTORY_FRACTION_NUM, HISTORY_FRACTION_DEN = 4, 5  # 80 % history / 20 % targets, in integers


@dataclass
class EvalSplit:
    """Valid or test users. U users, histories right-aligned with 0 padding.

    users (U,) raw ids; user_index (U,) rows of `PreparedData.user_features`;
    histories (U, max_len); lengths (U,); full_histories / targets: per user int64 arrays
    of item indices (the whole 80 % history; the remaining 20 %).
    """

    users: np.ndarray
    user_index: torch.Tensor
    histories: torch.Tensor
    lengths: torch.Tensor
    full_histories: list
    targets: list

    def __len__(self) -> int:
        return len(self.users)


def windows(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray, ends: np.ndarray,
            max_len: int) -> np.ndarray:
    """(n, max_len) int64: for each (user row r, end t), the items at positions t - max_len .. t - 1 of
    user r's sequence, right-aligned with 0 on the left where the sequence starts later."""
    rows = np.asarray(rows, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    pos = ends[:, None] + np.arange(-max_len, 0, dtype=np.int64)[None, :]         # (n, max_len)
    valid = pos >= 0
    flat = np.asarray(offsets, dtype=np.int64)[rows][:, None] + np.where(valid, pos, 0)
    out = np.asarray(values)[flat].astype(np.int64, copy=False)
    out[~valid] = 0
    return out


@dataclass
class PreparedData:
    """Everything training and evaluation need; see the module docstring for the protocol and layout.

    Shapes: item_genres (num_items+1, G); user_features (num_users_total, F); seq_values (I,) int32 and
    seq_offsets (num_users_total + 1,) int64; train_rows, train_positions (N,) int32; item_raw_ids,
    item_counts (num_items+1,).  The arrays may be read-only memory maps (:func:`mind.data.load_prepared`).
    """

    name: str
    max_len: int
    num_items: int
    item_raw_ids: np.ndarray
    item_titles: list
    item_genres: torch.Tensor
    genre_names: list
    user_features: torch.Tensor
    user_feature_names: list
    user_feature_cardinalities: list
    user_raw_ids: np.ndarray
    seq_values: np.ndarray
    seq_offsets: np.ndarray
    train_rows: np.ndarray
    train_positions: np.ndarray
    item_counts: np.ndarray
    valid: EvalSplit
    test: EvalSplit
    split: dict
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"name": self.name, "max_len": self.max_len, "num_items": self.num_items,
                "num_users": len(self.user_raw_ids), "train_users": len(self.split["train"]),
                "valid_users": len(self.split["valid"]), "test_users": len(self.split["test"]),
                "train_examples": int(len(self.train_positions)), "interactions": int(len(self.seq_values)),
                "valid_eval_users": len(self.valid), "test_eval_users": len(self.test)}

    @property
    def num_examples(self) -> int:
        return int(len(self.train_positions))

    def batch(self, examples, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(histories (B, max_len) int64 right-aligned, targets (B,) int64, user rows (B,) int64) of the
        training examples at indices ``examples`` (B,); the windows are cut from the CSR sequences here."""
        idx = np.asarray(examples, dtype=np.int64)
        rows = np.asarray(self.train_rows)[idx].astype(np.int64)
        pos = np.asarray(self.train_positions)[idx].astype(np.int64)
        hist = windows(self.seq_values, self.seq_offsets, rows, pos, max_len or self.max_len)
        targets = np.asarray(self.seq_values)[np.asarray(self.seq_offsets)[rows] + pos].astype(np.int64)
        return torch.from_numpy(hist), torch.from_numpy(targets), torch.from_numpy(rows)

    # The dense views of the training examples (N, max_len): small data, tests and benchmarks only.
    @property
    def train_users(self) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.train_rows).astype(np.int64))

    @property
    def train_targets(self) -> torch.Tensor:
        return self.batch(np.arange(self.num_examples))[1]

    @property
    def train_histories(self) -> torch.Tensor:
        return self.batch(np.arange(self.num_examples))[0]

    @property
    def train_lengths(self) -> torch.Tensor:
        return torch.from_numpy(np.minimum(np.asarray(self.train_positions).astype(np.int64), self.max_len))

def right_align(seqs: list[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Last ``max_len`` items of each sequence, right-aligned in a (len(seqs), max_len) zero tensor."""
    out = np.zeros((len(seqs), max_len), dtype=np.int64)
    lengths = np.zeros(len(seqs), dtype=np.int64)
    for r, s in enumerate(seqs):
        s = s[-max_len:]
        lengths[r] = len(s)
        if len(s):
            out[r, max_len - len(s):] = s
    return torch.from_numpy(out), torch.from_numpy(lengths)


def _say(progress: bool, stage: str, t0: float, detail: str = "") -> None:
    if progress:
        print(f"[prepare] {stage}{': ' + detail if detail else ''} ({time.time() - t0:.1f} s)", file=sys.stderr,
              flush=True)


def split_users(user_ids: np.ndarray, seed: int, split_ratio) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 5 on ascending raw ids: returns (train, valid, test) raw ids in permuted order."""
    a, b, _ = split_ratio
    perm = np.random.default_rng(seed).permutation(np.sort(np.asarray(user_ids, dtype=np.int64)))
    n = len(perm)
    # round() guards a+b against float noise such as 0.7+0.2 = 0.8999999999999999.
    cut1, cut2 = int(n * a), int(n * round(a + b, 12))
    return perm[:cut1], perm[cut1:cut2], perm[cut2:]


def eval_split(values: np.ndarray, offsets: np.ndarray, user_raw_ids: np.ndarray, rows: np.ndarray,
               max_len: int) -> EvalSplit:
    """Step 7 for the users at ``rows`` (ascending): history = first max(1, floor(0.8 L)) items, targets
    the rest; users without a target are left out."""
    rows = np.asarray(rows, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = offsets[rows + 1] - offsets[rows]
    cut = np.maximum(1, lengths * HISTORY_FRACTION_NUM // HISTORY_FRACTION_DEN)
    ok = cut < lengths
    rows, lengths, cut = rows[ok], lengths[ok], cut[ok]
    starts = offsets[rows]
    values = np.asarray(values)
    return EvalSplit(users=np.asarray(user_raw_ids)[rows].astype(np.int64),
                     user_index=torch.from_numpy(rows.copy()),
                     histories=torch.from_numpy(windows(values, offsets, rows, cut, max_len)),
                     lengths=torch.from_numpy(np.minimum(cut, max_len)),
                     full_histories=[values[s:s + k].astype(np.int64) for s, k in zip(starts.tolist(), cut.tolist())],
                     targets=[values[s + k:s + n].astype(np.int64)
                              for s, k, n in zip(starts.tolist(), cut.tolist(), lengths.tolist())])


def training_examples(offsets: np.ndarray, rows: np.ndarray, min_target_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """Step 6: (user rows, positions t) int32 of every example t >= min_target_pos of the users at ``rows``
    (ascending), ordered by row then t. Built in int32 (8 bytes per example, no int64 temporaries): the
    positions are a cumulative sum of steps of 1 that jump back to min_target_pos at each user's first example."""
    rows = np.asarray(rows, dtype=np.int64)
    lengths = np.asarray(offsets, dtype=np.int64)[rows + 1] - np.asarray(offsets, dtype=np.int64)[rows]
    per_user = np.maximum(lengths - min_target_pos, 0)
    rows, lengths, per_user = rows[per_user > 0], lengths[per_user > 0], per_user[per_user > 0]
    ex_rows = np.repeat(rows.astype(np.int32), per_user)
    ex_pos = np.ones(len(ex_rows), dtype=np.int32)
    if len(rows):
        first = np.cumsum(per_user) - per_user          # each user's first example
        ex_pos[first[0]] = min_target_pos
        ex_pos[first[1:]] = min_target_pos - (lengths[:-1] - 1)     # back from the previous user's last position
        np.cumsum(ex_pos, dtype=np.int32, out=ex_pos)
    return ex_rows, ex_pos


def _item_genres(raw: RawData, item_raw_ids: np.ndarray) -> tuple[torch.Tensor, list]:
    """(num_items + 1, G) genre indices (file order, deduplicated, 0-padded) and the genre names."""
    num_items = len(item_raw_ids)
    if "genres" not in raw.items:
        return torch.zeros(num_items + 1, 1, dtype=torch.long), ["<pad>"]
    # one row per (item position, genre); items missing from the item file come back as NaN, and an
    # empty list explodes to NaN: no genres
    genres = raw.items["genres"].reindex(item_raw_ids).reset_index(drop=True).explode().dropna()
    pairs = pd.DataFrame({"item": genres.index.to_numpy(dtype=np.int64), "genre": genres.astype(str).to_numpy()})
    pairs = pairs.drop_duplicates()
    names = ["<pad>"] + sorted(pairs["genre"].unique().tolist())
    width = int(pairs.groupby("item").size().max()) if len(pairs) else 1
    out = np.zeros((num_items + 1, width), dtype=np.int64)
    if len(pairs):
        col = pairs.groupby("item").cumcount().to_numpy()
        out[pairs["item"].to_numpy() + 1, col] = np.searchsorted(np.array(names[1:], dtype=object),
                                                                 pairs["genre"].to_numpy()) + 1
    return torch.from_numpy(out), names


def _item_titles(raw: RawData, item_raw_ids: np.ndarray) -> list:
    if "title" not in raw.items:
        return ["<pad>"] + [""] * len(item_raw_ids)
    return ["<pad>"] + raw.items["title"].reindex(item_raw_ids).fillna("").astype(str).tolist()


def _user_features(raw: RawData, user_ids: np.ndarray) -> tuple[torch.Tensor, list, list]:
    """(num_users, F) feature indices (0 = unknown), the feature names and their cardinalities."""
    names = [str(c) for c in raw.users.columns]
    meta = raw.users.reindex(user_ids)
    out = np.zeros((len(user_ids), len(names)), dtype=np.int64)
    cardinalities = []
    for j, c in enumerate(names):        # one pass per feature column, vectorised over users
        values = meta[c].fillna("").astype(str).str.strip()
        vocab = np.array(sorted(set(values[values != ""].tolist())), dtype=object)
        idx = np.searchsorted(vocab, values.to_numpy()) + 1 if len(vocab) else np.zeros(len(values), dtype=np.int64)
        out[:, j] = np.where(values.to_numpy() != "", idx, 0)
        cardinalities.append(len(vocab) + 1)
    return torch.from_numpy(out), names, cardinalities


def prepare(raw: RawData, max_len: int = 20, min_item_count: int = 5, min_user_count: int = 5,
            seed: int = 2020, min_target_pos: int = 4, split_ratio=(0.8, 0.1, 0.1),
            progress: bool = False) -> PreparedData:
    """Apply the protocol in the module docstring to ``raw`` (``progress``: a line per stage on stderr)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if min_target_pos < 1:
        raise ValueError(f"min_target_pos must be >= 1 (a history needs an item), got {min_target_pos}")
    if len(split_ratio) != 3 or min(split_ratio) < 0 or abs(sum(split_ratio) - 1) > 1e-9:
        raise ValueError(f"split_ratio must be three non-negative fractions summing to 1, got {split_ratio}")
    t0 = time.time()
    # the columns as the loader stored them (int32 where they fit): no int64 copies of the log
    user = raw.inter["user"].to_numpy()
    item = raw.inter["item"].to_numpy()
    ts = raw.inter["timestamp"].to_numpy()
    user_ids, item_raw_ids, values, offsets = sequences(user, item, ts, min_item_count, min_user_count)
    if not len(values):
        raise ValueError(f"{raw.name}: no interactions left after filtering with "
                         f"min_item_count={min_item_count}, min_user_count={min_user_count}")
    num_items = len(item_raw_ids)
    _say(progress, "sequences", t0, f"{len(values):,} of {len(raw.inter):,} interactions kept: "
         f"{len(user_ids):,} users, {num_items:,} items")

    train_u, valid_u, test_u = split_users(user_ids, seed, split_ratio)
    split = {k: np.sort(v).tolist() for k, v in (("train", train_u), ("valid", valid_u), ("test", test_u))}
    row_of = {k: np.searchsorted(user_ids, np.sort(v)) for k, v in (("train", train_u), ("valid", valid_u),
                                                                     ("test", test_u))}
    train_rows, train_positions = training_examples(offsets, row_of["train"], min_target_pos)
    is_train = np.zeros(len(user_ids), dtype=bool)
    is_train[row_of["train"]] = True
    item_counts = counts(values, num_items + 1, np.repeat(is_train, np.diff(offsets)))
    _say(progress, "split", t0, f"{len(train_positions):,} training examples")

    item_genres, genre_names = _item_genres(raw, item_raw_ids)
    user_features, feature_names, cardinalities = _user_features(raw, user_ids)
    _say(progress, "side features", t0)
    settings = dict(min_item_count=min_item_count, min_user_count=min_user_count, seed=seed,
                    min_target_pos=min_target_pos, split_ratio=list(split_ratio))
    return PreparedData(
        name=raw.name, max_len=max_len, num_items=num_items,
        item_raw_ids=np.concatenate([[-1], item_raw_ids]).astype(np.int64),
        item_titles=_item_titles(raw, item_raw_ids), item_genres=item_genres, genre_names=genre_names,
        user_features=user_features, user_feature_names=feature_names,
        user_feature_cardinalities=cardinalities, user_raw_ids=user_ids.astype(np.int64),
        seq_values=values, seq_offsets=offsets, train_rows=train_rows, train_positions=train_positions,
        item_counts=item_counts,
        valid=eval_split(values, offsets, user_ids, row_of["valid"], max_len),
        test=eval_split(values, offsets, user_ids, row_of["test"], max_len), split=split, settings=settings)


def save_split(data: PreparedData, path) -> None:
    """Write ``data.split`` ({"train"|"valid"|"test": [raw user ids]}) as JSON."""
    with open(path, "w") as f:
        json.dump(data.split, f, indent=1)


def load_split(path) -> dict:
    """Read a split written by `save_split`."""
    with open(path) as f:
        return {k: [int(u) for u in v] for k, v in json.load(f).items()}
