"""Faults: a training run SIGKILLed at random points always leaves a loadable checkpoint and
resumes to the same result as an uninterrupted run; a truncated or corrupt checkpoint is a
clear error naming the file (CLI exit status 2), never a silent fresh start.

The kills: ``python -m mind train`` (synthetic data, tiny model, 8 epochs of ~0.25 s) runs in
its own process group; once it prints its first epoch line (so a checkpoint has been written
at least once in this run, or it has just resumed), it is SIGKILLed after a delay drawn from
a seeded RNG, U(0, 1.5) s, which lands anywhere in an epoch, including inside a checkpoint
write.  Three kills, each followed by the checks, then a ``--resume`` run to the end.
"""

import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from mind.checkpoint import load_checkpoint
from mind.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
EPOCHS = 8
ARGS = ["--data", "synthetic", "--users", "600", "--dim", "16", "--negatives", "50",
        "--batch-size", "128", "--patience", "100", "--no-progress", "--threads", "1", "--seed", "0"]
REQUIRED = ("model", "optimizer", "epoch", "rng", "config", "best_metric", "best_epoch", "bad_epochs", "history")


def _cmd(out, *extra):
    return [sys.executable, "-m", "mind", "train", *ARGS, "--epochs", str(EPOCHS), "--out", str(out), *extra]


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _run_to_end(args, timeout=120) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(args)}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _start_and_kill(args, delay: float, timeout=60) -> str:
    """Start ``args``; once it prints an epoch line, wait ``delay`` s and SIGKILL it. Returns its output."""
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines, training = [], threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("epoch "):
                training.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        if not training.wait(timeout):
            pytest.fail(f"no epoch finished within {timeout}s:\n{''.join(lines)[-3000:]}")
        time.sleep(delay)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        t.join(timeout=30)
    return "".join(lines)


@pytest.mark.timeout(300)
def test_sigkill_at_random_points_then_resume_matches_uninterrupted(tmp_path):
    rng = random.Random(20240611)
    run = tmp_path / "killed"
    last = run / "last.pt"
    epochs_seen = []
    for kill in range(3):
        delay = rng.uniform(0.0, 1.5)
        out = _start_and_kill(_cmd(run, *(["--resume"] if last.exists() else [])), delay)
        if kill > 0:
            assert f"after epoch {epochs_seen[-1]}" in out, out[-2000:]      # resumed, not restarted
        state = load_checkpoint(last, required=REQUIRED)                     # always loads: atomic writes
        e = int(state["epoch"])
        assert [r["epoch"] for r in state["history"]] == list(range(1, e + 1))
        assert not epochs_seen or e >= epochs_seen[-1]
        epochs_seen.append(e)
        if e == EPOCHS:
            break
    # finish: resume continues from the checkpoint's epoch and completes
    done = _run_to_end(_cmd(run, "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    if epochs_seen[-1] < EPOCHS:
        assert f"resumed from {last} after epoch {epochs_seen[-1]}" in done.stdout, done.stdout[-2000:]
    final = load_checkpoint(last, required=REQUIRED)
    assert final["epoch"] == EPOCHS
    assert [r["epoch"] for r in final["history"]] == list(range(1, EPOCHS + 1))
    assert (run / "final_metrics.json").is_file()

    # resume is exact: killed-and-resumed ends bit-identical to an uninterrupted run
    clean = _run_to_end(_cmd(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr[-3000:]
    ref = load_checkpoint(tmp_path / "clean" / "last.pt")
    for k, v in ref["model"].items():
        assert torch.equal(v, final["model"][k]), k
    assert [r["train_loss"] for r in ref["history"]] == [r["train_loss"] for r in final["history"]]
    print(f"checkpoint epoch after each kill: {epochs_seen}")


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A finished 1-epoch run (in-process) whose last.pt the corruption tests damage copies of."""
    import shutil

    torch.set_num_threads(1)
    src = tmp_path_factory.mktemp("faults") / "run"
    args = ["train", "--data", "synthetic", "--dim", "8", "--negatives", "20", "--epochs", "1",
            "--no-progress", "--out", str(src)]
    assert main(args) == 0

    def copy(dst):
        shutil.copytree(src, dst)
        return dst, args[:-1] + [str(dst)]
    return copy


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_is_a_clear_cli_error(one_epoch, tmp_path, capsys, damage):
    run, args = one_epoch(tmp_path / "run")
    last = run / "last.pt"
    data = last.read_bytes()
    bad = {"truncate": data[: len(data) // 3], "garbage": b"\x00not a checkpoint" * 50, "empty": b""}[damage]
    last.write_bytes(bad)
    capsys.readouterr()
    args = [a if a != "1" else "3" for a in args] + ["--resume"]            # ask for 2 more epochs
    assert main(args) == 2
    err = capsys.readouterr().err
    if damage == "garbage":   # not ours: our own words, and never torch's advice to unpickle it
        assert err.startswith(f"error: {last} is not a MIND checkpoint (written by python -m mind train): "), err
        assert "weights_only" not in err, err
    else:
        assert err.startswith("error: checkpoint ") and str(last) in err and "truncated or corrupt" in err, err
    assert last.read_bytes() == bad                                      # nothing trained, nothing overwritten
    assert not (run / "metrics.json").read_text().count('"epoch": 2')


def test_corrupt_checkpoint_subprocess_exit_status(one_epoch, tmp_path):
    run, args = one_epoch(tmp_path / "run")
    last = run / "last.pt"
    last.write_bytes(last.read_bytes()[:-100])
    proc = _run_to_end([sys.executable, "-m", "mind", *args, "--resume"], timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert f"error: checkpoint {last} is truncated or corrupt" in proc.stderr
    assert "Traceback" not in proc.stderr and "epoch 1: loss" not in proc.stdout



def test_resume_without_checkpoint_is_a_clear_cli_error(one_epoch, tmp_path, capsys):
    run, args = one_epoch(tmp_path / "run")
    (run / "last.pt").unlink()
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert f"error: checkpoint {run / 'last.pt'} does not exist" in err, err
    assert not (run / "last.pt").exists()                                # no silent fresh start
