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
    # the default recipe keeps the K interests distinct
    cfg = TrainConfig(dim=32, num_interests=4, max_len=20, batch_size=128, epochs=6, num_negatives=50,
                      lr=5e-3, patience=10, seed=0, progress=False,
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


@pytest.mark.parametrize("recipe", ["default", "paper"])
def test_recipes_train_deterministically_resume_exactly_and_are_recorded(tiny, tmp_path, recipe):
    kw = dict(recipe=recipe, loss="sampled")
    full = train(tiny, _cfg(tmp_path / "a", epochs=2, **kw), log=lambda *_: None)
    again = train(tiny, _cfg(tmp_path / "c", epochs=2, **kw), log=lambda *_: None)
    assert full.history[-1]["train_loss"] == again.history[-1]["train_loss"]
    assert full.test_metrics == again.test_metrics
    train(tiny, _cfg(tmp_path / "b", epochs=1, **kw), log=lambda *_: None)
    resumed = train(tiny, _cfg(tmp_path / "b", epochs=2, **kw), resume=True, log=lambda *_: None)
    assert full.test_metrics == resumed.test_metrics
    saved = json.loads((tmp_path / "a" / "run" / "config.json").read_text())
    assert saved["recipe"] == recipe and saved["loss"] == "sampled"
    # the paper's head ends in a ReLU, the default one is linear
    assert isinstance(full.model.h_layers[-1], torch.nn.ReLU) == (recipe == "paper")
    assert full.model.config["h_out_activation"] == ("relu" if recipe == "paper" else "linear")
    # the recipe and lambda are part of the optimisation: resuming with another value is refused
    with pytest.raises(CheckpointError, match="diversity_lambda"):
        train(tiny, _cfg(tmp_path / "b", epochs=3, **{**kw, "diversity_lambda": 0.2}), resume=True)
    other = "paper" if recipe == "default" else "default"
    with pytest.raises(CheckpointError, match="recipe"):
        train(tiny, _cfg(tmp_path / "b", epochs=3, **{**kw, "recipe": other}), resume=True)


def test_a_checkpoint_of_the_earlier_config_format_loads_for_evaluation_but_does_not_resume(tiny, tmp_path):
    from mind.train import load_trained
    res = train(tiny, _cfg(tmp_path, epochs=1, recipe="paper"), log=lambda *_: None)
    for name in ("best.pt", "last.pt"):
        state = load_checkpoint(tmp_path / "run" / name)
        # as the earlier version wrote it: no config_format, the paper's head implied by a missing
        # h_out_activation, the research levers in the config and routing_weight_scale in the model's
        state.pop("config_format")
        state["model_config"].pop("h_out_activation")
        state["model_config"]["routing_weight_scale"] = 1.0
        cfg = {k: v for k, v in state["config"].items() if k != "recipe"}
        state["config"] = {**cfg, "scoring": "attention", "p": math.inf, "h_out_activation": "relu",
                           "hard_negative_beta": 0.0, "target_window": 1, "fused_loss": True}
        save_checkpoint(state, tmp_path / "run" / name)
    model, saved = load_trained(tmp_path / "run" / "best.pt")
    assert saved["max_len"] == 10 and isinstance(model.h_layers[-1], torch.nn.ReLU)
    for key, value in res.model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    with pytest.raises(CheckpointError, match="earlier mind-kernels.*config format 1"):
        train(tiny, _cfg(tmp_path, epochs=2, recipe="paper"), resume=True)


def test_train_flags_are_generated_from_the_config_with_its_defaults():
    import dataclasses
    from mind.cli import build_parser
    args = build_parser().parse_args(["train"])
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    flagged = [f for f in fields.values() if f.metadata.get("flag")]
    assert flagged and all(getattr(args, f.name) == f.default for f in flagged)
    assert len(fields) <= 30
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {s for a in train_parser._actions for s in a.option_strings if s.startswith("--")}
    assert len(flags) <= 32, sorted(flags)


@pytest.mark.parametrize("bad, match", [(dict(lr=-1e-3), "lr"), (dict(diversity_lambda=-1.0), "diversity_lambda"),
                                        (dict(recipe="mine"), "recipe"), (dict(dim=0), "dim"),
                                        (dict(loss="exact"), "loss"), (dict(num_negatives=1.5), "num_negatives")])
def test_config_refuses_bad_values_naming_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


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
