"""Export / load round trip, deterministic serving, unknown ids, explain, and the CLI."""

import collections
import subprocess
import sys

import numpy as np
import pytest
import torch

from mind.cli import build_parser, main
from mind.data import make_synthetic, prepare
from mind.evaluate import retrieve_topk
from mind.explain import explain
from mind.model import retrieval_vectors
from mind.serve import ModelFormatError, export, load
from mind.train import TrainConfig, build_model, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    raw, _ = make_synthetic(num_users=80, num_items=100, num_clusters=4, seq_len=(10, 20), seed=2)
    data = prepare(raw, max_len=10)
    out = tmp_path_factory.mktemp("serve")
    cfg = TrainConfig(dim=16, num_interests=3, max_len=10, batch_size=64, epochs=1, num_negatives=20,
                      seed=0, progress=False, out_dir=str(out / "run"))
    result = train(data, cfg, log=lambda *_: None)
    export(result.model, data, out / "model")
    return data, result.model, out


def test_round_trip_gives_identical_recommendations(trained):
    data, model, out = trained
    rec = load(out / "model")
    history = [int(r) for r in data.item_raw_ids[[3, 7, 11, 20, 5]]]
    got = rec.recommend(history, n=10)
    # the same list computed directly from the in-memory model
    idx = torch.tensor([[0] * 5 + [3, 7, 11, 20, 5]])
    with torch.no_grad():
        v, imask = model.eval().interests(idx)
        items, scores = retrieve_topk(retrieval_vectors(v, imask), model.item_embeddings(), 10,
                                      exclude=[np.array([3, 7, 11, 20, 5])])
    assert [r for r, _, _ in got] == [int(data.item_raw_ids[i]) for i in items[0]]
    np.testing.assert_allclose([s for _, _, s in got], scores[0], rtol=1e-6)
    assert [t for _, t, _ in got] == [data.item_titles[i] for i in items[0]]
    assert not set(history) & {r for r, _, _ in got}                 # history excluded
    # vectors from the export equal the model's
    np.testing.assert_allclose(rec.interests([history]), v.numpy(), rtol=1e-6)


def test_serving_is_deterministic_and_accepts_string_ids(trained):
    data, _, out = trained
    rec = load(out / "model")
    history = [int(r) for r in data.item_raw_ids[1:9]]
    first = rec.recommend(history, n=15)
    assert all(rec.recommend(history, n=15) == first for _ in range(3))
    assert load(out / "model").recommend([str(h) for h in history], n=15) == first
    a = rec.interests([history, history[:3]])
    assert np.array_equal(a, rec.interests([history, history[:3]]))
    # batch composition only changes float rounding (matmul blocking), not the result
    np.testing.assert_allclose(a[1], rec.interests([history[:3]])[0], rtol=1e-5, atol=1e-6)


def test_long_history_keeps_most_recent(trained):
    data, _, out = trained
    rec = load(out / "model")
    ids = [int(r) for r in data.item_raw_ids[1:]]
    long_history = ids[:25]                                             # max_len is 10
    np.testing.assert_array_equal(rec.interests([long_history]), rec.interests([long_history[-10:]]))
    with_incl = rec.recommend(long_history, n=5, exclude_history=False)
    without = rec.recommend(long_history, n=5)
    assert not {r for r, _, _ in without} & set(long_history)            # the whole history is excluded
    assert len(with_incl) == 5


def test_unknown_ids_are_dropped_with_warning_and_empty_raises(trained):
    data, _, out = trained
    rec = load(out / "model")
    good = [int(r) for r in data.item_raw_ids[1:5]]
    with pytest.warns(UserWarning, match="unknown item id"):
        mixed = rec.recommend(good + [10**9, "nope"], n=5)
    assert mixed == rec.recommend(good, n=5)
    with pytest.raises(ValueError, match="no known item"), pytest.warns(UserWarning):
        rec.recommend([10**9], n=5)
    with pytest.raises(ValueError, match="no known item"):
        rec.recommend([], n=5)


def test_explain_routes_every_item_and_writes_png(trained, tmp_path):
    data, _, out = trained
    rec = load(out / "model")
    history = [int(r) for r in data.item_raw_ids[1:9]]
    result = explain(rec, history, png=tmp_path / "e.png")
    w = result["weights"]
    assert w.shape == (3, 8)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, rtol=1e-5)         # softmax over interests
    assigned = sorted(r for it in result["interests"] for r, *_ in it["items"])
    assert assigned == sorted(history)                                   # each item in exactly one interest
    for it in result["interests"]:
        k = it["interest"]
        for raw, _, _, weight in it["items"]:
            assert weight == pytest.approx(w[:, history.index(raw)].max())
            assert w[k, history.index(raw)] == pytest.approx(weight)
    assert (tmp_path / "e.png").stat().st_size > 1000
    assert "interest" in result["text"]
    # the merged list is recommend()'s, and each of its items is credited to one active interest
    merged = rec.recommend(history, n=20)
    shares = explain(rec, history, merged_n=20)["interests"]
    assert sum(it["merged_share"] for it in shares) == len(merged)
    ids = {raw: i for i, raw in enumerate(rec.raw_ids)}
    for it in shares:
        genres = [g for raw, _, _ in it["recommendations"] for g in rec.genres[ids[raw]]]
        assert it["recommended_genres"] == collections.Counter(genres).most_common(3)


def test_export_of_fresh_model_loads(trained, tmp_path):
    data, _, _ = trained
    torch.manual_seed(0)
    model = build_model(data, TrainConfig(dim=8, num_interests=2, max_len=10))
    rec = load(export(model, data, tmp_path / "m"))
    assert rec.interests([[int(data.item_raw_ids[1])]]).shape == (1, 2, 8)
    with pytest.raises(ModelFormatError, match="not a MIND export"):
        load(tmp_path)


@pytest.mark.parametrize("command", [None, "train", "evaluate", "export", "recommend", "explain", "quality"])
def test_cli_help_exits_zero(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_cli_module_entry_point_and_recommend(trained, capsys):
    data, _, out = trained
    proc = subprocess.run([sys.executable, "-m", "mind", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "recommend" in proc.stdout
    history = ",".join(str(int(r)) for r in data.item_raw_ids[1:5])
    assert main(["recommend", "--model", str(out / "model"), "--history", history, "-n", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("1. [") and lines[2].strip().startswith("3. [")
    # the CLI prints the warning as one line (no source line), then the error
    assert main(["recommend", "--model", str(out / "model"), "--history", "999999999"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("warning: dropping 1 unknown item id") and "error: history has no known item" in err, err


def test_recommend_batch_equals_per_user_recommend(trained):
    data, _, out = trained
    rec = load(out / "model")
    ids = [int(r) for r in data.item_raw_ids[1:]]
    rng = np.random.default_rng(0)
    histories = [[ids[i] for i in rng.choice(len(ids), size=rng.integers(1, 30))] for _ in range(40)]
    histories.append(ids[:-3])                     # only 3 items eligible: a short list, not padding
    for excl in (True, False):
        batch = rec.recommend_batch(histories, n=7, exclude_history=excl, batch_size=16)
        assert len(batch) == len(histories)
        for h, got in zip(histories, batch):
            one = rec.recommend(h, n=7, exclude_history=excl)
            # same items and titles; scores equal up to the batched matmuls' rounding (module doc)
            assert [(r, t) for r, t, _ in got] == [(r, t) for r, t, _ in one]
            np.testing.assert_allclose([x for *_, x in got], [x for *_, x in one], rtol=1e-5, atol=1e-6)
    assert len(rec.recommend_batch([ids[:-3]], n=7)[0]) == 3
    assert rec.recommend_batch([], n=5) == []


def test_batch_bad_input_names_the_user(trained):
    data, _, out = trained
    rec = load(out / "model")
    good = [int(r) for r in data.item_raw_ids[1:5]]
    with pytest.warns(UserWarning, match=r"unknown item id.*positions \[1\].*nope"):
        got = rec.recommend_batch([good, good + ["nope"]], n=5)
    assert got[0] == got[1]                                              # "nope" dropped, same history
    assert [r for r, *_ in got[0]] == [r for r, *_ in rec.recommend(good, n=5)]
    with pytest.raises(ValueError, match="history 1 has no known item"), pytest.warns(UserWarning):
        rec.recommend_batch([good, [10**9, "x"]], n=5)
    with pytest.raises(ValueError, match="history 2 is empty"):
        rec.recommend_batch([good, good, []], n=5)
    with pytest.raises(ValueError, match="must be a list of raw item ids"):
        rec.recommend("1,2,3", n=5)
    with pytest.raises(ValueError, match="n must be >= 1"):
        rec.recommend_batch([good], n=0)


def test_long_history_recommendations_equal_truncated(trained):
    data, _, out = trained
    rec = load(out / "model")
    ids = [int(r) for r in data.item_raw_ids[1:]]
    long_history = ids[5:40]                                            # 35 items, max_len is 10
    short = long_history[-rec.max_len:]
    assert rec.recommend(long_history, n=10, exclude_history=False) == rec.recommend(short, n=10,
                                                                                      exclude_history=False)
    a, b = rec.recommend_batch([long_history, short], n=10, exclude_history=False)
    assert a == b                                     # same batch, identical rows: bit-identical


def test_faiss_index_serving_matches_exact(trained):
    """An exact faiss index and an IVF index probing every list give the brute-force recommendations."""
    pytest.importorskip("faiss")
    data, _, out = trained
    histories = [[int(r) for r in data.item_raw_ids[[3, 7, 11, 20, 5]]], [int(r) for r in data.item_raw_ids[30:41]]]
    want = load(out / "model").recommend_batch(histories, n=10)
    assert all(len(user) == 10 for user in want)
    for kind, params in (("exact", {}), ("ivf", {"nlist": 4, "nprobe": 4})):
        got = load(out / "model", index=kind, **params).recommend_batch(histories, n=10)
        assert [[r[0] for r in user] for user in got] == [[r[0] for r in user] for user in want]


def test_cli_metric_table_prints_the_measures_beside_recall():
    from mind.cli import _fmt_metrics
    base = {f"{m}@{n}{s}": 0.5 for n in (20, 50) for m in ("recall", "hit_rate", "ndcg") for s in ("", "_se")}
    k4 = {**base, "interest_cosine": 0.78, "diversity@50": 0.51, "coverage@50": 0.6, "recall@50_entropy_high": 0.37}
    k1 = {**base, "interest_cosine": None, "diversity@50": 0.5, "coverage@50": 0.61, "recall@50_entropy_high": 0.39}
    text = _fmt_metrics([("valid", k4), ("test", k1)])
    assert "valid: interest cosine 0.780, diversity@50 0.510, coverage@50 0.600" in text
    assert "test: interest cosine n/a, diversity@50 0.500" in text
