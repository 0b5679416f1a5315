"""The quality table: MostPopular vs MIND K=1 vs MIND K=4 on MovieLens-100k (valid and test).

For every model and seed the best-validation-epoch weights are evaluated with full-catalogue
retrieval, seen items excluded (see :mod:`mind.train`).  Each cell is

    mean over seeds ± std over seeds (sample std, ddof=1) [mean over seeds of the standard
    error across users]

MostPopular is deterministic, so its seed std is 0.  A second table carries the measures of
:mod:`mind.diversity` (NEW_METRICS): mean pairwise cosine of a user's active interests (n/a for
MostPopular and for K=1), ComiRec Diversity@50 (genre sets disjoint = different), catalogue
Coverage@50, and Recall@50 within the low / mid / high terciles of users by the genre entropy
of their input history.  The verdict line checks the goal:
MIND K=4 beats both baselines on Recall@50 and HitRate@50 by more than the seed spread
(mean difference > std of K=4 + std of the baseline), on valid and on test.

Written into ``out_dir``: quality.md (the table), quality.csv (one row per method, split,
metric), quality.json (the aggregated rows plus every per-seed result).
"""

from __future__ import annotations

import json
import math
import pathlib
import time

import numpy as np

METRICS = [f"{m}@{n}" for n in (20, 50) for m in ("recall", "hit_rate", "ndcg")]
#: the second table (mind.diversity); a value may be None (not applicable / undefined)
NEW_METRICS = ["interest_cosine", "diversity@50", "coverage@50",
               "recall@50_entropy_low", "recall@50_entropy_mid", "recall@50_entropy_high"]

#: the per-run config of the table: ``python -m mind train``'s defaults, 8 epochs at most (the
#: default recipe's best epoch is 2-9, so this caps the whole command at minutes on 2 cores)
QUALITY_CONFIG = dict(dim=64, max_len=20, epochs=8, patience=3)

#: the MIND rows: name -> config overrides of the defaults.  "MIND K=4" is the default recipe the
#: verdict is about, "MIND K=1" the same recipe with one interest; the last row is the paper's setting
#: (label-aware attention with p = inf, ReLU head, the sampled softmax, no interest-diversity term).
MODELS = {
    "MIND K=1": dict(num_interests=1),
    "MIND K=4": dict(num_interests=4),
    "MIND K=4 (paper: p=inf, sigma=1, relu, sampled)": dict(
        num_interests=4, recipe="paper", loss="sampled", diversity_lambda=0.0),
}
BASELINES = ("MostPopular", "MIND K=1")


def aggregate(per_seed: list[dict]) -> dict:
    """Per metric: mean and std over seeds, mean user standard error, per-seed values.  A value
    that is missing or None in a seed's row (e.g. interest_cosine for MostPopular or K=1) is
    skipped; with no value at all mean/std/se_users are None (strict JSON: no NaN)."""
    def _num(r, k):
        v = r.get(k)
        return math.nan if v is None else float(v)

    def _opt(x):
        return None if math.isnan(x) else float(x)

    out = {}
    for m in METRICS + NEW_METRICS:
        vals = np.array([_num(r, m) for r in per_seed], dtype=np.float64)
        ses = np.array([_num(r, m + "_se") for r in per_seed], dtype=np.float64)
        v, s = vals[~np.isnan(vals)], ses[~np.isnan(ses)]
        out[m] = {"mean": _opt(v.mean()) if len(v) else None,
                  "std": (float(v.std(ddof=1)) if len(v) > 1 else 0.0) if len(v) else None,
                  "se_users": _opt(s.mean()) if len(s) else None,
                  "values": [_opt(x) for x in vals]}
    return out


def _cell(a: dict) -> str:
    if a["mean"] is None:
        return "n/a"
    se = f" [{a['se_users']:.4f}]" if a["se_users"] is not None else ""
    return f"{a['mean']:.4f} ± {a['std']:.4f}{se}"


def _table(results: dict, metrics=METRICS) -> str:
    lines = ["| method | split | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for method, splits in results.items():
        for split, agg in splits.items():
            cells = [_cell(agg[m]) for m in metrics]
            lines.append(f"| {method} | {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(results: dict, target: str = "MIND K=4", baselines=BASELINES,
            metrics=("recall@50", "hit_rate@50")) -> tuple[bool, list]:
    """Does ``target`` beat every baseline by more than the summed seed std? One line per check."""
    ok, lines = True, []
    for split in ("valid", "test"):
        for m in metrics:
            t = results[target][split][m]
            for other in baselines:
                o = results[other][split][m]
                margin = t["mean"] - o["mean"]
                spread = t["std"] + o["std"]
                passed = margin > spread
                ok &= passed
                lines.append(f"{'PASS' if passed else 'FAIL'}  {split} {m}: {target} {t['mean']:.4f} vs "
                             f"{other} {o['mean']:.4f} (margin {margin:+.4f}, seed spread {spread:.4f})")
    return ok, lines


def run_quality(out_dir="runs/quality", seeds=(0, 1, 2), epochs=None, progress=False, log=print) -> dict:
    """Train and evaluate everything, write quality.{md,csv,json} into ``out_dir``; return the results."""
    from .data import fetch_movielens_100k, load_recbole, prepare
    from .diversity import beyond_accuracy
    from .evaluate import evaluate_rankings, most_popular_rankings, write_metrics
    from .train import TrainConfig, train

    t0 = time.time()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare(load_recbole(fetch_movielens_100k()), max_len=QUALITY_CONFIG["max_len"])
    log(f"data: {json.dumps(data.summary())}")

    raw: dict = {"MostPopular": {}}
    for split_name, split in (("valid", data.valid), ("test", data.test)):
        ranked = most_popular_rankings(data.item_counts, len(split), 50, exclude=split.full_histories)
        row = {**evaluate_rankings(ranked, split.targets),
               **beyond_accuracy(ranked, split.targets, split.histories, data.item_genres, int(data.num_items))}
        raw["MostPopular"][split_name] = [row] * len(seeds)

    base = dict(QUALITY_CONFIG)
    if epochs is not None:
        base["epochs"] = int(epochs)
    for name, overrides in MODELS.items():
        raw[name] = {"valid": [], "test": []}
        for seed in seeds:
            tag = name.replace(" ", "_").replace("=", "").replace("(", "").replace(")", "").replace(",", "")
            cfg = TrainConfig(seed=seed, out_dir=str(out / f"{tag}_seed{seed}"), progress=progress,
                              **{**base, **overrides})
            t = time.time()
            res = train(data, cfg, log=lambda *_: None)
            raw[name]["valid"].append(res.valid_metrics)
            raw[name]["test"].append(res.test_metrics)
            log(f"{name} seed {seed}: best epoch {res.best_epoch}, valid recall@50 {res.valid_metrics['recall@50']:.4f}, "
                f"test recall@50 {res.test_metrics['recall@50']:.4f} [{time.time() - t:.0f}s]")

    results = {method: {split: aggregate(rows) for split, rows in splits.items()} for method, splits in raw.items()}
    ok, checks = verdict(results)
    header = (f"MovieLens-100k ({data.summary()['valid_eval_users']} valid / {data.summary()['test_eval_users']} "
              f"test users), seeds {list(seeds)}, config {json.dumps(base)}, "
              f"models {json.dumps(MODELS, default=str)}.\n"
              "Cells: mean over seeds ± std over seeds [standard error across users, mean over seeds].\n")
    text = header + "\n" + _table(results) + "\n\n" + \
        "Beyond accuracy (mind/diversity.py; cells as above, n/a = not applicable):\n\n" + \
        _table(results, NEW_METRICS) + "\n\n" + "\n".join(checks) + \
        f"\n\nMIND K=4 beats both baselines by more than the seed spread: {'YES' if ok else 'NO'}\n"
    (out / "quality.md").write_text(text)
    rows = [{"method": method, "split": split, "metric": m, "mean": agg[m]["mean"], "std_seeds": agg[m]["std"],
             "se_users": agg[m]["se_users"], "per_seed": json.dumps(agg[m]["values"])}
            for method, splits in results.items() for split, agg in splits.items() for m in METRICS + NEW_METRICS]
    write_metrics(rows, out / "quality")
    (out / "quality.json").write_text(json.dumps({"config": base, "models": MODELS, "seeds": list(seeds), "results": results,
                                                  "checks": checks, "passed": ok, "raw": raw,
                                                  "seconds": time.time() - t0}, indent=1, default=float))
    log("\n" + text)
    log(f"written: {out / 'quality.md'}, {out / 'quality.csv'}, {out / 'quality.json'} "
        f"[{time.time() - t0:.0f}s]")
    return {"results": results, "passed": ok, "checks": checks}
