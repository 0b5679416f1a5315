"""Parquet input: an interaction log (one Parquet file, or a folder of them) -> `RawData`.

    raw = load_parquet("shop_log.parquet")          # or a folder: part-00000.parquet, part-00001.parquet, ...

Columns, by name (their order does not matter):

* ``user_id``, ``item_id``, ``timestamp`` (required): integer columns, any width, signed or unsigned
  (a uint64 value above 2**63-1 is refused). A float column is accepted only where every value is a
  whole number (``881250949.0``; ``1.5``, NaN or inf are refused). ``timestamp`` may also be an Arrow
  ``timestamp[unit]`` column: it becomes the int64 count of its own unit since the epoch (MIND only
  orders by it). Strings, even strings of digits, are refused: convert the column to integers first.
  A null in a required column is refused.
* ``category`` (optional): a string or integer column, the item's genre, taken from the item's
  first row like ComiRec's csv (`load_comirec_csv`): ``genres = [category]``, or ``[]`` where that
  row's category is null or empty. Integers become their decimal text (``3`` -> ``"3"``).
* ``title`` (optional): a string column, the item's title from its first row (null -> ``""``).
* ``user_<name>`` (optional, any number; not ``user_id``): a user-profile feature ``<name>``, a string
  or integer column (integers become their decimal text), taken from the user's first row; null or
  empty = unknown. They become the ``users`` frame's columns, as a RecBole ``.user`` file's fields do,
  and MIND embeds them like those (``user_gender`` -> feature ``gender``). A user's later rows may
  disagree: only the first counts, as for an item's category.
* Any other column is ignored, and never read from the file.

Surrounding whitespace of categories, titles and user features is stripped. Without ``user_*``
columns users get no profile features (an empty ``users`` frame indexed by the user ids, as
`load_comirec_csv` gives). A file of a folder that lacks a ``user_*`` column another file has
leaves that feature unknown for the users first seen in it. A folder is read file
by file in sorted name order (names starting with ``.`` or ``_``, such as Spark's ``_SUCCESS`` or
``_metadata``, are skipped; subfolders are not searched); each file is checked on its own, so
integer widths may differ between files. "First row" means first in that order.

Bounded memory: the three output columns are preallocated from the files' footers (num_rows) as
int32 and filled batch by batch; a column is widened to int64 (one copy) at the first batch whose
values do not fit in int32, as `RawData` specifies (`compact_ints`). Batches are read with ``ParquetFile.iter_batches(batch_size=BATCH_ROWS,
columns=<the needed ones>)``, opened with ``pre_buffer=False``: with Arrow's default it would
buffer every row group's column chunks up front, i.e. the whole file. Peak memory is the output
(12 bytes per interaction where ids and timestamps fit in int32, at most 24), one batch and the row groups it spans (needed columns only), and
per-item / per-user state: the ids seen so far (a bitmap of at most 1 byte per row while ids are
small non-negative integers, else sorted int64 runs) and each item's first category and title,
found per batch with ``np.unique(..., return_index=True)`` on the ids not seen yet (no Python
loop per row; one per item at the end, to build the ``items`` frame). The file is never
materialised as one Arrow table or pandas frame.

Errors (every message starts with the offending file):

* a missing path, or a folder with no ``*.parquet`` file -> `DataNotFoundError` (a FileNotFoundError);
* a file that is not Parquet, or is truncated -> ``DataFormatError("<file>: not a Parquet file (...)")``;
  data that fails to decode while reading -> ``"<file>: cannot read Parquet data (...)"``;
* ``"<file>: no column 'user_id' (columns: ...)"``;
* ``"<file>: column 'timestamp' has type string, want integers ..."`` (required columns),
  ``"... has type double, want strings or integers"`` (category), ``"... want strings"`` (title);
* ``"<file>: column 'item_id' has 3 null values (the first at row index 17)"`` (rows count from 0);
* ``"<file>: column 'timestamp' holds 1.5 at row index 2, not a whole number"`` (float columns),
  ``"... does not fit in int64"`` (uint64).

`DataFormatError.line` is None for these (a Parquet file has no lines).
"""

from __future__ import annotations

import pathlib

import numpy as np
import pandas as pd

from .loaders import DataFormatError, DataNotFoundError, RawData, _items_frame, _users_frame, compact_ints

REQUIRED = ("user_id", "item_id", "timestamp")
OPTIONAL = ("category", "title")
USER_PREFIX = "user_"      # user_<name>: a user-profile feature column (user_id excepted)
#: Rows per batch handed to numpy (Arrow holds the row groups a batch spans, needed columns only).
BATCH_ROWS = 1 << 16

_INT64_MAX = np.iinfo(np.int64).max


def _arrow():
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is in the [mind] extra
        raise ImportError("reading Parquet needs pyarrow: pip install pyarrow "
                          "(it is part of mind-kernels[mind])") from e
    return pa, pc, pq


def load_parquet(path, name: str | None = None, *, batch_rows: int = BATCH_ROWS) -> RawData:
    """Read an interaction log from one Parquet file or a folder of ``*.parquet`` files.

    See the module docstring for the columns, the memory bound and the errors. ``name``
    defaults to the file's (or folder's) stem; ``batch_rows`` is the rows per batch read.
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    p = pathlib.Path(path)
    files = _parquet_files(p)
    reader = _Reader(batch_rows)
    plans = [reader.plan(f) for f in files]          # footers only: a bad schema fails before any read
    reader.allocate(sum(n for _, n, _ in plans))
    for f, n, columns in plans:
        reader.read(f, n, columns)
    return reader.result(name or p.stem)


def _oneline(e: BaseException) -> str:
    return " ".join(str(e).split())


def _parquet_files(p: pathlib.Path) -> list[pathlib.Path]:
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise DataNotFoundError(f"data file not found: {p}")
    files = sorted(f for f in p.iterdir()
                   if f.suffix == ".parquet" and not f.name.startswith((".", "_")) and f.is_file())
    if not files:
        held = sorted(f.name for f in p.iterdir())
        hint = (f"; it holds {', '.join(held[:5])}{', ...' if len(held) > 5 else ''}" if held
                else "; it is empty")
        raise DataNotFoundError(f"no .parquet file in {p}{hint}")
    return files


class _Seen:
    """The set of ids seen so far, and which values of a batch are new.

    Dense mode, while every id is in ``[0, limit)``: a bool array indexed by id (1 byte per id
    value, ``limit`` = max(2**20, rows of the input), so never more than 1 byte per row), grown
    by doubling. The first id outside that range converts it to sparse mode: sorted disjoint
    int64 runs, each more than twice the size of the next (O(log n) runs, every id merged
    O(log n) times in all, 8 bytes per id), searched with ``np.searchsorted``.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.dense: np.ndarray | None = np.zeros(0, dtype=bool)
        self.runs: list[np.ndarray] = []

    def first_unseen(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, rows): the unseen ids among ``values`` (sorted) and the row of each one's
        first occurrence in ``values``; the ids are then marked as seen."""
        if not len(values):
            return values[:0], np.zeros(0, dtype=np.intp)
        if self.dense is not None:
            lo, hi = int(values.min()), int(values.max())
            if lo < 0 or hi >= self.limit:
                self._to_sparse()
        if self.dense is not None:
            if hi >= len(self.dense):
                grown = np.zeros(min(self.limit, max(hi + 1, 2 * len(self.dense))), dtype=bool)
                grown[:len(self.dense)] = self.dense
                self.dense = grown
            cand = np.flatnonzero(~self.dense[values])  # rows holding an unseen id
            ids, first = np.unique(values[cand], return_index=True)
            self.dense[ids] = True
            return ids, cand[first]
        ids, first = np.unique(values, return_index=True)
        mask = np.ones(len(ids), dtype=bool)
        for run in self.runs:
            pos = np.minimum(np.searchsorted(run, ids), len(run) - 1)
            mask &= run[pos] != ids
        ids, first = ids[mask], first[mask]
        self._add_run(ids)
        return ids, first

    def _to_sparse(self) -> None:
        run, self.dense = np.flatnonzero(self.dense).astype(np.int64), None
        self._add_run(run)

    def _add_run(self, run: np.ndarray) -> None:
        if not len(run):
            return
        while self.runs and len(self.runs[-1]) <= 2 * len(run):
            run = np.sort(np.concatenate([self.runs.pop(), run]), kind="stable")  # merges two runs
        self.runs.append(run)

    def sorted(self) -> np.ndarray:
        """Every id seen, ascending."""
        if self.dense is not None:
            return np.flatnonzero(self.dense).astype(np.int64)
        return np.sort(np.concatenate(self.runs)) if self.runs else np.zeros(0, dtype=np.int64)


class _Reader:
    def __init__(self, batch_rows: int):
        self.pa, self.pc, self.pq = _arrow()
        self.batch_rows = batch_rows
        self.item_ids: list[np.ndarray] = []      # per batch: items first seen there, sorted
        self.categories: list = []                # their first category (large_string, or null)
        self.titles: list = []                    # their first title
        self.user_ids: list[np.ndarray] = []      # per batch: users first seen there, sorted
        self.user_columns: list[str] = []         # the user_* feature columns, in first-seen order
        self.user_values: list[dict] = []         # per batch: {column: their first value (large_string)}
        self.pos = 0

    # ---------------------------------------------------------------- footers and schemas

    def _open(self, f: pathlib.Path):
        pa, pq = self.pa, self.pq
        try:
            return pq.ParquetFile(str(f), pre_buffer=False)
        except (pa.ArrowException, OSError) as e:
            if isinstance(e, (PermissionError, FileNotFoundError, IsADirectoryError)):
                raise
            raise DataFormatError(f, None, f"not a Parquet file ({_oneline(e)})") from None

    def plan(self, f: pathlib.Path) -> tuple[pathlib.Path, int, list[str]]:
        """Check the footer of ``f``: (file, rows, columns to read)."""
        with self._open(f) as pf:
            schema, rows = pf.schema_arrow, pf.metadata.num_rows
        types = {field.name: field.type for field in schema}
        for col in REQUIRED:
            if col not in types:
                raise DataFormatError(f, None, f"no column {col!r} (columns: {', '.join(schema.names)})")
            t = self._decoded(types[col])
            if self.pa.types.is_null(t) and rows:
                raise DataFormatError(f, None, f"column {col!r} has {rows} null values "
                                               f"(the first at row index 0)")
            if not (self.pa.types.is_integer(t) or self.pa.types.is_floating(t)
                    or (col == "timestamp" and self.pa.types.is_timestamp(t)) or self.pa.types.is_null(t)):
                raise DataFormatError(f, None, f"column {col!r} has type {types[col]}, want integers "
                                               f"(floats are accepted where every value is a whole "
                                               f"number, strings are not: convert the column first)")
        for col, ints in (("category", True), ("title", False)):
            if col in types:
                t = self._decoded(types[col])
                if not (self._is_text(t) or self.pa.types.is_null(t)
                        or (ints and self.pa.types.is_integer(t))):
                    raise DataFormatError(f, None, f"column {col!r} has type {types[col]}, want strings"
                                                   + (" or integers" if ints else ""))
        features = [c for c in schema.names if c.startswith(USER_PREFIX) and c != "user_id"]
        for col in features:
            t = self._decoded(types[col])
            if not (self._is_text(t) or self.pa.types.is_integer(t) or self.pa.types.is_null(t)):
                raise DataFormatError(f, None, f"column {col!r} (a user feature) has type {types[col]}, "
                                               f"want strings or integers")
            if col not in self.user_columns:
                self.user_columns.append(col)
        return f, rows, [c for c in REQUIRED + OPTIONAL if c in types] + features

    def _decoded(self, t):
        return t.value_type if self.pa.types.is_dictionary(t) else t

    def _is_text(self, t) -> bool:
        types = self.pa.types
        return (types.is_string(t) or types.is_large_string(t)
                or bool(getattr(types, "is_string_view", lambda _: False)(t)))

    # ---------------------------------------------------------------- reading

    def allocate(self, total: int) -> None:
        self.out = {c: np.empty(total, dtype=np.int32) for c in REQUIRED}   # widened where needed
        limit = max(1 << 20, total)
        self.users, self.items = _Seen(limit), _Seen(limit)

    def read(self, f: pathlib.Path, rows: int, columns: list[str]) -> None:
        pa = self.pa
        start, end = self.pos, self.pos + rows
        nulls = {c: [0, None] for c in REQUIRED}   # count, first row index in the file
        with self._open(f) as pf:
            batches = pf.iter_batches(batch_size=self.batch_rows, columns=columns, use_threads=True)
            while True:
                try:
                    batch = next(batches, None)
                except (pa.ArrowException, OSError) as e:
                    raise DataFormatError(f, None, f"cannot read Parquet data ({_oneline(e)})") from None
                if batch is None:
                    break
                n, row = batch.num_rows, self.pos - start
                if self.pos + n > end:
                    raise DataFormatError(f, None, f"holds more rows than its footer's num_rows ({rows})")
                arrays = {c: batch.column(c) for c in columns}
                for c in REQUIRED:
                    k = arrays[c].null_count
                    if k:
                        if nulls[c][1] is None:
                            nulls[c][1] = row + int(np.argmax(arrays[c].is_null().to_numpy(zero_copy_only=False)))
                        nulls[c][0] += k
                if not any(k for k, _ in nulls.values()):   # after a null, only count the rest
                    self._take(f, arrays, row, slice(self.pos, self.pos + n))
                self.pos += n
        for c in REQUIRED:
            count, first = nulls[c]
            if count:
                raise DataFormatError(f, None, f"column {c!r} has {count} null values "
                                               f"(the first at row index {first})")
        if self.pos != end:
            raise DataFormatError(f, None, f"holds {self.pos - start} rows, its footer says {rows}")

    def _take(self, f, arrays: dict, row: int, where: slice) -> None:
        for c in REQUIRED:
            v = compact_ints(self._int64(f, c, arrays[c], row))
            if v.dtype != self.out[c].dtype and self.out[c].dtype == np.int32:
                self.out[c] = self.out[c].astype(np.int64)     # the first value beyond int32
            self.out[c][where] = v
        users, first = self.users.first_unseen(self.out["user_id"][where])
        if len(users) and self.user_columns:
            rows = self.pa.array(first)
            self.user_ids.append(users)
            self.user_values.append({c: self._text(arrays.get(c), rows) for c in self.user_columns})
        ids, first = self.items.first_unseen(self.out["item_id"][where])
        if not len(ids):
            return
        self.item_ids.append(ids)
        rows = self.pa.array(first)
        self.categories.append(self._text(arrays.get("category"), rows))
        self.titles.append(self._text(arrays.get("title"), rows))

    def _int64(self, f, col: str, arr, row: int) -> np.ndarray:
        """A required column's batch as int64-compatible numpy values (checked; no nulls here)."""
        pa = self.pa
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        t = arr.type
        if pa.types.is_timestamp(t):
            return arr.cast(pa.int64()).to_numpy()
        v = arr.to_numpy(zero_copy_only=False)
        if pa.types.is_floating(t):
            v = v.astype(np.float64, copy=False)
            ok = np.isfinite(v) & (np.floor(v) == v) & (np.abs(v) < 2.0 ** 63)
            if not ok.all():
                k = int(np.argmin(ok))
                raise DataFormatError(f, None, f"column {col!r} holds {float(v[k])!r} at row index {row + k}, "
                                               f"not a whole number")
        elif v.dtype == np.uint64 and len(v) and v.max() > _INT64_MAX:
            k = int(np.argmax(v > _INT64_MAX))
            raise DataFormatError(f, None, f"column {col!r} holds {v[k]} at row index {row + k}, "
                                           f"which does not fit in int64")
        return v

    def _text(self, arr, rows):
        """Rows ``rows`` of an optional text column as large_string, stripped (all null if absent)."""
        pa = self.pa
        if arr is None:
            return pa.nulls(len(rows), pa.large_string())
        arr = arr.take(rows)
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        return self.pc.utf8_trim_whitespace(arr.cast(pa.large_string()))

    # ---------------------------------------------------------------- result

    def result(self, name: str) -> RawData:
        pa = self.pa
        for c in REQUIRED:
            self.out[c] = self.out[c][:self.pos]    # a view; pos == total unless a footer lied
        inter = pd.DataFrame({"user": self.out["user_id"], "item": self.out["item_id"],
                              "timestamp": self.out["timestamp"]}, copy=False)
        if self.item_ids:
            ids = np.concatenate(self.item_ids)
            order = pa.array(np.argsort(ids, kind="stable"))
            categories = pa.chunked_array(self.categories, pa.large_string()).take(order).to_pylist()
            titles = pa.chunked_array(self.titles, pa.large_string()).take(order).to_pylist()
            ids = ids[np.asarray(order)]
        else:
            ids, categories, titles = np.zeros(0, dtype=np.int64), [], []
        items = _items_frame(ids, [t or "" for t in titles], [[c] if c else [] for c in categories])
        return RawData(name, inter, items, self._users())

    def _users(self):
        """The ``users`` frame: every user id, ascending, with each user_* feature's first value ("" = unknown)."""
        if not self.user_ids:
            return _users_frame(self.users.sorted(), {})
        pa = self.pa
        ids = np.concatenate(self.user_ids)
        order = pa.array(np.argsort(ids, kind="stable"))
        columns = {}
        for c in self.user_columns:
            chunks = [v.get(c, pa.nulls(len(u), pa.large_string())) for u, v in zip(self.user_ids, self.user_values)]
            values = pa.chunked_array(chunks, pa.large_string()).take(order).to_pylist()
            columns[c[len(USER_PREFIX):]] = [v or "" for v in values]
        return _users_frame(ids[np.asarray(order)], columns)
