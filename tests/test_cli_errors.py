"""The CLI never shows a traceback for a user's mistake.

Every case runs ``python -m mind ...`` in a subprocess and checks: exit status 2, one
``error: ...`` line on stderr naming the file and the problem, no traceback.  The cases share one
tiny trained model (and its export) built once per module, and run four subprocesses at a time.
Also: the unknown-id warning without a source line, explain's default PNG path, and the
early-stopping line.
"""

import concurrent.futures
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from mind.data import make_synthetic, prepare
from mind.data.loaders import DataFormatError, load_movielens_raw, load_recbole
from mind.serve import export, load
from mind.train import TrainConfig, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
SYN = ["--data", "synthetic", "--users", "40", "--items", "60"]


def _inter_lines(rating_at_3="4"):
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"{u}\t{i}\t{rating_at_3 if n == 1 else '3'}\t{100 + n}"
              for n, (u, i) in enumerate([(1, 10), (1, 11), (2, 10), (2, 12)])]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A trained run (best.pt), its export, and the damaged copies and data folders the cases use."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("cli_errors")
    raw, _ = make_synthetic(num_users=60, num_items=80, num_clusters=4, seq_len=(10, 20), seed=1)
    data = prepare(raw, max_len=10)
    cfg = TrainConfig(dim=8, num_interests=2, max_len=10, batch_size=64, epochs=1, num_negatives=20, seed=0,
                      progress=False, out_dir=str(base / "run"))
    result = train(data, cfg, log=lambda *_: None)
    export(result.model, data, base / "model")
    (base / "history.txt").write_text(",".join(str(int(r)) for r in data.item_raw_ids[1:6]))

    shutil.copytree(base / "model", base / "badmeta")
    (base / "badmeta" / "meta.json").write_text('{"format": "mind-export/1", "max_len": ')
    shutil.copytree(base / "model", base / "badnpy")
    npy = base / "badnpy" / "item_embeddings.npy"
    npy.write_bytes(npy.read_bytes()[: npy.stat().st_size // 2])

    best = (base / "run" / "best.pt").read_bytes()
    (base / "trunc.pt").write_bytes(best[: len(best) // 3])
    (base / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 50)
    (base / "pickle.pt").write_bytes(pickle.dumps({"model": 1}))
    (base / "afile").write_text("not a folder\n")

    (base / "X").mkdir()                                       # folder X, files named Y.*
    (base / "X" / "Y.inter").write_text(_inter_lines())
    (base / "rb").mkdir()
    (base / "rb" / "rb.inter").write_text(_inter_lines(rating_at_3="three"))
    (base / "ml").mkdir()
    (base / "ml" / "u.data").write_text("1\t10\t4\t100\n1\t11\tthree\t101\n")
    return base


def _cases(b: pathlib.Path) -> dict:
    """name -> (argv after ``python -m mind``, substrings the error line must hold)."""
    hist = (b / "history.txt").read_text() if (b / "history.txt").is_file() else "1"
    cases = {}
    for verb in ("recommend", "explain"):
        cases.update({
            f"{verb}-missing-folder": ([verb, "--model", str(b / "nope"), "--history", hist],
                                       [f"model folder {b / 'nope'} does not exist", "python -m mind export"]),
            f"{verb}-checkpoint-file": ([verb, "--model", str(b / "run" / "best.pt"), "--history", hist],
                                        [f"{b / 'run' / 'best.pt'} is a training checkpoint, not a MIND export "
                                         "folder", "python -m mind export"]),
            f"{verb}-corrupt-meta": ([verb, "--model", str(b / "badmeta"), "--history", hist],
                                     [f"{b / 'badmeta' / 'meta.json'} is corrupt: not valid JSON"]),
            f"{verb}-truncated-npy": ([verb, "--model", str(b / "badnpy"), "--history", hist],
                                      [f"{b / 'badnpy' / 'item_embeddings.npy'} is truncated or corrupt"]),
        })
    cases.update({
        "train-folder-name-differs": (["train", "--data", "dir", "--data-dir", str(b / "X"), "--format", "recbole",
                                       "--out", str(b / "r1"), "--no-progress"],
                                      [f"data file not found: {b / 'X' / 'X.inter'}", "it holds Y.inter",
                                       "rename the folder to 'Y'"]),
        "train-recbole-rating-three": (["train", "--data-dir", str(b / "rb"), "--format", "recbole",
                                        "--out", str(b / "r2"), "--no-progress"],
                                       [f"{b / 'rb' / 'rb.inter'}:3: rating is not a number: 'three'"]),
        "train-movielens-rating-three": (["train", "--data-dir", str(b / "ml"), "--format", "movielens",
                                          "--out", str(b / "r3"), "--no-progress"],
                                         [f"{b / 'ml' / 'u.data'}:2: rating is not a number: 'three'"]),
        "train-no-data-dir": (["train", "--data", "dir", "--out", str(b / "r4"), "--no-progress"],
                              ["--data dir needs --data-dir PATH"]),
        "train-negative-lambda": (["train", *SYN, "--diversity-lambda", "-1", "--out", str(b / "r5"),
                                   "--no-progress"], ["diversity_lambda must be a finite number >= 0, got -1.0"]),
        "train-zero-batch": (["train", *SYN, "--batch-size", "0", "--out", str(b / "r6"), "--no-progress"],
                             ["batch_size must be an integer >= 1, got 0"]),
        "evaluate-truncated-checkpoint": (["evaluate", "--checkpoint", str(b / "trunc.pt"), *SYN],
                                          [f"checkpoint {b / 'trunc.pt'} is truncated or corrupt: its zip archive "
                                           "is incomplete or damaged"]),
        "evaluate-pickle-checkpoint": (["evaluate", "--checkpoint", str(b / "pickle.pt"), *SYN],
                                       [f"{b / 'pickle.pt'} is not a MIND checkpoint (written by python -m mind "
                                        "train): not a torch.save archive"]),
        "evaluate-export-folder-as-checkpoint": (["evaluate", "--checkpoint", str(b / "model"), *SYN],
                                                 [f"checkpoint {b / 'model'} is a folder, not a checkpoint file"]),
        "evaluate-checkpoint-of-other-data": (["evaluate", "--checkpoint", str(b / "run" / "best.pt"), *SYN],
                                              [f"checkpoint {b / 'run' / 'best.pt'} does not fit this data",
                                               "pass the data options it was trained with"]),
        "export-garbage-checkpoint": (["export", "--checkpoint", str(b / "garbage.pt"), "--out", str(b / "e"), *SYN],
                                      [f"{b / 'garbage.pt'} is not a MIND checkpoint (written by python -m mind "
                                       "train): not a torch.save archive"]),
        "quality-out-is-a-file": (["quality", "--out", str(b / "afile"), "--no-progress"],
                                  [f"{b / 'afile'}: File exists"]),
    })
    return cases


def _run(argv, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "mind", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def runs(base):
    """Every case (and the warning and explain runs below), four subprocesses at a time."""
    cwd = base / "cwd"
    cwd.mkdir()
    todo = {name: argv for name, (argv, _) in _cases(base).items()}
    hist = (base / "history.txt").read_text()
    todo["recommend-unknown-id"] = ["recommend", "--model", str(base / "model"), "--history", hist + ",nope", "-n", "3"]
    todo["explain-default-png"] = ["explain", "--model", str(base / "model"), "--history", hist]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = {name: pool.submit(_run, argv, cwd) for name, argv in todo.items()}
        return {name: f.result() for name, f in futures.items()}


CASE_NAMES = sorted(_cases(pathlib.Path("/b")))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_user_mistake_is_one_error_line_and_exit_2(base, runs, case):
    _, expected = _cases(base)[case]
    proc = runs[case]
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for words in expected:
        assert words in lines[0], (words, lines[0])
    assert "weights_only=False" not in proc.stderr and "PytorchStreamReader" not in proc.stderr


def test_unknown_id_warning_is_one_line_without_source(runs):
    proc = runs["recommend-unknown-id"]
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == ["warning: dropping 1 unknown item id(s) not in the catalogue: "
                                                "['nope']"], proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 3


def test_unknown_id_warning_points_at_the_caller(base):
    rec = load(base / "model")
    hist = (base / "history.txt").read_text().split(",")
    for call in (lambda: rec.recommend(hist + ["nope"], n=3),
                 lambda: rec.recommend_batch([hist, hist + ["nope"]], n=3),
                 lambda: rec.interests([hist + ["nope"]])):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            call()
        assert len(got) == 1 and got[0].filename == __file__, [(w.filename, w.lineno) for w in got]


def test_explain_writes_png_into_the_model_folder(base, runs):
    proc = runs["explain-default-png"]
    assert proc.returncode == 0, proc.stderr
    png = base / "model" / "explain.png"
    assert png.stat().st_size > 1000
    assert f"coupling-weight heatmap written to {png}" in proc.stdout
    assert not (base / "cwd" / "explain.png").exists()


def test_non_numeric_rating_is_refused_in_process(base):
    with pytest.raises(DataFormatError, match="rating is not a number") as e:
        load_recbole(base / "rb")
    assert e.value.line == 3
    with pytest.raises(DataFormatError, match="rating is not a number") as e:
        load_movielens_raw(base / "ml")
    assert e.value.line == 2


def test_early_stopping_is_announced(tiny, tmp_path):
    torch.set_num_threads(1)
    said = []
    cfg = TrainConfig(dim=8, num_interests=2, max_len=10, batch_size=64, epochs=5, num_negatives=20, seed=0,
                      lr=0.0, patience=1, progress=False, out_dir=str(tmp_path / "run"))
    result = train(tiny, cfg, log=lambda *a, **_: said.append(" ".join(map(str, a))))
    assert len(result.history) == 2                     # lr 0: epoch 2 does not improve on epoch 1
    stops = [s for s in said if s.startswith("early stopping")]
    assert stops == ["early stopping after epoch 2 of 5: valid_recall@50 has not improved for 1 epoch(s) "
                     f"(patience 1); best epoch 1 ({result.best_metric:.4f})"], said
