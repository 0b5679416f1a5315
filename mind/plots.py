"""PNG figures for training runs and explanations (matplotlib, headless Agg backend)."""

from __future__ import annotations

import math
import os
import re
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on training machines; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# One hue per metric (or tercile) and one shade per cutoff N, so that no two lines of a panel
# share a colour and a metric's lines read as one family; the line style also tells the N apart.
_FAMILY_CMAPS = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")
_N_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P")

_AT_N = re.compile(r"^valid_(recall|ndcg|hit_rate|diversity|coverage)@(\d+)$")
_ENTROPY = re.compile(r"^valid_recall@(\d+)_entropy_(low|mid|high)$")
_LABELS = {"recall": "Recall", "ndcg": "NDCG", "hit_rate": "HitRate", "diversity": "Diversity",
           "coverage": "Coverage"}


def _values(history: Sequence[dict], key: str) -> Optional[list]:
    """``key``'s per-epoch values with None / missing / non-finite as NaN; None when no epoch has one."""
    out = []
    for row in history:
        v = row.get(key)
        out.append(float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.nan)
    return None if all(math.isnan(v) for v in out) else out


def _shade(family: int, i: int, count: int):
    """Colour of the i-th of ``count`` cutoffs in a family: darker for larger N."""
    cmap = plt.get_cmap(_FAMILY_CMAPS[family % len(_FAMILY_CMAPS)])
    return cmap(0.85 if count == 1 else 0.5 + 0.4 * i / (count - 1))


def _learning_curve_panels(history: Sequence[dict]) -> list:
    """[(title, ylabel, [(label, values, colour, linestyle, marker)])] for the four panels."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    at_n: dict = {}
    entropy: dict = {}
    for k in keys:
        if m := _AT_N.match(k):
            at_n.setdefault(m.group(1), set()).add(int(m.group(2)))
        elif m := _ENTROPY.match(k):
            entropy.setdefault(m.group(2), set()).add(int(m.group(1)))

    def family_series(names, ns_of: dict, key_of, label_of, first_family: int = 0) -> list:
        series = []
        for f, name in enumerate(names):
            ns = sorted(ns_of.get(name, ()))
            for i, n in enumerate(ns):
                values = _values(history, key_of(name, n))
                if values is not None:
                    series.append((label_of(name, n), values, _shade(first_family + f, i, len(ns)),
                                   _N_STYLES[(len(ns) - 1 - i) % len(_N_STYLES)], _MARKERS[f % len(_MARKERS)]))
        return series

    def at_key(metric, n):
        return f"valid_{metric}@{n}"

    def at_label(metric, n):
        return f"{_LABELS[metric]}@{n}"

    loss = _values(history, "train_loss")
    panels = [("(a) training loss", "loss",
               [] if loss is None else [("train loss", loss, _shade(0, 0, 1), "-", "o")])]
    panels.append(("(b) ranking (validation)", "metric",
                   family_series(("recall", "ndcg", "hit_rate"), at_n, at_key, at_label)))
    beyond = family_series(("diversity", "coverage"), at_n, at_key, at_label, first_family=3)
    cosine = _values(history, "valid_interest_cosine")
    if cosine is not None:
        beyond.append(("interest cosine", cosine, _shade(2, 0, 1), "-", "^"))
    panels.append(("(c) diversity, coverage, interest cosine (validation)", "value", beyond))
    panels.append(("(d) Recall by genre entropy of the history (validation)", "recall",
                   family_series(("low", "mid", "high"), entropy, lambda t, n: f"valid_recall@{n}_entropy_{t}",
                                 lambda t, n: f"Recall@{n}, {t} entropy")))
    return panels


def learning_curve_figure(history: Sequence[dict]):
    """The learning-curve figure (see :func:`plot_learning_curves`); the caller closes it."""
    epochs = [int(row.get("epoch", i + 1)) for i, row in enumerate(history)]
    panels = _learning_curve_panels(history)
    fig, axes = plt.subplots(2, 2, figsize=(14, 8.5), layout="constrained")
    for ax, (title, ylabel, series) in zip(axes.flat, panels):
        ax.set_title(title, fontsize=11, loc="left")
        ax.set_xlabel("epoch")
        if 0 < len(set(epochs)) <= 12:
            ax.set_xticks(sorted(set(epochs)))  # every epoch, whole numbers only (also for a single one)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        if not series:
            ax.text(0.5, 0.5, "no values recorded", transform=ax.transAxes, ha="center", va="center",
                    color="0.45", fontsize=11)
            ax.set_yticks([])
            continue
        ax.set_ylabel(ylabel)
        ax.grid(True, color="0.9", linewidth=0.8)
        ax.set_axisbelow(True)
        for label, values, colour, style, marker in series:
            ax.plot(epochs, values, color=colour, linestyle=style, marker=marker, markersize=4,
                    linewidth=1.6, label=label)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8,
                      frameon=False, handlelength=2.6)
    return fig


def plot_learning_curves(history: Sequence[dict], path: str | os.PathLike) -> str:
    """Learning curves of a run's per-epoch rows (``train`` history) as a PNG at ``path``.

    Four panels, x = epoch: (a) training loss; (b) validation Recall / NDCG / HitRate@N; (c) validation
    Diversity@N, Coverage@N and interest cosine; (d) validation Recall@N by genre-entropy tercile of the
    history.  One hue per metric, one shade and line style per N (no colour repeats within a panel);
    legends sit to the right of their panel.  Values that are None (undefined, e.g. interest cosine
    for K = 1) leave gaps, a series with no value is left out, and a panel with none says so.
    """
    fig = learning_curve_figure(history)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def plot_coupling_heatmap(weights: np.ndarray, item_labels: Sequence[str], path: str | os.PathLike,
                          title: str = "B2I coupling weights") -> str:
    """Heatmap of coupling weights (K interests x L history items)."""
    K, L = weights.shape
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * L + 2), max(2.5, 0.5 * K + 1.5)))
    im = ax.imshow(weights, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_yticks(range(K))
    ax.set_yticklabels([f"interest {k}" for k in range(K)])
    ax.set_xticks(range(L))
    ax.set_xticklabels([str(s)[:28] for s in item_labels], rotation=75, ha="right", fontsize=7)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
