"""From MovieLens to a shop's log: time and peak memory of prepare and training against the log size.

    python bench/bench_scale.py --old /work/wt-8b87692 --out bench/measured/scale
    python bench/bench_scale.py --sizes 200000 --train-sizes 200000 --quality-size 200000 --ddp-size 200000
    python bench/bench_scale.py --report-only --out bench/measured/scale      # redraw md/png from scale.json

1. Generates (seeded, vectorised numpy, in chunks of about CHUNK_ROWS interactions) a shop-like log of N
   interactions: U = N/40 users, I = 2U items, C = 500 categories.  Each item belongs to one category
   (uniform); inside its category an item's popularity is Zipf, p ~ 1/rank**--zipf, the ranks in a
   random order of the item ids.  Each user has 2-4 distinct interests (categories, uniform) and a
   length drawn from a lognormal (sigma 0.8, at least 3) scaled so the lengths sum to N; each
   interaction picks one of the user's interests (uniformly), then an item of that category by its
   popularity.  Timestamps increase per user (gaps of 1 s .. 1 day).  The log is written as a RecBole
   atomic folder ``NAME/NAME.inter`` (user_id:token, item_id:token, rating:float, timestamp:float)
   plus ``NAME/NAME.item`` (item_id:token, category:token_seq, which load_recbole reads as the
   item's genres), and as ``NAME.parquet`` (user_id, item_id, timestamp int64, category string),
   chunk by chunk, cached under ``--work`` and reused.
2. Measures each step in its own subprocess: wall time by this process, peak RSS from
   ``os.wait4``'s ``ru_maxrss``, the process tree's RSS sampled every 0.25 s (stamped with the command's
   output lines, so the report says where the peak fell); a watchdog kills any run whose process tree
   exceeds ``--rss-cap-gb``.  ``python -m mind prepare`` (RecBole and Parquet input, with its progress
   lines; the two prepared folders are checked equal), the old checkout's ``load_recbole`` +
   ``prepare(raw, max_len=50)``, one training epoch (new: on the prepared folder; old: ``--data dir``
   from the log), bytes per interaction above the bare process (``python -c "import torch, mind.train"``),
   valid Recall@50 of K=4 vs K=1 at ``--quality-size``, and two torchrun ranks at ``--ddp-size`` with
   their /proc/PID/smaps(_rollup) sampled every 0.5 s (Rss vs Pss, and the prepared arrays' mappings).
   Each row records the git commit it ran (others may commit during a long run); ``--sections`` reruns
   some parts into the earlier ``scale.json``, replacing their rows.
3. Writes ``scale.json`` (everything), ``scale.csv`` (one row per run), ``scale.md`` and ``scale.png``
   into ``--out``; the training runs' own folders stay under ``--work``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
PY = sys.executable
CHUNK_ROWS = 1 << 20
SECTIONS = ("prepare", "train", "quality", "ddp")
NUM_CATEGORIES = 500
GiB = 1024 ** 3

OLD_PREPARE = r'''
import json, sys, time
t0 = time.perf_counter()
from mind.data import load_recbole, prepare
t1 = time.perf_counter()
raw = load_recbole(sys.argv[1])
t2 = time.perf_counter()
data = prepare(raw, max_len=int(sys.argv[2]))
t3 = time.perf_counter()
print("old-prepare " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "prepare_s": t3 - t2,
                                   "summary": data.summary()}))
'''


# ----------------------------------------------------------------------------- sizes


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmM]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 200000, 200k, 4M)")
    return int(round(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]))


def parse_sizes(text: str) -> list[int]:
    return [parse_size(t) for t in text.split(",") if t.strip()] if text.strip() else []


def label(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


# ----------------------------------------------------------------------------- the log


def _lengths(rng: np.random.Generator, users: int, n: int, floor: int = 3) -> np.ndarray:
    """Per-user interaction counts, lognormal(sigma 0.8) scaled to sum exactly to n, each >= floor."""
    w = rng.lognormal(0.0, 0.8, users)
    spare = n - floor * users
    lengths = floor + np.floor(w / w.sum() * spare).astype(np.int64)
    short = n - int(lengths.sum())
    if short:
        lengths[rng.choice(users, size=short, replace=False)] += 1
    return lengths


def _interests(rng: np.random.Generator, users: int, categories: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(users, 4) distinct categories per row (the first k used) and k in 2..4."""
    k = rng.integers(2, 5, users)
    cats = rng.choice(categories, size=(users, 4))
    while True:   # redraw rows with a repeat among their 4 (all 4 kept distinct, only k are used)
        s = np.sort(cats, axis=1)
        bad = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1))
        if not len(bad):
            return cats, k
        cats[bad] = rng.choice(categories, size=(len(bad), 4))


def generate(n: int, folder: pathlib.Path, seed: int, zipf: float) -> dict:
    """Write the log of ``n`` interactions into ``folder`` (see the module docstring); returns its meta."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = folder.name
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / name).mkdir(parents=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    U = max(1, n // 40)
    I = 2 * U
    C = NUM_CATEGORIES
    item_cat = rng.integers(0, C, I)
    # items grouped by category, a random order inside each: that order is the popularity rank
    by_cat = np.lexsort((rng.random(I), item_cat))
    cat_sorted = item_cat[by_cat]
    starts = np.searchsorted(cat_sorted, np.arange(C + 1))
    rank = np.arange(I) - starts[cat_sorted]
    w = 1.0 / (rank + 1.0) ** zipf
    tot = np.bincount(cat_sorted, weights=w, minlength=C)
    csum = np.cumsum(w)
    before = np.concatenate([[0.0], csum])[starts[:-1]]
    # cdf inside the category, shifted by the category number: category c spans (c, c + 1]
    key = cat_sorted + (csum - before[cat_sorted]) / tot[cat_sorted]
    nonempty = np.flatnonzero(np.diff(starts) > 0)
    key[starts[nonempty + 1] - 1] = nonempty + 1.0        # each category's last slot: exactly c + 1
    item_raw = by_cat + 1                                  # raw item id of each sorted slot
    interests, k = _interests(rng, U, nonempty)
    lengths = _lengths(rng, U, n)
    user_start = rng.integers(1_500_000_000, 1_530_000_000, U)

    with open(tmp / name / f"{name}.item", "w") as f:
        f.write("item_id:token\tcategory:token_seq\n")
        ids = np.arange(1, I + 1)
        for s in range(0, I, CHUNK_ROWS):
            pd.DataFrame({"i": ids[s:s + CHUNK_ROWS], "c": np.char.add("c", item_cat[s:s + CHUNK_ROWS].astype(str))}
                         ).to_csv(f, sep="\t", header=False, index=False)
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64()),
                        ("category", pa.string())])
    cat_names = pa.array([f"c{c}" for c in range(C)], pa.string())
    ends = np.cumsum(lengths)
    written = 0
    with open(tmp / name / f"{name}.inter", "w") as f, \
            pq.ParquetWriter(str(tmp / f"{name}.parquet"), schema) as pw:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        u0 = 0
        while u0 < U:      # users in blocks of about CHUNK_ROWS interactions
            u1 = int(np.searchsorted(ends, written + CHUNK_ROWS, side="right"))
            u1 = min(U, max(u1, u0 + 1))
            lens = lengths[u0:u1]
            m = int(lens.sum())
            user = np.repeat(np.arange(u0, u1), lens)
            pick = (rng.random(m) * k[user]).astype(np.int64)
            cat = interests[user, pick]
            slot = np.searchsorted(key, cat + rng.random(m), side="right")
            item = item_raw[slot]
            gaps = rng.integers(1, 86_400, m)
            c = np.cumsum(gaps)
            f0 = np.cumsum(lens) - lens                    # each user's first row in the chunk
            ts = user_start[user] + c - np.repeat(c[f0] - gaps[f0], lens)   # per-user running sum of gaps
            rating = rng.integers(1, 6, m)
            pd.DataFrame({"u": user + 1, "i": item, "r": rating, "t": ts}).to_csv(
                f, sep="\t", header=False, index=False)
            pw.write_table(pa.table({"user_id": user + 1, "item_id": item, "timestamp": ts,
                                     "category": cat_names.take(pa.array(item_cat[item - 1]))}, schema=schema))
            written += m
            u0 = u1
    meta = {"interactions": n, "users": U, "items": I, "categories": C, "zipf": zipf, "seed": seed,
            "seconds": time.perf_counter() - t0,
            "inter_bytes": (tmp / name / f"{name}.inter").stat().st_size,
            "parquet_bytes": (tmp / f"{name}.parquet").stat().st_size}
    (tmp / "log.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return meta


def get_log(work: pathlib.Path, n: int, seed: int, zipf: float) -> tuple[pathlib.Path, pathlib.Path, dict]:
    """(RecBole folder, Parquet file, meta) of the cached log of n interactions, generated if missing."""
    folder = work / "logs" / f"shop_{label(n)}_s{seed}_z{zipf:g}"
    name = folder.name
    meta_path = folder / "log.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        print(f"[log] reuse {folder} ({meta['interactions']:,} interactions)", flush=True)
    else:
        print(f"[log] generating {n:,} interactions into {folder} ...", flush=True)
        meta = generate(n, folder, seed, zipf)
        print(f"[log] done in {meta['seconds']:.1f} s ({meta['inter_bytes'] / 1e6:.0f} MB .inter, "
              f"{meta['parquet_bytes'] / 1e6:.0f} MB parquet)", flush=True)
    return folder / name, folder / f"{name}.parquet", meta


# ----------------------------------------------------------------------------- measuring


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def _status_kb(pid: int, fields=("VmRSS", "RssAnon", "RssFile", "RssShmem")) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in fields:
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def smaps(pid: int, under: str) -> dict:
    """kB: the process's rollup (Rss, Pss, Pss_Anon, Pss_File, Shared) and the Rss/Pss of the mappings
    of files under ``under`` (the prepared arrays)."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Shared_Clean", "Shared_Dirty"):
                    out[k] = int(v.split()[0])
        data_rss = data_pss = 0
        inside = False
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    parts = line.split(None, 5)
                    inside = len(parts) == 6 and parts[5].startswith(under)
                elif inside:
                    if line.startswith("Rss:"):
                        data_rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        data_pss += int(line.split()[1])
        out["data_Rss"], out["data_Pss"] = data_rss, data_pss
    except (OSError, ValueError):
        return {}
    out.update({k: v for k, v in _status_kb(pid).items() if k != "VmRSS"})
    out["Shared"] = out.pop("Shared_Clean", 0) + out.pop("Shared_Dirty", 0)
    return out


class Run:
    """One measured subprocess: wall time (parent), peak RSS (wait4's ru_maxrss), a log file."""

    def __init__(self, cmd: list[str], cwd, env: dict, log: pathlib.Path, rss_cap_kb: int,
                 timeout: float | None = None, sampler=None, interval: float = 0.25):
        self.cmd, self.cwd, self.env, self.log = cmd, str(cwd), env, log
        self.rss_cap_kb, self.timeout, self.sampler, self.interval = rss_cap_kb, timeout, sampler, interval
        self.killed: str | None = None
        self.tree_peak_kb = 0
        self.trace: list[tuple] = []       # (s since start, RSS, RssFile of the process tree, kB)
        self.lines: list[tuple[float, str]] = []

    def _watch(self, pid: int, done: threading.Event, t0: float) -> None:
        logf = open(self.log, errors="replace")
        partial = ""
        while not done.wait(self.interval):
            procs = [pid] + descendants(pid)
            stats = [_status_kb(p) for p in procs]
            rss = sum(st.get("VmRSS", 0) for st in stats)
            self.tree_peak_kb = max(self.tree_peak_kb, rss)
            t = round(time.perf_counter() - t0, 2)
            self.trace.append((t, rss, sum(st.get("RssFile", 0) for st in stats)))
            partial += logf.read()        # the command's output lines, stamped with the time they appeared
            *lines, partial = partial.split("\n")
            self.lines += [(t, line[:200]) for line in lines if line.strip()]
            if self.sampler is not None:
                self.sampler(pid, time.perf_counter() - t0)
            reason = None
            if rss > self.rss_cap_kb:
                reason = f"killed: process tree RSS {rss / 1024 ** 2:.2f} GiB > cap {self.rss_cap_kb / 1024 ** 2:.1f} GiB"
            elif self.timeout is not None and time.perf_counter() - t0 > self.timeout:
                reason = f"killed after {self.timeout:.0f} s (time cap)"
            if reason:
                self.killed = reason
                try:
                    os.killpg(pid, signal.SIGTERM)
                    if done.wait(10):
                        return
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return

    def go(self) -> dict:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        load0 = _loadavg()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        # other people commit while a long run goes on: note what each command ran
        commit = _git_head(self.cwd)
        commit = None if commit is None else commit + ("+dirty" if _git_dirty(self.cwd) else "")
        with open(self.log, "w") as out:
            out.write("$ " + " ".join(self.cmd) + f"\n# cwd {self.cwd}\n")
            out.flush()
            t0 = time.perf_counter()
            p = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            done = threading.Event()
            watcher = threading.Thread(target=self._watch, args=(p.pid, done, t0), daemon=True)
            watcher.start()
            _, status, ru = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t0
            done.set()
            watcher.join()
            p.returncode = os.waitstatus_to_exitcode(status)
        text = self.log.read_text(errors="replace")
        return {"rc": p.returncode, "wall_s": wall, "peak_rss_kb": int(ru.ru_maxrss), "killed": self.killed,
                "cpu_s": ru.ru_utime + ru.ru_stime, "load_before": load0, "load_after": _loadavg(),
                "commit": commit, "started": started,
                "tree_peak_kb": self.tree_peak_kb, "log": str(self.log), "stdout": text,
                "trace": self.trace, "lines": self.lines}


def peak_phase(trace: list, lines: list) -> str | None:
    """Where the sampled RSS peaked: the last output line before the peak and the first one after it."""
    if not trace:
        return None
    t, kb = max(trace, key=lambda x: x[1])[:2]
    before = [ln for s, ln in lines if s <= t and not ln.startswith(("$ ", "# cwd"))]
    after = [ln for s, ln in lines if s > t]
    return (f"sampled peak {kb * 1024 / 1e9:.2f} GB at {t:.1f} s, after {before[-1][:90]!r}" if before else
            f"sampled peak {kb * 1024 / 1e9:.2f} GB at {t:.1f} s, before any output") + \
           (f", before {after[0][:90]!r}" if after else ", after the last output")


def _loadavg() -> float | None:
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _json_after(text: str, marker: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith(marker):
            rest = line[len(marker):]
            try:
                return json.JSONDecoder().raw_decode(rest.strip())[0]
            except ValueError:
                return None
    return None


def _metrics(out_dir: pathlib.Path) -> dict | None:
    path = out_dir / "metrics.csv"
    if not path.is_file():
        return None
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else None


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = pathlib.Path(args.work)
        self.out = pathlib.Path(args.out)
        self.cap = int(args.rss_cap_gb * 1024 ** 2)
        self.results: list[dict] = []
        self.logs = self.work / "logs_runs"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        self.env_new = env
        self.env_old = dict(env, PYTHONPATH=str(pathlib.Path(args.old).resolve())) if args.old else None

    def run(self, cmd, cwd, env, tag: str, **kw) -> dict:
        print(f"[run] {tag}: {' '.join(cmd)}", flush=True)
        r = Run(cmd, cwd, env, self.logs / f"{tag}.log", self.cap, **kw).go()
        gb = r["peak_rss_kb"] / 1024 ** 2
        print(f"[run] {tag}: rc {r['rc']}, {r['wall_s']:.1f} s, peak RSS {gb:.2f} GiB"
              + (f", {r['killed']}" if r["killed"] else ""), flush=True)
        if r["rc"] != 0 and not r["killed"]:
            print("\n".join(r["stdout"].splitlines()[-30:]), flush=True)
        return r

    def record(self, row: dict) -> dict:
        key = (row["section"], row["variant"], row["n"])     # a rerun replaces the earlier row
        self.results = [r for r in self.results if (r["section"], r["variant"], r["n"]) != key] + [row]
        self.save()
        return row

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "scale.json").write_text(json.dumps(self.meta | {"rows": self.results}, indent=1))

    # ------------------------------------------------------------------ steps

    def bare(self, which: str) -> int:
        env, cwd = (self.env_new, ROOT) if which == "new" else (self.env_old, self.args.old)
        peaks = []
        for i in range(3):
            r = self.run([PY, "-c", "import torch, mind.train"], cwd, env, f"bare_{which}_{i}")
            peaks.append(r["peak_rss_kb"])
        kb = int(statistics.median(peaks))
        self.record({"section": "bare", "variant": which, "n": 0, "peak_rss_kb": kb, "rc": 0,
                     "commit": r["commit"], "started": r["started"],
                     "cmd": 'python -c "import torch, mind.train"', "note": f"median of 3: {peaks}"})
        return kb

    def prepare_new(self, n: int, src: pathlib.Path, fmt: str) -> dict:
        dst = self.work / "prepared" / f"{label(n)}_{fmt}"
        shutil.rmtree(dst, ignore_errors=True)
        cmd = [PY, "-m", "mind", "prepare", "--data-dir", str(src), "--format", fmt, "--out", str(dst)]
        r = self.run(cmd, ROOT, self.env_new, f"prepare_{fmt}_{label(n)}", timeout=self.args.step_timeout)
        summary = _json_after(r["stdout"], "prepared ") or {}
        m = re.search(r"^prepared .* in ([0-9.]+) s$", r["stdout"], re.M)
        size = sum(p.stat().st_size for p in dst.glob("*") if p.is_file()) if dst.is_dir() else None
        return self.record(self._row("prepare", f"new {fmt}", n, cmd, r, summary=summary, prepared=str(dst),
                                     prepared_bytes=size, inside_s=float(m.group(1)) if m else None))

    def prepare_old(self, n: int, src: pathlib.Path) -> dict:
        cmd = [PY, "-c", OLD_PREPARE, str(src), "50"]
        r = self.run(cmd, self.args.old, self.env_old, f"prepare_old_{label(n)}", timeout=self.args.step_timeout)
        got = _json_after(r["stdout"], "old-prepare ") or {}
        inside = got["load_s"] + got["prepare_s"] if got else None
        return self.record(self._row("prepare", "old recbole", n, [PY, "-c", "<load_recbole + prepare(raw, max_len=50)>",
                                                                     str(src)], r, summary=got.get("summary") or {},
                                     inner=got, inside_s=inside))

    def train_new(self, n: int, prep: pathlib.Path, tag: str, section: str = "train", variant: str = "new",
                  extra=(), max_len: int | None = 50, epochs: int = 1) -> dict:
        out_dir = self.work / "runs" / tag
        shutil.rmtree(out_dir, ignore_errors=True)
        cmd = [PY, "-m", "mind", "train", "--data-dir", str(prep), "--epochs", str(epochs)]
        if max_len is not None:
            cmd += ["--max-len", str(max_len)]
        cmd += ["--threads", str(self.args.threads), "--no-progress", "--out", str(out_dir), *extra]
        r = self.run(cmd, ROOT, self.env_new, tag, timeout=self.args.step_timeout)
        return self.record(self._train_row(section, variant, n, cmd, r, out_dir))

    def train_old(self, n: int, src: pathlib.Path) -> dict:
        tag = f"train_old_{label(n)}"
        out_dir = self.work / "runs" / tag
        shutil.rmtree(out_dir, ignore_errors=True)
        cmd = [PY, "-m", "mind", "train", "--data", "dir", "--data-dir", str(src), "--format", "recbole",
               "--epochs", "1", "--max-len", "50", "--threads", str(self.args.threads), "--no-progress",
               "--out", str(out_dir)]
        r = self.run(cmd, self.args.old, self.env_old, tag, timeout=self.args.step_timeout)
        return self.record(self._train_row("train", "old", n, cmd, r, out_dir))

    def ddp(self, n: int, prep: pathlib.Path) -> dict:
        tag = f"ddp_{label(n)}"
        out_dir = self.work / "runs" / tag
        shutil.rmtree(out_dir, ignore_errors=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "mind", "train", "--data-dir", str(prep), "--epochs", "1", "--max-len", "50", "--threads", "1",
               "--no-progress", "--out", str(out_dir)]
        under = str(prep.resolve()) + "/"
        samples: list[dict] = []

        def sample(pid: int, t: float) -> None:
            ranks = {}
            for c in _children().get(pid, []):
                try:
                    env = open(f"/proc/{c}/environ", "rb").read().split(b"\0")
                except OSError:
                    continue
                rank = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"LOCAL_RANK=")), None)
                if rank is None:
                    continue
                got = smaps(c, under)
                if got:
                    ranks[rank] = got
            if ranks:
                samples.append({"t": round(t, 2), "ranks": ranks})

        cap = self.args.ddp_seconds if self.args.ddp_seconds else 900.0
        r = self.run(cmd, ROOT, self.env_new, tag, timeout=cap, sampler=sample, interval=0.5)
        row = self._train_row("ddp", "2 ranks x 1 thread", n, cmd, r, out_dir)
        full = [s for s in samples if len(s["ranks"]) == 2]
        def tot(s, k):
            return sum(v.get(k, 0) for v in s["ranks"].values())
        if full:
            peak_rss = max(full, key=lambda s: tot(s, "Rss"))
            peak_pss = max(full, key=lambda s: tot(s, "Pss"))
            peak_data = max(full, key=lambda s: tot(s, "data_Rss"))
            per_rank_peak = {k: {f: max(s["ranks"][k].get(f, 0) for s in full if k in s["ranks"])
                                 for f in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Shared", "RssFile", "RssAnon",
                                           "data_Rss", "data_Pss")}
                             for k in sorted({k for s in full for k in s["ranks"]})}
            row.update({"ddp_samples": len(samples), "ddp_samples_both": len(full),
                        "sum_rss_peak_kb": tot(peak_rss, "Rss"), "sum_pss_at_rss_peak_kb": tot(peak_rss, "Pss"),
                        "sum_pss_peak_kb": tot(peak_pss, "Pss"),
                        "sum_rss_minus_pss_at_rss_peak_kb": tot(peak_rss, "Rss") - tot(peak_rss, "Pss"),
                        "data_rss_sum_peak_kb": tot(peak_data, "data_Rss"),
                        "data_pss_sum_at_that_kb": tot(peak_data, "data_Pss"),
                        "per_rank_peak_kb": per_rank_peak})
        row["prepared_bytes"] = sum(p.stat().st_size for p in prep.glob("*.npy"))
        row["ddp_cap_s"] = cap
        (self.work / "ddp_samples.json").write_text(json.dumps(samples))   # every sample; scale.json keeps the peaks
        row["samples_file"] = str(self.work / "ddp_samples.json")
        return self.record(row)

    # ------------------------------------------------------------------ rows

    def _row(self, section, variant, n, cmd, r, **extra) -> dict:
        row = {"section": section, "variant": variant, "n": n, "cmd": " ".join(cmd), "rc": r["rc"],
               "commit": r["commit"], "started": r["started"],
               "killed": r["killed"], "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "peak_rss_kb": r["peak_rss_kb"],
               "tree_peak_kb": r["tree_peak_kb"], "load_before": r["load_before"], "load_after": r["load_after"],
               "log": r["log"], "peak_phase": peak_phase(r["trace"], r["lines"]), "rss_trace": r["trace"],
               "output_times": r["lines"]}
        if r["rc"] != 0:
            row["tail"] = "\n".join(r["stdout"].splitlines()[-25:])
        row.update(extra)
        return row

    def _train_row(self, section, variant, n, cmd, r, out_dir) -> dict:
        summary = _json_after(r["stdout"], "data: ") or {}
        m = _metrics(out_dir)
        row = self._row(section, variant, n, cmd, r, summary=summary, out_dir=str(out_dir))
        if m:
            sec = float(m["seconds"])
            ex = summary.get("train_examples")
            row.update({"epoch_s": sec, "valid_recall50": float(m["valid_recall@50"]),
                        "examples_per_s": ex / sec if ex else None})
        return row

    # ------------------------------------------------------------------ main

    def main(self) -> None:
        a = self.args
        from importlib.metadata import version
        sections = set(a.sections)
        command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
        previous = self.out / "scale.json"
        if sections != set(SECTIONS) and previous.is_file():     # rerun some sections into the earlier results
            earlier = json.loads(previous.read_text())
            self.results = earlier.pop("rows")
            self.meta = earlier
            self.meta.setdefault("reruns", []).append(
                {"command": command, "sections": sorted(sections), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        else:
            self.meta = {"command": command, "torch": version("torch"), "numpy": np.__version__,
                         "threads": a.threads, "cpus": os.cpu_count(), "old": str(a.old) if a.old else None,
                         "old_commit": _git_head(a.old) if a.old else None, "new_commit": _git_head(ROOT),
                         "new_dirty": _git_dirty(ROOT), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                         "quality_epochs": a.quality_epochs, "zipf": a.zipf, "seed": a.seed}
        t_start = time.perf_counter()
        if "bare_new_kb" not in self.meta:
            self.meta["bare_new_kb"] = self.bare("new")
        if a.old and "bare_old_kb" not in self.meta:
            self.meta["bare_old_kb"] = self.bare("old")
        need_prep = set(a.train_sizes if "train" in sections else ())
        need_prep |= {a.quality_size} if a.quality_size and "quality" in sections else set()
        need_prep |= {a.ddp_size} if a.ddp_size and "ddp" in sections else set()
        logs, preps = {}, {}
        for n in sorted(need_prep | (set(a.sizes) if "prepare" in sections else set())):
            src, pq_file, meta = get_log(self.work, n, a.seed, a.zipf)
            logs[n] = src
            self.meta.setdefault("logs", {})[str(n)] = meta
            cached = self.work / "prepared" / f"{label(n)}_recbole"
            if "prepare" not in sections and (cached / "meta.json").is_file():
                preps[n] = cached                    # prepared by an earlier run of this script
                continue
            r = self.prepare_new(n, src, "recbole")
            if r["rc"] != 0:
                raise SystemExit(f"prepare failed at {n}: see {r['log']}")
            preps[n] = pathlib.Path(r["prepared"])
            if "prepare" not in sections:
                continue
            rp = self.prepare_new(n, pq_file, "parquet")
            if rp["rc"] == 0:
                rp["same_arrays_as_recbole"] = same_arrays(preps[n], pathlib.Path(rp["prepared"]))
                self.save()
            if a.old and n <= a.old_max:
                self.prepare_old(n, src)
        if "train" in sections:
            for n in a.train_sizes:
                self.train_new(n, preps[n], f"train_new_{label(n)}")
                if a.old and n <= a.old_max:
                    self.train_old(n, logs[n])
        if a.quality_size and "quality" in sections:
            n = a.quality_size
            for k in (4, 1):
                self.train_new(n, preps[n], f"quality_K{k}_{label(n)}", section="quality", variant=f"K={k}",
                               extra=["--interests", str(k)], max_len=None, epochs=a.quality_epochs)
        if a.ddp_size and "ddp" in sections:
            self.ddp(a.ddp_size, preps[a.ddp_size])
        if "reruns" in self.meta and self.meta["reruns"][-1]["command"] == command:
            self.meta["reruns"][-1]["total_s"] = time.perf_counter() - t_start
        else:
            self.meta["total_s"] = time.perf_counter() - t_start
        self.save()
        report(self.out)


def same_arrays(a: pathlib.Path, b: pathlib.Path) -> bool:
    """True when two prepared folders hold equal .npy arrays (compared memory-mapped, in slices)."""
    names = sorted(p.name for p in a.glob("*.npy"))
    if names != sorted(p.name for p in b.glob("*.npy")):
        return False
    for name in names:
        x, y = np.load(a / name, mmap_mode="r"), np.load(b / name, mmap_mode="r")
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        for s in range(0, len(x), CHUNK_ROWS):
            if not np.array_equal(x[s:s + CHUNK_ROWS], y[s:s + CHUNK_ROWS]):
                return False
    return True


def _git_head(path) -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _git_dirty(path) -> bool | None:
    try:
        return bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "mind"], cwd=path,
                                   capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return None


# ----------------------------------------------------------------------------- report


def _gb(kb) -> str:
    """kB (KiB, as /proc and ru_maxrss give) -> GB (10^9 bytes), two decimals."""
    return "" if kb is None else f"{kb * 1024 / 1e9:.2f}"


def _f(x, fmt="{:.1f}") -> str:
    return "" if x is None else fmt.format(x)


def epoch_rss_kb(r) -> int | None:
    """Median sampled RSS while the epoch ran: from the 'jagged histories' line to the 'epoch 1:' line."""
    lines, trace = r.get("output_times") or [], r.get("rss_trace") or []
    t0 = next((t for t, ln in lines if ln.startswith("jagged histories")), None)
    t1 = next((t for t, ln in lines if ln.startswith("epoch 1:")), None)
    inside = [x[1] for x in trace if t0 is not None and t1 is not None and t0 < x[0] < t1 - 1]
    return int(statistics.median(inside)) if inside else None


def _commits(rows, section) -> str:
    by: dict[str, list[str]] = {}
    for r in sorted((r for r in rows if r["section"] == section and r.get("commit")), key=lambda r: r["n"]):
        by.setdefault(r["commit"], []).append(f"{r['variant']} {label(r['n'])}")
    return ("Commits measured (others committed during the runs): "
            + "; ".join(f"{c}: {', '.join(v)}" for c, v in by.items()) + ".") if by else ""


def _marginal(rows, section, variant) -> str:
    """Peak-RSS growth per added interaction between consecutive sizes (independent of the baseline)."""
    pts = sorted((r["n"], r["peak_rss_kb"]) for r in rows if r["section"] == section and r["variant"] == variant
                 and r.get("rc") == 0)
    return ", ".join(f"{label(a)}->{label(b)} {(kb - ka) * 1024 / (b - a):.0f}" for (a, ka), (b, kb) in zip(pts, pts[1:]))


def _load(r) -> str:
    if not r or r.get("load_before") is None:
        return ""
    return f"{r['load_before']:.1f} -> {r['load_after']:.1f}"


def _n(x) -> str:
    return "" if x is None else f"{x:,}"


def report(out: pathlib.Path) -> None:
    data = json.loads((out / "scale.json").read_text())
    rows = data["rows"]
    bare = {"new": data.get("bare_new_kb"), "old": data.get("bare_old_kb")}

    def get(section, variant, n):
        return next((r for r in rows if r["section"] == section and r["variant"] == variant and r["n"] == n
                     and r.get("rc") == 0), None)

    def bpi(r):
        which = "old" if r and r["variant"].startswith("old") else "new"
        if r is None or bare.get(which) is None or not r["n"]:
            return None
        return (r["peak_rss_kb"] - bare[which]) * 1024 / r["n"]

    for r in rows:   # bytes per interaction above the bare process of the same checkout
        if r["section"] != "bare" and r.get("rc") == 0:
            r["bytes_per_interaction"] = bpi(r)

    cols = ["section", "variant", "n", "rc", "killed", "wall_s", "cpu_s", "peak_rss_kb", "bytes_per_interaction",
            "epoch_s", "examples_per_s", "valid_recall50", "interactions_kept", "users", "items", "train_examples",
            "prepared_bytes", "same_arrays_as_recbole", "sum_rss_peak_kb", "sum_pss_at_rss_peak_kb",
            "sum_pss_peak_kb", "data_rss_sum_peak_kb", "data_pss_sum_at_that_kb", "load_before", "load_after", "cmd"]
    with open(out / "scale.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            s = r.get("summary") or {}
            w.writerow(r | {"interactions_kept": s.get("interactions"), "users": s.get("num_users"),
                            "items": s.get("num_items"), "train_examples": s.get("train_examples"),
                            "cmd": r["cmd"].replace(PY, "python")})

    loads = [x for r in rows for x in (r.get("load_before"), r.get("load_after")) if x is not None]
    sizes = sorted({r["n"] for r in rows if r["section"] == "prepare"})
    L = ["# Scale: prepare and one training epoch against the log size", "",
         f"`{data['command']}`", ""]
    for rr in data.get("reruns", []):
        L += [f"then, rerunning {', '.join(rr['sections'])} (rows replaced; started {rr['started']}): "
              f"`{rr['command']}`", ""]
    L += [
         f"torch {data['torch']}, numpy {data['numpy']}, {data['cpus']} CPUs shared with other jobs "
         f"(1-min load average {min(loads, default=0):.1f}-{max(loads, default=0):.1f} around the runs), "
         f"this checkout at {data['new_commit']}{' + uncommitted mind/ changes' if data.get('new_dirty') else ''} "
         f"when the first run started (each section names the commit each row ran)"
         + (f", old = {data['old_commit']} ({data['old']})" if data.get("old") else "")
         + f"; started {data['started']}, {data.get('total_s', 0) / 60:.0f} min"
         + "".join(f" + {rr['total_s'] / 60:.0f} min" for rr in data.get("reruns", []) if rr.get("total_s"))
         + " in all.", "",
         f"Log (bench/bench_scale.py, seed {data['seed']}): N interactions, U = N/40 users, 2U items, "
         f"{NUM_CATEGORIES} categories, Zipf({data['zipf']:g}) popularity inside a category, 2-4 interests per user. "
         f"Peak RSS = `os.wait4` ru_maxrss of the command's process, in GB (10^9 bytes); bytes/interaction = "
         f"(peak RSS - bare) / N, bare = `python -c \"import torch, mind.train\"` of the same checkout "
         f"({_gb(bare['new'])} GB new" + (f", {_gb(bare['old'])} GB old" if bare.get("old") else "") + "). "
         "Prepare s = wall time of the whole command (interpreter start and imports included); in-process s = "
         "what the command itself reports (new: `prepared ... in X s`, reading the log to writing the arrays; "
         "old: load_recbole + prepare, imports excluded).", "",
         "## Prepare", "",
         "| N | kept | users | items | train examples | new s (RecBole) | new s (Parquet) | old s (load+prepare) "
         "| new/old | in-process s new (RecBole) | new (Parquet) | old | new/old "
         "| peak RSS GB new (RecBole) | new (Parquet) | old | B/interaction new (RecBole) | new (Parquet) | old |",
         "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in sizes:
        nr, npq, old = get("prepare", "new recbole", n), get("prepare", "new parquet", n), get("prepare", "old recbole", n)
        s = (nr or npq or {}).get("summary") or {}
        ratio = f"{nr['wall_s'] / old['wall_s']:.2f}" if nr and old else ""
        inside_ratio = (f"{nr['inside_s'] / old['inside_s']:.2f}"
                        if nr and old and nr.get("inside_s") and old.get("inside_s") else "")
        L.append(f"| {label(n)} | {_n(s.get('interactions'))} | {_n(s.get('num_users'))} | {_n(s.get('num_items'))} "
                 f"| {_n(s.get('train_examples'))} | {_f(nr and nr['wall_s'])} | {_f(npq and npq['wall_s'])} "
                 f"| {_f(old and old['wall_s'])} | {ratio} | {_f(nr and nr.get('inside_s'))} "
                 f"| {_f(npq and npq.get('inside_s'))} | {_f(old and old.get('inside_s'))} | {inside_ratio} "
                 f"| {_gb(nr and nr['peak_rss_kb'])} "
                 f"| {_gb(npq and npq['peak_rss_kb'])} | {_gb(old and old['peak_rss_kb'])} "
                 f"| {_f(bpi(nr), '{:.0f}')} | {_f(bpi(npq), '{:.0f}')} | {_f(bpi(old), '{:.0f}')} |")
    same = [(r["n"], r.get("same_arrays_as_recbole")) for r in rows
            if r["section"] == "prepare" and r["variant"] == "new parquet" and r.get("rc") == 0]
    if same:
        L += ["", "Parquet and RecBole input give the same prepared arrays: "
              + ", ".join(f"{label(n)} {'yes' if ok else 'NO'}" for n, ok in same) + "."]
    marg = [(v, _marginal(rows, "prepare", v)) for v in ("new recbole", "new parquet", "old recbole")]
    marg = [(v, m) for v, m in marg if m]
    if marg:
        L += ["", "Peak RSS growth per added interaction (bytes), between consecutive sizes: "
              + "; ".join(f"{v}: {m}" for v, m in marg) + "."]
    L += ["", _commits(rows, "prepare")]
    L += ["", "Where the sampled peak fell (RSS of the process sampled every 0.25 s, stamped by the command's "
          "progress lines): " + "; ".join(f"{r['variant']} {label(r['n'])}: {r['peak_phase']}" for r in rows
                                           if r["section"] == "prepare" and r.get("peak_phase") and r["n"] == max(sizes))
          + "."]
    olds = [r for r in rows if r["section"] == "prepare" and r["variant"] == "old recbole" and r.get("inner")]
    if olds:
        L += ["", "Old, inside its process: " + "; ".join(
            f"{label(r['n'])}: imports {r['inner']['import_s']:.1f} s, load_recbole {r['inner']['load_s']:.1f} s, "
            f"prepare {r['inner']['prepare_s']:.1f} s" for r in olds) + "."]
    for r in rows:
        if r["section"] in ("prepare", "train") and r.get("rc") != 0:
            L.append(f"\n**failed**: {r['section']} {r['variant']} at {label(r['n'])}: rc {r['rc']} "
                     f"{r.get('killed') or ''}")
    tsizes = sorted({r["n"] for r in rows if r["section"] == "train"})
    if tsizes:
        L += ["", f"## One training epoch (max_len 50, K=4, {data['threads']} threads)", "",
              "Epoch s = metrics.csv `seconds` (the epoch and its valid evaluation); examples/s = train examples / "
              "epoch s; wall s = the whole command; CPU s = its user + system time; load avg = the machine's 1-min "
              "load average before -> after the run (2 cores; above 2 means other jobs competed). New trains on the prepared folder (memory-mapped); old loads "
              "and prepares the RecBole log inside the training process, so its peak RSS and wall time include that.",
              "",
              "| N | train examples | epoch s new | old | examples/s new | old | new/old | peak RSS GB new | old "
              "| RSS during the epoch GB new | old "
              "| B/interaction new | old | valid Recall@50 new | old | wall s new | old | CPU s new | old "
              "| load avg new | old |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for n in tsizes:
            nw, old = get("train", "new", n), get("train", "old", n)
            s = (nw or old or {}).get("summary") or {}
            ratio = (f"{nw['examples_per_s'] / old['examples_per_s']:.2f}"
                     if nw and old and nw.get("examples_per_s") and old.get("examples_per_s") else "")
            L.append(f"| {label(n)} | {_n(s.get('train_examples'))} | {_f(nw and nw.get('epoch_s'))} "
                     f"| {_f(old and old.get('epoch_s'))} | {_f(nw and nw.get('examples_per_s'), '{:.0f}')} "
                     f"| {_f(old and old.get('examples_per_s'), '{:.0f}')} | {ratio} | {_gb(nw and nw['peak_rss_kb'])} "
                     f"| {_gb(old and old['peak_rss_kb'])} | {_gb(nw and epoch_rss_kb(nw))} | {_gb(old and epoch_rss_kb(old))} "
                     f"| {_f(bpi(nw), '{:.0f}')} | {_f(bpi(old), '{:.0f}')} "
                     f"| {_f(nw and nw.get('valid_recall50'), '{:.4f}')} | {_f(old and old.get('valid_recall50'), '{:.4f}')} "
                     f"| {_f(nw and nw['wall_s'])} | {_f(old and old['wall_s'])} "
                     f"| {_f(nw and nw.get('cpu_s'), '{:.0f}')} | {_f(old and old.get('cpu_s'), '{:.0f}')} "
                     f"| {_load(nw)} | {_load(old)} |")
    if tsizes:
        L += ["", "RSS during the epoch = median of the samples between the 'jagged histories' line and the 'epoch 1:' "
              "line; the peak comes after it (new: checkpoints, plots and the final valid + test evaluation; old: "
              "its in-process load + prepare before training). Peak: " + "; ".join(
                  f"{r['variant']} {label(r['n'])}: {r['peak_phase']}" for r in rows
                  if r["section"] == "train" and r.get("peak_phase")) + ".", "", _commits(rows, "train")]
    q = [r for r in rows if r["section"] == "quality"]
    if q:
        L += ["", f"## K=4 vs K=1 at {label(q[0]['n'])} (train defaults: max_len 20, dim 64, batch 256; "
              f"--epochs {data['quality_epochs']}, {data['threads']} threads)", "",
              _commits(rows, "quality"), "",
              "| model | valid Recall@50 | epoch s | peak RSS GB |", "|---|---:|---:|---:|"]
        for r in q:
            L.append(f"| MIND {r['variant']} | {_f(r.get('valid_recall50'), '{:.4f}')} | {_f(r.get('epoch_s'))} "
                     f"| {_gb(r['peak_rss_kb'])} |" + ("" if r.get("rc") == 0 else f" failed rc {r['rc']}"))
    d = [r for r in rows if r["section"] == "ddp"]
    if d:
        r = d[0]
        pr = r.get("per_rank_peak_kb") or {}
        L += ["", f"## Two torchrun ranks at {label(r['n'])} (1 thread each, one epoch, max_len 50)", "",
              f"`{r['cmd'].replace(PY, 'python')}`", "", _commits(rows, "ddp"), "",
              f"/proc/PID/smaps_rollup and /proc/PID/smaps of both ranks every 0.5 s ({r.get('ddp_samples_both', 0)} "
              f"samples with both ranks alive); \"prepared arrays mapped\" = the mappings of the prepared folder's .npy "
              f"files. " + (f"Run {r['killed']}; " if r.get("killed") else "The run finished its epoch; ")
              + f"rc {r['rc']}, wall {r['wall_s']:.0f} s"
              + (f", epoch {r['epoch_s']:.0f} s, {r['examples_per_s']:.0f} examples/s, valid Recall@50 "
                 f"{r['valid_recall50']:.4f}" if r.get("epoch_s") else "") + ".", "",
              "| quantity | MB (10^6 B) |", "|---|---:|"]
        for k, v in (("peak over time of sum(Rss) over the 2 ranks", r.get("sum_rss_peak_kb")),
                     ("sum(Pss) at that moment", r.get("sum_pss_at_rss_peak_kb")),
                     ("peak over time of sum(Pss)", r.get("sum_pss_peak_kb")),
                     ("sum(Rss) - sum(Pss) at the Rss peak (all shared pages: libraries, the dataset)",
                      r.get("sum_rss_minus_pss_at_rss_peak_kb")),
                     ("prepared arrays mapped: peak of sum(Rss) over ranks", r.get("data_rss_sum_peak_kb")),
                     ("prepared arrays mapped: sum(Pss) at that moment", r.get("data_pss_sum_at_that_kb")),
                     ("prepared .npy files on disk", r["prepared_bytes"] / 1024)):
            L.append(f"| {k} | {'' if v is None else f'{v * 1024 / 1e6:.1f}'} |")
        if pr:
            L += ["", "Per rank, the peak of each field over the run (MB): " + "; ".join(
                f"rank {k}: Rss {v['Rss'] * 1.024e-3:.0f}, Pss {v['Pss'] * 1.024e-3:.0f}, "
                f"Pss_Anon {v['Pss_Anon'] * 1.024e-3:.0f}, Pss_File {v['Pss_File'] * 1.024e-3:.0f}, "
                f"Shared {v['Shared'] * 1.024e-3:.0f}, RssFile {v['RssFile'] * 1.024e-3:.0f}, "
                f"prepared arrays Rss {v['data_Rss'] * 1.024e-3:.1f} / Pss {v['data_Pss'] * 1.024e-3:.1f}"
                for k, v in pr.items()) + "."]
    L += ["", "![peak RSS and time against N](scale.png)", ""]
    (out / "scale.md").write_text("\n".join(L))
    plot(out, rows, bare)


def plot(out: pathlib.Path, rows: list[dict], bare: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    series = [("prepare", "new recbole", "prepare, new (RecBole)", "tab:blue", "o", "-", "inside_s"),
              ("prepare", "new parquet", "prepare, new (Parquet)", "tab:green", "s", "-", "inside_s"),
              ("prepare", "old recbole", "load+prepare, old", "tab:blue", "o", "--", "inside_s"),
              ("train", "new", "1 training epoch, new", "tab:red", "^", "-", "epoch_s"),
              ("train", "old", "1 training epoch, old (incl. load+prepare in RSS)", "tab:red", "^", "--", "epoch_s")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for section, variant, name, color, marker, ls, tkey in series:
        pts = sorted((r["n"], r["peak_rss_kb"] * 1024 / 1e9, r.get(tkey)) for r in rows
                     if r["section"] == section and r["variant"] == variant and r.get("rc") == 0)
        if not pts:
            continue
        face = "white" if ls == "--" else color
        kw = dict(color=color, marker=marker, ls=ls, mfc=face, ms=7, lw=1.6, label=name)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], **kw)
        tp = [(p[0], p[2]) for p in pts if p[2]]
        axes[1].plot([p[0] for p in tp], [p[1] for p in tp], **kw)
    if bare.get("new"):
        axes[0].axhline(bare["new"] * 1024 / 1e9, color="grey", lw=1, ls=":",
                        label="bare process (import torch, mind.train)")
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    for ax, title, ylabel in ((axes[0], "peak RSS", "peak RSS (GB)"),
                              (axes[1], "time", "seconds (prepare: in-process, imports excluded;\n"
                                                "train: epoch + its valid evaluation)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("interactions in the log, N")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(fmt)
            axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ns = sorted({r["n"] for r in rows if r["section"] in ("prepare", "train")})
        if ns:
            ax.set_xticks(ns, [label(n) for n in ns])
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(out / "scale.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=parse_sizes, default=parse_sizes("1M,4M,16M"), help="prepare at these N")
    p.add_argument("--train-sizes", type=parse_sizes, default=parse_sizes("1M,4M"), help="one epoch at these N")
    p.add_argument("--quality-size", type=parse_size, default=parse_size("4M"), help="K=4 vs K=1 here (0: skip)")
    p.add_argument("--quality-epochs", type=int, default=1)
    p.add_argument("--ddp-size", type=parse_size, default=parse_size("4M"), help="two torchrun ranks here (0: skip)")
    p.add_argument("--ddp-seconds", type=float, default=None, help="kill the two-rank run after this (default: "
                                                                    "one epoch, capped at 900 s)")
    p.add_argument("--old", default=None, help="a checkout of the old revision with its extension built")
    p.add_argument("--old-max", type=parse_size, default=parse_size("4M"), help="old runs only up to this N")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/scale", help="logs, prepared folders, training runs (cached logs reused)")
    p.add_argument("--out", default="bench/measured/scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zipf", type=float, default=1.3, help="popularity exponent inside a category")
    p.add_argument("--rss-cap-gb", type=float, default=14.0, help="kill a run whose process tree exceeds this")
    p.add_argument("--step-timeout", type=float, default=3600.0, help="kill any one run after this many seconds")
    p.add_argument("--sections", type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                   default=list(SECTIONS), help="which parts to run (default all: prepare,train,quality,ddp); a "
                                                "subset reruns those into the earlier --out/scale.json, replacing "
                                                "their rows (prepared folders are reused from --work)")
    p.add_argument("--report-only", action="store_true", help="rewrite scale.md/.csv/.png from scale.json")
    args = p.parse_args(argv)
    if args.report_only:
        report(pathlib.Path(args.out))
        return
    bad = set(args.sections) - set(SECTIONS)
    if bad:
        p.error(f"--sections: unknown {sorted(bad)}; choose from {','.join(SECTIONS)}")
    if args.old:
        args.old = str(pathlib.Path(args.old).resolve())
    Bench(args).main()


if __name__ == "__main__":
    main()
