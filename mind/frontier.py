"""The relevance / diversity frontier of the merge rules: MIND K=4 against K=1 with the same re-ranking.

``python -m mind frontier --data ml-100k --runs RUNS --out OUT`` (``--data planted`` for the control):

1. Models: for K in (4, 1) and each ``--seeds`` seed, ``RUNS/K{K}_seed{S}/best.pt``; a missing one is
   trained first, one run at a time, by ``python -m mind train <the data options> --interests K
   --seed S --threads T --no-progress --out RUNS/K{K}_seed{S} <--train-args>`` (the chosen recipe:
   ``python -m mind train``'s defaults; the planted control adds ``--dim 16 --lr 0.01``).
2. Lists: each model's valid and test users, full catalogue, seen items excluded, top 50 merged by
   (:mod:`mind.merge`, through ``mind.evaluate.split_rankings``, the lists ``Recommender.recommend_batch``
   returns for the same interests):

   * K=4: ``max``, ``quota``, and ``diverse`` for every lambda of ``--lambdas`` (m = ``--candidates``
     items per interest, so a pool of at most K x m);
   * K=1, the fair baseline: ``diverse`` for every lambda from the one vector's top K x m (the same
     pool size as K=4's; lambda = 0 is K=1's ``max`` list), and from its top m (``K=1 m=200`` rows).

3. Measures (mean over users, then mean and sample std over seeds): Recall@50, NDCG@50,
   Diversity@50 (ComiRec's, ``mind.diversity.diversity_at_n``: pairs of disjoint genre sets; on the
   planted control, whose items carry no genre, over the planted clusters the generator returns),
   Coverage@50.
4. Selection on valid only: for each K=4 lambda, its margin = its valid Diversity@50 minus K=1's valid
   curve (m = K x ``--candidates``) interpolated linearly at the same valid Recall@50 (None where K=1's
   curve does not reach that recall); lambda_4 = the largest margin; lambda_1 = the K=1 lambda whose
   valid Recall@50 is nearest K=4's at lambda_4.  Test is then read at (K=4, lambda_4) and (K=1,
   lambda_1): the verdict is PASS when their test Recall@50 differ by at most the larger seed std
   and K=4's test Diversity@50 exceeds K=1's by more than the larger seed std.  The test curves are
   drawn and tabulated too, with the same margin per lambda; nothing is chosen on them.

Writes into ``--out``: frontier_runs.csv (one row per model, split, rule, lambda), frontier.csv (mean
and std over seeds), frontier.json (both, the selection, the verdict, the commands), frontier.md (the
tables) and frontier.png (Diversity@50 against Recall@50, valid and test, K=4 and K=1 curves).
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys
import time

import numpy as np

DEFAULT_LAMBDAS = (0.0, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
MEASURES = ("recall@50", "ndcg@50", "diversity@50", "coverage@50")
PLANTED_TRAIN_ARGS = "--dim 16 --lr 0.01"


def _data_flags(args) -> list:
    if args.data_dir:
        return ["--data-dir", str(args.data_dir), "--format", args.format, "--split-seed", str(args.split_seed)]
    flags = ["--data", args.data, "--split-seed", str(args.split_seed)]
    if args.data in ("planted", "synthetic"):
        from .data import generated_size

        size = generated_size(args.data, args.users, args.items)
        flags += ["--users", str(size["num_users"]), "--items", str(size["num_items"])]
    if args.data == "planted":
        flags += ["--planted-clusters", str(args.planted_clusters), "--planted-kappa", str(args.planted_kappa),
                  "--planted-seed", str(args.planted_seed)]
    return flags


def _train_missing(args, runs: pathlib.Path, log, error) -> list:
    """Train every missing (K, seed) run, one at a time; returns the train command of every run."""
    extra = shlex.split(args.train_args if args.train_args is not None else
                        (PLANTED_TRAIN_ARGS if args.data == "planted" and not args.data_dir else ""))
    commands = []
    for K in (4, 1):
        for seed in args.seeds:
            out = runs / f"K{K}_seed{seed}"
            cmd = [sys.executable, "-m", "mind", "train", *_data_flags(args), "--interests", str(K),
                   "--seed", str(seed), "--threads", str(args.threads), "--no-progress", "--out", str(out), *extra]
            commands.append("python " + " ".join(shlex.quote(c) for c in cmd[1:]))
            if (out / "best.pt").is_file():
                continue
            log(f"[frontier] training: {commands[-1]}")
            t = time.time()
            proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)),
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise error(f"training failed ({commands[-1]}): {proc.stderr.strip().splitlines()[-1:]}")
            log(f"[frontier]   done in {time.time() - t:.0f} s")
    return commands


def _measure_categories(args, data) -> tuple[np.ndarray, str]:
    """The (num_items + 1, G) category ids Diversity@50 is measured over, and what they are."""
    if args.data == "planted" and not args.data_dir:
        from .data import make_planted

        from .data import generated_size

        _, truth = make_planted(**generated_size("planted", args.users, args.items), num_clusters=args.planted_clusters,
                                kappa=args.planted_kappa, seed=args.planted_seed)
        clusters = np.zeros((int(data.num_items) + 1, 1), dtype=np.int64)
        clusters[1:, 0] = [truth["item_cluster"][int(r)] + 1 for r in np.asarray(data.item_raw_ids)[1:]]
        return clusters, "planted clusters (the generator's truth; the items carry no genre)"
    return np.asarray(data.item_genres), "genres (two items differ when their genre sets are disjoint)"


def _configs(lambdas, candidates: int, K: int) -> list:
    """(row label, merge, lambda, candidates per interest) evaluated for a K model."""
    if K > 1:
        return ([(f"K={K} max", "max", 0.0, candidates), (f"K={K} quota", "quota", 0.0, candidates)]
                + [(f"K={K} diverse", "diverse", lam, candidates) for lam in lambdas])
    return ([(f"K=1 diverse m={4 * candidates}", "diverse", lam, 4 * candidates) for lam in lambdas]
            + [(f"K=1 diverse m={candidates}", "diverse", lam, candidates) for lam in lambdas])


def _interp(points: list, recall: float):
    """K=1's mean diversity at ``recall`` on its curve [(recall, diversity)], linear; None outside."""
    pts = sorted(points)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if not xs or recall < xs[0] - 1e-12 or recall > xs[-1] + 1e-12:
        return None
    return float(np.interp(recall, xs, ys))


def _summaries(rows: list) -> dict:
    """(label, lambda, split) -> {measure: (mean, std)} over seeds."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["label"], r["lambda"], r["split"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        out[key] = {m: (float(np.mean([r[m] for r in rs])), float(np.std([r[m] for r in rs], ddof=1))
                        if len(rs) > 1 else 0.0) for m in MEASURES}
        out[key]["seeds"] = len(rs)
    return out


def select_and_judge(summary: dict, k4: str, k1: str, lambdas) -> dict:
    """The valid-only selection and the test verdict of the module docstring."""
    def curve(label, split):
        return [(summary[(label, lam, split)]["recall@50"][0], summary[(label, lam, split)]["diversity@50"][0])
                for lam in lambdas]

    margins = {}
    for split in ("valid", "test"):
        base = curve(k1, split)
        margins[split] = []
        for lam in lambdas:
            s = summary[(k4, lam, split)]
            at = _interp(base, s["recall@50"][0])
            margins[split].append(None if at is None else s["diversity@50"][0] - at)
    usable = [(m, lam) for m, lam in zip(margins["valid"], lambdas) if m is not None]
    lam4 = max(usable, key=lambda x: (x[0], -x[1]))[1] if usable else lambdas[0]
    r4 = summary[(k4, lam4, "valid")]["recall@50"][0]
    lam1 = min(lambdas, key=lambda lam: (abs(summary[(k1, lam, "valid")]["recall@50"][0] - r4), lam))
    t4, t1 = summary[(k4, lam4, "test")], summary[(k1, lam1, "test")]
    recall_gap = t4["recall@50"][0] - t1["recall@50"][0]
    recall_spread = max(t4["recall@50"][1], t1["recall@50"][1])
    div_gap = t4["diversity@50"][0] - t1["diversity@50"][0]
    div_spread = max(t4["diversity@50"][1], t1["diversity@50"][1])
    same_recall = abs(recall_gap) <= recall_spread
    passed = same_recall and div_gap > div_spread
    above = [m is not None and m > max(summary[(k4, lam, "test")]["diversity@50"][1],
                                       (_std_at(summary, k1, lambdas, summary[(k4, lam, "test")]["recall@50"][0])))
             for lam, m in zip(lambdas, margins["test"])]
    return {"lambda_k4": lam4, "lambda_k1": lam1, "margins": margins, "test_k4": t4, "test_k1": t1,
            "recall_gap": recall_gap, "recall_spread": recall_spread, "diversity_gap": div_gap,
            "diversity_spread": div_spread, "same_recall": same_recall, "passed": passed,
            "test_points_above": int(sum(above)), "test_points_compared": int(sum(m is not None for m in margins["test"]))}


def _std_at(summary, k1, lambdas, recall) -> float:
    """The seed std of K=1's test Diversity@50 at its point nearest ``recall``."""
    lam = min(lambdas, key=lambda x: abs(summary[(k1, x, "test")]["recall@50"][0] - recall))
    return summary[(k1, lam, "test")]["diversity@50"][1]


def _plot(summary: dict, lambdas, labels: dict, verdict: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    styles = {labels["k4"]: dict(color="C0", marker="o"), labels["k1"]: dict(color="C3", marker="s"),
              labels["k1_small"]: dict(color="C3", marker="^", linestyle="--", alpha=0.6)}
    for ax, split in zip(axes, ("valid", "test")):
        for label, style in styles.items():
            xs = [summary[(label, lam, split)]["recall@50"] for lam in lambdas]
            ys = [summary[(label, lam, split)]["diversity@50"] for lam in lambdas]
            ax.errorbar([x[0] for x in xs], [y[0] for y in ys], xerr=[x[1] for x in xs], yerr=[y[1] for y in ys],
                        label=f"{label} (lambda {lambdas[0]:g} .. {lambdas[-1]:g})", capsize=2, markersize=4, **style)
        for label, mk in ((labels["k4_quota"], "D"),):
            s = summary[(label, 0.0, split)]
            ax.errorbar([s["recall@50"][0]], [s["diversity@50"][0]], xerr=[s["recall@50"][1]],
                        yerr=[s["diversity@50"][1]], marker=mk, color="C2", label=label, capsize=2, linestyle="none")
        for key, color in (("k4", "C0"), ("k1", "C3")):
            lam = verdict[f"lambda_{key}"]
            s = summary[(labels[key], lam, split)]
            ax.plot([s["recall@50"][0]], [s["diversity@50"][0]], marker="o", markersize=14, markerfacecolor="none",
                    markeredgecolor=color, linestyle="none",
                    label=f"chosen on valid: {labels[key]} lambda {lam:g}" if split == "valid" else None)
        ax.set_xlabel("Recall@50")
        ax.set_title(f"{split} (mean ± std over seeds)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Diversity@50")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_frontier(args, load_data, log=print, error=ValueError) -> dict:
    """Everything of the module docstring; returns the frontier.json content.

    ``args``: the parsed ``python -m mind frontier`` arguments; ``load_data(args)``: the CLI's
    PreparedData loader; ``error``: the exception class for a user's mistake (the CLI's UsageError)."""
    import torch

    from .diversity import coverage_at_n, diversity_at_n
    from .evaluate import _long, evaluate_rankings, split_rankings, user_interests, write_metrics
    from .merge import check_merge
    from .train import load_trained

    lambdas = sorted(set(float(x) for x in (args.lambdas or DEFAULT_LAMBDAS)))
    for lam in lambdas:
        try:
            check_merge("diverse", lam)
        except ValueError as e:
            raise error(f"--lambdas: {e}") from None
    if 0.0 not in lambdas:
        lambdas = [0.0] + lambdas
    t0 = time.time()
    runs, out = pathlib.Path(args.runs), pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commands = _train_missing(args, runs, log, error)
    torch.set_num_threads(args.threads)
    first, saved = load_trained(runs / f"K4_seed{args.seeds[0]}" / "best.pt")
    args.max_len = int(saved.get("max_len", 20))
    data = load_data(args)
    measure_ids, measure_what = _measure_categories(args, data)
    rows = []
    for K in (4, 1):
        for seed in args.seeds:
            ckpt = runs / f"K{K}_seed{seed}" / "best.pt"
            model, _ = load_trained(ckpt)
            if model.num_items != int(data.num_items):
                raise error(f"{ckpt} was trained on {model.num_items} items, this data has {data.num_items}: "
                                 f"pass the data options it was trained with")
            t = time.time()
            for split_name, split in (("valid", data.valid), ("test", data.test)):
                feats = _long(data.user_features)[_long(split.user_index)]
                interests = user_interests(model, split.histories, feats)
                for label, merge, lam, cands in _configs(lambdas, args.candidates, K):
                    ranked = split_rankings(model, data, split, 50, merge=merge, diversity=lam, candidates=cands,
                                            interests=interests)
                    acc = evaluate_rankings(ranked, split.targets, ns=(50,))
                    rows.append({"dataset": args.data if not args.data_dir else str(args.data_dir), "K": K,
                                 "seed": seed, "split": split_name, "label": label, "merge": merge, "lambda": lam,
                                 "candidates": cands, "recall@50": acc["recall@50"], "ndcg@50": acc["ndcg@50"],
                                 "diversity@50": float(np.nanmean(diversity_at_n(ranked, measure_ids, 50))),
                                 "coverage@50": coverage_at_n(ranked, 50, int(data.num_items))})
            log(f"[frontier] K={K} seed {seed}: {len(_configs(lambdas, args.candidates, K))} lists x 2 splits "
                f"[{time.time() - t:.0f} s]")
    summary = _summaries(rows)
    labels = {"k4": "K=4 diverse", "k4_quota": "K=4 quota", "k4_max": "K=4 max",
              "k1": f"K=1 diverse m={4 * args.candidates}", "k1_small": f"K=1 diverse m={args.candidates}"}
    verdict = select_and_judge(summary, labels["k4"], labels["k1"], lambdas)
    agg = [{"label": lab, "lambda": lam, "split": sp, "seeds": v["seeds"],
            **{f"{m}_{w}": v[m][i] for m in MEASURES for i, w in enumerate(("mean", "std"))}}
           for (lab, lam, sp), v in summary.items()]
    write_metrics(rows, out / "frontier_runs")
    write_metrics(agg, out / "frontier")
    title = (f"{args.data if not args.data_dir else args.data_dir}: Diversity@50 ({measure_what.split(' (')[0]}) "
             f"against Recall@50, seeds {list(args.seeds)}")
    _plot(summary, lambdas, labels, verdict, out / "frontier.png", title)
    md = _markdown(summary, lambdas, labels, verdict, args, measure_what, commands)
    (out / "frontier.md").write_text(md)
    result = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "lambdas": lambdas,
              "measure": measure_what, "train_commands": commands, "verdict": verdict, "summary": agg,
              "seconds": time.time() - t0}
    (out / "frontier.json").write_text(json.dumps(result, indent=1, default=str))
    log(md)
    log(f"written: {out}/frontier.md, frontier.csv, frontier_runs.csv, frontier.json, frontier.png "
        f"[{time.time() - t0:.0f} s]")
    return result


def _cell(v) -> str:
    return f"{v[0]:.4f} ± {v[1]:.4f}"


def _markdown(summary, lambdas, labels, verdict, args, measure_what, commands) -> str:
    cmd = "python -m mind frontier " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if len(sys.argv) > 1 and sys.argv[1] == "frontier" else "python -m mind frontier ..."
    lines = [f"`{cmd}`", "",
             f"Seeds {list(args.seeds)} per model; cells: mean ± std over seeds of the mean over users; "
             f"Diversity@50 over {measure_what}; m = candidates per interest. Models trained by:", ""]
    lines += [f"    {c}" for c in commands[:1] + commands[len(commands) // 2:len(commands) // 2 + 1]]
    lines += ["    (the other seeds alike)", ""]
    for split in ("valid", "test"):
        lines += [f"### {split}", "", "| rows | lambda | Recall@50 | NDCG@50 | Diversity@50 | Coverage@50 | "
                  "K=4 Diversity@50 minus K=1's (m = 4 x m) at the same Recall@50 |", "|---|---:|---|---|---|---|---:|"]
        for key, lams in (("k4_max", [0.0]), ("k4_quota", [0.0]), ("k4", lambdas), ("k1", lambdas),
                          ("k1_small", lambdas)):
            for lam in lams:
                s = summary[(labels[key], lam, split)]
                margin = ""
                if key == "k4":
                    m = verdict["margins"][split][lambdas.index(lam)]
                    margin = "n/a (K=1 never reaches this recall)" if m is None else f"{m:+.4f}"
                lam_txt = "-" if key in ("k4_max", "k4_quota") else f"{lam:g}"
                lines.append(f"| {labels[key]} | {lam_txt} | " + " | ".join(_cell(s[m]) for m in MEASURES)
                             + f" | {margin} |")
        lines.append("")
    v = verdict
    lines += ["### Verdict (lambda chosen on valid, test read at the chosen lambdas)", "",
              f"- chosen on valid: K=4 lambda = {v['lambda_k4']:g} (largest valid margin); K=1 lambda = "
              f"{v['lambda_k1']:g} (valid Recall@50 nearest K=4's)",
              f"- test: K=4 Recall@50 {_cell(v['test_k4']['recall@50'])}, Diversity@50 "
              f"{_cell(v['test_k4']['diversity@50'])}; K=1 Recall@50 {_cell(v['test_k1']['recall@50'])}, "
              f"Diversity@50 {_cell(v['test_k1']['diversity@50'])}",
              f"- same recall: gap {v['recall_gap']:+.4f} against the larger seed std {v['recall_spread']:.4f}: "
              f"{'yes' if v['same_recall'] else 'NO'}",
              f"- diversity: gap {v['diversity_gap']:+.4f} against the larger seed std {v['diversity_spread']:.4f}",
              f"- K=4's test curve above K=1's by more than the larger seed std at {v['test_points_above']} of "
              f"{v['test_points_compared']} comparable lambdas",
              f"- **{'PASS' if v['passed'] else 'FAIL'}**: K=4 with the diverse merge "
              f"{'is' if v['passed'] else 'is not'} more diverse than K=1 with the same re-ranking at the same "
              f"recall, by more than the seed spread", ""]
    return "\n".join(lines)
