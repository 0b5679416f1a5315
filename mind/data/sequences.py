"""From the log's three columns to the CSR sequences: ComiRec's filter, the id ranks and the time order.

Steps 2-4 of the protocol in :mod:`mind.data.prepare`, in memory that follows the interactions:

* every per-row pass runs a block of ``BLOCK`` rows at a time, so its temporaries (pandas' int64
  indexer, a boolean selection, an int64 key block) are a few MB, never 8 bytes per row;
* ids become ranks in the ascending unique ids (a hash lookup per row, ``pandas.Index.get_indexer``),
  stored int32 where they fit;
* where ``users x timestamp span x items`` fits in an int64, each kept row is one packed key
  ``(user * span + ts - t_min) * items + item`` sorted in place: equal keys are equal (user, ts, item)
  triples, so no stable argsort and no int64 permutation are needed, and the sorted key decodes to the
  item of each position. Otherwise (e.g. millisecond timestamps over a large catalogue) ``np.lexsort``
  of the compact columns gives the permutation.

Held per row at the peak (the packed path): the caller's three columns (4 or 8 bytes each), the two
int32 ranks, a keep flag and the int64 key: about 29 bytes with int32 columns.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

BLOCK = 1 << 20   # rows per block of the per-row passes


def _blocks(n: int):
    return ((s, min(s + BLOCK, n)) for s in range(0, n, BLOCK))


def _index_dtype(n: int):
    return np.int32 if n < 2 ** 31 else np.int64


def ranks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ascending unique values of x, each row's rank among them), the ranks int32 where they fit."""
    uniques = np.sort(pd.unique(x))
    index = pd.Index(uniques)
    out = np.empty(len(x), dtype=_index_dtype(len(uniques)))
    for s, e in _blocks(len(x)):
        out[s:e] = index.get_indexer(x[s:e])
    return uniques, out


def counts(r: np.ndarray, n: int, keep: np.ndarray | None = None) -> np.ndarray:
    """(n,) int64: how many rows (those with ``keep`` set, if given) hold each rank of ``r``."""
    out = np.zeros(n, dtype=np.int64)
    for s, e in _blocks(len(r)):
        out += np.bincount(r[s:e] if keep is None else r[s:e][keep[s:e]], minlength=n)
    return out


def _renumber(used: np.ndarray) -> np.ndarray:
    """Old rank -> new rank among the ranks with ``used`` set (-1 for the others), int32 where it fits."""
    new = np.full(len(used), -1, dtype=_index_dtype(len(used)))
    new[used] = np.arange(int(used.sum()), dtype=new.dtype)
    return new


def sequences(user: np.ndarray, item: np.ndarray, ts: np.ndarray, min_item_count: int,
              min_user_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user ids (U,) ascending, item ids (I,) ascending, values (n,) int32, offsets (U + 1,) int64).

    Filter: items with >= min_item_count rows, then users with >= min_user_count of the rest (one pass
    each). Kept users and items are those with a row left; ``values[offsets[u]:offsets[u + 1]]`` are user
    u's items as 1-based ranks (0 is padding) sorted by (timestamp, item id). Empty when nothing is kept.
    """
    item_ids, item_r = ranks(item)
    keep = (counts(item_r, len(item_ids)) >= min_item_count)[item_r]
    user_ids, user_r = ranks(user)
    keep &= (counts(user_r, len(user_ids), keep) >= min_user_count)[user_r]
    per_user = counts(user_r, len(user_ids), keep)
    per_item = counts(item_r, len(item_ids), keep)
    user_new, item_new = _renumber(per_user > 0), _renumber(per_item > 0)
    user_ids, item_ids, per_user = user_ids[per_user > 0], item_ids[per_item > 0], per_user[per_user > 0]
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(per_user, out=offsets[1:])
    n, num_users, num_items = int(offsets[-1]), len(user_ids), len(item_ids)

    def kept(s, e):     # (user, ts, item) of the kept rows in block [s, e): new ranks, compact dtypes
        k = keep[s:e]
        return user_new[user_r[s:e][k]], ts[s:e][k], item_new[item_r[s:e][k]]

    t_min = t_max = None
    for s, e in _blocks(len(keep)):
        t = ts[s:e][keep[s:e]]
        if len(t):
            lo, hi = int(t.min()), int(t.max())
            t_min, t_max = lo if t_min is None else min(t_min, lo), hi if t_max is None else max(t_max, hi)
    if t_min is None:
        t_min = t_max = 0
    span = t_max - t_min + 1
    values = np.empty(n, dtype=np.int32)
    if num_users * span * max(num_items, 1) < 2 ** 63:
        key = np.empty(n, dtype=np.int64)
        at = 0
        for s, e in _blocks(len(keep)):
            u, t, i = kept(s, e)
            block = u.astype(np.int64)
            block *= span
            dt = t.astype(np.int64)     # t - t_min in [0, span): no intermediate can overflow
            dt -= t_min
            block += dt
            block *= num_items
            block += i
            key[at:at + len(block)] = block
            at += len(block)
        del keep, user_r, item_r
        key.sort()      # in place; equal keys are equal rows, so stability does not matter
        for s, e in _blocks(n):
            values[s:e] = key[s:e] % num_items
    else:
        u = np.empty(n, dtype=user_new.dtype)
        t = np.empty(n, dtype=ts.dtype)
        i = np.empty(n, dtype=item_new.dtype)
        at = 0
        for s, e in _blocks(len(keep)):
            bu, bt, bi = kept(s, e)
            u[at:at + len(bu)], t[at:at + len(bu)], i[at:at + len(bu)] = bu, bt, bi
            at += len(bu)
        del keep, user_r, item_r
        order = np.lexsort((i, t, u))
        del u, t
        values[:] = i[order]
    values += 1
    return user_ids, item_ids, values, offsets
