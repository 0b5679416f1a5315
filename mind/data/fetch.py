"""Fetch MovieLens-100k in RecBole's atomic-file format.

RecBole ships ml-100k inside its wheel (``recbole/dataset_example/ml-100k/``), and
PyPI is the one place this project may download from, so the wheel is the source:

1. ``python -m pip download --no-deps recbole==1.2.1 -d <cache>/wheels``
2. extract ``ml-100k.inter``, ``ml-100k.item``, ``ml-100k.user`` into ``<cache>/ml-100k/``.

Both steps are skipped when their output already exists (idempotent). Data lives in the
cache directory only, never in the repository. A download says so on stderr (what, from where, where to)
and pip's own lines, which give the wheel's size, follow; it ends with the size and the time taken.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time
import zipfile

RECBOLE_VERSION = "1.2.1"
_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
_MEMBER_DIR = "recbole/dataset_example/ml-100k/"


def _find_wheel(wheel_dir: pathlib.Path) -> pathlib.Path | None:
    wheels = sorted(wheel_dir.glob(f"recbole-{RECBOLE_VERSION}-*.whl"))
    return wheels[0] if wheels else None


def _say(msg: str) -> None:
    print(f"[ml-100k] {msg}", file=sys.stderr, flush=True)


def _progress_fd():
    """stderr's file descriptor for pip's own download lines, or None (inherit stdout) under a capture."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def fetch_movielens_100k(cache_dir: str | os.PathLike = "~/.cache/mind-kernels") -> pathlib.Path:
    """Return ``<cache_dir>/ml-100k`` holding ``ml-100k.{inter,item,user}``, downloading if needed.

    Raises RuntimeError (with pip's output) when the download fails, e.g. without network.
    """
    cache = pathlib.Path(cache_dir).expanduser()
    out = cache / "ml-100k"
    if all((out / f).is_file() for f in _FILES):
        return out

    wheel_dir = cache / "wheels"
    wheel = _find_wheel(wheel_dir)
    if wheel is None:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"recbole=={RECBOLE_VERSION}", "-d", str(wheel_dir)]
        _say(f"downloading MovieLens-100k: the recbole=={RECBOLE_VERSION} wheel from PyPI (it ships "
             f"ml-100k; 2.1 MB, a few seconds) into {wheel_dir}")
        start = time.monotonic()
        # pip's stdout (its "Downloading ... (size)" line, a progress bar on a terminal) is shown as it
        # comes; its stderr is kept for the error message.
        proc = subprocess.run(cmd, stdout=_progress_fd(), stderr=subprocess.PIPE, text=True)
        wheel = _find_wheel(wheel_dir)
        if proc.returncode != 0 or wheel is None:
            raise RuntimeError(
                f"could not download recbole=={RECBOLE_VERSION} (which ships ml-100k) with "
                f"{' '.join(cmd)!r} (exit {proc.returncode}). Is PyPI reachable?\n"
                f"{(proc.stdout or '')[-2000:]}{(proc.stderr or '')[-2000:]}")
        _say(f"downloaded {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB) in {time.monotonic() - start:.1f} s")

    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for f in _FILES:
            member = _MEMBER_DIR + f
            if member not in names:
                raise RuntimeError(f"{wheel} has no {member}; cannot extract ml-100k")
            # Write to a temporary name then rename, so an interrupted run never leaves a
            # truncated file that the idempotency check would accept.
            tmp = out / (f + ".part")
            tmp.write_bytes(zf.read(member))
            tmp.replace(out / f)
    _say(f"extracted {', '.join(_FILES)} into {out}")
    return out
