"""``python -m mind sweep``: choose MIND's training recipe on valid only, then report test once.

The question it answers (issue 12): does a K=4 MIND beat a single user vector (K=1) on
MovieLens-100k, and with which levers?  Both sides get the same search, so the K=1 baseline
is as tuned as the K=4 model it is compared with.

Protocol (ComiRec split of :func:`mind.data.prepare`, seen items excluded from retrieval):

1. **Screen.** Every candidate of :data:`CANDIDATES` (a name and its :class:`mind.train.TrainConfig`
   overrides) is trained with ``screen_seeds`` seeds; its score is the mean valid Recall@50.
2. **Finalists.** Per group (K = 1 and K > 1), the ``finalists`` best candidates by screen
   score are trained with ``seeds`` seeds (the screen's runs are reused: a run is a
   deterministic function of its config and seed).  K > 1 candidates whose interests
   collapsed on valid (mean pairwise cosine above ``max_cosine``, 0.8) are not eligible.
3. **Choice.** Per group, the finalist with the best mean valid Recall@50 over ``seeds``.
4. **Test, once.** Only the two chosen configurations are read on test (the same seeds).
   The verdict: the chosen K > 1 recipe beats the chosen K = 1 one by more than the seed
   spread (std of the one + std of the other, as in :mod:`mind.quality`) on valid and on test,
   with its interests kept distinct (mean pairwise cosine <= 0.8) and more diverse lists
   (Diversity@50).

Every candidate's test numbers are computed by training (``train`` evaluates the best epoch
on test) but are neither printed nor written, except for the two chosen ones.

Written into ``out_dir``: sweep.md (tables and verdict), sweep.json (every run's valid
metrics, the chosen configurations' test metrics), sweep.png (valid Recall@50 and interest
cosine per candidate, mean and seed spread).
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
from tqdm.auto import tqdm

#: the base of every candidate (the CLI's training defaults, max_len 20, d = 64)
SWEEP_BASE = dict(dim=64, max_len=20, lr=3e-3, weight_decay=1e-4, batch_size=256, epochs=20, patience=3,
                  num_negatives=200, loss="sampled")

_LIN = dict(h_out_activation="linear")
_MAX = dict(scoring="max", h_out_activation="linear")
#: name -> TrainConfig overrides.  The K=1 rows get every lever that applies to one vector.
CANDIDATES = {
    "K=1 relu (old default)": dict(num_interests=1, p=0.0, routing_init_std=0.1),
    "K=1 linear": dict(num_interests=1, routing_init_std=0.1, **_LIN),
    "K=1 linear full": dict(num_interests=1, routing_init_std=0.1, loss="full", **_LIN),
    "K=1 linear hn0.5": dict(num_interests=1, routing_init_std=0.1, hard_negative_beta=0.5, **_LIN),
    "K=4 p=0 relu (old default)": dict(num_interests=4, p=0.0, routing_init_std=0.1),
    "K=4 p=inf sigma=1 (paper)": dict(num_interests=4, p=math.inf, routing_init_std=1.0),
    "K=4 p=inf stochastic linear": dict(num_interests=4, p=math.inf, routing_init_std=1.0,
                                        stochastic_selection=True, **_LIN),
    "K=4 max sigma=0.1": dict(num_interests=4, routing_init_std=0.1, **_MAX),
    "K=4 max sigma=0.1 full": dict(num_interests=4, routing_init_std=0.1, loss="full", **_MAX),
    "K=4 max sigma=1 full": dict(num_interests=4, routing_init_std=1.0, loss="full", **_MAX),
    "K=4 max sigma=0.1 s=5": dict(num_interests=4, routing_init_std=0.1, logit_scale=5.0, **_MAX),
    "K=4 max sigma=0.1 s=5 full": dict(num_interests=4, routing_init_std=0.1, logit_scale=5.0, loss="full", **_MAX),
    "K=4 max sigma=0.1 s=20 full": dict(num_interests=4, routing_init_std=0.1, logit_scale=20.0, loss="full", **_MAX),
    "K=4 max sigma=1 hn0.5": dict(num_interests=4, routing_init_std=1.0, hard_negative_beta=0.5, **_MAX),
    "K=4 max sigma=1 full div0.1": dict(num_interests=4, routing_init_std=1.0, loss="full", diversity_lambda=0.1,
                                        **_MAX),
}

_DATA = None            # a PreparedData given to run_sweep (tests), used for every max_len
_ML100K: dict = {}      # max_len -> MovieLens-100k prepared with that history length


def _data(max_len: int):
    if _DATA is not None:
        return _DATA
    if max_len not in _ML100K:
        from .data import fetch_movielens_100k, load_recbole, prepare
        _ML100K[max_len] = prepare(load_recbole(fetch_movielens_100k()), max_len=max_len)
    return _ML100K[max_len]


def _run(job: tuple) -> dict:
    """Train one (candidate, seed) in this process; valid metrics and, kept aside, test metrics."""
    import torch

    from .train import TrainConfig, train
    name, overrides, seed, out_dir, threads = job
    torch.set_num_threads(threads)
    t = time.time()
    cfg = TrainConfig(**{**SWEEP_BASE, **overrides}, seed=seed, out_dir=out_dir, progress=False, write_files=False)
    res = train(_data(cfg.max_len), cfg, log=lambda *_: None)
    return {"name": name, "seed": seed, "best_epoch": res.best_epoch, "valid": res.valid_metrics,
            "test": res.test_metrics, "seconds": time.time() - t}


def _summary(runs: list, split: str = "valid") -> dict:
    """Per metric over the runs' seeds: mean, std (ddof=1), ... (:func:`mind.quality.aggregate`)."""
    from .quality import aggregate
    return aggregate([r[split] for r in runs])


def _fmt(s: dict, digits: int = 4) -> str:
    return "n/a" if s["mean"] is None else f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _group(name: str, overrides: dict) -> str:
    return "K=1" if int(overrides.get("num_interests", 4)) == 1 else "K>1"


def run_sweep(out_dir="runs/sweep", candidates=None, screen_seeds=(0,), seeds=(0, 1, 2, 3, 4), finalists=2,
              jobs=1, threads=1, data=None, max_cosine=0.8, progress=False, log=print) -> dict:
    """Run the protocol of the module docstring; write sweep.{md,json,png}; return the summary.

    ``data``: a PreparedData to sweep on instead of MovieLens-100k (tests); ``jobs`` > 1 trains
    that many runs at once in worker processes (forked: they inherit ``data``), each on ``threads``.
    ``max_cosine``: a K>1 candidate is a finalist only if its screen's mean valid interest cosine
    is at most this (distinct interests are part of the goal, so they are a constraint of the
    choice, measured on valid like everything else).
    """
    global _DATA
    if data is not None:
        _DATA = data
    candidates = dict(candidates or CANDIDATES)
    if {_group(n, o) for n, o in candidates.items()} != {"K=1", "K>1"}:
        raise ValueError("sweep: the candidates need at least one K=1 and one K>1 configuration")
    if not set(screen_seeds) <= set(seeds):
        raise ValueError(f"sweep: the screen seeds {list(screen_seeds)} must be among the seeds {list(seeds)}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    runs: dict = {name: {} for name in candidates}

    def train_all(pairs):
        todo = [(n, s) for n, s in pairs if s not in runs[n]]
        jobs_ = [(n, candidates[n], s, str(out / "runs" / f"{_slug(n)}_seed{s}"), threads) for n, s in todo]
        with tqdm(total=len(jobs_), desc="sweep runs", disable=not progress, leave=False) as bar:
            if jobs > 1:
                with ProcessPoolExecutor(jobs) as pool:
                    for future in as_completed([pool.submit(_run, j) for j in jobs_]):
                        record(future.result(), bar)
            else:
                for j in jobs_:
                    record(_run(j), bar)

    def record(r, bar):
        runs[r["name"]][r["seed"]] = r
        bar.update(1)
        log(f"  {r['name']} seed {r['seed']}: valid recall@50 {r['valid']['recall@50']:.4f}, "
            f"interest cosine {_opt(r['valid'].get('interest_cosine'))} (best epoch {r['best_epoch']}, "
            f"{r['seconds']:.0f}s)")

    log(f"screen: {len(candidates)} candidates x seeds {list(screen_seeds)}")
    train_all([(n, s) for n in candidates for s in screen_seeds])
    screened = {n: _summary([runs[n][s] for s in screen_seeds]) for n in candidates}
    screen = {n: screened[n]["recall@50"]["mean"] for n in candidates}
    screen_cos = {n: screened[n]["interest_cosine"]["mean"] for n in candidates}
    chosen_finalists = []
    for group in ("K=1", "K>1"):
        names = [n for n in candidates if _group(n, candidates[n]) == group and
                 (group == "K=1" or (screen_cos[n] is not None and screen_cos[n] <= max_cosine))]
        if not names:
            raise RuntimeError(f"sweep: no {group} candidate kept its valid interest cosine <= {max_cosine}")
        chosen_finalists += sorted(names, key=lambda n: -screen[n])[:finalists]
    log(f"finalists: {chosen_finalists} x seeds {list(seeds)}")
    train_all([(n, s) for n in chosen_finalists for s in seeds])

    final = {n: _summary([runs[n][s] for s in seeds]) for n in chosen_finalists}
    chosen = {}
    for group in ("K=1", "K>1"):
        names = [n for n in chosen_finalists if _group(n, candidates[n]) == group]
        chosen[group] = max(names, key=lambda n: final[n]["recall@50"]["mean"])
    test = {g: _summary([runs[n][s] for s in seeds], "test") for g, n in chosen.items()}
    checks, ok = _verdict(final, test, chosen)

    result = {"base": SWEEP_BASE, "candidates": candidates, "screen_seeds": list(screen_seeds), "seeds": list(seeds),
              "screen_valid_recall@50": screen, "screen_valid_interest_cosine": screen_cos,
              "max_cosine": max_cosine, "finalists": chosen_finalists, "final_valid": final,
              "chosen": chosen, "chosen_test": test, "checks": checks, "passed": ok,
              "valid_runs": {n: {s: {"valid": r["valid"], "best_epoch": r["best_epoch"]} for s, r in rs.items()}
                             for n, rs in runs.items()},
              "chosen_test_runs": {g: {s: runs[n][s]["test"] for s in seeds} for g, n in chosen.items()},
              "seconds": time.time() - t0}
    (out / "sweep.json").write_text(json.dumps(_jsonable(result), indent=1, allow_nan=False))
    text = _markdown(result, runs, candidates)
    (out / "sweep.md").write_text(text)
    _plot(runs, candidates, chosen_finalists, seeds, screen_seeds, out / "sweep.png")
    log("\n" + text)
    log(f"written: {out / 'sweep.md'}, {out / 'sweep.json'}, {out / 'sweep.png'} [{time.time() - t0:.0f}s]")
    return result


def _verdict(final: dict, test: dict, chosen: dict) -> tuple[list, bool]:
    lines, ok = [], True
    k4, k1 = chosen["K>1"], chosen["K=1"]
    for split, a, b in (("valid", final[k4], final[k1]), ("test", test["K>1"], test["K=1"])):
        margin = a["recall@50"]["mean"] - b["recall@50"]["mean"]
        spread = a["recall@50"]["std"] + b["recall@50"]["std"]
        passed = margin > spread
        ok &= passed
        lines.append(f"{'PASS' if passed else 'FAIL'}  {split} recall@50: {k4} {a['recall@50']['mean']:.4f} vs "
                     f"{k1} {b['recall@50']['mean']:.4f} (margin {margin:+.4f}, seed spread {spread:.4f})")
    cos = test["K>1"]["interest_cosine"]["mean"]
    passed = cos is not None and cos <= 0.8
    ok &= passed
    lines.append(f"{'PASS' if passed else 'FAIL'}  test mean pairwise interest cosine of {k4}: "
                 f"{_opt(cos)} (goal <= 0.8)")
    da, db = test["K>1"]["diversity@50"]["mean"], test["K=1"]["diversity@50"]["mean"]
    passed = da is not None and db is not None and da > db
    ok &= passed
    lines.append(f"{'PASS' if passed else 'FAIL'}  test diversity@50: {k4} {_opt(da)} vs {k1} {_opt(db)}")
    return lines, ok


def _markdown(result: dict, runs: dict, candidates: dict) -> str:
    seeds, screen_seeds = result["seeds"], result["screen_seeds"]
    lines = [f"MovieLens-100k, ComiRec split, seen items excluded; base config {json.dumps(SWEEP_BASE)}.",
             f"Screen: every candidate with seeds {screen_seeds}; finalists: the best "
             f"{len(result['finalists']) // 2} per group with seeds {seeds}; choice on valid only; test read "
             f"for the two chosen configurations only. Cells: mean ± std over seeds.", "",
             "| candidate | overrides | seeds | valid recall@50 | valid ndcg@50 | interest cosine | diversity@50 | coverage@50 |",
             "|---|---|---|---|---|---|---|---|"]
    order = sorted(candidates, key=lambda n: (_group(n, candidates[n]), -result["screen_valid_recall@50"][n]))
    for n in order:
        s = sorted(runs[n])
        summ = _summary([runs[n][x] for x in s])
        mark = " (chosen)" if n in result["chosen"].values() else (" (finalist)" if n in result["finalists"] else "")
        lines.append(f"| {n}{mark} | `{json.dumps(_jsonable(candidates[n]))}` | {len(s)} | "
                     f"{_fmt(summ['recall@50'])} | {_fmt(summ['ndcg@50'])} | {_fmt(summ['interest_cosine'], 3)} | "
                     f"{_fmt(summ['diversity@50'], 3)} | {_fmt(summ['coverage@50'], 3)} |")
    lines += ["", "Test, chosen configurations only:", "",
              "| group | chosen | test recall@50 | test ndcg@50 | interest cosine | diversity@50 | coverage@50 |",
              "|---|---|---|---|---|---|---|"]
    for g, n in result["chosen"].items():
        t = result["chosen_test"][g]
        lines.append(f"| {g} | {n} | {_fmt(t['recall@50'])} | {_fmt(t['ndcg@50'])} | {_fmt(t['interest_cosine'], 3)} | "
                     f"{_fmt(t['diversity@50'], 3)} | {_fmt(t['coverage@50'], 3)} |")
    lines += ["", *result["checks"], "",
              f"K>1 beats K=1 by more than the seed spread, with distinct and more diverse interests: "
              f"{'YES' if result['passed'] else 'NO'}"]
    return "\n".join(lines) + "\n"


def _plot(runs: dict, candidates: dict, finalists: list, seeds, screen_seeds, path) -> None:
    from .plots import plt
    names = sorted(candidates, key=lambda n: (_group(n, candidates[n]), n))
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 0.45 * len(names) + 1.8), sharey=True)
    for i, n in enumerate(names):
        vals = [r["valid"]["recall@50"] for r in runs[n].values()]
        cos = [r["valid"].get("interest_cosine") for r in runs[n].values()]
        color = "tab:blue" if _group(n, candidates[n]) == "K=1" else "tab:orange"
        a.scatter(vals, [i] * len(vals), color=color, alpha=0.5, s=14)
        a.errorbar(np.mean(vals), i, xerr=np.std(vals, ddof=1) if len(vals) > 1 else 0, fmt="o", color=color)
        c = [x for x in cos if x is not None]
        if c:
            b.errorbar(np.mean(c), i, xerr=np.std(c, ddof=1) if len(c) > 1 else 0, fmt="o", color=color)
    a.set_yticks(range(len(names)))
    a.set_yticklabels([f"{n}{' *' if n in finalists else ''}" for n in names], fontsize=8)
    a.set_xlabel("valid Recall@50 (dots: seeds; * = finalist)")
    b.set_xlabel("valid mean pairwise interest cosine")
    b.axvline(0.8, color="grey", linestyle=":")
    fig.suptitle("MIND on MovieLens-100k: candidates of python -m mind sweep (valid only)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _opt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _jsonable(x):
    """Strict JSON: inf (p = inf) as the string "inf", NaN as null, numpy scalars as Python ones."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x
