"""Does a training lever keep model quality?  Valid Recall@50 of `python -m mind train` over seeds, per variant.

    python bench/seed_study.py --out runs/seed_study --variant "K=1=--interests 1" --variant "defaults=" \\
        --seeds 0 1 2 --jobs 2

Each (variant, seed) is one ``python -m mind train --data ml-100k --threads 1 --no-progress --seed S``
run (plus the variant's flags and ``--extra``), in its own process, ``--jobs`` at a time.  A variant
named ``NAME@PATH=FLAGS`` runs the checkout at PATH (e.g. a worktree of an earlier commit with its
extension built) instead of this one:

    python bench/seed_study.py --variant "8b87692@/work/wt-8b87692=" --variant "this checkout=" --jobs 2

From its metrics.csv: the best epoch's valid Recall@50 (the checkpoint training keeps; model selection on
valid only, the test split is not read) and the median epoch seconds (valid evaluation included;
runs that share the machine slow each other, so compare seconds only between runs of one --jobs 1
study).  Writes study.md / study.json into ``--out``: per seed, then mean and sample std (ddof=1).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_one(name: str, flags: list, seed: int, out: pathlib.Path, extra: list) -> dict:
    name, _, checkout = name.partition("@")
    root = pathlib.Path(checkout).resolve() if checkout else ROOT
    run_dir = (out / "runs" / f"{name.replace(' ', '_')}_seed{seed}").resolve()
    cmd = [sys.executable, "-m", "mind", "train", "--data", "ml-100k", "--threads", "1", "--no-progress",
           "--seed", str(seed), "--out", str(run_dir), *extra, *flags]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root)),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    best = max(rows, key=lambda r: float(r["valid_recall@50"]))
    return dict(variant=name, seed=seed, valid_recall50=float(best["valid_recall@50"]), best_epoch=int(best["epoch"]),
                epochs=len(rows), epoch_s=statistics.median(float(r["seconds"]) for r in rows),
                wall_s=time.time() - t0, command=" ".join(shlex.quote(c) for c in cmd[1:]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", action="append", required=True, help='NAME=FLAGS, e.g. "bf16=--h-dtype bfloat16"')
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--extra", default="", help="flags added to every run (e.g. '--max-len 50')")
    p.add_argument("--out", default="runs/seed_study")
    args = p.parse_args(argv)
    variants = {}
    for v in args.variant:
        if "=" not in v:
            p.error(f"--variant wants NAME=FLAGS, got {v!r}")
        name, flags = v.split("=", 1)
        variants[name.strip()] = shlex.split(flags)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = shlex.split(args.extra)
    jobs = [(n, f, s) for s in args.seeds for n, f in variants.items()]   # seeds outer: variants alternate
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        results = list(ex.map(lambda j: run_one(*j, out, extra), jobs))
    for r in results:
        print(f"{r['variant']} seed {r['seed']}: valid Recall@50 {r['valid_recall50']:.4f} (epoch {r['best_epoch']} "
              f"of {r['epochs']}), {r['epoch_s']:.2f} s/epoch", flush=True)
    md = [f"`python bench/seed_study.py {' '.join(shlex.quote(a) for a in (argv or sys.argv[1:]))}`", "",
          "| variant | flags | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | std | s/epoch (median) |",
          "|---|---|" + "---:|" * (len(args.seeds) + 3)]
    for name, flags in variants.items():
        rs = [r for r in results if r["variant"] == name.partition("@")[0]]
        vals = [r["valid_recall50"] for r in rs]
        std = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        md.append(f"| {name.partition('@')[0]} | `{' '.join(flags) or '(defaults)'}` | " + " | ".join(f"{v:.4f}" for v in vals)
                  + f" | {statistics.mean(vals):.4f} | {std:.4f} | {statistics.median(r['epoch_s'] for r in rs):.2f} |")
    (out / "study.md").write_text("\n".join(md) + "\n")
    (out / "study.json").write_text(json.dumps(results, indent=1))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
