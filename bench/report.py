"""Turn a pytest-benchmark JSON into the CSV, the speed-up plot and the README table.

    python bench/report.py bench/results/routing_cpu.json [--out bench/results]

CSV: one row per measurement (case, backend, mode, median, p20, p80 in seconds, peak bytes,
speed-up against the eager reference of the same case and mode, device, torch version, git revision).
PNG: speed-up over the eager reference against batch size, one panel per mode.
Markdown: the table the README shows, printed and written beside the CSV.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections import defaultdict

import numpy as np


def load_rows(path):
    with open(path) as f:
        doc = json.load(f)
    rows = []
    for bench in doc["benchmarks"]:
        info = bench["extra_info"]
        data = np.asarray(bench["stats"].get("data") or [bench["stats"]["median"]])
        rows.append(
            dict(
                case=info["case"], backend=info["backend"], mode=info["mode"], batch=info["batch"],
                median=float(np.median(data)), p20=float(np.percentile(data, 20)), p80=float(np.percentile(data, 80)),
                rounds=len(data), peak_bytes=info.get("peak_bytes"), device=info["device"], torch=info["torch"],
                git=info["git"], threads=info.get("threads"),
            )
        )
    ref = {(r["case"], r["mode"]): r["median"] for r in rows if r["backend"] == "reference"}
    for r in rows:
        base = ref.get((r["case"], r["mode"]))
        r["speedup_vs_reference"] = base / r["median"] if base else None
    return rows


def write_csv(rows, path):
    fields = ["case", "backend", "mode", "batch", "median", "p20", "p80", "rounds", "peak_bytes",
              "speedup_vs_reference", "device", "torch", "git", "threads"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in fields})


def markdown(rows):
    backends = [b for b in ("cpp", "cuda", "triton", "reference", "compile", "rechub")
                if any(r["backend"] == b for r in rows)]
    by = {(r["mode"], r["batch"], r["backend"]): r for r in rows}
    lines = ["| mode | B | " + " | ".join(f"{b} ms (x ref)" for b in backends) + " |",
             "|---|---:|" + "---:|" * len(backends)]
    for mode in ("fwd", "fwd+bwd"):
        for batch in sorted({r["batch"] for r in rows}):
            cells = []
            for b in backends:
                r = by.get((mode, batch, b))
                if r is None:
                    cells.append("n/a")
                else:
                    spread = f" [{r['p20'] * 1e3:.3g}-{r['p80'] * 1e3:.3g}]"
                    ratio = f" ({r['speedup_vs_reference']:.1f}x)" if r["speedup_vs_reference"] else ""
                    cells.append(f"{r['median'] * 1e3:.3g}{spread}{ratio}")
            lines.append(f"| {mode} | {batch} | " + " | ".join(cells) + " |")
    first = rows[0]
    lines.append("")
    lines.append(f"median ms [p20-p80] over repeated rounds in one process; (x ref) = speed-up over the eager "
                 f"reference; device {first['device']}, {first['threads']} threads, torch {first['torch']}, "
                 f"git {first['git']}")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        series = defaultdict(list)
        for r in rows:
            if r["mode"] == mode and r["speedup_vs_reference"]:
                series[r["backend"]].append((r["batch"], r["speedup_vs_reference"]))
        for backend, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("batch size B (L=50, D=64, K=4, r=3)")
        ax.set_title(mode)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speed-up over eager reference")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json_path")
    ap.add_argument("--out", default=None, help="output folder (default: the JSON's folder)")
    args = ap.parse_args()
    out = args.out or os.path.dirname(os.path.abspath(args.json_path))
    os.makedirs(out, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.json_path))[0]
    rows = load_rows(args.json_path)
    write_csv(rows, os.path.join(out, stem + ".csv"))
    plot(rows, os.path.join(out, stem + ".png"))
    table = markdown(rows)
    with open(os.path.join(out, stem + ".md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
