"""The dense per-user protocol of ``mind.data.prepare`` as it was written before the CSR layout (one
Python pass per user, every training window a padded row): the reference the vectorised
``prepare`` is tested against (tests/test_prepared.py).  Returns plain arrays and lists."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from numpy.lib.stride_tricks import sliding_window_view

HISTORY_FRACTION_NUM, HISTORY_FRACTION_DEN = 4, 5


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


def filter_interactions(inter: pd.DataFrame, min_item_count: int, min_user_count: int) -> pd.DataFrame:
    """Step 3: items with >= min_item_count rows, then users with >= min_user_count of the rest."""
    item_counts = inter["item"].map(inter["item"].value_counts())
    inter = inter[item_counts.to_numpy() >= min_item_count]
    user_counts = inter["user"].map(inter["user"].value_counts())
    return inter[user_counts.to_numpy() >= min_user_count]


def split_users(user_ids: np.ndarray, seed: int, split_ratio) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 5 on ascending raw ids: returns (train, valid, test) raw ids in permuted order."""
    a, b, _ = split_ratio
    perm = np.random.default_rng(seed).permutation(np.sort(np.asarray(user_ids, dtype=np.int64)))
    n = len(perm)
    # round() guards a+b against float noise such as 0.7+0.2 = 0.8999999999999999.
    cut1, cut2 = int(n * a), int(n * round(a + b, 12))
    return perm[:cut1], perm[cut1:cut2], perm[cut2:]


def reference_prepare(raw, max_len: int = 20, min_item_count: int = 5, min_user_count: int = 5,
            seed: int = 2020, min_target_pos: int = 4, split_ratio=(0.8, 0.1, 0.1)) -> dict:
    """Apply the protocol in the module docstring to ``raw``."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if min_target_pos < 1:
        raise ValueError(f"min_target_pos must be >= 1 (a history needs an item), got {min_target_pos}")
    if len(split_ratio) != 3 or min(split_ratio) < 0 or abs(sum(split_ratio) - 1) > 1e-9:
        raise ValueError(f"split_ratio must be three non-negative fractions summing to 1, got {split_ratio}")

    inter = raw.inter[["user", "item", "timestamp"]].astype(np.int64)
    inter = filter_interactions(inter, min_item_count, min_user_count)
    if len(inter) == 0:
        raise ValueError(f"{raw.name}: no interactions left after filtering with "
                         f"min_item_count={min_item_count}, min_user_count={min_user_count}")
    user = inter["user"].to_numpy()
    item = inter["item"].to_numpy()
    ts = inter["timestamp"].to_numpy()
    order = np.lexsort((item, ts, user))  # last key is primary: user, then time, then item
    user, item = user[order], item[order]

    item_raw_ids = np.unique(item)
    num_items = len(item_raw_ids)
    item_idx = np.searchsorted(item_raw_ids, item) + 1
    user_ids, starts, counts = np.unique(user, return_index=True, return_counts=True)
    seqs = {int(u): item_idx[s:s + c] for u, s, c in zip(user_ids, starts, counts)}
    user_row = {int(u): r for r, u in enumerate(user_ids)}

    train_u, valid_u, test_u = split_users(user_ids, seed, split_ratio)
    split = {"train": sorted(int(u) for u in train_u), "valid": sorted(int(u) for u in valid_u),
             "test": sorted(int(u) for u in test_u)}

    # Step 6: all windows of the zero-left-padded sequence at once.
    ex_users, ex_hist, ex_len, ex_tgt = [], [], [], []
    for u in split["train"]:
        s = seqs[u]
        if len(s) <= min_target_pos:
            continue
        padded = np.concatenate([np.zeros(max_len, dtype=np.int64), s])
        # window t (0-based) = padded[t : t+max_len] = s[t-max_len : t], right-aligned.
        windows = sliding_window_view(padded, max_len)[min_target_pos:len(s)]
        t = np.arange(min_target_pos, len(s))
        ex_hist.append(windows)
        ex_len.append(np.minimum(t, max_len))
        ex_tgt.append(s[min_target_pos:])
        ex_users.append(np.full(len(t), user_row[u], dtype=np.int64))
    if ex_tgt:
        train_hist = torch.from_numpy(np.concatenate(ex_hist).astype(np.int64))
        train_len = torch.from_numpy(np.concatenate(ex_len).astype(np.int64))
        train_tgt = torch.from_numpy(np.concatenate(ex_tgt).astype(np.int64))
        train_usr = torch.from_numpy(np.concatenate(ex_users))
    else:
        train_hist = torch.zeros(0, max_len, dtype=torch.long)
        train_len = train_tgt = train_usr = torch.zeros(0, dtype=torch.long)

    item_counts = np.zeros(num_items + 1, dtype=np.int64)
    for u in split["train"]:
        np.add.at(item_counts, seqs[u], 1)

    def eval_split(raw_users: list[int]) -> dict:
        users, hists, tgts = [], [], []
        for u in raw_users:
            s = seqs[u]
            k = max(1, len(s) * HISTORY_FRACTION_NUM // HISTORY_FRACTION_DEN)
            if k >= len(s):
                continue  # no target left; see step 7
            users.append(u)
            hists.append(s[:k].astype(np.int64))
            tgts.append(s[k:].astype(np.int64))
        h, lengths = right_align(hists, max_len)
        return dict(users=np.asarray(users, dtype=np.int64),
                    user_index=torch.tensor([user_row[u] for u in users], dtype=torch.long),
                    histories=h, lengths=lengths, full_histories=hists, targets=tgts)

    items_meta = raw.items.reindex(item_raw_ids)
    raw_titles = items_meta["title"].tolist() if "title" in items_meta else [""] * num_items
    titles = ["<pad>"] + [t if isinstance(t, str) else "" for t in raw_titles]
    raw_genres = items_meta["genres"].tolist() if "genres" in items_meta else [None] * num_items
    # Items missing from the item file come back as NaN: no title, no genres.
    genre_lists = [list(dict.fromkeys(g)) if isinstance(g, (list, tuple)) else [] for g in raw_genres]
    genre_names = ["<pad>"] + sorted({g for gs in genre_lists for g in gs})
    genre_index = {g: i for i, g in enumerate(genre_names)}
    width = max([1] + [len(gs) for gs in genre_lists])
    item_genres = torch.zeros(num_items + 1, width, dtype=torch.long)
    for i, gs in enumerate(genre_lists, start=1):
        if gs:
            item_genres[i, :len(gs)] = torch.tensor([genre_index[g] for g in gs])

    feature_names = [str(c) for c in raw.users.columns]
    users_meta = raw.users.reindex(user_ids)
    user_features = torch.zeros(len(user_ids), len(feature_names), dtype=torch.long)
    cardinalities = []
    for j, c in enumerate(feature_names):
        values = ["" if not isinstance(v, str) else v.strip() for v in users_meta[c].tolist()]
        vocab = {v: i for i, v in enumerate(sorted({v for v in values if v}), start=1)}
        user_features[:, j] = torch.tensor([vocab.get(v, 0) for v in values], dtype=torch.long)
        cardinalities.append(len(vocab) + 1)

    return dict(
        num_items=num_items, item_raw_ids=np.concatenate([[-1], item_raw_ids]).astype(np.int64),
        item_titles=titles, item_genres=item_genres, genre_names=genre_names, user_features=user_features,
        user_feature_names=feature_names, user_feature_cardinalities=cardinalities,
        user_raw_ids=user_ids.astype(np.int64), train_users=train_usr, train_histories=train_hist,
        train_lengths=train_len, train_targets=train_tgt, item_counts=item_counts,
        valid=eval_split(split["valid"]), test=eval_split(split["test"]), split=split)
