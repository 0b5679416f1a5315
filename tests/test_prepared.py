"""The CSR data path: ``prepare`` equals the dense per-user protocol it replaced (same users, same
split, same windows and targets), and a prepared folder on disk round-trips, memory-mapped, and is
refused with a named file when it is damaged or of another version."""

import json

import numpy as np
import pytest
import torch

from mind.data import (DataFormatError, load_prepared, make_planted, make_synthetic, prepare, write_prepared)
from mind.data.loaders import DataNotFoundError
from prepare_reference import reference_prepare


def _datasets():
    syn, _ = make_synthetic(num_users=120, num_items=150, seq_len=(3, 40), seed=3)
    planted, _ = make_planted(num_users=200, num_items=256, num_clusters=16, seed=1)
    return {"synthetic": syn, "planted": planted}


def _assert_same(new, ref, max_len):
    assert new.num_items == ref["num_items"]
    assert new.split == ref["split"]
    np.testing.assert_array_equal(new.item_raw_ids, ref["item_raw_ids"])
    np.testing.assert_array_equal(new.user_raw_ids, ref["user_raw_ids"])
    np.testing.assert_array_equal(new.item_counts, ref["item_counts"])
    assert torch.equal(new.item_genres, ref["item_genres"]) and new.genre_names == ref["genre_names"]
    assert torch.equal(new.user_features, ref["user_features"])
    assert new.user_feature_cardinalities == ref["user_feature_cardinalities"]
    assert new.item_titles == ref["item_titles"]
    assert torch.equal(new.train_histories, ref["train_histories"])
    assert torch.equal(new.train_targets, ref["train_targets"])
    assert torch.equal(new.train_users, ref["train_users"])
    assert torch.equal(new.train_lengths, ref["train_lengths"])
    for part in ("valid", "test"):
        got, want = getattr(new, part), ref[part]
        np.testing.assert_array_equal(got.users, want["users"])
        assert torch.equal(got.user_index, want["user_index"])
        assert torch.equal(got.histories, want["histories"]) and torch.equal(got.lengths, want["lengths"])
        assert [h.tolist() for h in got.full_histories] == [h.tolist() for h in want["full_histories"]]
        assert [t.tolist() for t in got.targets] == [t.tolist() for t in want["targets"]]
    assert new.train_histories.shape[1] == max_len


@pytest.mark.parametrize("name", ["synthetic", "planted"])
@pytest.mark.parametrize("max_len", [1, 5, 20])
def test_prepare_equals_the_dense_protocol(name, max_len):
    raw = _datasets()[name]
    _assert_same(prepare(raw, max_len=max_len), reference_prepare(raw, max_len=max_len), max_len)


def test_prepare_equals_the_dense_protocol_on_movielens(tiny):
    from mind.data import fetch_movielens_100k, load_recbole
    try:
        raw = load_recbole(fetch_movielens_100k())
    except Exception as e:   # no network and no cache: the synthetic cases above still ran
        pytest.skip(f"MovieLens-100k unavailable: {e}")
    _assert_same(prepare(raw, max_len=20), reference_prepare(raw, max_len=20), 20)


def test_prepare_with_other_filters_and_ratios_equals_the_dense_protocol():
    raw = _datasets()["synthetic"]
    kw = dict(min_item_count=2, min_user_count=1, seed=7, min_target_pos=2, split_ratio=(0.6, 0.2, 0.2))
    _assert_same(prepare(raw, max_len=7, **kw), reference_prepare(raw, max_len=7, **kw), 7)


def test_sequences_are_stored_once_as_int32_csr():
    data = prepare(_datasets()["synthetic"], max_len=20)
    assert data.seq_values.dtype == np.int32 and data.seq_offsets.dtype == np.int64
    assert data.train_rows.dtype == np.int32 and data.train_positions.dtype == np.int32
    assert len(data.seq_offsets) == len(data.user_raw_ids) + 1 and data.seq_offsets[-1] == len(data.seq_values)
    # a batch of examples: the windows and targets of the dense view, in any order
    idx = np.array([5, 0, len(data.train_positions) - 1, 5])
    hist, tgt, rows = data.batch(idx, 20)
    assert torch.equal(hist, data.train_histories[idx]) and torch.equal(tgt, data.train_targets[idx])
    assert torch.equal(rows, data.train_users[idx])
    # a shorter history length cuts the same windows on the left
    assert torch.equal(data.batch(idx, 3)[0], data.train_histories[idx][:, -3:])


def test_prepared_folder_round_trips_memory_mapped(tmp_path):
    data = prepare(_datasets()["planted"], max_len=20)
    write_prepared(data, tmp_path / "p")
    back = load_prepared(tmp_path / "p", max_len=20)
    assert isinstance(back.seq_values, np.memmap) and not back.seq_values.flags.writeable
    assert back.split == data.split and back.summary() == data.summary()
    for name in ("seq_values", "seq_offsets", "train_rows", "train_positions", "item_raw_ids", "user_raw_ids",
                 "item_counts"):
        np.testing.assert_array_equal(getattr(back, name), getattr(data, name))
    assert torch.equal(back.item_genres, data.item_genres) and torch.equal(back.user_features, data.user_features)
    assert back.item_titles == data.item_titles and back.genre_names == data.genre_names
    for part in ("valid", "test"):
        assert torch.equal(getattr(back, part).histories, getattr(data, part).histories)
        assert [t.tolist() for t in getattr(back, part).targets] == [t.tolist() for t in getattr(data, part).targets]
    # the history length is chosen when loading
    assert load_prepared(tmp_path / "p", max_len=7).valid.histories.shape[1] == 7
    # writing again over a prepared folder is allowed; over a folder of other files it is refused
    write_prepared(data, tmp_path / "p")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataFormatError, match="not a prepared dataset"):
        write_prepared(data, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("damage, match", [
    ("truncate seq_values.npy", r"seq_values\.npy.*truncated or corrupt"),
    ("delete train_rows.npy", r"train_rows\.npy is missing"),
    ("other format", r"meta\.json.*format 'mind-prepared/0'"),
    ("garbled meta", r"meta\.json.*truncated or corrupt"),
    ("shape mismatch", r"item_counts\.npy: holds int64 \[3\]"),
    ("titles", r"items\.json: should hold"),
])
def test_a_damaged_or_foreign_prepared_folder_is_refused_naming_the_file(tmp_path, damage, match):
    data = prepare(_datasets()["synthetic"], max_len=20)
    folder = write_prepared(data, tmp_path / "p")
    if damage.startswith("truncate"):
        path = folder / "seq_values.npy"
        path.write_bytes(path.read_bytes()[:200])
    elif damage.startswith("delete"):
        (folder / "train_rows.npy").unlink()
    elif damage == "other format":
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "format": "mind-prepared/0"}))
    elif damage == "garbled meta":
        (folder / "meta.json").write_text('{"format": "mind-prep')
    elif damage == "shape mismatch":
        np.save(folder / "item_counts.npy", np.zeros(3, dtype=np.int64))
    else:
        (folder / "items.json").write_text(json.dumps({"titles": ["x"]}))
    with pytest.raises((DataFormatError, DataNotFoundError), match=match):
        load_prepared(folder)


def test_cli_prepare_then_train_evaluate_on_the_prepared_folder(tmp_path):
    import subprocess
    import sys
    from mind.data.loaders import _inter_frame  # noqa: F401  (the loaders stay importable)
    raw, _ = make_synthetic(num_users=200, num_items=150, seed=2)
    folder = tmp_path / "log"
    folder.mkdir()
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"{u}\t{i}\t1\t{t}" for u, i, t in raw.inter[["user", "item", "timestamp"]].itertuples(index=False)]
    (folder / "log.inter").write_text("\n".join(lines) + "\n")

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "mind", *argv], capture_output=True, text=True, timeout=600)

    out = run("prepare", "--data-dir", str(folder), "--format", "recbole", "--out", str(tmp_path / "prep"))
    assert out.returncode == 0, out.stderr
    assert "[prepare] sequences" in out.stderr and "prepared" in out.stdout
    common = ["--dim", "8", "--interests", "2", "--epochs", "1", "--negatives", "20", "--no-progress"]
    a = run("train", "--data-dir", str(tmp_path / "prep"), "--out", str(tmp_path / "a"), *common)
    b = run("train", "--data-dir", str(folder), "--format", "recbole", "--out", str(tmp_path / "b"), *common)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    # the same split, the same training: the same metrics from the prepared folder and from the log
    fa = json.loads((tmp_path / "a" / "final_metrics.json").read_text())
    fb = json.loads((tmp_path / "b" / "final_metrics.json").read_text())
    assert fa == fb
    ev = run("evaluate", "--checkpoint", str(tmp_path / "a" / "best.pt"), "--data-dir", str(tmp_path / "prep"))
    assert ev.returncode == 0, ev.stderr
    # a damaged prepared folder: one error line naming the file, exit 2
    (tmp_path / "prep" / "seq_offsets.npy").write_bytes(b"garbage")
    bad = run("train", "--data-dir", str(tmp_path / "prep"), "--out", str(tmp_path / "c"), *common)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "seq_offsets.npy" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("spread", [1, 10**9, 2**55, 2**62])
def test_the_time_order_packs_or_falls_back_without_changing_the_result(spread):
    """Timestamps spanning up to 2^62 push the (users x span x items) key past int64: the sort falls
    back to np.lexsort; the prepared sequences stay those of the dense protocol."""
    raw, _ = make_synthetic(num_users=80, num_items=60, seq_len=(5, 20), seed=4)
    rng = np.random.default_rng(0)
    ts = rng.integers(0, 50, len(raw.inter))              # many ties: the item breaks them
    raw.inter["timestamp"] = ts * (spread // 50 if spread > 50 else 1) - (spread // 4)
    raw.inter = raw.inter.sample(frac=1.0, random_state=1).reset_index(drop=True)   # any row order
    _assert_same(prepare(raw, max_len=6), reference_prepare(raw, max_len=6), 6)


@pytest.mark.parametrize("spread", [1, 2**62])
def test_rows_processed_in_many_blocks_prepare_like_one_block(monkeypatch, spread):
    """The filter, ranks and sort key run a block of rows at a time (BLOCK = 2^20 in use): with blocks
    of 7 rows, on the packed and on the lexsort path, the result is still the dense protocol's."""
    import mind.data.sequences as sequences
    raw, _ = make_synthetic(num_users=60, num_items=50, seq_len=(3, 15), seed=5)
    raw.inter["timestamp"] = np.random.default_rng(1).integers(0, 40, len(raw.inter)) * max(spread // 40, 1)
    raw.inter = raw.inter.sample(frac=1.0, random_state=2).reset_index(drop=True)
    monkeypatch.setattr(sequences, "BLOCK", 7)
    _assert_same(prepare(raw, max_len=5, min_item_count=3, min_user_count=4),
                 reference_prepare(raw, max_len=5, min_item_count=3, min_user_count=4), 5)


def test_ids_and_timestamps_beyond_int32_prepare_like_the_dense_protocol():
    # a shop's 64-bit ids and millisecond timestamps: the loader keeps those columns int64
    # (int32 only where a column fits), and prepare's packed sort key must not overflow
    from mind.data.loaders import RawData, compact_ints, inter_frame
    raw = _datasets()["synthetic"]
    col = {c: raw.inter[c].to_numpy().astype(np.int64) for c in raw.inter.columns}
    big = inter_frame(col["user"] * 3_000_000_019 + 7, col["item"] + 2 ** 40,
                      col["timestamp"] * 1000 + 1_700_000_000_000)
    assert all(big[c].dtype == np.int64 for c in big.columns)
    assert compact_ints(np.array([-2 ** 31, 2 ** 31 - 1])).dtype == np.int32
    assert compact_ints(np.array([0, 2 ** 31])).dtype == np.int64
    items = raw.items.set_axis(raw.items.index.to_numpy() + 2 ** 40).rename_axis("item")
    users = raw.users.set_axis(raw.users.index.to_numpy() * 3_000_000_019 + 7).rename_axis("user")
    raw_big = RawData(raw.name, big, items, users)
    got, want = prepare(raw_big, max_len=9), prepare(raw, max_len=9)
    assert np.array_equal(got.seq_values, want.seq_values) and np.array_equal(got.seq_offsets, want.seq_offsets)
    assert np.array_equal(got.train_rows, want.train_rows)
    assert np.array_equal(got.train_positions, want.train_positions)
    _assert_same(got, reference_prepare(raw_big, max_len=9), 9)
