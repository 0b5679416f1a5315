"""mind/merge.py: the max / quota / diverse merge rules against slow, obvious references, and their use by
serving (every export path and index), evaluation, explain and the CLI."""

import itertools

import numpy as np
import pytest
import torch

from mind import merge as M
from mind.cli import main
from mind.data import make_synthetic, prepare
from mind.diversity import diversity_at_n
from mind.evaluate import evaluate_model, split_rankings
from mind.explain import explain
from mind.metrics import ndcg_at_n, recall_at_n
from mind.serve import export, load
from mind.train import TrainConfig, train


# ----------------------------------------------------------------------------- slow, obvious references


def _differ(a: set, b: set) -> int:
    """g for category sets: 1 when disjoint (an item without categories differs from everything)."""
    return int(not (a & b))


def reference_topn(V, active, E, n, exclude, merge, lam=0.0, cat_sets=None, m=200):
    """One user at a time, dicts and sorted(): the rules exactly as the module docstring states them."""
    U, K, _ = V.shape
    N = E.shape[0] - 1
    E64, V64 = E.astype(np.float64), V.astype(np.float64)
    unit = [e / np.linalg.norm(e) if np.linalg.norm(e) > 0 else e * 0 for e in E64]
    out = []
    for u in range(U):
        act = [k for k in range(K) if active[u, k]]
        excl = set(int(x) for x in exclude[u])
        elig = [i for i in range(1, N + 1) if i not in excl]
        s = {k: {i: float(np.dot(E64[i], V64[u, k])) for i in elig} for k in act}
        f = {i: max(s[k][i] for k in act) for i in elig}
        if merge == "max":
            out.append(sorted(elig, key=lambda i: (-f[i], i))[:n])
            continue
        lists = {k: sorted(elig, key=lambda i: (-s[k][i], i))[:max(m, n)] for k in act}
        chosen: list = []
        if merge == "quota":
            ptr = {k: 0 for k in act}
            while len(chosen) < n:
                progressed = False
                for k in act:
                    if len(chosen) == n:
                        break
                    while ptr[k] < len(lists[k]) and lists[k][ptr[k]] in chosen:
                        ptr[k] += 1
                    if ptr[k] < len(lists[k]):
                        chosen.append(lists[k][ptr[k]])
                        ptr[k] += 1
                        progressed = True
                if not progressed:
                    break
            out.append(chosen)
            continue

        def g(i, j):
            if cat_sets is not None:
                return _differ(cat_sets[i], cat_sets[j])
            return (1.0 - float(np.dot(unit[i], unit[j]))) * 0.5

        pool = sorted(set().union(*lists.values()), key=lambda i: (-f[i], i))
        while len(chosen) < min(n, len(pool)):
            best = None
            for i in pool:
                if i in chosen:
                    continue
                total = 0
                for j in chosen:
                    total += g(i, j)
                obj = f[i] + lam * total
                if best is None or obj > best[0]:
                    best = (obj, i)
            chosen.append(best[1])
        out.append(chosen)
    return out


def _rows(items):
    return [[int(i) for i in row if i > 0] for row in items]


def _random_case(seed, integer=True, U=6, K=3, N=40, d=4, G=3, vocab=5, offset=0):
    rng = np.random.default_rng(seed)
    if integer:      # small integers: exact products, so many exact ties in f and in the objective
        E = rng.integers(-2, 3, size=(N + 1, d)).astype(np.float32)
        V = rng.integers(-2, 3, size=(U, K, d)).astype(np.float32)
    else:
        E = rng.normal(size=(N + 1, d)).astype(np.float32)
        V = rng.normal(size=(U, K, d)).astype(np.float32)
    E[0] = 0
    active = rng.random((U, K)) < 0.7
    active[:, 0] = True
    ids = np.zeros((N + 1, G), dtype=np.int64)
    for i in range(1, N + 1):
        k = rng.integers(0, G + 1)                  # some items have no category
        ids[i, :k] = rng.choice(np.arange(1, vocab + 1), k, replace=False) + offset
    exclude = [rng.choice(np.arange(1, N + 1), rng.integers(0, 8), replace=False) for _ in range(U)]
    cat_sets = [set(int(x) for x in row if x) for row in ids]
    return V, active, E, ids, exclude, cat_sets


# ----------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("integer", [True, False])
def test_lambda0_diverse_equals_max(integer):
    V, active, E, ids, excl, _ = _random_case(0, integer=integer, U=8, N=60, d=6)
    cats = M.Categories(ids)
    want_i, want_s = M.merged_topn(V, 12, table=E, active=active, exclude=excl)
    got_i, got_s = M.merged_topn(V, 12, table=E, active=active, exclude=excl, merge="diverse", diversity=0.0,
                                 categories=cats, candidates=12)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_s, want_s)
    assert _rows(want_i) == reference_topn(V, active, E, 12, excl, "max")


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lam", [0.5, 1.0, 3.0])
def test_vectorised_greedy_equals_reference_with_categories(seed, lam):
    V, active, E, ids, excl, cat_sets = _random_case(seed)
    for m in (5, 15):
        got, _ = M.merged_topn(V, 10, table=E, active=active, exclude=excl, merge="diverse", diversity=lam,
                               categories=M.Categories(ids), candidates=m)
        assert _rows(got) == reference_topn(V, active, E, 10, excl, "diverse", lam, cat_sets, m), (seed, lam, m)


def test_category_bitmask_and_id_paths_agree():
    """A vocabulary over 256 ids uses the (G x G) id comparison instead of bitmasks: same lists."""
    V, active, E, ids, excl, cat_sets = _random_case(7)
    small = M.Categories(ids)
    big_ids = np.where(ids > 0, ids + 1000, 0)
    big = M.Categories(big_ids)
    assert small.words == 1 and big.words == 0
    a, _ = M.merged_topn(V, 10, table=E, active=active, exclude=excl, merge="diverse", diversity=1.0,
                         categories=small, candidates=8)
    b, _ = M.merged_topn(V, 10, table=E, active=active, exclude=excl, merge="diverse", diversity=1.0,
                         categories=big, candidates=8)
    np.testing.assert_array_equal(a, b)
    # a vocabulary of 65..256 ids: several bitmask words
    mid = M.Categories(np.where(ids > 0, ids + 100, 0))
    assert mid.words == 2
    c, _ = M.merged_topn(V, 10, table=E, active=active, exclude=excl, merge="diverse", diversity=1.0,
                         categories=mid, candidates=8)
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("seed", range(3))
def test_vectorised_greedy_equals_reference_with_cosine(seed):
    V, active, E, _, excl, _ = _random_case(seed, integer=False, d=5)
    for lam in (0.1, 2.0):
        got, _ = M.merged_topn(V, 10, table=E, active=active, exclude=excl, merge="diverse", diversity=lam,
                               categories=M.Categories(np.zeros((len(E), 1), np.int64)), candidates=8)
        assert _rows(got) == reference_topn(V, active, E, 10, excl, "diverse", lam, None, 8)
        none, _ = M.merged_topn(V, 10, table=E, active=active, exclude=excl, merge="diverse", diversity=lam,
                                candidates=8)
        np.testing.assert_array_equal(got, none)          # no categories at all: the same cosine rule


@pytest.mark.parametrize("seed", range(4))
def test_quota_equals_reference(seed):
    V, active, E, _, excl, _ = _random_case(seed)
    for m in (3, 10):
        got, scores = M.merged_topn(V, 12, table=E, active=active, exclude=excl, merge="quota", candidates=m)
        assert _rows(got) == reference_topn(V, active, E, 12, excl, "quota", m=m)
        best = M.best_scores(V.astype(np.float64), active, E.astype(np.float64), got)
        np.testing.assert_array_equal(scores, best.astype(np.float32))


def test_quota_gives_each_active_interest_its_turn():
    per = np.array([[[1, 2, 3, 4], [1, 5, 6, 7], [8, 9, 10, 11]]])
    got = M.quota_merge(per, np.array([[True, True, True]]), 6)
    assert got.tolist() == [[1, 5, 8, 2, 6, 9]]          # interest 1's duplicate "1" is skipped for 5
    got = M.quota_merge(per, np.array([[True, False, True]]), 6)
    assert got.tolist() == [[1, 8, 2, 9, 3, 10]]         # an inactive interest gets no turn
    short = np.array([[[1, 2, 3, 4], [1, 5, 6, 7], [8, -1, -1, -1]]])
    got = M.quota_merge(short, np.array([[True, True, True]]), 9)
    assert got.tolist() == [[1, 5, 8, 2, 6, 3, 7, 4, -1]]   # an exhausted interest loses its turns


def test_huge_lambda_maximises_distinct_category_pairs():
    """One category per item: the greedy with a huge lambda reaches the most different-category pairs
    any n-subset of the pool has (brute force over all subsets)."""
    rng = np.random.default_rng(3)
    for trial in range(6):
        N, n = 10, 5
        E = rng.normal(size=(N + 1, 3)).astype(np.float32)
        E[0] = 0
        V = rng.normal(size=(1, 1, 3)).astype(np.float32)
        cat = np.zeros((N + 1, 1), np.int64)
        cat[1:, 0] = rng.choice([1, 1, 1, 1, 2, 2, 3], N)        # uneven categories
        got, _ = M.merged_topn(V, n, table=E, merge="diverse", diversity=1e6, categories=M.Categories(cat),
                               candidates=N)

        def pairs(items):
            return sum(cat[a, 0] != cat[b, 0] for a, b in itertools.combinations(items, 2))

        best = max(pairs(s) for s in itertools.combinations(range(1, N + 1), n))
        assert pairs(got[0]) == best, (trial, got, cat[1:, 0])
        assert np.nanmean(diversity_at_n(got, cat, n)) == pytest.approx(best / (n * (n - 1) / 2))


def test_diversity_grows_with_lambda_and_lists_stay_distinct():
    V, active, E, ids, excl, _ = _random_case(11, integer=False, U=20, N=80, d=8)
    divs = []
    for lam in (0.0, 0.1, 1.0, 100.0):
        got, scores = M.merged_topn(V, 10, table=E, active=active, exclude=excl, merge="diverse", diversity=lam,
                                    categories=M.Categories(ids))
        for row, x in zip(got, excl):
            assert len(set(row.tolist())) == 10 and not set(row.tolist()) & set(x.tolist())
        divs.append(np.nanmean(diversity_at_n(got, ids, 10)))
    assert divs[0] < divs[2] <= divs[3]


def test_short_catalogue_pads_and_batch_equals_single():
    V, active, E, ids, _, _ = _random_case(5, U=5, N=12)
    excl = [np.arange(1, 10)] * 5                            # 3 items left
    for merge, lam in (("quota", 0.0), ("diverse", 1.0), ("max", 0.0)):
        got, scores = M.merged_topn(V, 6, table=E, active=active, exclude=excl, merge=merge, diversity=lam,
                                    categories=M.Categories(ids))
        assert ((got > 0).sum(1) == 3).all() and (got[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    got, scores = M.merged_topn(V, 6, table=E, active=active, merge="diverse", diversity=0.7,
                                categories=M.Categories(ids), chunk_size=2)
    for u in range(len(V)):
        one, s1 = M.merged_topn(V[u:u + 1], 6, table=E, active=active[u:u + 1], merge="diverse", diversity=0.7,
                                categories=M.Categories(ids))
        np.testing.assert_array_equal(one[0], got[u])
        np.testing.assert_array_equal(s1[0], scores[u])


@pytest.mark.parametrize("kwargs, match", [
    (dict(merge="best"), "merge must be one of max, quota, diverse, got 'best'"),
    (dict(merge="diverse", diversity=-0.1), "diversity must be a finite number >= 0, got -0.1"),
    (dict(merge="diverse", diversity=float("nan")), "diversity must be a finite number >= 0"),
    (dict(merge="diverse", diversity="x"), "diversity must be a finite number >= 0, got 'x'"),
    (dict(merge="max", diversity=0.5), "diversity 0.5 only applies to merge 'diverse'"),
    (dict(n=41), "n must be at most the catalogue's 40 items, got n=41"),
    (dict(n=0), "n must be >= 1, got 0"),
    (dict(candidates=0), "candidates must be an integer >= 1, got 0"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    V, active, E, _, _, _ = _random_case(0)
    kw = {"n": 5, "table": E, **kwargs}
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        M.merged_topn(V, kw.pop("n"), **kw)


# ----------------------------------------------------------------------------- serving, evaluation, CLI


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.set_num_threads(1)
    raw, _ = make_synthetic(num_users=80, num_items=100, num_clusters=4, seq_len=(10, 20), seed=2)
    data = prepare(raw, max_len=10)
    out = tmp_path_factory.mktemp("merge")
    cfg = TrainConfig(dim=16, num_interests=3, max_len=10, batch_size=64, epochs=1, num_negatives=20,
                      seed=0, progress=False, out_dir=str(out / "run"))
    result = train(data, cfg, log=lambda *_: None)
    export(result.model, data, out / "model")
    return data, result.model, out


RULES = [("max", 0.0), ("quota", 0.0), ("diverse", 0.0), ("diverse", 0.3), ("diverse", 5.0)]


def test_recommend_and_batch_agree_for_every_rule(served):
    data, _, out = served
    rec = load(out / "model")
    ids = [int(r) for r in data.item_raw_ids[1:]]
    rng = np.random.default_rng(0)
    histories = [[ids[i] for i in rng.choice(len(ids), size=rng.integers(1, 30))] for _ in range(25)]
    for merge, lam in RULES:
        batch = rec.recommend_batch(histories, n=15, merge=merge, diversity=lam, batch_size=8)
        for h, got in zip(histories, batch):
            one = rec.recommend(h, n=15, merge=merge, diversity=lam)
            assert [r for r, *_ in got] == [r for r, *_ in one], (merge, lam)
            assert not {r for r, *_ in got} & set(h)
    base = rec.recommend_batch(histories, n=15)
    assert rec.recommend_batch(histories, n=15, merge="diverse", diversity=0.0) == base
    assert rec.recommend_batch(histories, n=15, merge="diverse", diversity=5.0) != base


def test_every_index_serves_the_rules(served):
    pytest.importorskip("faiss")
    data, _, out = served
    histories = [[int(r) for r in data.item_raw_ids[[3, 7, 11, 20, 5]]], [int(r) for r in data.item_raw_ids[30:41]]]
    for merge, lam in RULES[1:]:
        want = load(out / "model").recommend_batch(histories, n=10, merge=merge, diversity=lam)
        for kind, params in (("exact", {}), ("ivf", {"nlist": 4, "nprobe": 4}), ("hnsw", {"efSearch": 200})):
            got = load(out / "model", index=kind, **params).recommend_batch(histories, n=10, merge=merge,
                                                                              diversity=lam)
            assert [[r[0] for r in u] for u in got] == [[r[0] for r in u] for u in want], (kind, merge, lam)


def test_evaluation_scores_the_lists_the_python_api_returns(served):
    """Recall@N and Diversity@N recomputed from recommend_batch's lists equal evaluate_model's."""
    data, model, out = served
    rec = load(out / "model")
    split = data.test
    row_of = {r: i for i, r in enumerate(rec.raw_ids)}
    histories = [[rec.raw_ids[i] for i in h] for h in split.full_histories]
    feats = np.asarray(data.user_features)[np.asarray(split.user_index)]
    for merge, lam in RULES:
        lists = rec.recommend_batch(histories, n=20, user_features=feats, merge=merge, diversity=lam)
        ranked = np.full((len(lists), 20), -1, dtype=np.int64)
        for u, items in enumerate(lists):
            ranked[u, :len(items)] = [row_of[r] for r, *_ in items]
        got = evaluate_model(model, data, split, ns=(20,), merge=merge, diversity=lam)
        assert got["recall@20"] == pytest.approx(recall_at_n(ranked, split.targets, 20).mean(), abs=1e-12)
        assert got["ndcg@20"] == pytest.approx(ndcg_at_n(ranked, split.targets, 20).mean(), abs=1e-12)
        assert got["diversity@20"] == pytest.approx(np.nanmean(diversity_at_n(ranked, data.item_genres, 20)),
                                                    abs=1e-12)
        np.testing.assert_array_equal(split_rankings(model, data, split, 20, merge=merge, diversity=lam), ranked)


def test_explain_credits_the_merged_list_of_the_rule(served):
    data, _, out = served
    rec = load(out / "model")
    history = [int(r) for r in data.item_raw_ids[1:9]]
    for merge, lam in RULES:
        shares = explain(rec, history, merged_n=20, merge=merge, diversity=lam)["interests"]
        assert sum(it["merged_share"] for it in shares) == len(rec.recommend(history, n=20, merge=merge,
                                                                             diversity=lam))
    with pytest.raises(ValueError, match="merge must be one of"):
        explain(rec, history, merge="nope")


def test_serving_bad_merge_arguments(served):
    data, _, out = served
    rec = load(out / "model")
    good = [int(r) for r in data.item_raw_ids[1:5]]
    with pytest.raises(ValueError, match="merge must be one of max, quota, diverse"):
        rec.recommend(good, n=5, merge="union")
    with pytest.raises(ValueError, match="diversity must be a finite number >= 0, got -1"):
        rec.recommend_batch([good], n=5, merge="diverse", diversity=-1)
    with pytest.raises(ValueError, match=f"n must be at most the catalogue's {rec.num_items} items"):
        rec.recommend(good, n=rec.num_items + 1)


@pytest.mark.parametrize("extra, message", [
    (["--merge", "union"], "error: --merge must be one of max, quota, diverse, got 'union'"),
    (["--merge", "diverse", "--diversity", "-1"], "error: --diversity must be a finite number >= 0, got '-1'"),
    (["--merge", "diverse", "--diversity", "lots"], "error: --diversity must be a finite number >= 0, got 'lots'"),
    (["--diversity", "0.5"], "error: --diversity 0.5 only applies to merge 'diverse', got merge 'max'"),
    (["-n", "100000"], "error: n must be at most the catalogue's"),
])
def test_cli_recommend_bad_merge_input_is_one_error_line(served, capsys, extra, message):
    data, _, out = served
    history = ",".join(str(int(r)) for r in data.item_raw_ids[1:5])
    assert main(["recommend", "--model", str(out / "model"), "--history", history, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err


def test_cli_recommend_and_evaluate_with_a_merge(served, capsys):
    data, _, out = served
    history = ",".join(str(int(r)) for r in data.item_raw_ids[1:9])
    assert main(["recommend", "--model", str(out / "model"), "--history", history, "-n", "5",
                 "--merge", "diverse", "--diversity", "0.3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    want = load(out / "model").recommend(history.split(","), n=5, merge="diverse", diversity=0.3)
    assert [line.split("[")[1].split("]")[0] for line in lines] == [str(r) for r, *_ in want]
    syn = ["--data", "synthetic", "--users", "80", "--items", "100", "--max-len", "10"]
    assert main(["evaluate", "--checkpoint", str(out / "run" / "nope.pt"), "--merge", "x", *syn]) == 2
    assert capsys.readouterr().err.strip() == "error: --merge must be one of max, quota, diverse, got 'x'"


def test_frontier_help():
    with pytest.raises(SystemExit) as exc:
        main(["frontier", "--help"])
    assert exc.value.code == 0


def test_top_exact_ranks_a_batch_as_each_user_alone_to_the_bit():
    """The batched rescoring (one (B, C, d) einsum per interest) gives each user the items and float64
    scores that scoring its candidates alone gives; 0 = no candidate; fewer than n candidates pad -1."""
    from mind.merge import _exact_scores, _rank, top_exact
    rng = np.random.default_rng(3)
    E = rng.standard_normal((301, 24)).astype(np.float32)
    U64 = rng.standard_normal((40, 4, 24))
    cands = np.stack([rng.permutation(np.arange(1, 301))[:30] for _ in range(40)])
    cands[rng.random(cands.shape) < 0.3] = 0
    cands[5] = 0
    cands[6, 3:] = 0
    for n in (1, 10, 30):
        items, scores = top_exact(U64, E, cands, n)
        for u in range(40):
            c = cands[u][cands[u] > 0]
            want_i, want_s = _rank(c, _exact_scores(U64[u], E[c].astype(np.float64)), n)
            np.testing.assert_array_equal(items[u, :len(want_i)], want_i)
            np.testing.assert_array_equal(scores[u, :len(want_s)], want_s)
            assert (items[u, len(want_i):] == -1).all() and np.isneginf(scores[u, len(want_s):]).all()
