"""Serving exports: ``python -m mind export --to {native,aoti,onnx}``.

One tiny model (synthetic data, 80 items, two profile features, K = 4 dynamic interests, logit
scale 2) is exported once per module in every format; the AOTInductor compile is the slow part
(about a minute on a CPU).  Checks: the user tower equals ``MIND.interests`` for every input form,
each format gives native serving's interest vectors to ``ATOL`` and the same top-50 lists up to
tied scores, the AOTI package runs in a fresh process that never imports ``mind``, the ONNX model
in one that imports only onnxruntime, the faiss index file, bad input, and the CLI's ``error:``
line for a damaged export.
"""

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from mind.data import make_synthetic, prepare
from mind.export import export
from mind.export.tower import UserTower
from mind.model import MIND
from mind.serve import load
from mind.train import TrainConfig, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_LEN = 10
#: float32 tolerance on interest vectors (entries are O(0.1..1)): aoti runs the same fused op as
#: native (equal to ~1e-7); onnx runs the reference routing as plain ops (measured ~1e-7, bound 1e-5).
ATOL = 1e-5


def _have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


HAVE_ONNX = _have("onnxruntime") and _have("onnxscript") and _have("onnx")
needs_onnx = pytest.mark.skipif(
    not HAVE_ONNX, reason="the onnx export needs onnx, onnxscript and onnxruntime (requirements/dev.txt)")


def _data_with_features():
    raw, _ = make_synthetic(num_users=60, num_items=80, num_clusters=4, seq_len=(10, 20), seed=1)
    data = prepare(raw, max_len=MAX_LEN)
    g = torch.Generator().manual_seed(0)
    U = data.user_features.shape[0]
    feats = torch.stack([torch.randint(0, 3, (U,), generator=g), torch.randint(0, 5, (U,), generator=g)], 1)
    return dataclasses.replace(data, user_features=feats, user_feature_names=["age", "job"],
                               user_feature_cardinalities=[3, 5])


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{format: folder} for native, aoti (and onnx when installed) of one random-initialised model."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("exports")
    data = _data_with_features()
    torch.manual_seed(0)
    # built directly: logit_scale is a MIND argument (the tower must carry s != 1), not a TrainConfig field
    model = MIND(int(data.num_items), torch.as_tensor(np.asarray(data.item_genres)), len(data.genre_names),
                 user_feature_cardinalities=[3, 5], dim=8, num_interests=4, dynamic_interests=True,
                 logit_scale=2.0).eval()
    formats = ["native", "aoti"] + (["onnx"] if HAVE_ONNX else [])
    out = {fmt: export(model, data, base / fmt, to=fmt, threads=1) for fmt in formats}
    torch.set_num_threads(old)
    return out, data


def _raw_histories(data, rng):
    """Every user's full history, plus random ones of length 1, max_len and 3 * max_len (raw ids)."""
    raw = np.asarray(data.item_raw_ids)
    users = [raw[np.asarray(h)].tolist() for h in data.test.full_histories + data.valid.full_histories]
    for length in (1, MAX_LEN, 3 * MAX_LEN):
        users += [raw[rng.integers(1, data.num_items + 1, length)].tolist() for _ in range(10)]
    return users


def _same_ranking(a, b, tol=1e-5):
    """Two top-n lists of (raw id, title, score) agree, except for the order of items whose scores tie
    within ``tol`` (and which of them a tie at the cut-off keeps)."""
    assert len(a) == len(b)
    sa = np.array([s for _, _, s in a])
    np.testing.assert_allclose(sa, [s for _, _, s in b], atol=tol)
    i = 0
    while i < len(a):
        j = i + 1
        while j < len(a) and sa[j - 1] - sa[j] < tol:
            j += 1
        if j < len(a):  # a tie group that the cut-off does not split must hold the same items
            assert {x for x, _, _ in a[i:j]} == {x for x, _, _ in b[i:j]}, (i, a[i:j], b[i:j])
        i = j


# ----- the tower itself ---------------------------------------------------------------------------

def _with_holes(items, num_items, width):
    """[-3, 5, i1, N+7, i2, N+7, ..., 0 ...]: each item followed by an unknown id, padded right to ``width``."""
    between = torch.stack([items, torch.full_like(items, num_items + 7)], 1).reshape(-1)
    return torch.cat([torch.tensor([-3, 5]), between, torch.zeros(width - 2 - len(between), dtype=torch.long)])


@pytest.mark.parametrize("softmax_over,dynamic,backend", [
    ("interests", True, "auto"), ("interests", False, "reference"), ("behaviors", True, "reference"),
    ("behaviors", False, "auto"), ("interests", True, "graph"), ("interests", False, "graph"),
    ("behaviors", True, "graph"), ("behaviors", False, "graph")])
def test_tower_equals_model_interests_for_every_input_form(one_thread, softmax_over, dynamic, backend):
    torch.manual_seed(1)
    N, L = 50, 8
    genres = torch.randint(0, 6, (N + 1, 3))
    genres[0] = 0
    model = MIND(N, genres, user_feature_cardinalities=[3, 4], dim=8, num_interests=4, dynamic_interests=dynamic,
                 softmax_over=softmax_over, logit_scale=1.5).eval()
    tower = UserTower(model, L, backend=backend)
    hist = torch.randint(1, N + 1, (6, L))
    hist[0, :7] = 0   # 1 item
    hist[1, :3] = 0   # 5 items
    feats = torch.randint(0, 3, (6, 2))
    with torch.no_grad():
        want, want_mask = model.interests(hist, feats)
        n = (hist != 0).sum(1)
        forms = {
            "right-aligned, max_len": (hist, hist != 0),
            # the same items left-aligned and padded to 13 columns, with the mask marking them
            "left-aligned, longer": (torch.stack([torch.cat([h[h != 0], torch.zeros(13 - k, dtype=torch.long)])
                                                  for h, k in zip(hist, n)]), None),
            # unknown ids (> N, < 0) and a masked-out real id (5, column 1) between the items are dropped
            "holes and unknown ids": (torch.stack([_with_holes(h[h != 0], N, 2 + 2 * L) for h in hist]), "holes"),
        }
        for name, (ids, mask) in forms.items():
            if mask is None:
                mask = ids != 0
            elif mask == "holes":
                mask = torch.ones_like(ids, dtype=torch.bool)
                mask[:, 1] = False   # the real id 5 at column 1 is masked out
            got, got_mask = tower(ids, mask, feats)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)
            assert torch.equal(got_mask, want_mask), name
        # longer than max_len: the most recent max_len items, as native serving keeps
        long = torch.randint(1, N + 1, (3, 3 * L))
        got, _ = tower(long, long != 0, feats[:3])
        torch.testing.assert_close(got, model.interests(long[:, -L:], feats[:3])[0], atol=1e-6, rtol=1e-5)
        # no usable item: all-False interest mask and zero vectors (native refuses such a user)
        empty = torch.tensor([[0, 0, 0], [N + 1, -1, 0]])
        got, got_mask = tower(empty, torch.ones_like(empty, dtype=torch.bool), feats[:2])
        assert not got_mask.any() and not got.any()
        # an out-of-vocabulary profile feature reads as unknown (0)
        got, _ = tower(hist, hist != 0, torch.full_like(feats, 99))
        torch.testing.assert_close(got, model.interests(hist, torch.zeros_like(feats))[0], atol=1e-6, rtol=1e-5)


def test_tower_rejects_bad_max_len():
    model = MIND(10, dim=4, num_interests=2)
    with pytest.raises(ValueError, match="max_len"):
        UserTower(model, 0)


# ----- every format against native serving -----------------------------------------------------------

@pytest.mark.parametrize("fmt", ["aoti", pytest.param("onnx", marks=needs_onnx)])
def test_format_matches_native_serving(exports, fmt, one_thread):
    folders, data = exports
    native, other = load(folders["native"]), load(folders[fmt])
    assert type(other.model).__name__ == "CompiledTower" and other.model.format == fmt
    histories = _raw_histories(data, np.random.default_rng(0))
    feats = np.random.default_rng(1).integers(0, [3, 5], size=(len(histories), 2))
    v_native, m_native = native.interests(histories, feats, return_mask=True)
    v, m = other.interests(histories, feats, return_mask=True)
    assert v.dtype == np.float32 and v.shape == v_native.shape
    np.testing.assert_allclose(v, v_native, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(m, m_native)
    assert m_native.sum(1).min() >= 1 and (m_native.sum(1) < 4).any()  # dynamic K'_u exercised
    lists_native = native.recommend_batch(histories, n=50, user_features=feats)
    lists = other.recommend_batch(histories, n=50, user_features=feats)
    for a, b in zip(lists_native, lists):
        _same_ranking(a, b)


def test_item_side_is_the_same_in_every_format(exports):
    import faiss

    folders, data = exports
    table = np.load(folders["native"] / "item_embeddings.npy")
    catalogue = json.loads((folders["native"] / "items.json").read_text())
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((5, table.shape[1])).astype(np.float32)
    exact = np.argsort(-(queries.astype(np.float64) @ table[1:].T.astype(np.float64)), axis=1)[:, :10] + 1
    for fmt, folder in folders.items():
        np.testing.assert_array_equal(np.load(folder / "item_embeddings.npy"), table)
        assert json.loads((folder / "items.json").read_text()) == catalogue
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["item_index"]["position_offset"] == 1 and meta["item_index"]["kind"] == "exact"
        index = faiss.read_index(str(folder / "items.faiss"))
        assert index.ntotal == data.num_items
        _, pos = index.search(queries, 10)
        np.testing.assert_array_equal(pos + 1, exact)   # faiss position p = item index p + 1


# ----- the artefacts without this package -----------------------------------------------------------

_AOTI_SCRIPT = r"""
import os, sys
import numpy as np, torch, torch._inductor
import mind_kernels.ops   # registers mind_kernels::routing_forward, which the package calls
folder = sys.argv[1]
tower = torch._inductor.aoti_load_package(os.path.join(folder, "user_tower.pt2"))
ids, mask, feats = (torch.from_numpy(np.load(os.path.join(folder, n + ".npy"))) for n in ("ids", "mask", "feats"))
v, m = tower(ids, mask, feats)
np.save(os.path.join(folder, "v.npy"), v.numpy()); np.save(os.path.join(folder, "m.npy"), m.numpy())
try:
    tower(ids.to(torch.int32), mask, feats)
    print("int32 accepted")
except RuntimeError as e:
    print("int32 refused:", str(e).strip().splitlines()[0])
assert not [k for k in sys.modules if k == "mind" or k.startswith("mind.")], "imported mind"
print("ok")
"""

_ONNX_SCRIPT = r"""
import os, sys
import numpy as np, onnx, onnxruntime as ort
folder = sys.argv[1]
model = onnx.load(os.path.join(folder, "user_tower.onnx"))
opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
domains = sorted({n.domain for n in model.graph.node})
s = ort.InferenceSession(os.path.join(folder, "user_tower.onnx"), providers=["CPUExecutionProvider"])
feed = {n: np.load(os.path.join(folder, n + ".npy")) for n in ("history_ids", "history_mask", "user_features")}
v, m = s.run(None, feed)
np.save(os.path.join(folder, "v.npy"), v); np.save(os.path.join(folder, "m.npy"), m)
try:
    s.run(None, dict(feed, history_ids=feed["history_ids"].astype(np.int32)))
    print("int32 accepted")
except Exception as e:
    print("int32 refused:", str(e).strip().splitlines()[0])
assert not [k for k in sys.modules if k in ("torch", "mind", "mind_kernels") or k.startswith("mind.")], "imported"
print("opset", opset, "domains", domains)
print("ok")
"""


def _tensor_inputs(data, rng, native):
    """(ids (U, 3 max_len) right-aligned item indices, mask, features) and native's interests for them."""
    histories = _raw_histories(data, rng)
    ids = np.zeros((len(histories), 3 * MAX_LEN), dtype=np.int64)
    for r, h in enumerate(histories):
        known = native.map_history(h)
        ids[r, ids.shape[1] - len(known):] = known
    feats = rng.integers(0, [3, 5], size=(len(histories), 2)).astype(np.int64)
    v, m = native.interests(histories, feats, return_mask=True)
    return ids, ids != 0, feats, v, m


def test_aoti_package_runs_in_a_fresh_process_without_mind(exports, tmp_path):
    folders, data = exports
    ids, mask, feats, v_native, m_native = _tensor_inputs(data, np.random.default_rng(2), load(folders["native"]))
    work = tmp_path / "aoti"
    shutil.copytree(folders["aoti"], work)
    for name, x in (("ids", ids), ("mask", mask), ("feats", feats)):
        np.save(work / f"{name}.npy", x)
    env = dict(os.environ, AOTI_RUNTIME_CHECK_INPUTS="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _AOTI_SCRIPT, str(work)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok" in done.stdout
    assert "int32 refused" in done.stdout and "dtype" in done.stdout, done.stdout  # with the runtime checks on
    np.testing.assert_allclose(np.load(work / "v.npy"), v_native, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(np.load(work / "m.npy"), m_native)



@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="needs a C++ compiler (g++)")
def test_aoti_package_runs_from_cpp_with_libtorch_only(exports, tmp_path):
    """examples/aoti_cpp: a C++ program (libtorch's AOTI loader + the routing op's library, no Python)."""
    import mind_kernels.ops as ops

    if ops._C is None:
        pytest.skip(f"the compiled extension is not built: {ops._LOAD_ERROR}")
    folders, data = exports
    ids, mask, feats, v_native, m_native = _tensor_inputs(data, np.random.default_rng(4), load(folders["native"]))
    binary = tmp_path / "mind_tower"
    built = subprocess.run(["bash", str(ROOT / "examples" / "aoti_cpp" / "build.sh"), sys.executable, str(binary)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for row in (0, 1, len(ids) - 1):                       # users with features, and a long random history
        done = subprocess.run([str(binary), str(folders["aoti"] / "user_tower.pt2"), ops._C.__file__,
                               ",".join(map(str, ids[row])), ",".join(map(str, feats[row]))],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        lines = done.stdout.strip().splitlines()
        assert len(lines) == v_native.shape[1]
        got = np.array([[float(x) for x in line.split(":")[1].split()] for line in lines])
        active = np.array([" active:" in line for line in lines])
        np.testing.assert_allclose(got, v_native[row], atol=ATOL, rtol=0)
        np.testing.assert_array_equal(active, m_native[row])
    done = subprocess.run([str(binary), str(folders["aoti"] / "user_tower.pt2"), ops._C.__file__, ""],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "error: the history is empty" in done.stderr

@needs_onnx
def test_onnx_model_runs_with_onnxruntime_only(exports, tmp_path):
    folders, data = exports
    ids, mask, feats, v_native, m_native = _tensor_inputs(data, np.random.default_rng(3), load(folders["native"]))
    work = tmp_path / "onnx"
    shutil.copytree(folders["onnx"], work)
    for name, x in (("history_ids", ids), ("history_mask", mask), ("user_features", feats)):
        np.save(work / f"{name}.npy", x)
    done = subprocess.run([sys.executable, "-c", _ONNX_SCRIPT, str(work)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok" in done.stdout and "int32 refused" in done.stdout, done.stdout
    opset = int(done.stdout.split("opset ")[1].split()[0])
    assert opset >= 17
    assert "domains ['']" in done.stdout, done.stdout   # standard ONNX ops only: no custom domain
    np.testing.assert_allclose(np.load(work / "v.npy"), v_native, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(np.load(work / "m.npy"), m_native)


# ----- bad input through mind.serve.load: as native ----------------------------------------------------

@pytest.mark.parametrize("fmt", ["aoti", pytest.param("onnx", marks=needs_onnx)])
def test_bad_input_is_handled_as_native(exports, fmt, one_thread):
    folders, data = exports
    native, other = load(folders["native"]), load(folders[fmt])
    for rec in (native, other):
        with pytest.raises(ValueError, match="is empty"):
            rec.recommend([])
        with pytest.raises(ValueError, match="has no known item"), pytest.warns(UserWarning, match="dropping 2"):
            rec.recommend(["nope", 10 ** 9])
        with pytest.raises(ValueError, match="must be a list of raw item ids"):
            rec.recommend("12")
    known = [str(x) for x in np.asarray(data.item_raw_ids)[1:6]]
    with pytest.warns(UserWarning, match="dropping 1 unknown item id"):
        got = other.recommend(known[:2] + ["nope"] + known[2:], n=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _same_ranking(native.recommend(known, n=10), got)
    with pytest.raises(ValueError, match="user_features must be"):
        other.interests([known], user_features=np.zeros((1, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="explain needs the native export"):
        from mind.explain import explain
        explain(other, known, png=None)


# ----- the CLI: export --to, and a damaged export is an error line ------------------------------------

SYN = ["--data", "synthetic", "--users", "40", "--items", "60", "--max-len", "10"]


def _cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "mind", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def _assert_error(done, *names):
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, done.stderr
    for name in names:
        assert name in lines[0], lines[0]


@needs_onnx
def test_cli_export_onnx_then_recommend(tmp_path):
    torch.set_num_threads(1)
    raw, _ = make_synthetic(num_users=40, num_items=60)
    data = prepare(raw, max_len=10)
    cfg = TrainConfig(dim=8, num_interests=2, max_len=10, batch_size=64, epochs=1, num_negatives=20, seed=0,
                      progress=False, out_dir=str(tmp_path / "run"))
    train(data, cfg, log=lambda *_: None)
    done = _cli("export", "--checkpoint", tmp_path / "run" / "best.pt", "--out", tmp_path / "onnx", "--to", "onnx",
                "--index", "hnsw", *SYN)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "onnx user tower" in done.stdout
    meta = json.loads((tmp_path / "onnx" / "meta.json").read_text())
    assert meta["format"] == "mind-export-onnx/1" and meta["item_index"]["kind"] == "hnsw"
    history = ",".join(str(int(x)) for x in data.item_raw_ids[1:6])
    rec = _cli("recommend", "--model", tmp_path / "onnx", "--history", history, "-n", "5")
    assert rec.returncode == 0 and rec.stdout.count("score") == 5, rec.stderr[-2000:]


def test_cli_damaged_export_is_an_error_line(exports, tmp_path):
    folders, data = exports
    history = ",".join(str(int(x)) for x in data.item_raw_ids[1:6])
    cases = []
    for fmt in [f for f in ("aoti", "onnx") if f in folders]:
        name = "user_tower.pt2" if fmt == "aoti" else "user_tower.onnx"
        trunc = tmp_path / f"{fmt}_trunc"
        shutil.copytree(folders[fmt], trunc)
        blob = (trunc / name).read_bytes()
        (trunc / name).write_bytes(blob[: len(blob) // 2])
        garbage = tmp_path / f"{fmt}_garbage"
        shutil.copytree(folders[fmt], garbage)
        (garbage / name).write_bytes(b"\x00 not a model " * 64)
        missing = tmp_path / f"{fmt}_missing"
        shutil.copytree(folders[fmt], missing)
        (missing / name).unlink()
        cases += [(["recommend", "--model", d, "--history", history], [str(d / name)])
                  for d in (trunc, garbage, missing)]
        cases.append((["explain", "--model", folders[fmt], "--history", history, "--png", tmp_path / "x.png"],
                      [str(folders[fmt] / name), "native export"]))
    bad_meta = tmp_path / "aoti_badmeta"
    shutil.copytree(folders["aoti"], bad_meta)
    meta = json.loads((bad_meta / "meta.json").read_text())
    del meta["tower"]
    (bad_meta / "meta.json").write_text(json.dumps(meta))
    cases.append((["recommend", "--model", bad_meta, "--history", history], [str(bad_meta / "meta.json")]))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:   # each case is a fresh interpreter importing torch
        results = list(pool.map(lambda case: _cli(*case[0]), cases))
    for (_, names), done in zip(cases, results):
        _assert_error(done, *names)
