"""python -m mind sweep on tiny planted data: the protocol (valid-only choice, test read once), its files."""

import json
import math

import pytest

from mind.sweep import run_sweep

BASE = dict(dim=8, max_len=10, batch_size=64, epochs=2, num_negatives=20, patience=5)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_sweep_chooses_on_valid_and_reads_test_for_the_chosen_only(tiny, tmp_path, monkeypatch):
    import mind.sweep as sweep
    monkeypatch.setattr(sweep, "SWEEP_BASE", {**sweep.SWEEP_BASE, **BASE})
    monkeypatch.setattr(sweep, "_DATA", None)   # run_sweep(data=...) sets it; restored after the test
    cands = {"K=1 a": dict(num_interests=1), "K=1 b": dict(num_interests=1, h_out_activation="linear"),
             "K=4 a": dict(num_interests=4, p=math.inf, routing_init_std=1.0),
             "K=4 max": dict(num_interests=4, scoring="max", h_out_activation="linear")}
    # tiny models' interests nearly coincide: no distinctness constraint here (max_cosine=1)
    res = run_sweep(out_dir=tmp_path, candidates=cands, screen_seeds=(0,), seeds=(0, 1), finalists=1,
                    data=tiny, max_cosine=1.0, jobs=2, log=lambda *_: None)   # jobs=2: forked workers
    # one finalist per group, chosen = that finalist, which had the best screen score in its group
    assert len(res["finalists"]) == 2
    for group, names in (("K=1", ["K=1 a", "K=1 b"]), ("K>1", ["K=4 a", "K=4 max"])):
        best = max(names, key=lambda n: res["screen_valid_recall@50"][n])
        assert res["chosen"][group] == best
        assert sorted(res["valid_runs"][best]) == [0, 1]                 # finalists got every seed
        others = [n for n in names if n != best]
        assert all(sorted(res["valid_runs"][n]) == [0] for n in others)  # the rest only the screen
        vals = [res["valid_runs"][best][s]["valid"]["recall@50"] for s in (0, 1)]
        assert res["final_valid"][best]["recall@50"]["mean"] == pytest.approx(sum(vals) / 2)
    # test numbers exist for the two chosen configurations only
    assert set(res["chosen_test_runs"]) == {"K=1", "K>1"}
    saved = json.loads((tmp_path / "sweep.json").read_text())              # strict JSON (p = inf as "inf")
    assert saved["candidates"]["K=4 a"]["p"] == "inf"
    text = (tmp_path / "sweep.md").read_text()
    assert "(chosen)" in text and "test recall@50" in text and len(res["checks"]) == 4
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_sweep_refuses_candidates_without_both_groups(tiny, tmp_path, monkeypatch):
    import mind.sweep as sweep
    monkeypatch.setattr(sweep, "_DATA", None)
    with pytest.raises(ValueError, match="K=1 and one K>1"):
        run_sweep(out_dir=tmp_path, candidates={"K=4": dict(num_interests=4)}, data=tiny, log=lambda *_: None)
    with pytest.raises(ValueError, match="screen seeds"):
        run_sweep(out_dir=tmp_path, candidates={"a": dict(num_interests=1), "b": dict(num_interests=4)},
                  screen_seeds=(7,), seeds=(0, 1), data=tiny, log=lambda *_: None)


def test_sweep_keeps_collapsed_interests_out_of_the_final(tiny, tmp_path, monkeypatch):
    import mind.sweep as sweep
    monkeypatch.setattr(sweep, "SWEEP_BASE", {**sweep.SWEEP_BASE, **BASE, "epochs": 1})
    monkeypatch.setattr(sweep, "_DATA", None)
    cands = {"K=1": dict(num_interests=1), "K=4": dict(num_interests=4)}
    with pytest.raises(RuntimeError, match="interest cosine <= -1.5"):   # no cosine is below -1
        run_sweep(out_dir=tmp_path, candidates=cands, seeds=(0, 1), data=tiny, max_cosine=-1.5,
                  log=lambda *_: None)
