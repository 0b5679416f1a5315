"""``--sharded-embeddings``: the TorchRec-sharded item table against DDP with the same table optimizer.

Two gloo processes under torchrun on synthetic data (300 users, 400 items, d = 16, global batch 128,
sampled softmax: 50 steps of 2 x 64 examples).  The sharded run and the DDP run with
``--table-optimizer adagrad`` make the same update (mind/sharded.py), so every step's loss agrees to
float rounding: measured 4.8e-7 at most (relative 1.6e-7) over the 50 steps, asserted at 1e-5
relative.  A run whose table got two Adagrad updates per step, or a gradient scaled by 1/W twice,
differs by 1e-5..1e-3 from step 2 on (both were seen while building it) and fails.

Without torchrec installed these tests are skipped, except the one that checks the error line.
"""

import importlib.util
import json
import pathlib
import sys

import pytest
import torch

from mind import cli
from mind.checkpoint import load_checkpoint
from mind.sharded import INSTALL
from test_distributed import _free_port as free_port, _run as run_in_group  # one subprocess runner

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMON = ["--data", "synthetic", "--users", "300", "--dim", "16", "--negatives", "50",
          "--batch-size", "128", "--no-progress", "--threads", "1", "--loss", "sampled", "--seed", "0"]
# find_spec, not an import: importing torchrec here would load FBGEMM into every later test of this process
needs_torchrec = pytest.mark.skipif(importlib.util.find_spec("torchrec") is None,
                                    reason="torchrec is not installed (the [scale] extra: requirements/scale.txt)")


def _run(args, timeout=300) -> str:
    proc = run_in_group(args, timeout)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def _train(out_dir, *extra, ranks=2) -> str:
    """`train` under torchrun through tests/sharded_worker.py, which records every step's loss."""
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                 "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                 str(ROOT / "tests" / "sharded_worker.py"), str(out_dir), *COMMON, *extra])


def _losses(out_dir, rank=0) -> list:
    return json.loads((pathlib.Path(out_dir) / f"losses_rank{rank}.json").read_text())


def test_without_torchrec_the_flag_is_an_error_line(monkeypatch, capsys):
    import mind.sharded
    monkeypatch.setattr(mind.sharded, "torchrec_available", lambda: False)
    code = cli.main(["train", *COMMON, "--sharded-embeddings", "--epochs", "1", "--out", "/nonexistent/never"])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {INSTALL}" in err and "Traceback" not in err


def test_sharded_table_refuses_adamw_and_odd_dims(capsys):
    assert cli.main(["train", *COMMON, "--sharded-embeddings", "--table-optimizer", "adamw", "--out", "/x"]) == 2
    assert "cannot train a sharded table" in capsys.readouterr().err
    assert cli.main(["train", *COMMON, "--dim", "18", "--sharded-embeddings", "--out", "/x"]) == 2
    assert "multiple of 4" in capsys.readouterr().err


@needs_torchrec
@pytest.mark.timeout(900)
def test_two_sharded_ranks_match_ddp_step_by_step_then_resume_and_export(tmp_path):
    sharded = _train(tmp_path / "sharded", "--epochs", "2", "--sharded-embeddings")
    ddp = _train(tmp_path / "ddp", "--epochs", "2", "--table-optimizer", "adagrad")
    assert "sharded item table: TorchRec over 2 rank(s)" in sharded and "row_wise" in sharded
    assert "sharded item table" not in ddp
    for rank in (0, 1):
        a, b = _losses(tmp_path / "sharded", rank), _losses(tmp_path / "ddp", rank)
        assert len(a) == len(b) == 100                       # 2 epochs x 50 steps on each rank
        assert a != _losses(tmp_path / "sharded", 1 - rank)   # the ranks saw different examples
        worst = max(abs(x - y) / abs(y) for x, y in zip(a[:50], b[:50]))
        assert worst < 1e-5, worst
    final = {name: json.loads((tmp_path / name / "final_metrics.json").read_text()) for name in ("sharded", "ddp")}
    recall = {name: next(r for r in rows if r["split"] == "valid")["recall@50"] for name, rows in final.items()}
    assert abs(recall["sharded"] - recall["ddp"]) < 0.005, recall

    # the checkpoints have the single-process layout: the whole table, and evaluate reads them
    state = load_checkpoint(tmp_path / "sharded" / "best.pt")["model"]
    ref = load_checkpoint(tmp_path / "ddp" / "best.pt")["model"]
    assert state.keys() == ref.keys() and state["item_id_embedding.weight"].shape == (401, 16)
    assert torch.allclose(state["item_id_embedding.weight"], ref["item_id_embedding.weight"], atol=1e-4)
    out = _run([sys.executable, "-m", "mind", "evaluate", "--checkpoint", str(tmp_path / "sharded" / "best.pt"),
                "--data", "synthetic", "--users", "300"])
    want = next(r for r in final["sharded"] if r["split"] == "valid")
    assert f"| valid | {want['recall@20']:.4f}" in out, out[-2000:]

    # resume: one epoch, then --resume to two, gives the uninterrupted run's table and Adagrad state bit for bit
    _train(tmp_path / "resumed", "--epochs", "1", "--sharded-embeddings")
    _train(tmp_path / "resumed", "--epochs", "2", "--sharded-embeddings", "--resume")
    whole, resumed = (load_checkpoint(tmp_path / d / "last.pt") for d in ("sharded", "resumed"))
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert torch.equal(whole["optimizer"]["table_sum"], resumed["optimizer"]["table_sum"])
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "sharded")[50:]


@needs_torchrec
@pytest.mark.timeout(600)
def test_one_sharded_rank_matches_single_process_adagrad(tmp_path):
    _train(tmp_path / "sharded", "--epochs", "1", "--sharded-embeddings", ranks=1)
    single = tmp_path / "single"
    _run([sys.executable, str(ROOT / "tests" / "sharded_worker.py"), str(single), *COMMON, "--epochs", "1",
          "--table-optimizer", "adagrad"])
    a, b = _losses(tmp_path / "sharded"), _losses(single)
    assert len(a) == len(b) > 40
    assert max(abs(x - y) / abs(y) for x, y in zip(a, b)) < 1e-5
