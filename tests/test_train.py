"""Training: planted-interest recovery, checkpoints, exact resume, corrupt-checkpoint errors."""

import collections
import json
import math
import random

import numpy as np
import pytest
import torch

from mind.checkpoint import (CheckpointError, get_rng_state, load_checkpoint, save_checkpoint,
                             set_rng_state)
from mind.data import make_synthetic, prepare
from mind.evaluate import evaluate_rankings, most_popular_rankings
from mind.train import TrainConfig, train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted():
    raw, truth = make_synthetic(num_users=300, num_items=400, num_clusters=8, interests_per_user=(2, 3),
                                seq_len=(20, 40), seed=0)
    return prepare(raw, max_len=20), truth


def _cfg(tmp_path, **kw):
    base = dict(dim=16, num_interests=4, max_len=10, batch_size=64, epochs=2, num_negatives=20, lr=3e-3,
                patience=5, seed=3, progress=False, out_dir=str(tmp_path / "run"))
    base.update(kw)
    return TrainConfig(**base)


def test_planted_interests_are_recovered(planted, tmp_path):
    data, truth = planted
    # the paper's regime (sigma = 1, hard label-aware attention) keeps the K interests distinct
    cfg = TrainConfig(dim=32, num_interests=4, max_len=20, batch_size=128, epochs=6, num_negatives=50,
                      lr=5e-3, patience=10, seed=0, p=math.inf, routing_init_std=1.0, progress=False,
                      out_dir=str(tmp_path / "syn"))
    result = train(data, cfg, log=lambda *_: None)
    test = result.test_metrics
    pop = evaluate_rankings(most_popular_rankings(data.item_counts, len(data.test), 50,
                                                  exclude=data.test.full_histories), data.test.targets)
    # a user's future items come from its 2-3 planted clusters (of 8): MIND must find them
    assert test["recall@20"] > 2 * pop["recall@20"], (test, pop)
    assert test["recall@50"] > pop["recall@50"] + 0.1, (test, pop)

    cluster_of = {i: truth["item_cluster"][int(r)] for i, r in enumerate(data.item_raw_ids) if i > 0}
    model = result.model.eval()
    with torch.no_grad():
        V, _, w = model.interests(data.test.histories, data.user_features[data.test.user_index],
                                  return_weights=True)
        table = model.item_embeddings()

    def concentration(items):
        counts = collections.Counter(cluster_of[int(i)] for i in items)
        return max(counts.values()) / len(items)

    # Each interest retrieves from ONE cluster: a user's top-20 drawn from its 2-3 clusters
    # would have concentration ~0.4-0.6.
    retrieved = [concentration(torch.topk(table[1:] @ V[u, k], 20).indices + 1)
                 for u in range(len(data.test)) for k in range(V.shape[1])]
    assert np.mean(retrieved) > 0.85, np.mean(retrieved)

    # The routing groups history items by cluster: the purity of the argmax assignment beats
    # the same assignment with the items shuffled (chance, same group sizes).
    rng = np.random.default_rng(0)
    observed, shuffled = [], []
    for u in range(len(data.test)):
        hist = data.test.histories[u]
        pos = torch.nonzero(hist).flatten()
        owner = w[u][:, pos].argmax(0).numpy()
        items = hist[pos].numpy()
        perm = rng.permutation(items)
        for k in np.unique(owner):
            if (owner == k).sum() >= 2:
                observed.append(concentration(items[owner == k]))
                shuffled.append(concentration(perm[owner == k]))
    assert np.mean(observed) > np.mean(shuffled) + 0.1, (np.mean(observed), np.mean(shuffled))

    # files a user is told about
    out = result.out_dir
    for name in ("metrics.json", "metrics.csv", "final_metrics.json", "learning_curves.png", "split.json",
                 "last.pt", "best.pt"):
        assert (out / name).is_file(), name


def test_resume_matches_uninterrupted_run(tiny, tmp_path):
    full = train(tiny, _cfg(tmp_path / "a", epochs=2), log=lambda *_: None)
    train(tiny, _cfg(tmp_path / "b", epochs=1), log=lambda *_: None)
    messages = []
    resumed = train(tiny, _cfg(tmp_path / "b", epochs=2), resume=True, log=messages.append)
    assert any("resumed" in m and "after epoch 1" in m for m in messages)
    a = load_checkpoint(tmp_path / "a" / "run" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "run" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert [r["epoch"] for r in b["history"]] == [1, 2]
    assert a["history"][1]["train_loss"] == b["history"][1]["train_loss"]
    assert full.test_metrics == resumed.test_metrics


LEVERS = dict(scoring="max", h_out_activation="linear", loss="sampled", hard_negative_beta=0.5, diversity_lambda=0.1,
              stochastic_selection=False, routing_init_std=1.0, target_window=3)


def test_levers_train_deterministically_resume_exactly_and_are_recorded(tiny, tmp_path):
    full = train(tiny, _cfg(tmp_path / "a", epochs=2, **LEVERS), log=lambda *_: None)
    again = train(tiny, _cfg(tmp_path / "c", epochs=2, **LEVERS), log=lambda *_: None)
    assert full.history[-1]["train_loss"] == again.history[-1]["train_loss"]
    assert full.test_metrics == again.test_metrics
    train(tiny, _cfg(tmp_path / "b", epochs=1, **LEVERS), log=lambda *_: None)
    resumed = train(tiny, _cfg(tmp_path / "b", epochs=2, **LEVERS), resume=True, log=lambda *_: None)
    assert full.test_metrics == resumed.test_metrics
    saved = json.loads((tmp_path / "a" / "run" / "config.json").read_text())
    assert {k: saved[k] for k in LEVERS} == LEVERS
    # a lever is part of the optimisation: resuming with another value is refused
    with pytest.raises(CheckpointError, match="diversity_lambda"):
        train(tiny, _cfg(tmp_path / "b", epochs=3, **{**LEVERS, "diversity_lambda": 0.2}), resume=True)
    # the stochastic selection path trains and changes the result (it draws the interest)
    stoch = train(tiny, _cfg(tmp_path / "d", epochs=1, **{**LEVERS, "scoring": "attention", "p": math.inf,
                                                           "stochastic_selection": True}), log=lambda *_: None)
    assert math.isfinite(stoch.history[0]["train_loss"])


def test_corrupt_checkpoint_raises_naming_file(tiny, tmp_path):
    cfg = _cfg(tmp_path, epochs=1)
    train(tiny, cfg, log=lambda *_: None)
    last = tmp_path / "run" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"last\.pt.*(truncated|corrupt)"):
        train(tiny, _cfg(tmp_path, epochs=2), resume=True)
    last.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"last\.pt"):
        train(tiny, _cfg(tmp_path, epochs=2), resume=True)


def test_resume_without_checkpoint_or_with_other_config_raises(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        train(tiny, _cfg(tmp_path), resume=True)
    train(tiny, _cfg(tmp_path, epochs=1), log=lambda *_: None)
    with pytest.raises(CheckpointError, match="different config"):
        train(tiny, _cfg(tmp_path, epochs=2, dim=8), resume=True)


def test_atomic_save_leaves_no_temp_files(tmp_path):
    path = save_checkpoint({"x": torch.arange(3)}, tmp_path / "c.pt")
    save_checkpoint({"x": torch.arange(4)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    assert torch.equal(load_checkpoint(path, required=("x",))["x"], torch.arange(4))
    with pytest.raises(CheckpointError, match=r"lacks required entries \['y'\]"):
        load_checkpoint(path, required=("x", "y"))


def test_rng_state_round_trip_through_checkpoint(tmp_path):
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    save_checkpoint({"rng": get_rng_state()}, tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_future_targets_stay_inside_each_users_sequence():
    from mind.train import draw_targets, future_targets
    users = torch.tensor([0, 0, 0, 1, 1])
    targets = torch.tensor([5, 6, 7, 8, 9])
    fut = future_targets(users, targets, 3)
    assert fut.tolist() == [[5, 6, 7], [6, 7, 0], [7, 0, 0], [8, 9, 0], [9, 0, 0]]
    assert torch.equal(future_targets(users, targets, 1)[:, 0], targets)
    torch.manual_seed(0)
    draws = torch.stack([draw_targets(fut) for _ in range(2000)])            # (2000, 5)
    for row in range(5):
        allowed = {int(x) for x in fut[row] if x != 0}
        seen = {int(x) for x in draws[:, row]}
        assert seen == allowed, (row, seen, allowed)                          # every allowed item, nothing else
    assert abs(float((draws[:, 0] == 5).double().mean()) - 1 / 3) < 0.04     # uniform over the window
