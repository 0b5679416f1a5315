"""mind.data: loaders on hand-written fixtures (good and malformed), the ComiRec split protocol
on a hand-made dataset, synthetic data, and (opt-in / cached) the real ml-100k download."""

import json
import os
import pathlib
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

from mind.data import (DataFormatError, RawData, fetch_movielens_100k, load_comirec_csv,
                       load_movielens_raw, load_recbole, load_split, make_synthetic, prepare,
                       save_split)
from mind.data import fetch as fetch_mod

DATA = pathlib.Path(__file__).parent / "data"


def _inter_rows(raw):
    return [tuple(int(v) for v in r) for r in raw.inter[["user", "item", "timestamp"]].to_numpy()]


# ----------------------------------------------------------------------------- loaders


def test_recbole_tiny():
    raw = load_recbole(DATA / "recbole" / "tiny")
    assert raw.name == "tiny"
    assert list(raw.inter.columns) == ["user", "item", "timestamp"]
    assert all(raw.inter[c].dtype == np.int32 for c in raw.inter.columns)   # small values: compact
    # "90.0" is a float timestamp holding an integer: accepted as 90; ratings dropped.
    assert _inter_rows(raw) == [(1, 10, 100), (1, 20, 90), (2, 10, 300)]
    assert raw.items.loc[10, "title"] == "Toy Story"
    assert raw.items.loc[10, "genres"] == ["Animation", "Children's", "Comedy"]
    assert raw.items.loc[20, "genres"] == []
    assert list(raw.users.columns) == ["age", "gender", "occupation"]  # zip_code dropped
    assert raw.users.loc[1].tolist() == ["18-24", "M", "technician"]
    assert raw.users.loc[2].tolist() == ["<18", "F", "student"]


def test_movielens_100k_raw():
    raw = load_movielens_raw(DATA / "ml100k")
    assert raw.name == "ml-100k"
    assert _inter_rows(raw) == [(196, 242, 881250949), (186, 302, 891717742), (196, 302, 881250950)]
    assert raw.items.loc[242, "genres"] == ["Comedy"]
    assert raw.items.loc[302, "genres"] == ["Crime", "Mystery", "Thriller"]
    assert raw.items.loc[303, "genres"] == ["unknown"]
    assert raw.items.loc[303, "title"] == "Caf\u00e9 au lait (1994)"  # latin-1 decoded
    assert raw.users.loc[196].tolist() == ["45-49", "M", "writer"]
    assert raw.users.loc[186].tolist() == ["35-44", "F", "executive"]


def test_movielens_1m_raw():
    raw = load_movielens_raw(DATA / "ml1m")
    assert raw.name == "ml-1m"
    assert _inter_rows(raw) == [(1, 1193, 978300760), (1, 1, 978302109), (2, 1193, 978298413)]
    assert raw.items.loc[1, "genres"] == ["Animation", "Children's", "Comedy"]
    assert raw.items.loc[1193, "title"] == "One Flew Over the Cuckoo's Nest (1975)"
    assert raw.users.loc[1].tolist() == ["<18", "F", "K-12 student"]
    assert raw.users.loc[2].tolist() == ["56+", "M", "self-employed"]


@pytest.mark.parametrize("fname", ["tiny.csv", "header.csv"])
def test_comirec_csv(fname):
    raw = load_comirec_csv(DATA / "comirec" / fname)
    if fname == "tiny.csv":
        assert _inter_rows(raw) == [(1, 10, 1000), (1, 11, 1001), (2, 10, 999)]
    else:
        assert _inter_rows(raw) == [(1, 10, 1000), (2, 11, 1001)]
    assert raw.items.loc[10, "genres"] == ["3"]
    assert raw.items.loc[11, "genres"] == ["4"]
    assert raw.users.shape == (2, 0)


@pytest.mark.parametrize("load, path, line, words", [
    (load_recbole, "recbole/bad_fields", 3, "expected 3 fields"),
    (load_recbole, "recbole/bad_id", 4, "user_id is not an integer: 'x12'"),
    (load_recbole, "recbole/bad_time", 2, "timestamp is not an integer"),
    (load_recbole, "recbole/bad_header", 1, "bad header column"),
    (load_recbole, "recbole/dup_item", 4, "duplicate item id 10 (first on line 2)"),
    (load_movielens_raw, "ml100k_bad", 2, "timestamp is not an integer: '88125x'"),
    (load_movielens_raw, "ml100k_bad_item", 2, "expected 24 fields"),
    (load_movielens_raw, "ml1m_bad", 3, "expected 4 fields separated by '::'"),
    (load_comirec_csv, "comirec/bad.csv", 2, "item id is not an integer: 'abc'"),
    (load_comirec_csv, "comirec/short.csv", 3, "expected 4 fields"),
])
def test_malformed_files_name_file_and_line(load, path, line, words):
    with pytest.raises(DataFormatError) as e:
        load(DATA / path)
    assert e.value.line == line
    assert f":{line}: " in str(e.value)
    assert words in str(e.value)
    # The message names the offending file (inside the fixture folder).
    assert str(DATA / path) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.inter"):
        load_recbole(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="u.data"):
        load_movielens_raw(tmp_path)
    with pytest.raises(FileNotFoundError, match="gone.csv"):
        load_comirec_csv(tmp_path / "gone.csv")


# ----------------------------------------------------------------------------- prepare

# Hand-made dataset. Raw items 101..106 are common; 160 has exactly 5 interactions (two of
# them from user 7); 199 has 4 (dropped by the item filter). User 7 has 5 raw interactions
# but only 4 on kept items (dropped); user 12 has 4 (dropped). After the user filter 160 has
# 3 interactions but stays (one pass each). Kept: items 101..106 -> 1..6, 160 -> 7;
# users 1, 2, 3, 4, 5, 6, 8, 9, 10, 11.
FILLERS = (4, 5, 6, 8, 9, 10, 11)


def _hand_raw():
    rows = [(1, 101, 1), (1, 102, 2), (1, 103, 3), (1, 104, 4), (1, 105, 5), (1, 106, 6),
            (1, 101, 7), (1, 102, 8), (1, 199, 9),
            # user 2, scrambled input order; 103 and 105 tie at t=100 -> 103 first.
            (2, 105, 100), (2, 101, 50), (2, 103, 100), (2, 104, 200), (2, 160, 300),
            (2, 106, 10), (2, 199, 400),
            (3, 101, 1), (3, 102, 2), (3, 103, 3), (3, 104, 4), (3, 160, 5), (3, 199, 6),
            (7, 160, 1), (7, 160, 2), (7, 199, 3), (7, 101, 4), (7, 102, 5),
            (12, 101, 1), (12, 102, 2), (12, 103, 3), (12, 104, 4)]
    for u in FILLERS:
        rows += [(u, 100 + i, i) for i in range(1, 7)]
    rows.append((5, 160, 7))
    inter = pd.DataFrame(rows, columns=["user", "item", "timestamp"]).astype(np.int64)
    items = pd.DataFrame({"title": ["A", "B"], "genres": [["Drama", "Comedy"], ["Comedy"]]},
                         index=pd.Index([101, 102], name="item"))
    items.loc[160] = ["", []]
    users = pd.DataFrame({"gender": ["M", "F", ""]}, index=pd.Index([1, 2, 3], name="user"))
    return RawData("hand", inter, items, users)


def _rows(t):
    return t.tolist()


def test_filter_and_indexing():
    d = prepare(_hand_raw(), max_len=3)
    assert d.num_items == 7
    assert d.item_raw_ids.tolist() == [-1, 101, 102, 103, 104, 105, 106, 160]
    assert d.user_raw_ids.tolist() == [1, 2, 3, 4, 5, 6, 8, 9, 10, 11]
    everyone = sorted(d.split["train"] + d.split["valid"] + d.split["test"])
    assert everyone == [1, 2, 3, 4, 5, 6, 8, 9, 10, 11]
    assert d.item_titles[:3] == ["<pad>", "A", "B"] and d.item_titles[7] == ""
    assert d.genre_names == ["<pad>", "Comedy", "Drama"]
    assert _rows(d.item_genres[:3]) == [[0, 0], [2, 1], [1, 0]]
    assert _rows(d.item_genres[3:]) == [[0, 0]] * 5
    # gender vocabulary {F: 1, M: 2}; user 3's "" and users without a row are unknown (0).
    assert d.user_feature_names == ["gender"] and d.user_feature_cardinalities == [3]
    assert d.user_features[:, 0].tolist() == [2, 1, 0, 0, 0, 0, 0, 0, 0, 0]


def test_split_sizes_disjoint_and_seeded():
    raw = _hand_raw()
    a, b = prepare(raw, seed=2020), prepare(raw, seed=2020)
    assert a.split == b.split
    assert [len(a.split[k]) for k in ("train", "valid", "test")] == [8, 1, 1]
    parts = [set(a.split[k]) for k in ("train", "valid", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    perm = np.random.default_rng(2020).permutation(np.array([1, 2, 3, 4, 5, 6, 8, 9, 10, 11]))
    assert a.split["train"] == sorted(perm[:8].tolist())
    assert a.split["valid"] == [int(perm[8])] and a.split["test"] == [int(perm[9])]
    assert a.valid.users.tolist() == a.split["valid"] and a.test.users.tolist() == a.split["test"]
    c = prepare(raw, seed=7)
    assert c.split != a.split
    # train examples only from train users
    train_rows = set(a.train_users.tolist())
    assert {int(a.user_raw_ids[r]) for r in train_rows} == set(a.split["train"])


def test_training_examples_right_aligned_and_truncated():
    raw = _hand_raw()
    d = prepare(raw, max_len=3, split_ratio=(1.0, 0.0, 0.0))
    # user 1's kept sequence is 1 2 3 4 5 6 1 2 (199 dropped); targets from t = 4.
    assert _rows(d.train_histories[:4]) == [[2, 3, 4], [3, 4, 5], [4, 5, 6], [5, 6, 1]]
    assert d.train_targets[:4].tolist() == [5, 6, 1, 2]
    assert d.train_lengths[:4].tolist() == [3, 3, 3, 3]
    assert d.train_users[:4].tolist() == [0, 0, 0, 0]
    # user 2: 106@10 101@50 103@100 105@100 104@200 160@300 -> 6 1 3 5 4 7.
    assert _rows(d.train_histories[4:6]) == [[1, 3, 5], [3, 5, 4]]
    assert d.train_targets[4:6].tolist() == [4, 7]
    # 4 (user 1) + 2 (user 2) + 1 (user 3) + 2 per filler, 3 for user 5 (7 items)
    assert len(d.train_targets) == 4 + 2 + 1 + 2 * 7 + 1
    assert d.train_histories.shape == (22, 3)

    d6 = prepare(raw, max_len=6, split_ratio=(1.0, 0.0, 0.0))
    assert _rows(d6.train_histories[:4]) == [[0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5],
                                             [1, 2, 3, 4, 5, 6], [2, 3, 4, 5, 6, 1]]
    assert d6.train_lengths[:6].tolist() == [4, 5, 6, 6, 4, 5]
    assert _rows(d6.train_histories[4:6]) == [[0, 0, 6, 1, 3, 5], [0, 6, 1, 3, 5, 4]]
    # user 3 (1 2 3 4 7): one example
    assert d6.train_targets[6].item() == 7 and d6.train_users[6].item() == 2
    # item counts over train users: item 1 = 2 (user 1) + 1 + 1 + 7 fillers
    assert d6.item_counts[1] == 11 and d6.item_counts[7] == 3 and d6.item_counts[0] == 0


def test_eval_history_target_split():
    d = prepare(_hand_raw(), max_len=3, split_ratio=(0.0, 0.0, 1.0))
    assert len(d.train_targets) == 0 and len(d.valid) == 0
    t = d.test
    assert t.users[:3].tolist() == [1, 2, 3]
    # user 1: L = 8 -> floor(6.4) = 6 history items, 2 targets
    assert t.full_histories[0].tolist() == [1, 2, 3, 4, 5, 6] and t.targets[0].tolist() == [1, 2]
    # user 2: L = 6 -> 4 + 2; user 3: L = 5 -> 4 + 1
    assert t.full_histories[1].tolist() == [6, 1, 3, 5] and t.targets[1].tolist() == [4, 7]
    assert t.full_histories[2].tolist() == [1, 2, 3, 4] and t.targets[2].tolist() == [7]
    assert _rows(t.histories[:3]) == [[4, 5, 6], [1, 3, 5], [2, 3, 4]]
    assert t.lengths[:3].tolist() == [3, 3, 3]
    assert t.user_index[:3].tolist() == [0, 1, 2]
    d6 = prepare(_hand_raw(), max_len=6, split_ratio=(0.0, 0.0, 1.0))
    assert _rows(d6.test.histories[1:3]) == [[0, 0, 6, 1, 3, 5], [0, 0, 1, 2, 3, 4]]
    assert d6.test.lengths[:3].tolist() == [6, 4, 4]


def test_eval_user_without_target_is_left_out():
    inter = pd.DataFrame({"user": [1, 2, 2], "item": [5, 5, 6], "timestamp": [1, 2, 3]})
    raw = RawData("t", inter, pd.DataFrame(columns=["title", "genres"]), pd.DataFrame())
    d = prepare(raw, min_item_count=1, min_user_count=1, min_target_pos=1, split_ratio=(0, 0, 1))
    # user 1 (one item): history = that item, no target -> not evaluated; user 2: 5 | 6
    assert d.split["test"] == [1, 2]
    assert d.test.users.tolist() == [2] and d.test.targets[0].tolist() == [2]


def test_save_and_load_split(tmp_path):
    d = prepare(_hand_raw())
    save_split(d, tmp_path / "split.json")
    assert json.loads((tmp_path / "split.json").read_text()) == d.split
    assert load_split(tmp_path / "split.json") == d.split


def test_prepare_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_len"):
        prepare(_hand_raw(), max_len=0)
    with pytest.raises(ValueError, match="no interactions left"):
        prepare(_hand_raw(), min_item_count=1000)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_planted_interests():
    raw, truth = make_synthetic(num_users=40, num_items=64, num_clusters=4,
                                interests_per_user=(1, 2), seq_len=(5, 9), seed=3)
    assert len(raw.items) == 64 and raw.inter.user.nunique() == 40
    # 64 items in 4 clusters of 16, genre = "c<cluster>"
    sizes = np.bincount(list(truth["item_cluster"].values()), minlength=4)
    assert sizes.tolist() == [16, 16, 16, 16]
    for item, k in truth["item_cluster"].items():
        assert raw.items.loc[item, "genres"] == [f"c{k}"]
    for u, g in raw.inter.groupby("user"):
        ks = truth["user_clusters"][u]
        assert 1 <= len(ks) <= 2 and 5 <= len(g) <= 9
        assert {truth["item_cluster"][i] for i in g.item} <= set(ks)
        assert (np.diff(g.timestamp.to_numpy()) > 0).all()
    again, truth2 = make_synthetic(num_users=40, num_items=64, num_clusters=4,
                                   interests_per_user=(1, 2), seq_len=(5, 9), seed=3)
    assert again.inter.equals(raw.inter) and truth2 == truth
    other, _ = make_synthetic(num_users=40, num_items=64, num_clusters=4,
                              interests_per_user=(1, 2), seq_len=(5, 9), seed=4)
    assert not other.inter.equals(raw.inter)


# ----------------------------------------------------------------------------- fetch


def test_fetch_reports_pip_failure(tmp_path, monkeypatch):
    def failing_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="no network")
    monkeypatch.setattr(fetch_mod.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match=r"recbole==1\.2\.1.*\n?.*no network"):
        fetch_movielens_100k(tmp_path)


_CACHE = pathlib.Path("~/.cache/mind-kernels").expanduser()
_CACHED = all((_CACHE / "ml-100k" / f"ml-100k.{x}").is_file() for x in ("inter", "item", "user"))


@pytest.mark.skipif(os.environ.get("MIND_KERNELS_NETWORK_TESTS") != "1" and not _CACHED,
                    reason="needs network (set MIND_KERNELS_NETWORK_TESTS=1) or ml-100k already "
                           "in ~/.cache/mind-kernels")
def test_fetch_movielens_100k_real():
    folder = fetch_movielens_100k()
    stamp = (folder / "ml-100k.inter").stat().st_mtime_ns
    assert fetch_movielens_100k() == folder  # idempotent: no re-extraction
    assert (folder / "ml-100k.inter").stat().st_mtime_ns == stamp
    raw = load_recbole(folder)
    assert len(raw.inter) == 100000
    assert raw.inter.user.nunique() == 943 and len(raw.users) == 943
    assert raw.inter.item.nunique() == 1682 and len(raw.items) == 1682
    d = prepare(raw, max_len=20)
    assert sum(len(v) for v in d.split.values()) == len(d.user_raw_ids)
    assert d.train_histories.shape == (len(d.train_targets), 20)
    assert int(d.train_targets.max()) <= d.num_items and int(d.train_targets.min()) >= 1
    assert torch.equal(d.train_lengths, torch.count_nonzero(d.train_histories, dim=1))


# ----------------------------------------------------------------------------- bad rows, every file of every loader


@pytest.mark.parametrize("load, folder, fname, lineno, bad, words", [
    (load_recbole, "recbole/tiny", "tiny.item", 3, "20\tonly two", "expected 4 fields"),
    (load_recbole, "recbole/tiny", "tiny.user", 2, "abc\t24\tM\ttechnician\t85711", "user_id is not an integer"),
    (load_recbole, "recbole/tiny", "tiny.user", 3, "1\t17\tF\tstudent\t94043", "duplicate user id 1"),
    (load_movielens_raw, "ml100k", "u.data", 3, "196\t302\t1", "expected 4 fields"),
    (load_movielens_raw, "ml100k", "u.item", 1, "242|Kolya (1996)|24-Jan-1997||url" + "|2" * 19,
     "genre flags must be 0 or 1"),
    (load_movielens_raw, "ml100k", "u.user", 2, "186|old|F|executive|00000", "age is not an integer: 'old'"),
    (load_movielens_raw, "ml1m", "movies.dat", 2, "1193::no genres", "expected 3 fields"),
    (load_movielens_raw, "ml1m", "users.dat", 1, "1::F::7::10::48067", "unknown age code 7"),
    (load_movielens_raw, "ml1m", "users.dat", 2, "2::M::56::25::70072", "unknown occupation code 25"),
    (load_comirec_csv, "comirec/tiny.csv", None, 2, "1,11,4,soon", "timestamp is not an integer: 'soon'"),
])
def test_bad_row_in_any_file_names_file_and_line(tmp_path, load, folder, fname, lineno, bad, words):
    """Each loader reads each of its files line by line: a bad row anywhere is a DataFormatError
    naming that file and line, never a silently skipped or mis-parsed row."""
    import shutil

    src = DATA / folder
    if src.is_file():                                     # comirec: a single csv
        target = tmp_path / src.name
        shutil.copy(src, target)
        arg = target
    else:
        arg = tmp_path / src.name
        shutil.copytree(src, arg)
        target = arg / fname
    enc = "utf-8" if load is not load_movielens_raw else "latin-1"
    lines = target.read_text(encoding=enc).splitlines()
    lines[lineno - 1] = bad
    target.write_text("\n".join(lines) + "\n", encoding=enc)
    with pytest.raises(DataFormatError) as e:
        load(arg)
    assert e.value.path == str(target) and e.value.line == lineno, str(e.value)
    assert str(e.value).startswith(f"{target}:{lineno}: ") and words in str(e.value), str(e.value)


def test_cli_reports_bad_data_file_and_exits_2(tmp_path, capsys):
    from mind.cli import main

    bad = DATA / "comirec" / "bad.csv"
    assert main(["train", "--data-dir", str(bad), "--format", "comirec", "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:2: ") and "item id is not an integer" in err, err
    assert not (tmp_path / "r" / "last.pt").exists()
