"""The serve / export split: ``mind.serve`` imports ``mind.export``, never the reverse; meta.json has one
writer (mind/export/meta.py) for every format, with the keys and bytes earlier exports have; serving's
public names stay importable from ``mind.serve``."""

import ast
import json
import pathlib

import numpy as np
import pytest
import torch

import mind.export
import mind.export.errors
import mind.export.native
import mind.serve
from mind.data import make_synthetic, prepare
from mind.model import MIND
from mind.serve import ModelFormatError, load

ROOT = pathlib.Path(__file__).resolve().parents[1]
NATIVE_KEYS = ["format", "max_len", "dim", "num_interests", "user_feature_names", "user_feature_cardinalities",
               "dataset"]


def _imports(path: pathlib.Path, package: str) -> set:
    """Absolute names of every module imported anywhere in ``path`` (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return out


def test_export_never_imports_serve():
    for path in sorted((ROOT / "mind" / "export").glob("*.py")):
        bad = {m for m in _imports(path, "mind.export") if m.split(".")[:2] in (["mind", "serve"], ["mind", "explain"])}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}: mind.export must not depend on mind.serve"


def test_serve_reexports_its_public_names():
    assert mind.serve.ModelFormatError is mind.export.errors.ModelFormatError
    assert mind.serve.first_line is mind.export.errors.first_line
    assert mind.serve.export is mind.export.native.export
    assert mind.serve.FORMAT == "mind-export/1"
    for name in ("Recommender", "load", "export", "ModelFormatError", "first_line"):
        assert hasattr(mind.serve, name)


@pytest.fixture(scope="module")
def model_and_data():
    raw, _ = make_synthetic(num_users=40, num_items=50, num_clusters=3, seq_len=(8, 14), seed=2)
    data = prepare(raw, max_len=8)
    torch.manual_seed(0)
    model = MIND(num_items=int(data.num_items), item_genres=torch.as_tensor(np.asarray(data.item_genres)),
                 num_genres=len(data.genre_names), user_feature_cardinalities=list(data.user_feature_cardinalities),
                 dim=8, num_interests=3)
    return model.eval(), data


def _legacy_native_meta(model, data) -> str:
    """meta.json exactly as the native writer in mind/serve.py wrote it before the split."""
    meta = {"format": "mind-export/1", "max_len": int(data.max_len), "dim": model.dim,
            "num_interests": model.num_interests, "user_feature_names": list(data.user_feature_names),
            "user_feature_cardinalities": [int(c) for c in data.user_feature_cardinalities],
            "dataset": str(data.name)}
    return json.dumps(meta, indent=2)


def test_native_meta_keys_and_bytes(model_and_data, tmp_path):
    model, data = model_and_data
    folder = mind.serve.export(model, data, tmp_path / "plain")
    assert sorted(p.name for p in folder.iterdir()) == ["item_embeddings.npy", "items.json", "meta.json", "model.pt"]
    assert (folder / "meta.json").read_text() == _legacy_native_meta(model, data)

    pytest.importorskip("faiss")
    indexed = mind.export.export(model, data, tmp_path / "indexed", to="native", index="exact")
    assert sorted(p.name for p in indexed.iterdir()) == ["item_embeddings.npy", "items.faiss", "items.json",
                                                         "meta.json", "model.pt"]
    meta = json.loads((indexed / "meta.json").read_text())
    assert list(meta) == NATIVE_KEYS + ["item_index"]
    assert meta["item_index"]["file"] == "items.faiss" and meta["item_index"]["ntotal"] == data.num_items
    for name in ("item_embeddings.npy", "items.json", "model.pt"):
        assert (indexed / name).read_bytes() == (folder / name).read_bytes(), name


@pytest.mark.parametrize("route", ["serve.export", "export native", "export onnx"])
def test_meta_json_is_written_once_by_write_meta(model_and_data, tmp_path, monkeypatch, route):
    import mind.export.meta

    model, data = model_and_data
    calls = []
    real = mind.export.meta.write_meta

    def spy(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(mind.export.meta, "write_meta", spy)
    monkeypatch.setattr(mind.export.native, "write_meta", spy)
    if route == "serve.export":
        folder = mind.serve.export(model, data, tmp_path / "x")
    else:
        pytest.importorskip("faiss")
        to = route.split()[1]
        if to == "onnx":
            for module in ("onnx", "onnxscript", "onnxruntime"):
                pytest.importorskip(module)
        folder = mind.export.export(model, data, tmp_path / "x", to=to)
    assert len(calls) == 1
    assert json.loads((folder / "meta.json").read_text()) == calls[0]
    assert not (folder / "meta.json.tmp").exists()
    load(folder)


def test_a_meta_json_from_before_the_split_loads(model_and_data, tmp_path):
    model, data = model_and_data
    folder = mind.serve.export(model, data, tmp_path / "old")
    history = [int(x) for x in data.item_raw_ids[1:6]]
    want = load(folder).recommend(history, n=10)
    (folder / "meta.json").write_text(_legacy_native_meta(model, data))
    assert load(folder).recommend(history, n=10) == want


def test_a_failed_export_leaves_no_loadable_folder(model_and_data, tmp_path):
    model, data = model_and_data
    folder = mind.serve.export(model, data, tmp_path / "folder")
    with pytest.raises(ValueError, match="kind must be one of"):
        mind.export.export(model, data, folder, to="native", index="no-such-kind")
    with pytest.raises(ModelFormatError, match="no meta.json"):
        load(folder)
