"""mind.data.parquet: load_parquet against ComiRec's csv (same RawData, same prepared split), row
groups / batches / folders, integral floats, the first-row category and title, every malformed input
(DataFormatError naming the file and the column, or DataNotFoundError), and the memory bound."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from mind.data import load_comirec_csv, prepare  # noqa: E402
from mind.data.loaders import DataFormatError, DataNotFoundError  # noqa: E402
from mind.data.parquet import load_parquet  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _log(seed=0, users=40, items=30, per_user=12):
    """An interaction log big enough for prepare's 5-core filter; an item's category varies between
    its rows (only the first row counts), and some first rows have none."""
    rng = np.random.default_rng(seed)
    n = users * per_user
    user = np.repeat(np.arange(1, users + 1) * 7, per_user)
    item = 100 + rng.integers(0, items, n)
    ts = rng.integers(1_000_000, 1_000_500, n)   # ties on purpose: prepare breaks them by item id
    cat = np.where(rng.random(n) < 0.15, "", (item % 5).astype(str))
    cat = np.where(rng.random(n) < 0.2, "9", cat)   # later rows disagree with the first one
    return pd.DataFrame({"user_id": user, "item_id": item, "category": cat, "timestamp": ts})


def _write_csv(df, path):
    df[["user_id", "item_id", "category", "timestamp"]].to_csv(path, header=False, index=False)
    return path


def _write(df_or_table, path, **kw):
    table = df_or_table if isinstance(df_or_table, pa.Table) else pa.Table.from_pandas(df_or_table,
                                                                                        preserve_index=False)
    pq.write_table(table, path, **kw)
    return path


def _rows(raw):
    return raw.inter[["user", "item", "timestamp"]].to_numpy().tolist()


def _assert_same_raw(a, b):
    assert list(a.inter.columns) == ["user", "item", "timestamp"]
    assert all(a.inter[c].dtype in (np.int32, np.int64) for c in a.inter.columns)
    assert _rows(a) == _rows(b)
    assert a.items.index.tolist() == b.items.index.tolist() and a.items.index.name == "item"
    assert a.items["genres"].tolist() == b.items["genres"].tolist()
    assert a.items["title"].tolist() == b.items["title"].tolist()
    assert a.users.index.tolist() == b.users.index.tolist() and a.users.index.name == "user"
    assert a.users.shape[1] == b.users.shape[1] == 0


# ----------------------------------------------------------------------------- equivalence


def test_same_rawdata_and_split_as_comirec_csv(tmp_path):
    df = _log()
    csv = load_comirec_csv(_write_csv(df, tmp_path / "shop.csv"))
    raw = load_parquet(_write(df, tmp_path / "shop.parquet"))
    assert raw.name == "shop"
    _assert_same_raw(raw, csv)
    assert any(g == [] for g in raw.items["genres"])           # an empty first category: no genre
    first = df.drop_duplicates("item_id").set_index("item_id")["category"]
    assert raw.items["genres"].tolist() == [[c] if c else [] for c in first.sort_index()]

    a, b = prepare(raw, max_len=8), prepare(csv, max_len=8)
    assert a.split == b.split and a.num_items == b.num_items
    for field in ("train_users", "train_histories", "train_lengths", "train_targets", "item_genres"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.genre_names == b.genre_names
    for part in ("valid", "test"):
        x, y = getattr(a, part), getattr(b, part)
        assert x.users.tolist() == y.users.tolist()
        assert [t.tolist() for t in x.targets] == [t.tolist() for t in y.targets]


def test_row_groups_batches_and_folders_give_the_same_data(tmp_path):
    df = _log(seed=1)
    one = load_parquet(_write(df, tmp_path / "one.parquet"))
    many = load_parquet(_write(df, tmp_path / "many.parquet", row_group_size=7), batch_rows=5)
    assert pq.ParquetFile(tmp_path / "many.parquet").num_row_groups > 10
    _assert_same_raw(many, one)

    folder = tmp_path / "log"
    folder.mkdir()
    cut = len(df) // 3
    _write(df.iloc[cut:], folder / "part-1.parquet", row_group_size=50)   # written first, read second
    _write(df.iloc[:cut], folder / "part-0.parquet")
    (folder / "_SUCCESS").write_text("")                                   # Spark's marker: skipped
    (folder / "notes.txt").write_text("not data")
    raw = load_parquet(folder, batch_rows=64)
    assert raw.name == "log"
    _assert_same_raw(raw, one)
    assert load_parquet(folder, name="shop").name == "shop"


def test_first_row_category_and_title(tmp_path):
    table = pa.table({"user_id": [1, 1, 2, 2, 3], "item_id": [10, 11, 10, 12, 12],
                      "timestamp": [5, 6, 7, 8, 9], "category": [3, None, 4, 5, 6],
                      "title": [" Red mug ", "Lamp", "other", None, "late"],
                      "price": [1.5, 2.5, 3.5, 4.5, 5.5]})   # ignored (a fractional float)
    raw = load_parquet(_write(table, tmp_path / "t.parquet", row_group_size=2), batch_rows=1)
    assert raw.items["genres"].tolist() == [["3"], [], ["5"]]         # int categories become text
    assert raw.items["title"].tolist() == ["Red mug", "Lamp", ""]
    assert raw.users.index.tolist() == [1, 2, 3]


def test_integral_floats_timestamps_and_narrow_ints_are_accepted(tmp_path):
    table = pa.table({"user_id": pa.array([1, 2], pa.uint16()), "item_id": pa.array([10.0, 11.0]),
                      "timestamp": pa.array([1_000, 2_000], pa.timestamp("ms", tz="UTC")),
                      "category": pa.array(["a", "b"]).dictionary_encode()})
    raw = load_parquet(_write(table, tmp_path / "f.parquet"))
    assert _rows(raw) == [[1, 10, 1_000], [2, 11, 2_000]]       # timestamp: its own unit since the epoch
    assert raw.items["genres"].tolist() == [["a"], ["b"]]


@pytest.mark.parametrize("base", [0, -5, 1 << 40])
def test_first_seen_matches_pandas_on_dense_and_sparse_ids(tmp_path, base):
    # base 0: ids stay dense (a bitmap); -5 and 2**40: sparse (sorted runs); the large ids arrive
    # after dense ones, so the bitmap is converted mid-file.
    rng = np.random.default_rng(3)
    n = 3000
    item = rng.integers(0, 400, n)
    item[n // 2:] += base
    df = pd.DataFrame({"user_id": rng.integers(0, 300, n) + base, "item_id": item,
                       "timestamp": rng.integers(0, 10, n), "category": rng.integers(0, 50, n).astype(str)})
    raw = load_parquet(_write(df, tmp_path / "r.parquet", row_group_size=333), batch_rows=97)
    first = df.drop_duplicates("item_id").set_index("item_id").sort_index()
    assert raw.items.index.tolist() == first.index.tolist()
    assert raw.items["genres"].tolist() == [[c] for c in first["category"]]
    assert raw.users.index.tolist() == sorted(set(df["user_id"]))
    assert _rows(raw) == df[["user_id", "item_id", "timestamp"]].to_numpy().tolist()


def test_empty_file_gives_empty_data(tmp_path):
    table = pa.table({"user_id": pa.array([], pa.int64()), "item_id": pa.array([], pa.int64()),
                      "timestamp": pa.array([], pa.int64())})
    raw = load_parquet(_write(table, tmp_path / "e.parquet"))
    assert len(raw.inter) == len(raw.items) == len(raw.users) == 0


# ----------------------------------------------------------------------------- errors


def _table(**over):
    cols = {"user_id": [1, 2, 3], "item_id": [10, 11, 12], "timestamp": [5, 6, 7]}
    cols.update(over)
    return pa.table({k: v for k, v in cols.items() if v is not None})


@pytest.mark.parametrize("table, words", [
    (_table(user_id=None), "no column 'user_id' (columns: item_id, timestamp)"),
    (_table(timestamp=["5", "6", "7"]), "column 'timestamp' has type string, want integers"),
    (_table(item_id=["a", "b", "c"]), "column 'item_id' has type string, want integers"),
    (_table(user_id=[True, False, True]), "column 'user_id' has type bool, want integers"),
    (_table(item_id=[10, None, None]), "column 'item_id' has 2 null values (the first at row index 1)"),
    (_table(user_id=[None, None, None]), "column 'user_id' has 3 null values"),
    (_table(timestamp=[5.0, 6.5, 7.0]), "column 'timestamp' holds 6.5 at row index 1, not a whole number"),
    (_table(item_id=[10.0, 11.0, float("inf")]), "column 'item_id' holds inf at row index 2"),
    (_table(user_id=pa.array([1, 2, 2 ** 64 - 1], pa.uint64())), "column 'user_id' holds 18446744073709551615"),
    (_table(category=[1.5, 2.5, 3.5]), "column 'category' has type double, want strings or integers"),
    (_table(title=[1, 2, 3]), "column 'title' has type int64, want strings"),
])
def test_malformed_columns_name_file_and_column(tmp_path, table, words):
    path = _write(table, tmp_path / "bad.parquet", row_group_size=2)
    with pytest.raises(DataFormatError) as e:
        load_parquet(path, batch_rows=2)
    assert str(e.value).startswith(f"{path}: "), str(e.value)
    assert words in str(e.value), str(e.value)
    assert e.value.path == str(path) and e.value.line is None


def test_bad_file_in_a_folder_is_named_before_anything_is_read(tmp_path):
    _write(_table(), tmp_path / "a.parquet")
    _write(_table(item_id=["x", "y", "z"]), tmp_path / "b.parquet")
    with pytest.raises(DataFormatError, match="b.parquet: column 'item_id' has type string"):
        load_parquet(tmp_path)


def test_not_parquet_and_truncated_files_are_refused(tmp_path):
    text = tmp_path / "log.parquet"
    text.write_text("user_id,item_id,timestamp\n1,10,5\n")
    good = _write(_table(), tmp_path / "good.parquet")
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[:-20])
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    for path in (text, cut, empty):
        with pytest.raises(DataFormatError) as e:
            load_parquet(path)
        assert str(e.value).startswith(f"{path}: not a Parquet file ("), str(e.value)
        assert "\n" not in str(e.value)


def test_corrupt_data_pages_are_refused(tmp_path):
    good = _write(_table(), tmp_path / "good.parquet", compression="none")
    data = bytearray(good.read_bytes())
    data[4:60] = b"\xff" * 56                 # the first column chunk's page header
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(bytes(data))
    with pytest.raises(DataFormatError) as e:
        load_parquet(bad)
    assert str(e.value).startswith(f"{bad}: cannot read Parquet data ("), str(e.value)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DataNotFoundError, match="gone.parquet"):
        load_parquet(tmp_path / "gone.parquet")
    (tmp_path / "_SUCCESS").write_text("")
    with pytest.raises(DataNotFoundError, match=r"no \.parquet file in .*; it holds _SUCCESS"):
        load_parquet(tmp_path)
    assert issubclass(DataNotFoundError, FileNotFoundError)


def test_data_format_error_without_a_line():
    assert str(DataFormatError("x.parquet", None, "bad")) == "x.parquet: bad"
    e = DataFormatError("x.csv", 3, "bad")
    assert str(e) == "x.csv:3: bad" and e.line == 3 and e.path == "x.csv" and e.problem == "bad"


# ----------------------------------------------------------------------------- memory


def test_reads_batches_of_the_needed_columns_only(tmp_path, monkeypatch):
    df = _log(seed=2).assign(notes="ignored", price=1.5)
    path = _write(df, tmp_path / "m.parquet", row_group_size=40)
    calls, opened = [], []
    real_init, real_iter = pq.ParquetFile.__init__, pq.ParquetFile.iter_batches

    def init(self, source, **kw):
        opened.append(kw)
        real_init(self, source, **kw)

    def iter_batches(self, batch_size=None, **kw):
        calls.append((batch_size, kw.get("columns")))
        return real_iter(self, batch_size=batch_size, **kw)

    def whole(*a, **k):
        raise AssertionError("load_parquet read a whole file at once")

    monkeypatch.setattr(pq.ParquetFile, "__init__", init)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", iter_batches)
    for name in ("read", "read_row_groups"):
        monkeypatch.setattr(pq.ParquetFile, name, whole)
    monkeypatch.setattr(pq, "read_table", whole)
    monkeypatch.setattr(pd, "read_parquet", whole)
    load_parquet(path, batch_rows=32)
    assert calls == [(32, ["user_id", "item_id", "timestamp", "category"])]
    assert opened and all(kw.get("pre_buffer") is False for kw in opened)  # else Arrow buffers every row group


def test_peak_memory_is_the_output_plus_one_batch(tmp_path):
    # Fresh interpreter: Arrow's pool peak and numpy's traced peak then belong to this load alone.
    n, group = 200_000, 10_000
    rng = np.random.default_rng(0)
    table = pa.table({"user_id": rng.integers(0, 300, n), "item_id": rng.integers(0, 500, n),
                      "timestamp": rng.integers(0, 1 << 40, n),
                      "category": pa.array(rng.integers(0, 20, n).astype(str)),
                      "payload": pa.array(np.full(n, "x" * 100))})   # 20 MB that must never be read
    path = _write(table, tmp_path / "big.parquet", row_group_size=group)
    code = textwrap.dedent(f"""
        import tracemalloc, pyarrow as pa
        from mind.data.parquet import load_parquet
        tracemalloc.start()
        raw = load_parquet({str(path)!r}, batch_rows=8192)
        assert len(raw.inter) == {n}
        assert [str(raw.inter[c].dtype) for c in raw.inter.columns] == ["int32", "int32", "int64"]
        print(tracemalloc.get_traced_memory()[1], pa.default_memory_pool().max_memory())
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    numpy_peak, arrow_peak = map(int, proc.stdout.split())
    output = 16 * n      # ids fit in int32, timestamps need int64
    # A second copy of the output, int64 ids, or pre_buffer=True (3.4 MB in Arrow) fails.
    assert numpy_peak < output * 3 // 2, (numpy_peak, output)
    assert arrow_peak < output // 3, (arrow_peak, output)


def test_user_feature_columns_become_the_users_frame(tmp_path):
    df = _log(seed=5)
    first = ~df["user_id"].duplicated()
    df["user_gender"] = np.where(df["user_id"] % 2, "  F ", "M")
    df.loc[~first & (df["user_id"] == 7), "user_gender"] = "X"      # a later row disagrees: ignored
    df["user_age"] = (df["user_id"] % 3 * 10 + 20).astype(np.int64)
    df.loc[first & (df["user_id"] == 14), "user_gender"] = None      # unknown for that user
    path = _write(df, tmp_path / "f.parquet", row_group_size=50)
    raw = load_parquet(path, batch_rows=17)
    assert list(raw.users.columns) == ["gender", "age"]
    assert raw.users.index.tolist() == sorted(df["user_id"].unique().tolist())
    want = df[first].set_index("user_id")
    assert raw.users.loc[7, "gender"] == "F" and raw.users.loc[14, "gender"] == ""
    assert raw.users["age"].tolist() == [str(want.loc[u, "user_age"]) for u in raw.users.index]
    data = prepare(raw, max_len=5)
    assert data.user_feature_names == ["gender", "age"]
    assert data.user_feature_cardinalities == [3, 4]      # {F, M} and {20, 30, 40}, + unknown
    # a folder whose second file lacks a feature column: users first seen there have it unknown
    other = df[df["user_id"] > 140].drop(columns=["user_age"])
    folder = tmp_path / "parts"
    folder.mkdir()
    _write(df[df["user_id"] <= 140], folder / "a.parquet")
    _write(other, folder / "b.parquet")
    users = load_parquet(folder).users
    late = sorted(other["user_id"].unique())
    assert late and all(users.loc[u, "age"] == "" for u in late)
    assert all(users.loc[u, "gender"] == want.loc[u, "user_gender"].strip() for u in late)


def test_a_user_feature_of_another_type_is_refused(tmp_path):
    path = _write(_log(seed=6).assign(user_score=0.5), tmp_path / "s.parquet")
    with pytest.raises(DataFormatError, match=r"s\.parquet: column 'user_score' \(a user feature\) has type double"):
        load_parquet(path)
