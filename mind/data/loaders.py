"""Loaders: every dataset format becomes one `RawData`.

`RawData` holds three frames:

* ``inter``: columns ``user``, ``item``, ``timestamp``, one row per interaction, each int32 where
  every value of the column fits in int32, else int64 (`compact_ints`: 4 bytes per id instead of 8
  keeps a shop's log small). Ratings are read and dropped: MIND treats every interaction as
  implicit feedback.
* ``items``: index = raw item id (int64, name ``item``); ``title`` (str, may be "") and
  ``genres`` (list[str], may be empty).
* ``users``: index = raw user id (int64, name ``user``); categorical profile features as str
  (may have no columns).

Files are parsed line by line (not with ``pandas.read_csv``) so that a malformed row raises
`DataFormatError` naming the file, the 1-based line number and the problem. Blank lines are
skipped. A missing required file raises `DataNotFoundError` (a FileNotFoundError) naming the
path and, where it can, what the folder holds instead. Ratings are dropped, but a rating that
is not a number (``three``) is refused like any other malformed field.
"""

from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd


class DataFormatError(ValueError):
    """A malformed data file; the message is ``"<file>:<line>: <problem>"`` (line is 1-based),
    or ``"<file>: <problem>"`` where ``line`` is None (a file without lines, such as Parquet)."""

    def __init__(self, path, line: int | None, problem: str):
        self.path = str(path)
        self.line = line
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if line is None else f"{self.path}:{line}: {problem}")


class DataNotFoundError(FileNotFoundError):
    """A required data file or folder does not exist; the message names the path."""


@dataclass
class RawData:
    """What every loader returns; see the module docstring for the columns."""

    name: str
    inter: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame

    def __repr__(self) -> str:
        return (f"RawData(name={self.name!r}, interactions={len(self.inter)}, "
                f"items={len(self.items)}, users={len(self.users)}, "
                f"user_features={list(self.users.columns)})")


# MovieLens-1M's age buckets; raw ages (ml-100k) are mapped onto the same buckets so that
# both datasets share one vocabulary.
AGE_BUCKETS = ((18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"),
               (56, "50-55"))
ML1M_AGE_CODES = {1: "<18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55",
                  56: "56+"}
ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer")
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western")


def age_bucket(age: int) -> str:
    """Age in years -> MovieLens-1M bucket: <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+."""
    for upper, name in AGE_BUCKETS:
        if age < upper:
            return name
    return "56+"


# ----------------------------------------------------------------------------- parsing


def _require(path) -> pathlib.Path:
    p = pathlib.Path(path)
    if not p.is_file():
        raise DataNotFoundError(f"data file not found: {p}")
    return p


def _rows(path: pathlib.Path, sep: str, encoding: str = "utf-8",
          nfields: int | None = None) -> Iterator[tuple[int, list[str]]]:
    """Yield (1-based line number, fields) for each non-blank line.

    With ``nfields`` set, a line with another number of fields raises DataFormatError.
    """
    with open(path, encoding=encoding, newline="") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split(sep)
            if nfields is not None and len(fields) != nfields:
                raise DataFormatError(path, lineno,
                                      f"expected {nfields} fields separated by {sep!r}, "
                                      f"found {len(fields)}")
            yield lineno, fields


def _int(path, lineno: int, what: str, text: str, allow_integral_float: bool = False) -> int:
    """Parse an integer field; RecBole's ``float`` timestamps may be written ``881250949.0``."""
    s = text.strip()
    try:
        return int(s)
    except ValueError:
        pass
    if allow_integral_float:
        try:
            v = float(s)
        except ValueError:
            v = math.nan
        if math.isfinite(v) and v == int(v):
            return int(v)
    raise DataFormatError(path, lineno, f"{what} is not an integer: {text!r}")


def _number(path, lineno: int, what: str, text: str) -> float:
    """Check a numeric field that is read and dropped (a rating): refuse ``three``, ``nan``, ``""``."""
    try:
        v = float(text.strip())
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise DataFormatError(path, lineno, f"{what} is not a number: {text!r}")
    return v


_INT32 = np.iinfo(np.int32)


def compact_ints(values) -> np.ndarray:
    """``values`` (integers) as int32 when every value fits, else as int64."""
    v = np.asarray(values)
    if v.dtype == np.int32:
        return v
    fits = not len(v) or (int(v.min()) >= _INT32.min and int(v.max()) <= _INT32.max)
    return v.astype(np.int32 if fits else np.int64, copy=False)


def inter_frame(user, item, timestamp) -> pd.DataFrame:
    """The ``inter`` frame of `RawData` from three integer arrays, each stored by `compact_ints`."""
    return pd.DataFrame({"user": compact_ints(user), "item": compact_ints(item),
                         "timestamp": compact_ints(timestamp)}, copy=False)


def _inter_frame(users: list[int], items: list[int], times: list[int]) -> pd.DataFrame:
    return inter_frame(np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64),
                       np.asarray(times, dtype=np.int64))


def _items_frame(ids: list[int], titles: list[str], genres: list[list[str]]) -> pd.DataFrame:
    df = pd.DataFrame({"title": pd.Series(titles, dtype=object),
                       "genres": pd.Series(genres, dtype=object)})
    df.index = pd.Index(np.asarray(ids, dtype=np.int64), name="item")
    return df


def _users_frame(ids: list[int], columns: dict[str, list[str]]) -> pd.DataFrame:
    df = pd.DataFrame({k: pd.Series(v, dtype=object) for k, v in columns.items()},
                      index=range(len(ids)))
    df.index = pd.Index(np.asarray(ids, dtype=np.int64), name="user")
    return df


class _Unique:
    """Remembers where each id was first seen, to report duplicates in item/user files."""

    def __init__(self, path, what: str):
        self.path, self.what, self.seen = path, what, {}

    def check(self, lineno: int, key: int) -> None:
        if key in self.seen:
            raise DataFormatError(self.path, lineno,
                                  f"duplicate {self.what} id {key} (first on line {self.seen[key]})")
        self.seen[key] = lineno


# ----------------------------------------------------------------------------- RecBole

_RECBOLE_TYPES = ("token", "float", "token_seq", "float_seq")
_TITLE_FIELDS = ("movie_title", "title", "item_title", "name")
_GENRE_FIELDS = ("class", "genre", "genres", "categories", "category")
_DROPPED_USER_FIELDS = ("zip_code",)


def _recbole_header(path: pathlib.Path, encoding: str = "utf-8") -> list[str]:
    """Field names of a RecBole atomic file; the header is ``name:type`` per column."""
    with open(path, encoding=encoding, newline="") as f:
        header = f.readline().rstrip("\r\n")
    if not header.strip():
        raise DataFormatError(path, 1, "empty header; expected tab-separated 'field:type' columns")
    names = []
    for col in header.split("\t"):
        name, colon, typ = col.partition(":")
        if not colon or not name or typ not in _RECBOLE_TYPES:
            raise DataFormatError(path, 1, f"bad header column {col!r}; expected 'field:type' "
                                           f"with type in {_RECBOLE_TYPES}")
        names.append(name)
    return names


def _recbole_body(path: pathlib.Path, ncols: int) -> Iterator[tuple[int, list[str]]]:
    for lineno, fields in _rows(path, "\t", nfields=ncols):
        if lineno > 1:
            yield lineno, fields


def _recbole_inter_checked(path: pathlib.Path, cols: list[str]) -> pd.DataFrame:
    """The .inter body read line by line, every field checked: DataFormatError names the first bad line."""
    iu, ii = cols.index("user_id"), cols.index("item_id")
    it = cols.index("timestamp") if "timestamp" in cols else None
    ir = cols.index("rating") if "rating" in cols else None
    users, items, times = [], [], []
    for lineno, f in _recbole_body(path, len(cols)):
        users.append(_int(path, lineno, "user_id", f[iu]))
        items.append(_int(path, lineno, "item_id", f[ii]))
        if ir is not None:
            _number(path, lineno, "rating", f[ir])
        times.append(lineno if it is None else
                     _int(path, lineno, "timestamp", f[it], allow_integral_float=True))
    return _inter_frame(users, items, times)


def _recbole_inter_fast(path: pathlib.Path, cols: list[str]) -> pd.DataFrame | None:
    """The .inter body through pyarrow's CSV reader (the columns MIND uses, typed), or None when the file is
    not clean enough to be sure it equals :func:`_recbole_inter_checked`'s result: an id that is not an
    integer, a timestamp that is not an integral number below 2^53, a rating that is not a finite number,
    a line with another number of fields, or no timestamp field (then line numbers are the time order).
    Then the checked reader runs and names the line.  Blank lines are skipped by both."""
    if "timestamp" not in cols or len(set(cols)) != len(cols):
        return None
    try:
        import pyarrow as pa
        from pyarrow import csv
    except ImportError:
        return None
    types = {"user_id": pa.int64(), "item_id": pa.int64(), "timestamp": pa.float64()}
    if "rating" in cols:
        types["rating"] = pa.float64()
    # Streamed block by block (each block's columns copied out, the block freed), so the peak is the
    # output columns plus one block, not the whole file parsed at once.
    parts: dict = {c: [] for c in ("user_id", "item_id", "timestamp")}
    try:
        reader = csv.open_csv(path, read_options=csv.ReadOptions(skip_rows=1, column_names=cols, block_size=1 << 24),
                              parse_options=csv.ParseOptions(delimiter="\t", quote_char=False, ignore_empty_lines=True),
                              convert_options=csv.ConvertOptions(column_types=types, include_columns=list(types)))
        for batch in reader:
            if any(batch.column(c).null_count for c in types):
                return None
            ts = batch.column("timestamp").to_numpy()
            if not (np.isfinite(ts).all() and (np.abs(ts) < 2.0 ** 53).all() and (ts == np.round(ts)).all()):
                return None
            if "rating" in types and not np.isfinite(batch.column("rating").to_numpy()).all():
                return None
            # each block compacted on its own (int32 where it fits), so the columns held are 4 bytes
            # per id; np.concatenate widens to int64 if any block needed it
            for c, v in (("user_id", batch.column("user_id").to_numpy()), ("item_id", batch.column("item_id").to_numpy()),
                         ("timestamp", ts.astype(np.int64))):
                v = compact_ints(v)
                parts[c].append(v if v.flags.owndata else v.copy())     # never a view of Arrow's block
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError, OSError):
        return None
    finally:
        pa.default_memory_pool().release_unused()
    cat = {}
    for c in ("user_id", "item_id", "timestamp"):       # one column at a time: its blocks freed as it lands
        cat[c] = np.concatenate(parts.pop(c)) if parts[c] else np.zeros(0, np.int64)
    return inter_frame(cat["user_id"], cat["item_id"], cat["timestamp"])


def load_recbole(folder, name: str | None = None) -> RawData:
    """Read RecBole atomic files ``<folder>/<name>.inter`` (required), ``.item``, ``.user``.

    ``name`` defaults to the folder's name. Files are tab-separated with a ``field:type``
    header (types token, float, token_seq, float_seq).

    * ``.inter``: needs ``user_id`` and ``item_id`` (integer tokens); ``timestamp`` may be
      a float holding an integer value; a ``rating`` must be a number and is dropped; other
      fields are ignored. Without a ``timestamp`` field the line order is the time order
      (timestamp = line number).
    * ``.item``: ``item_id``; the title is the first of movie_title/title/item_title/name
      that exists (kept verbatim); genres are the first of class/genre/genres/categories/
      category, a space-separated token_seq. Other fields (release_year) are ignored.
    * ``.user``: ``user_id``; every other field except zip_code is a categorical feature
      kept as str; ``age``, when it holds integers, becomes a MovieLens-1M age bucket.
    """
    folder = pathlib.Path(folder)
    name = name or folder.name
    inter_path = folder / f"{name}.inter"
    if not inter_path.is_file():
        if not folder.is_dir():
            raise DataNotFoundError(f"data file not found: {inter_path} (the folder {folder} does not exist)")
        found = sorted(p.name for p in folder.glob("*.inter"))
        hint = (f"; it holds {', '.join(found[:5])}: RecBole files are named after their folder, "
                f"so rename the folder to {pathlib.Path(found[0]).stem!r} or the files to {name!r}.*"
                if found else "; it holds no .inter file")
        raise DataNotFoundError(f"data file not found: {inter_path}{hint}")

    cols = _recbole_header(inter_path)
    for need in ("user_id", "item_id"):
        if need not in cols:
            raise DataFormatError(inter_path, 1, f"header has no {need!r} field")
    inter = _recbole_inter_fast(inter_path, cols)
    if inter is None:            # not a clean file: the line-by-line reader names the first bad line
        inter = _recbole_inter_checked(inter_path, cols)

    ids, titles, genres = [], [], []
    item_path = folder / f"{name}.item"
    if item_path.is_file():
        cols = _recbole_header(item_path)
        if "item_id" not in cols:
            raise DataFormatError(item_path, 1, "header has no 'item_id' field")
        iid = cols.index("item_id")
        ititle = next((cols.index(c) for c in _TITLE_FIELDS if c in cols), None)
        igenre = next((cols.index(c) for c in _GENRE_FIELDS if c in cols), None)
        uniq = _Unique(item_path, "item")
        for lineno, f in _recbole_body(item_path, len(cols)):
            key = _int(item_path, lineno, "item_id", f[iid])
            uniq.check(lineno, key)
            ids.append(key)
            titles.append("" if ititle is None else f[ititle].strip())
            genres.append([] if igenre is None else f[igenre].split())
    items_df = _items_frame(ids, titles, genres)

    uids, feats = [], {}
    user_path = folder / f"{name}.user"
    if user_path.is_file():
        cols = _recbole_header(user_path)
        if "user_id" not in cols:
            raise DataFormatError(user_path, 1, "header has no 'user_id' field")
        iuid = cols.index("user_id")
        keep = [(i, c) for i, c in enumerate(cols)
                if c != "user_id" and c not in _DROPPED_USER_FIELDS]
        feats = {c: [] for _, c in keep}
        uniq = _Unique(user_path, "user")
        for lineno, f in _recbole_body(user_path, len(cols)):
            key = _int(user_path, lineno, "user_id", f[iuid])
            uniq.check(lineno, key)
            uids.append(key)
            for i, c in keep:
                feats[c].append(f[i].strip())
        if "age" in feats and all(v.strip().isdigit() or not v for v in feats["age"]):
            feats["age"] = [age_bucket(int(v)) if v else "" for v in feats["age"]]
    users_df = _users_frame(uids, feats)
    return RawData(name, inter, items_df, users_df)


# ----------------------------------------------------------------------------- MovieLens raw


def load_movielens_raw(folder) -> RawData:
    """Read GroupLens' original files, detecting the release from the file names.

    * ml-100k (``u.data`` present): ``u.data`` is ``user \\t item \\t rating \\t timestamp``;
      ``u.item`` is '|'-separated latin-1 with 24 fields (id, title, release date, video
      release date, IMDb URL, 19 genre flags in the order of ``u.genre``: unknown, Action,
      ... Western); ``u.user`` is ``id|age|gender|occupation|zip``. Age (years) becomes a
      MovieLens-1M bucket; zip is dropped. Titles keep their "(year)" suffix.
    * ml-1m (``ratings.dat`` present): '::'-separated latin-1 files: ratings
      ``user::item::rating::timestamp``; movies ``id::title::Genre1|Genre2``; users
      ``id::gender::age_code::occupation_code::zip``. Age codes become bucket names,
      occupation codes the names from the ml-1m README; zip is dropped.

    ``u.item``/``u.user``/``movies.dat``/``users.dat`` are optional (empty frames when absent).
    """
    folder = pathlib.Path(folder)
    if (folder / "u.data").is_file():
        return _load_ml100k(folder)
    if (folder / "ratings.dat").is_file():
        return _load_ml1m(folder)
    raise DataNotFoundError(f"no MovieLens files in {folder}: expected {folder / 'u.data'} "
                            f"(ml-100k) or {folder / 'ratings.dat'} (ml-1m)")


def _read_ratings(path: pathlib.Path, sep: str) -> pd.DataFrame:
    users, items, times = [], [], []
    for lineno, f in _rows(path, sep, encoding="latin-1", nfields=4):
        users.append(_int(path, lineno, "user id", f[0]))
        items.append(_int(path, lineno, "item id", f[1]))
        _number(path, lineno, "rating", f[2])
        times.append(_int(path, lineno, "timestamp", f[3]))
    return _inter_frame(users, items, times)


def _load_ml100k(folder: pathlib.Path) -> RawData:
    inter = _read_ratings(folder / "u.data", "\t")

    ids, titles, genres = [], [], []
    path = folder / "u.item"
    if path.is_file():
        uniq = _Unique(path, "item")
        for lineno, f in _rows(path, "|", encoding="latin-1", nfields=5 + len(ML100K_GENRES)):
            key = _int(path, lineno, "item id", f[0])
            uniq.check(lineno, key)
            flags = f[5:]
            if any(x not in ("0", "1") for x in flags):
                raise DataFormatError(path, lineno, f"genre flags must be 0 or 1, got {flags}")
            ids.append(key)
            titles.append(f[1].strip())
            genres.append([g for g, x in zip(ML100K_GENRES, flags) if x == "1"])
    items = _items_frame(ids, titles, genres)

    uids, feats = [], {"age": [], "gender": [], "occupation": []}
    path = folder / "u.user"
    if path.is_file():
        uniq = _Unique(path, "user")
        for lineno, f in _rows(path, "|", encoding="latin-1", nfields=5):
            key = _int(path, lineno, "user id", f[0])
            uniq.check(lineno, key)
            uids.append(key)
            feats["age"].append(age_bucket(_int(path, lineno, "age", f[1])))
            feats["gender"].append(f[2].strip())
            feats["occupation"].append(f[3].strip())
    return RawData("ml-100k", inter, items, _users_frame(uids, feats))


def _load_ml1m(folder: pathlib.Path) -> RawData:
    inter = _read_ratings(folder / "ratings.dat", "::")

    ids, titles, genres = [], [], []
    path = folder / "movies.dat"
    if path.is_file():
        uniq = _Unique(path, "item")
        for lineno, f in _rows(path, "::", encoding="latin-1", nfields=3):
            key = _int(path, lineno, "movie id", f[0])
            uniq.check(lineno, key)
            ids.append(key)
            titles.append(f[1].strip())
            genres.append([g for g in f[2].strip().split("|") if g])
    items = _items_frame(ids, titles, genres)

    uids, feats = [], {"age": [], "gender": [], "occupation": []}
    path = folder / "users.dat"
    if path.is_file():
        uniq = _Unique(path, "user")
        for lineno, f in _rows(path, "::", encoding="latin-1", nfields=5):
            key = _int(path, lineno, "user id", f[0])
            uniq.check(lineno, key)
            age = _int(path, lineno, "age code", f[2])
            occ = _int(path, lineno, "occupation code", f[3])
            if age not in ML1M_AGE_CODES:
                raise DataFormatError(path, lineno, f"unknown age code {age} "
                                                    f"(expected one of {sorted(ML1M_AGE_CODES)})")
            if not 0 <= occ < len(ML1M_OCCUPATIONS):
                raise DataFormatError(path, lineno, f"unknown occupation code {occ} (expected 0..20)")
            uids.append(key)
            feats["age"].append(ML1M_AGE_CODES[age])
            feats["gender"].append(f[1].strip())
            feats["occupation"].append(ML1M_OCCUPATIONS[occ])
    return RawData("ml-1m", inter, items, _users_frame(uids, feats))


# ----------------------------------------------------------------------------- ComiRec csv


def load_comirec_csv(path, name: str | None = None) -> RawData:
    """Read ComiRec's ``user,item,category,timestamp`` csv (no header; one header line accepted).

    Line 1 is taken as a header when its user field is not an integer. Each item's genres
    are ``[category]`` from its first line (ComiRec gives one category per item). Users
    have no profile features. ``name`` defaults to the file name without extension.
    """
    path = _require(path)
    users, items, times = [], [], []
    category: dict[int, str] = {}
    for lineno, f in _rows(path, ",", nfields=4):
        if lineno == 1 and not _is_int(f[0]):
            continue  # header line
        users.append(_int(path, lineno, "user id", f[0]))
        item = _int(path, lineno, "item id", f[1])
        items.append(item)
        times.append(_int(path, lineno, "timestamp", f[3]))
        category.setdefault(item, f[2].strip())
    ids = sorted(category)
    items_df = _items_frame(ids, [""] * len(ids), [[category[i]] if category[i] else [] for i in ids])
    uids = sorted(set(users))
    return RawData(name or path.stem, _inter_frame(users, items, times), items_df,
                   _users_frame(uids, {}))


def _is_int(s: str) -> bool:
    try:
        int(s.strip())
        return True
    except ValueError:
        return False

