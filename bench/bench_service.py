"""Load benchmark of the recall service (``python -m mind serve``): latency, throughput, failures, hot swaps.

    python bench/bench_service.py --model aoti=/tmp/svc/model_aoti --model onnx=/tmp/svc/model_onnx \\
        --out bench/measured/service

Each ``--model FMT=DIR`` (exports of one checkpoint; ML-100k in docs/results/service.md) is served by
``python -m mind serve --threads 1`` in a subprocess on 127.0.0.1, once with dynamic batching
(``--max-wait-ms``, default 1) and once with ``--no-batching``.  The client is this process: asyncio,
raw HTTP/1.1 keep-alive connections to 127.0.0.1 only, request bodies encoded in advance.  Every load
loop is bounded by a request count and a time limit and stops by itself.

Requests: ``POST /recommend`` with n = 10 and a history of raw ids drawn once from a seeded RNG
(lengths uniform in 1..40, items uniform over the export's catalogue).  A request fails when it gets
no answer, a status other than 200, or not n items.

Runs per model and batching mode (both servers run at once and each run alternates between them in
``--rounds`` rounds, so that both see the same background load of a shared machine):

* closed loop at each ``--concurrency`` (default 1, 8, 64): that many connections, each sending its
  next request when the previous answer arrives; ``--requests`` requests (default 3000) or
  ``--seconds`` (default 15 s), whichever ends first; requests/s and latency p50 / p99;
* open loop at ``--rate`` requests/s (default 200) for ``--rate-seconds`` (default 20): requests sent
  on a fixed schedule whatever the answers do, latency counted from the scheduled send time (so a
  stall cannot hide queued requests); p50 / p99 / max.

Then, with the first model and batching on: ``--soak`` well-formed requests (default 100,000) at
concurrency 64 (time limit ``--soak-seconds``), counting failures; and ``--swaps`` hot swaps (default
10) through ``POST /admin/reload`` alternating between the first two models, under closed-loop load
at concurrency 8, counting failures and the model ids the answers carry.

The server's mean batch (users per model call) of each run comes from its /metrics
(``mind_serve_batch_users`` sum / count before and after).  ``--screenshot`` also saves the page
(``GET /``) from headless Chromium.  Writes ``service.json``, ``service.csv``, ``service.md`` and
``service.png`` into ``--out``; prints the markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import git_revision, write_rows_csv  # noqa: E402

HOST = "127.0.0.1"          # the only address this benchmark talks to


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _histories(model: pathlib.Path, count: int, seed: int = 0) -> list[list]:
    raw_ids = json.loads((model / "items.json").read_text())["raw_ids"][1:]
    rng = random.Random(seed)
    return [[raw_ids[rng.randrange(len(raw_ids))] for _ in range(rng.randint(1, 40))] for _ in range(count)]


def _request(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class Conn:
    """One keep-alive HTTP/1.1 connection; ``call(raw request) -> (status, body)``."""

    def __init__(self, port: int):
        self.port, self.reader, self.writer = port, None, None

    async def call(self, payload: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        try:
            self.writer.write(payload)
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await self.reader.readexactly(length)
            if b"connection: close" in head.lower():
                self.close()
            return status, body
        except Exception:
            self.close()
            raise

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _ok(status: int, body: bytes, n: int, models: dict) -> bool:
    if status != 200:
        return False
    try:
        got = json.loads(body)
    except ValueError:
        return False
    models[got.get("model")] = models.get(got.get("model"), 0) + 1
    return len(got.get("items", ())) == n


async def closed_loop(port: int, payloads: list, n: int, concurrency: int, requests: int, seconds: float,
                      raw: bool = False, stop: asyncio.Event | None = None) -> dict:
    """``concurrency`` connections, each sending its next request on the previous answer; bounded by
    ``requests``, ``seconds`` and (when given) ``stop`` being set."""
    lat, failures, models, issued = [], [0], {}, [0]
    deadline = time.perf_counter() + seconds

    async def worker():
        conn = Conn(port)
        while (issued[0] < requests and time.perf_counter() < deadline
               and not (stop is not None and stop.is_set())):
            i = issued[0]
            issued[0] += 1
            t0 = time.perf_counter()
            try:
                status, body = await asyncio.wait_for(conn.call(payloads[i % len(payloads)]), 30)
                good = _ok(status, body, n, models)
            except Exception:  # noqa: BLE001 - a failed request, counted
                good = False
                conn.close()
            lat.append(time.perf_counter() - t0)
            failures[0] += not good
        conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    if raw:
        return {"lat": lat, "failed": failures[0], "wall": wall, "models": models}
    return _summary(lat, failures[0], wall, models)


async def open_loop(port: int, payloads: list, n: int, rate: float, seconds: float, pool: int = 64,
                    raw: bool = False, drain: float = 30.0) -> dict:
    """Requests on a fixed schedule (``rate``/s for ``seconds``); latency from the scheduled time.  What is
    unanswered ``drain`` seconds after the last send is cancelled and counted as failed (and its latency
    as the time waited), so an overloaded server cannot stretch the run."""
    conns: asyncio.Queue = asyncio.Queue()
    for _ in range(pool):
        conns.put_nowait(Conn(port))
    lat, failures, models = [], [0], {}
    loop = asyncio.get_running_loop()

    async def one(i: int, when: float):
        conn = await conns.get()
        try:
            status, body = await asyncio.wait_for(conn.call(payloads[i % len(payloads)]), 30)
            good = _ok(status, body, n, models)
        except asyncio.CancelledError:          # cut at the drain limit: counted by the caller
            conn.close()
            raise
        except Exception:  # noqa: BLE001
            good = False
            conn.close()
        lat.append(loop.time() - when)
        failures[0] += not good
        conns.put_nowait(conn)

    total = int(rate * seconds)
    start = loop.time() + 0.05
    tasks = []
    for i in range(total):
        when = start + i / rate
        delay = when - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, when)))
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, start + seconds + drain - loop.time()))
    cut = loop.time()
    for task, i in zip(tasks, range(total)):
        if not task.done():
            task.cancel()
            lat.append(cut - (start + i / rate))
            failures[0] += 1
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    wall = loop.time() - start
    while not conns.empty():
        conns.get_nowait().close()
    if raw:
        return {"lat": lat, "failed": failures[0], "wall": wall, "models": models}
    return _summary(lat, failures[0], wall, models)


def _summary(lat: list, failed: int, wall: float, models: dict) -> dict:
    a = np.asarray(lat) * 1000 if lat else np.zeros(1)
    return {"requests": len(lat), "failed": failed, "seconds": round(wall, 2),
            "rps": round(len(lat) / wall, 1) if wall > 0 else 0.0,
            "p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "max_ms": round(float(a.max()), 2), "models": models}


def _get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(port: int, path: str, body: dict, timeout: float = 120.0) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _batch_stats(port: int) -> tuple[float, float]:
    """(sum, count) of the server's mind_serve_batch_users histogram."""
    _, text = _get(port, "/metrics")
    s = c = 0.0
    for line in text.decode().splitlines():
        if line.startswith("mind_serve_batch_users_sum"):
            s = float(line.split()[-1])
        elif line.startswith("mind_serve_batch_users_count"):
            c = float(line.split()[-1])
    return s, c


class Server:
    """``python -m mind serve`` in a subprocess on a free 127.0.0.1 port; stopped with SIGTERM."""

    def __init__(self, model: pathlib.Path, batching: bool, max_wait_ms: float, log: pathlib.Path):
        self.port = _free_port()
        cmd = [sys.executable, "-m", "mind", "serve", "--model", str(model), "--host", HOST, "--port",
               str(self.port), "--threads", "1", "--max-queue", "100000", "--max-wait-ms", str(max_wait_ms)]
        if not batching:
            cmd.append("--no-batching")
        self.cmd = " ".join(["python"] + cmd[1:])
        self.log = open(log, "w")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}; see {log}")
            try:
                status, body = _get(self.port, "/readyz", 2)
                if status == 200:
                    self.ready = json.loads(body)
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"serve did not get ready in 180 s; see {log}")
            time.sleep(0.2)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _merge(parts: list) -> dict:
    """One run's summary from its rounds (latencies kept per round as lists)."""
    lat = [x for p in parts for x in p["lat"]]
    wall = sum(p["wall"] for p in parts)
    models: dict = {}
    for p in parts:
        for k, v in p["models"].items():
            models[k] = models.get(k, 0) + v
    return _summary(lat, sum(p["failed"] for p in parts), wall, models)


async def _run_model(fmt: str, folder: pathlib.Path, args, payloads, rows: list, logdir: pathlib.Path) -> None:
    """Both servers (batching on, off) up at once; each load level alternates between them in
    ``--rounds`` rounds, so both modes see the same background load on this shared machine."""
    servers = {}
    try:
        for b in ("on", "off"):
            servers[b] = Server(folder, b == "on", args.max_wait_ms, logdir / f"serve_{fmt}_{b}.log")
        for server in servers.values():
            await closed_loop(server.port, payloads, args.n, 8, min(500, args.requests), 10)      # warm-up
        runs = [("closed", c) for c in args.concurrency] + [("open", args.rate)]
        for kind, level in runs:
            parts = {"on": [], "off": []}
            stats = {b: [0.0, 0.0] for b in servers}
            for _ in range(args.rounds):
                for b, server in servers.items():
                    s0 = _batch_stats(server.port)
                    if kind == "closed":
                        r = await closed_loop(server.port, payloads, args.n, level, args.requests // args.rounds,
                                              args.seconds / args.rounds, raw=True)
                    else:
                        r = await open_loop(server.port, payloads, args.n, level, args.rate_seconds / args.rounds,
                                            raw=True)
                    s1 = _batch_stats(server.port)
                    stats[b][0] += s1[0] - s0[0]
                    stats[b][1] += s1[1] - s0[1]
                    parts[b].append(r)
            for b, server in servers.items():
                r = _merge(parts[b])
                row = {"format": fmt, "batching": b, "load": kind,
                       "concurrency": level if kind == "closed" else "", "rate": level if kind == "open" else "",
                       **{k: v for k, v in r.items() if k != "models"},
                       "mean_batch": round(stats[b][0] / stats[b][1], 2) if stats[b][1] else 0.0,
                       "loadavg": _loadavg(), "server": server.cmd}
                rows.append(row)
                print(f"{fmt:5s} batching {b:3s} {kind:6s} {str(level):>5s}: {r['requests']:6d} req {r['failed']} failed"
                      f"  {r['rps']:8.1f} req/s  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:8.2f} ms"
                      f"  mean batch {row['mean_batch']}  (load {row['loadavg']})", flush=True)
    finally:
        for server in servers.values():
            server.stop()


async def _main(args) -> dict:
    models = [(f, pathlib.Path(d).resolve()) for f, d in (m.split("=", 1) for m in args.model)]
    histories = _histories(models[0][1], 2000)
    payloads = [_request("/recommend", json.dumps({"history": h, "n": args.n}).encode()) for h in histories]
    logdir = pathlib.Path(tempfile.mkdtemp(prefix="bench_service_"))
    rows: list = []
    t0 = time.time()
    for fmt, folder in models:
        await _run_model(fmt, folder, args, payloads, rows, logdir)
    extra = await _soak_and_swaps(models, args, payloads, logdir) if (args.soak or args.swaps) else {}
    return {"rows": rows, **extra, "seconds": round(time.time() - t0, 1), "logs": str(logdir)}


async def _soak_and_swaps(models: list, args, payloads, logdir: pathlib.Path) -> dict:
    """The soak run, then the hot swaps under load (module docstring)."""
    fmt, folder = models[0]
    server = Server(folder, True, args.max_wait_ms, logdir / "serve_soak.log")
    out = {"soak_server": server.cmd}
    try:
        if args.soak:
            r = await closed_loop(server.port, payloads, args.n, 64, args.soak, args.soak_seconds)
            out["soak"] = {"format": fmt, "concurrency": 64, **r}
            print(f"soak: {r['requests']} requests, {r['failed']} failed, {r['rps']} req/s, p50 {r['p50_ms']} ms, "
                  f"p99 {r['p99_ms']} ms", flush=True)
        if len(models) > 1 and args.swaps:
            stop = asyncio.Event()
            load = asyncio.ensure_future(closed_loop(server.port, payloads, args.n, 8, 10**6, 600, stop=stop))
            swaps = []
            await asyncio.sleep(0.5)
            for i in range(args.swaps):
                target = models[1][1] if i % 2 == 0 else folder
                t = time.perf_counter()
                status, got = await asyncio.to_thread(_post, server.port, "/admin/reload", {"model": str(target)})
                swaps.append({"status": status, "seconds": round(time.perf_counter() - t, 2), **got})
                await asyncio.sleep(0.3)
            await asyncio.sleep(0.5)
            stop.set()
            r = await load
            out["swaps"] = {"reloads": len(swaps), "ok": sum(s["status"] == 200 for s in swaps), "detail": swaps, **r}
            print(f"swaps: {out['swaps']['ok']}/{len(swaps)} reloads ok; under load {r['requests']} requests, "
                  f"{r['failed']} failed, p99 {r['p99_ms']} ms; answers by model {r['models']}", flush=True)
    finally:
        server.stop()
    return out


def _screenshot(model: pathlib.Path, out: pathlib.Path) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return "no chromium on PATH"
    server = Server(model, True, 1.0, out / ".screenshot_serve.log")
    try:
        # the first of a few seeded histories whose list draws on more than one interest (a fuller picture)
        for seed in range(50):
            history = _histories(model, 1, seed=seed)[0][:8]
            status, got = _post(server.port, "/recommend", {"history": history, "n": 12})
            if status == 200 and len({it["interest"] for it in got["items"]}) > 1:
                break
        hist = ",".join(str(x) for x in history)
        url = f"http://{HOST}:{server.port}/?history={hist}&n=12"
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                            f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--window-size=1280,860",
                            f"--screenshot={out / 'page.png'}", url], capture_output=True, timeout=120)
    finally:
        server.stop()
        (out / ".screenshot_serve.log").unlink(missing_ok=True)
    return str(out / "page.png")


def _markdown(result: dict, args) -> str:
    lines = [f"`python bench/bench_service.py {' '.join(sys.argv[1:])}` (git {result['git']}, {result['machine']}, "
             f"load average before {result['loadavg_before']}, after {result['loadavg_after']}, "
             f"{result['seconds']} s)", "",
             "| format | batching | load | requests | failed | req/s | p50 ms | p99 ms | max ms | mean batch |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        load = f"closed, c={r['concurrency']}" if r["load"] == "closed" else f"open, {r['rate']}/s"
        lines.append(f"| {r['format']} | {r['batching']} | {load} | {r['requests']} | {r['failed']} | {r['rps']} | "
                     f"{r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} | {r['mean_batch']} |")
    lines.append("")
    for fmt in dict.fromkeys(r["format"] for r in result["rows"]):
        sat = {b: max((r["rps"] for r in result["rows"] if r["format"] == fmt and r["batching"] == b
                       and r["load"] == "closed"), default=0) for b in ("on", "off")}
        if sat["off"]:
            lines.append(f"- {fmt}: saturated throughput {sat['on']} req/s with batching, {sat['off']} without: "
                         f"{sat['on'] / sat['off']:.2f}x")
    if "soak" in result:
        s = result["soak"]
        lines.append(f"- soak ({s['format']}, batching on, c=64): {s['requests']} requests, {s['failed']} failed, "
                     f"{s['rps']} req/s, p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms")
    if "swaps" in result:
        s = result["swaps"]
        lines.append(f"- hot swaps: {s['ok']}/{s['reloads']} reloads answered 200 (each "
                     f"{min(d['seconds'] for d in s['detail'])}-{max(d['seconds'] for d in s['detail'])} s); under "
                     f"closed-loop load at c=8: {s['requests']} requests, {s['failed']} failed, p99 {s['p99_ms']} ms, "
                     f"answers per model id {s['models']}")
    return "\n".join(lines) + "\n"


def _plot(rows: list, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for fmt in dict.fromkeys(r["format"] for r in rows):
        for b, style in (("on", "-o"), ("off", "--s")):
            rs = [r for r in rows if r["format"] == fmt and r["batching"] == b and r["load"] == "closed"]
            if not rs:
                continue
            c = [r["concurrency"] for r in rs]
            axes[0].plot(c, [r["rps"] for r in rs], style, label=f"{fmt}, batching {b}")
            axes[1].plot(c, [r["p99_ms"] for r in rs], style, label=f"{fmt}, batching {b}")
    for ax, title in zip(axes, ("requests/s (closed loop)", "p99 latency, ms (closed loop)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent connections")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("python -m mind serve, ML-100k export, 127.0.0.1, 2 shared cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="FORMAT=EXPORT_FOLDER (repeat; first = soak/swaps)")
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "measured" / "service")))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--requests", type=int, default=3000, help="requests per closed-loop run (default 3000)")
    p.add_argument("--seconds", type=float, default=15.0, help="time limit of a closed-loop run (default 15)")
    p.add_argument("--rate", type=float, default=200.0, help="open-loop requests/s (default 200)")
    p.add_argument("--rate-seconds", type=float, default=20.0, help="open-loop duration (default 20)")
    p.add_argument("--soak", type=int, default=100_000, help="well-formed requests of the soak run (0: none)")
    p.add_argument("--soak-seconds", type=float, default=240.0, help="time limit of the soak run (default 240)")
    p.add_argument("--swaps", type=int, default=10, help="hot swaps under load (0: none)")
    p.add_argument("--rounds", type=int, default=3, help="rounds each run is split in, alternating on/off (default 3)")
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--max-wait-ms", type=float, default=1.0)
    p.add_argument("--screenshot", action="store_true", help="also save the page from headless Chromium")
    args = p.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    before = _loadavg()
    result = asyncio.run(_main(args))
    result.update({"git": git_revision(), "loadavg_before": before, "loadavg_after": _loadavg(),
                   "machine": f"{os.cpu_count()} CPUs {platform.machine()}, Python {platform.python_version()}",
                   "command": "python bench/bench_service.py " + " ".join(sys.argv[1:] if argv is None else argv)})
    if args.screenshot:
        result["screenshot"] = _screenshot(pathlib.Path(args.model[0].split("=", 1)[1]), out)
    (out / "service.json").write_text(json.dumps(result, indent=2))
    write_rows_csv(result["rows"], out, "service.csv")
    md = _markdown(result, args)
    (out / "service.md").write_text(md)
    _plot(result["rows"], out / "service.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
