"""The recall service (mind/service/): answers, batching, bad requests, hot swap, admin guard, metrics, page, CLI.

Tiny random-initialised exports (no training), uvicorn in-process on a free 127.0.0.1 port, a
stdlib HTTP client; nothing here asserts a timing (latency and throughput: bench/bench_service.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import http.client
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("starlette", reason="the service needs the [serve] extra (starlette, uvicorn, prometheus-client)")
pytest.importorskip("uvicorn", reason="the service needs the [serve] extra")
pytest.importorskip("prometheus_client", reason="the service needs the [serve] extra")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from mind.data import make_synthetic, prepare  # noqa: E402
from mind.export import export  # noqa: E402
from mind.model import MIND  # noqa: E402
from mind.service import ServiceConfig, create_app, start_in_thread  # noqa: E402
from mind.service.batcher import Batcher  # noqa: E402
from mind.service.models import Query  # noqa: E402
from mind.service.reload import load_state  # noqa: E402
from mind.serve import load  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_LEN = 10


def _data(features: bool = True):
    raw, _ = make_synthetic(num_users=60, num_items=80, num_clusters=4, seq_len=(10, 20), seed=1)
    data = prepare(raw, max_len=MAX_LEN)
    if not features:
        return data
    U = data.user_features.shape[0]
    g = torch.Generator().manual_seed(0)
    feats = torch.stack([torch.randint(0, 3, (U,), generator=g), torch.randint(0, 5, (U,), generator=g)], 1)
    return dataclasses.replace(data, user_features=feats, user_feature_names=["age", "job"],
                               user_feature_cardinalities=[3, 5])


def _export(data, folder, seed: int, to: str = "native", index="exact"):
    torch.manual_seed(seed)
    cards = list(data.user_feature_cardinalities)
    model = MIND(int(data.num_items), torch.as_tensor(np.asarray(data.item_genres)), len(data.genre_names),
                 user_feature_cardinalities=cards, dim=8, num_interests=4, dynamic_interests=True).eval()
    return export(model, data, folder, to=to, index=index, threads=1)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Folders: a and b (same features, other weights; a with an exact items.faiss, b without), c (no features)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("service")
    data = _data()
    out = {"a": _export(data, base / "a", 0), "b": _export(data, base / "b", 1, index=None),
           "c": _export(_data(features=False), base / "c", 2), "base": base}
    torch.set_num_threads(old)
    return out, data


def _ids(data, rows):
    return [int(data.item_raw_ids[i]) for i in rows]


class Client:
    """A keep-alive HTTP/1.1 client on 127.0.0.1 (one per thread)."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def call(self, method: str, path: str, body=None, headers=None):
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        for attempt in range(2):
            try:
                self.conn.request(method, path, body=data, headers=headers or {})
                r = self.conn.getresponse()
                raw = r.read()
                break
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                if attempt:
                    raise
        if r.getheader("content-type", "").startswith("application/json"):
            return r.status, json.loads(raw)
        return r.status, raw.decode()

    def post(self, path, body, headers=None):
        return self.call("POST", path, body, headers)

    def get(self, path):
        return self.call("GET", path)


@pytest.fixture(scope="module")
def service(exports):
    """Folder a served with a 5 ms batching window; yields (port, config, app)."""
    ex, _ = exports
    config = ServiceConfig(model=str(ex["a"]), max_wait_ms=5.0)
    app = create_app(config, load_state(ex["a"]))
    server, port = start_in_thread(app)
    yield port, config, app
    server.should_exit = True


@pytest.fixture
def client(service):
    c = Client(service[0])
    yield c
    c.conn.close()


def _metrics(client) -> dict:
    status, text = client.get("/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _count(m: dict, route: str, status: int) -> float:
    return m.get(("mind_serve_requests_total", (("route", route), ("status", str(status)))), 0.0)


# --- answers --------------------------------------------------------------------------------------

def test_recommend_equals_the_recommender(exports, client):
    ex, data = exports
    rec = load(ex["a"], index="exact")
    history = _ids(data, [3, 7, 11, 20, 5]) + [999_999]          # one unknown id: dropped and counted
    status, got = client.post("/recommend", {"history": history, "n": 7})
    assert status == 200, got
    want = rec.recommend(history[:-1], n=7)
    assert [it["id"] for it in got["items"]] == [r for r, _, _ in want]
    assert [it["title"] for it in got["items"]] == [t for _, t, _ in want]
    np.testing.assert_allclose([it["score"] for it in got["items"]], [s for _, _, s in want], rtol=1e-5)
    assert got["dropped"] == 1
    # interests = K'_u; each item's interest is the active one that scores it best
    v, mask = rec.interests([history[:-1]], return_mask=True)
    assert got["interests"] == int(mask[0].sum())
    rows = rec.map_history([it["id"] for it in got["items"]])
    per_k = rec.item_table[rows] @ v[0].T
    per_k[:, ~mask[0]] = -np.inf
    assert [it["interest"] for it in got["items"]] == per_k.argmax(1).tolist()
    assert got["model"].startswith("native-") and len(got["model"]) == len("native-") + 12


def test_batch_agrees_with_single(exports, client):
    ex, data = exports
    histories = [_ids(data, [1, 2, 3]), _ids(data, [10, 20, 30, 40, 50, 60]), _ids(data, [5]),
                 [str(r) for r in _ids(data, [7, 8])]]
    status, batch = client.post("/recommend/batch", {"users": [{"history": h} for h in histories], "n": 5})
    assert status == 200, batch
    assert len(batch["results"]) == len(histories)
    for h, got in zip(histories, batch["results"]):
        status, single = client.post("/recommend", {"history": h, "n": 5})
        assert status == 200
        assert [it["id"] for it in got["items"]] == [it["id"] for it in single["items"]]
        np.testing.assert_allclose([it["score"] for it in got["items"]], [it["score"] for it in single["items"]],
                                   rtol=1e-5)
        assert got["interests"] == single["interests"]
    assert batch["model"] == single["model"]


def test_user_features_reach_the_model(exports, client):
    ex, data = exports
    rec = load(ex["a"], index="exact")
    history = _ids(data, [3, 4, 5, 6])
    status, got = client.post("/recommend", {"history": history, "n": 10, "user_features": {"age": 2, "job": 4}})
    assert status == 200, got
    want = rec.recommend(history, n=10, user_features=[2, 4])
    assert [it["id"] for it in got["items"]] == [r for r, _, _ in want]
    # a missing feature is 0 (unknown)
    status, partial = client.post("/recommend", {"history": history, "n": 10, "user_features": {"job": 4}})
    assert [it["id"] for it in partial["items"]] == [r for r, _, _ in rec.recommend(history, n=10, user_features=[0, 4])]


def test_merge_is_passed_through_when_given(exports, client, service):
    ex, data = exports
    state = service[2].state.service.state
    history = _ids(data, [1, 9, 17, 25, 33, 41])
    if not state.supports_merge:
        status, got = client.post("/recommend", {"history": history, "merge": "quota"})
        assert status == 400 and "not supported" in got["error"]
        return
    rec = load(ex["a"], index="exact")
    for merge, diversity in (("quota", None), ("diverse", 0.5), ("max", None)):
        body = {"history": history, "n": 8, "merge": merge}
        kwargs = {"merge": merge}
        if diversity is not None:
            body["diversity"], kwargs["diversity"] = diversity, diversity
        status, got = client.post("/recommend", body)
        assert status == 200, got
        assert [it["id"] for it in got["items"]] == [r for r, _, _ in rec.recommend(history, n=8, **kwargs)]
    status, got = client.post("/recommend", {"history": history, "merge": "bogus"})
    assert status == 400 and "merge" in got["error"]


def test_batcher_gathers_queued_requests_into_one_call(exports):
    """Jobs queued before the worker runs go through one model call (deterministic: no timing)."""
    ex, data = exports
    state = load_state(ex["a"])
    calls = []
    batcher = Batcher(max_wait_s=0.05, max_batch=64, on_batch=calls.append)
    histories = [_ids(data, [i, i + 1, i + 2]) for i in range(1, 13)]

    async def go():
        tasks = [asyncio.ensure_future(batcher.submit(state, Query([h], None, 5, True, {}, False)))
                 for h in histories]
        await asyncio.sleep(0)            # every job is queued ...
        batcher.start()                   # ... before the worker takes the first
        return await asyncio.wait_for(asyncio.gather(*tasks), 60)   # a lost job fails, not hangs

    try:
        answers = asyncio.run(go())
    finally:
        batcher.stop()
    assert calls == [len(histories)]
    alone = state.run(histories, 5, None, True, {})
    for got, want in zip(answers, alone):
        assert [it["id"] for it in got[0]["items"]] == [it["id"] for it in want["items"]]
    # batching off: one call per request
    calls.clear()
    off = Batcher(max_wait_s=0.05, max_batch=1, on_batch=calls.append)

    async def go_off():
        tasks = [asyncio.ensure_future(off.submit(state, Query([h], None, 5, True, {}, False))) for h in histories[:4]]
        await asyncio.sleep(0)
        off.start()
        return await asyncio.wait_for(asyncio.gather(*tasks), 60)   # a lost job fails, not hangs

    try:
        asyncio.run(go_off())
    finally:
        off.stop()
    assert calls == [1, 1, 1, 1]


def test_a_bad_request_in_a_batch_fails_alone(exports):
    ex, data = exports
    state = load_state(ex["a"])
    batcher = Batcher(max_wait_s=0.05, max_batch=64)
    good, bad = _ids(data, [1, 2, 3]), [999_999]

    async def go():
        tasks = [asyncio.ensure_future(batcher.submit(state, Query([h], None, 5, True, {}, False)))
                 for h in (good, bad, good)]
        await asyncio.sleep(0)
        batcher.start()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)

    try:
        a, b, c = asyncio.run(go())
    finally:
        batcher.stop()
    assert isinstance(b, ValueError) and "no known item" in str(b)
    assert a == c and len(a[0]["items"]) == 5


def test_a_full_queue_is_a_503_not_a_wait(exports):
    ex, data = exports
    state = load_state(ex["a"])
    batcher = Batcher(max_wait_s=0.0, max_batch=4, max_queue=2)          # the worker is not started
    from mind.service.batcher import Overloaded

    async def go():
        queued = asyncio.ensure_future(batcher.submit(state, Query([["x"], ["y"]], None, 5, True, {}, True)))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="--max-queue 2"):
            await batcher.submit(state, Query([_ids(data, [1])], None, 5, True, {}, False))
        queued.cancel()

    asyncio.run(go())


def test_health_and_readiness_while_the_model_cannot_load(tmp_path):
    app = create_app(ServiceConfig(model=str(tmp_path / "missing")))      # loads in the background
    server, port = start_in_thread(app)
    try:
        c = Client(port)
        assert c.get("/healthz") == (200, {"status": "ok"})
        deadline = time.monotonic() + 30
        while (ready := c.get("/readyz"))[1].get("status") == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        status, got = ready
        assert status == 503 and got["status"] == "failed" and "does not exist" in got["error"], got
        status, got = c.post("/recommend", {"history": [1]})
        assert status == 503 and "no model loaded" in got["error"]
    finally:
        server.should_exit = True


# --- bad requests ---------------------------------------------------------------------------------

BAD = [  # (name, body, status, words the one-line reason must contain)
    ("malformed JSON", b'{"history": [1, 2', 400, "not valid JSON"),
    ("empty body", b"", 400, "empty body"),
    ("not UTF-8", b'{"history": ["\xff\xfe"]}', 400, "UTF-8"),
    ("array body", [1, 2, 3], 400, "JSON object"),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    ("history missing", {"n": 3}, 400, "history is required"),
    ("history a string", {"history": "1,2,3"}, 400, "must be a list"),
    ("history of floats", {"history": [1.5]}, 400, "history[0] must be an item id"),
    ("history of objects", {"history": [1, {"id": 2}]}, 400, "history[1] must be an item id"),
    ("history with null", {"history": [None]}, 400, "history[0] must be an item id"),
    ("empty history", {"history": []}, 400, "empty"),
    ("only unknown ids", {"history": [999_999, "nope"]}, 400, "no known item"),
    ("100,000 ids", {"history": list(range(100_000))}, 400, "more than the limit"),
    ("n = 0", {"history": ["ID1"], "n": 0}, 400, "n must be between 1 and"),
    ("n above the catalogue", {"history": ["ID1"], "n": 10_000}, 400, "n must be between 1 and"),
    ("n a string", {"history": ["ID1"], "n": "5"}, 400, "n must be an integer"),
    ("n a boolean", {"history": ["ID1"], "n": True}, 400, "n must be an integer"),
    ("n a float", {"history": ["ID1"], "n": 2.5}, 400, "n must be an integer"),
    ("unknown field", {"history": ["ID1"], "top_k": 3}, 400, "unknown field"),
    ("exclude_history not bool", {"history": ["ID1"], "exclude_history": "no"}, 400, "exclude_history"),
    ("diversity NaN", b'{"history": ["ID1"], "diversity": NaN}', 400, "diversity must be a finite number"),
    ("merge not a string", {"history": ["ID1"], "merge": 3}, 400, "merge must be a string"),
    ("unknown feature", {"history": ["ID1"], "user_features": {"height": 1}}, 400, "unknown feature"),
    ("feature out of range", {"history": ["ID1"], "user_features": {"age": 3}}, 400, "must be in 0..2"),
    ("features not an object", {"history": ["ID1"], "user_features": [1, 2]}, 400, "user_features must be"),
    ("body over the limit", b'{"history": ["' + b"x" * (2 << 20) + b'"]}', 413, "larger than the limit"),
]
BAD_BATCH = [
    ("users missing", {"n": 3}, 400, "users must be a non-empty list"),
    ("users empty", {"users": []}, 400, "users must be a non-empty list"),
    ("users not a list", {"users": {"history": [1]}}, 400, "users must be a non-empty list"),
    ("user unknown field", {"users": [{"history": ["ID1"], "x": 1}]}, 400, "users[0]"),
    ("second user unknown ids", {"users": [{"history": ["ID1"]}, {"history": [999_999]}]}, 400,
     "users[1].history"),
    ("too many users", {"users": [{"history": ["ID1"]}] * 1001}, 400, "more than the limit"),
]


def _resolve(body, data):
    """Put a real raw id where the cases say "ID1"."""
    if isinstance(body, bytes):
        return body.replace(b'"ID1"', str(int(data.item_raw_ids[1])).encode())
    text = json.dumps(body).replace('"ID1"', str(int(data.item_raw_ids[1])))
    return text.encode()


@pytest.mark.parametrize("route,name,body,status,words",
                         [("/recommend", *c) for c in BAD] + [("/recommend/batch", *c) for c in BAD_BATCH],
                         ids=[c[0] for c in BAD] + ["batch: " + c[0] for c in BAD_BATCH])
def test_bad_request_is_a_4xx_with_a_one_line_reason(exports, client, route, name, body, status, words):
    _, data = exports
    got_status, got = client.post(route, _resolve(body, data), {"content-type": "application/json"})
    assert got_status == status, (name, got)
    assert isinstance(got, dict) and set(got) == {"error"}, got
    assert words in got["error"], got["error"]
    assert "\n" not in got["error"] and len(got["error"]) <= 500
    # the service is still healthy and still answers
    assert client.get("/healthz") == (200, {"status": "ok"})
    ok, answer = client.post("/recommend", {"history": [int(data.item_raw_ids[2])], "n": 3})
    assert ok == 200 and len(answer["items"]) == 3


def test_wrong_method_and_path_are_4xx(client):
    assert client.get("/recommend")[0] == 405
    status, got = client.get("/no/such/route")
    assert status == 404 and "error" in got


def test_no_500_after_the_bad_requests(client, exports):
    _, data = exports
    for case in BAD:
        client.post("/recommend", _resolve(case[1], data))
    m = _metrics(client)
    assert not [k for k, v in m.items() if k[0] == "mind_serve_requests_total" and ("status", "500") in k[1] and v]
    assert client.get("/readyz")[0] == 200


# --- metrics ----------------------------------------------------------------------------------------

def test_metrics_parse_and_count_requests(exports, client, service):
    _, data = exports
    before = _metrics(client)
    for i in range(7):
        assert client.post("/recommend", {"history": [int(data.item_raw_ids[i + 1])], "n": 2})[0] == 200
    for _ in range(3):
        assert client.post("/recommend", {"history": []})[0] == 400
    after = _metrics(client)
    assert _count(after, "recommend", 200) - _count(before, "recommend", 200) == 7
    assert _count(after, "recommend", 400) - _count(before, "recommend", 400) == 3
    lat = ("mind_serve_request_seconds_count", (("route", "recommend"),))
    assert after[lat] - before.get(lat, 0) == 10
    assert after[("mind_serve_batch_users_count", ())] >= before.get(("mind_serve_batch_users_count", ()), 0) + 7
    model = service[2].state.service.state.model_id
    info = [k for k, v in after.items() if k[0] == "mind_serve_model_info" and v == 1]
    assert len(info) == 1 and ("model", model) in info[0][1]


# --- hot swap -----------------------------------------------------------------------------------------

def test_hot_swap_under_load_has_no_failures(exports):
    ex, data = exports
    config = ServiceConfig(model=str(ex["a"]), max_wait_ms=2.0)
    app = create_app(config, load_state(ex["a"]))
    server, port = start_in_thread(app)
    try:
        expected = {}           # model id -> its answer for the probe history, from the model alone
        history = _ids(data, [2, 4, 6, 8])
        for name in ("a", "b"):
            st = load_state(ex[name])
            expected[st.model_id] = [it["id"] for it in st.run([history], 5, None, True, {})[0]["items"]]
        assert len(expected) == 2
        stop = time.monotonic() + 60            # bounded in time and in count
        swaps_done = [False]
        answered = [0]
        lock = threading.Lock()

        def hammer():
            c, seen, failures = Client(port), [], []
            for _ in range(2000):
                if swaps_done[0] or time.monotonic() > stop:
                    break
                status, got = c.post("/recommend", {"history": history, "n": 5})
                if status != 200 or [it["id"] for it in got["items"]] != expected.get(got.get("model")):
                    failures.append((status, got))
                else:
                    seen.append(got["model"])
                with lock:
                    answered[0] += 1
            c.conn.close()
            return seen, failures

        def wait_for_answers(k: int):
            """Let the hammers get k more answers (each model serves while the others keep asking)."""
            with lock:
                goal = answered[0] + k
            while answered[0] < goal and time.monotonic() < stop:
                time.sleep(0.005)

        admin = Client(port)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(hammer) for _ in range(4)]
            ids = []
            wait_for_answers(8)
            for i in range(10):
                folder = ex["b"] if i % 2 == 0 else ex["a"]
                status, got = admin.post("/admin/reload", {"model": str(folder)})
                assert status == 200, got
                ids.append(got["model"])
                assert admin.get("/readyz")[1]["model"] == got["model"]
                wait_for_answers(8)
            swaps_done[0] = True
            results = [f.result() for f in futures]
        failures = [f for _, fs in results for f in fs]
        seen = [m for s, _ in results for m in s]
        assert failures == []
        assert set(seen) == set(expected)                 # both models answered, each answer its own
        assert ids == [ids[0], ids[1]] * 5 and ids[0] != ids[1]
        m = _metrics(admin)
        assert m[("mind_serve_reloads_total", (("result", "ok"),))] == 10
    finally:
        server.should_exit = True


def test_damaged_or_incompatible_export_is_refused_and_old_model_serves(exports, tmp_path):
    ex, data = exports
    config = ServiceConfig(model=str(ex["a"]))
    app = create_app(config, load_state(ex["a"]))
    server, port = start_in_thread(app)
    c = Client(port)
    try:
        old = c.get("/readyz")[1]["model"]
        history = _ids(data, [1, 2])
        _, before = c.post("/recommend", {"history": history, "n": 5})
        # truncated item table
        bad = tmp_path / "truncated"
        shutil.copytree(ex["b"], bad)
        npy = bad / "item_embeddings.npy"
        npy.write_bytes(npy.read_bytes()[:100])
        # corrupt meta.json, missing model.pt, a folder that does not exist, a checkpoint file
        meta_bad = tmp_path / "meta_bad"
        shutil.copytree(ex["b"], meta_bad)
        (meta_bad / "meta.json").write_text("{not json")
        no_model = tmp_path / "no_model"
        shutil.copytree(ex["b"], no_model)
        (no_model / "model.pt").unlink()
        cases = [(bad, "item_embeddings.npy"), (meta_bad, "meta.json"), (no_model, "model.pt"),
                 (tmp_path / "nowhere", "does not exist"), (ex["b"] / "model.pt", "model.pt")]
        for folder, words in cases:
            status, got = c.post("/admin/reload", {"model": str(folder)})
            assert status == 422, got
            assert words in got["error"] and "\n" not in got["error"], got
            assert c.get("/readyz")[1]["model"] == old
            assert c.post("/recommend", {"history": history, "n": 5}) == (200, before)
        # other user features: refused (409) unless forced
        status, got = c.post("/admin/reload", {"model": str(ex["c"])})
        assert status == 409 and "user features" in got["error"] and "meta.json" in got["error"], got
        assert c.get("/readyz")[1]["model"] == old
        status, got = c.post("/admin/reload", {"model": str(ex["c"]), "force": True})
        assert status == 200 and got["previous"] == old and got["model"] != old
        status, got = c.post("/admin/reload", {"model": str(ex["a"]), "force": True})
        assert status == 200 and got["model"] == old
        assert c.post("/admin/reload", {"folder": "x"})[0] == 400
        m = _metrics(c)
        assert m[("mind_serve_reloads_total", (("result", "refused"),))] == len(cases) + 1
    finally:
        server.should_exit = True


def test_model_id_is_the_content_not_the_path(exports, tmp_path):
    ex, _ = exports
    copy = tmp_path / "copy"
    shutil.copytree(ex["a"], copy)
    a, b, same = load_state(ex["a"]), load_state(ex["b"]), load_state(copy)
    assert a.model_id == same.model_id != b.model_id
    np.save(copy / "item_embeddings.npy", np.load(copy / "item_embeddings.npy") * 2)
    assert load_state(copy).model_id != a.model_id


# --- admin guard ------------------------------------------------------------------------------------

def _asgi(app, method: str, path: str, body: bytes, client_host: str, headers=()):
    """One request straight into the ASGI app, from ``client_host`` (no socket)."""
    svc = app.state.service
    out = {}

    async def go():
        await svc.startup()
        sent = [False]

        async def receive():
            if sent[0]:
                return {"type": "http.disconnect"}
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                out["status"] = message["status"]
            elif message["type"] == "http.response.body":
                out["body"] = out.get("body", b"") + message.get("body", b"")

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
                 "client": (client_host, 40000), "server": ("127.0.0.1", 8000)}
        try:
            await app(scope, receive, send)
        finally:
            await svc.shutdown()

    asyncio.run(go())
    return out["status"], json.loads(out["body"])


def test_admin_routes_refuse_non_loopback_and_need_the_token_when_exposed(exports):
    ex, _ = exports
    body = json.dumps({"model": str(ex["a"])}).encode()
    closed = create_app(ServiceConfig(model=str(ex["a"])), load_state(ex["a"]))
    status, got = _asgi(closed, "POST", "/admin/reload", body, "10.1.2.3")
    assert status == 403 and "loopback" in got["error"]
    status, got = _asgi(closed, "POST", "/admin/reload", body, "10.1.2.3", [("Authorization", "Bearer x")])
    assert status == 403                                          # a token does not open a closed service
    assert _asgi(closed, "POST", "/admin/reload", body, "::1")[0] == 200
    assert _asgi(closed, "POST", "/admin/reload", body, "127.0.0.1")[0] == 200
    with pytest.raises(ValueError, match="needs a token"):
        ServiceConfig(model=str(ex["a"]), admin_expose=True)
    exposed = create_app(ServiceConfig(model=str(ex["a"]), admin_expose=True, admin_token="s3cret"),
                         load_state(ex["a"]))
    assert _asgi(exposed, "POST", "/admin/reload", body, "10.1.2.3")[0] == 401
    assert _asgi(exposed, "POST", "/admin/reload", body, "127.0.0.1")[0] == 401       # token for everyone
    assert _asgi(exposed, "POST", "/admin/reload", body, "10.1.2.3", [("Authorization", "Bearer nope")])[0] == 403
    status, got = _asgi(exposed, "POST", "/admin/reload", body, "10.1.2.3", [("Authorization", "Bearer s3cret")])
    assert status == 200 and got["model"].startswith("native-")
    # recommend routes are not admin routes
    assert _asgi(closed, "GET", "/healthz", b"", "10.1.2.3")[0] == 200


# --- other export formats ----------------------------------------------------------------------------

def test_onnx_export_is_served_like_its_recommender(exports, tmp_path):
    pytest.importorskip("onnxruntime", reason="serving an ONNX export needs onnxruntime")
    pytest.importorskip("onnxscript", reason="writing an ONNX export needs onnxscript")
    _, data = exports
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = _export(data, tmp_path / "onnx", 0, to="onnx")
    finally:
        torch.set_num_threads(old)
    app = create_app(ServiceConfig(model=str(folder)), load_state(folder))
    server, port = start_in_thread(app)
    try:
        c = Client(port)
        history = _ids(data, [4, 8, 15, 16, 23, 42])
        status, got = c.post("/recommend", {"history": history, "n": 6})
        assert status == 200 and got["model"].startswith("onnx-"), got
        want = load(folder, index="exact").recommend(history, n=6)
        assert [it["id"] for it in got["items"]] == [r for r, _, _ in want]
    finally:
        server.should_exit = True


# --- the page, in headless Chromium -------------------------------------------------------------------

def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_page_in_headless_chromium(exports, client, service, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on PATH (apt-get install chromium): the page test needs a headless browser")
    _, data = exports
    history = _ids(data, [3, 7, 11, 20, 5])
    status, want = client.post("/recommend", {"history": history, "n": 8})
    assert status == 200
    url = f"http://127.0.0.1:{service[0]}/?history={','.join(map(str, history))}&n=8"
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=15000"]
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'data-state="done"' in html, html[-3000:]
    for item in want["items"]:                       # the merged list, in order, as the API gives it
        assert f'data-id="{item["id"]}"' in html
    positions = [html.index(f'<tr class="item" data-id="{it["id"]}"') for it in want["items"]]
    assert positions == sorted(positions)
    for k in {it["interest"] for it in want["items"]}:   # a column per interest that scores an item best
        assert f'data-interest="{k}"' in html
    assert want["model"] in html
    shot = tmp_path / "page.png"
    done = subprocess.run(flags + ["--window-size=1280,900", f"--screenshot={shot}", url], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and shot.is_file() and shot.stat().st_size > 5000, done.stderr[-2000:]
    print(f"\nscreenshot of the page: {shot}")


# --- the CLI ------------------------------------------------------------------------------------------

def test_listening_socket_is_tcp_so_asyncio_sets_nodelay():
    # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; without it a keep-alive client
    # waits out a delayed ACK (~40 ms) between the answer's two writes
    from mind.service.app import _bind

    sock = _bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(port: int, proc, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            status, got = Client(port).get("/readyz")
            if status == 200:
                return got
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("serve did not get ready")


def test_cli_serve_reloads_on_sighup_and_stops_on_sigterm(exports, tmp_path):
    ex, data = exports
    folder = tmp_path / "live"
    shutil.copytree(ex["a"], folder)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "mind", "serve", "--model", str(folder), "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = _wait_ready(port, proc)
        assert first["model"] == load_state(ex["a"]).model_id
        status, got = Client(port).post("/recommend", {"history": _ids(data, [1, 2, 3]), "n": 3})
        assert status == 200 and got["model"] == first["model"]
        # replace the folder's files with export b, then SIGHUP: the same folder is loaded again
        for f in folder.iterdir():
            f.unlink()
        for f in ex["b"].iterdir():
            shutil.copy(f, folder / f.name)
        want = load_state(ex["b"]).model_id
        proc.send_signal(signal.SIGHUP)
        deadline, now = time.monotonic() + 60, first["model"]
        while now != want and time.monotonic() < deadline:
            time.sleep(0.2)
            now = Client(port).get("/readyz")[1]["model"]
        assert now == want
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down, then re-raises the signal it caught: exit by SIGTERM, no traceback
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        err = proc.stderr.read()
        assert "SIGHUP reload of" in err and "Traceback" not in err, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("args,words", [
    (["--model", "{missing}"], "does not exist"),
    (["--model", "{a}", "--admin-expose"], "--admin-expose needs a token"),
    (["--model", "{a}", "--port", "{busy}"], "cannot listen on"),
])
def test_cli_serve_errors_are_one_line(exports, tmp_path, capsys, monkeypatch, args, words):
    from mind.cli import main

    ex, _ = exports
    monkeypatch.delenv("MIND_SERVE_ADMIN_TOKEN", raising=False)
    threads = torch.get_num_threads()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        fill = {"missing": str(tmp_path / "missing"), "a": str(ex["a"]), "busy": str(busy.getsockname()[1])}
        try:
            code = main(["serve", *[a.format(**fill) for a in args]])
        finally:
            torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert code == 2, err
    assert words in err and err.startswith("error: ") and err.count("\n") == 1, err
