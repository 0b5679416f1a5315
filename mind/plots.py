"""PNG figures for training runs and explanations (matplotlib, headless Agg backend)."""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on training machines; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_learning_curves(history: Sequence[dict], path: str | os.PathLike) -> str:
    """Two panels: training loss per epoch; valid Recall/HitRate/NDCG@N per epoch."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row["train_loss"] for row in history], marker="o")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("training loss")
    keys = [k for k in (history[0] if history else {}) if k.startswith("valid_") and "@" in k and not k.endswith("_se")]
    for key in keys:
        ax_metric.plot(epochs, [row[key] for row in history], marker="o", label=key[len("valid_"):])
    ax_metric.set_xlabel("epoch")
    ax_metric.set_title("validation metrics")
    if keys:
        ax_metric.legend(fontsize=8)
    fig.tight_layout()
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
