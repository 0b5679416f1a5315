"""The learning-curve PNG (mind.plots.plot_learning_curves) for the per-epoch rows training writes."""

import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import pytest

from mind.plots import learning_curve_figure, plot_learning_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(epoch: int, cosine=0.4) -> dict:
    """One epoch's row with the keys train() writes (evaluate_rankings + beyond_accuracy, ns = (20, 50))."""
    g = epoch / (epoch + 2)
    row = {"epoch": epoch, "train_loss": 6.0 - g, "seconds": 1.5, "valid_interest_cosine": cosine,
           "valid_interest_cosine_se": None if cosine is None else 0.01}
    for n, s in ((20, 0.6), (50, 1.0)):
        for name, v in (("recall", 0.3), ("ndcg", 0.15), ("hit_rate", 0.6), ("diversity", 0.7)):
            row[f"valid_{name}@{n}"], row[f"valid_{name}@{n}_se"] = v * s * g, 0.01
        row[f"valid_coverage@{n}"] = 0.2 * s
        for t, f in (("low", 1.2), ("mid", 1.0), ("high", 0.8)):
            row[f"valid_recall@{n}_entropy_{t}"], row[f"valid_recall@{n}_entropy_{t}_se"] = 0.3 * s * g * f, 0.02
    return row


def _labels(fig) -> list:
    return [[line.get_label() for line in ax.get_lines()] for ax in fig.axes]


def _write(history, path) -> bytes:
    out = plot_learning_curves(history, path)
    assert out == str(path)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    return data


def test_full_history_one_panel_per_family_distinct_colours_legends_outside(tmp_path):
    history = [_row(e) for e in range(1, 9)]
    _write(history, tmp_path / "curves.png")
    fig = learning_curve_figure(history)
    try:
        assert len(fig.axes) == 4
        loss, ranking, beyond, entropy = _labels(fig)
        assert loss == ["train loss"]
        assert sorted(ranking) == sorted(f"{m}@{n}" for m in ("Recall", "NDCG", "HitRate") for n in (20, 50))
        assert sorted(beyond) == sorted(["Diversity@20", "Diversity@50", "Coverage@20", "Coverage@50",
                                         "interest cosine"])
        assert len(entropy) == 6 and all("entropy" in label for label in entropy)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            colours = [mcolors.to_hex(line.get_color()) for line in ax.get_lines()]
            assert len(set(colours)) == len(colours), (ax.get_title(), colours)  # no repeated colour in a panel
            assert all(float(t).is_integer() for t in ax.get_xticks()), ax.get_xticks()  # whole epochs
            legend = ax.get_legend()
            assert legend is not None
            box, data_area = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
            assert box.x0 >= data_area.x1, ax.get_title()  # to the right of the data area, not over it
    finally:
        plt.close(fig)


def test_none_values_and_missing_series(tmp_path):
    # K = 1: interest cosine is None every epoch; a coverage value undefined once; an older row without
    # the entropy keys; a whole family missing leaves its panel saying so
    history = [_row(e, cosine=None) for e in range(1, 5)]
    history[1]["valid_coverage@20"] = None
    for key in [k for k in history[0] if "entropy" in k]:
        del history[0][key]
    for row in history:
        for key in [k for k in row if "entropy" in k]:
            row[key] = None
    _write(history, tmp_path / "none.png")
    fig = learning_curve_figure(history)
    try:
        loss, ranking, beyond, entropy = _labels(fig)
        assert "interest cosine" not in beyond and "Coverage@20" in beyond  # all-None skipped, gaps kept
        assert entropy == []
        assert "no values" in " ".join(t.get_text() for t in fig.axes[3].texts)
    finally:
        plt.close(fig)


@pytest.mark.parametrize("history", [[_row(1)], [{"epoch": 1, "train_loss": 5.0}], []],
                         ids=["one-epoch", "loss-only", "empty"])
def test_short_histories(tmp_path, history):
    _write(history, tmp_path / "short.png")
    fig = learning_curve_figure(history)
    try:
        if history:
            assert list(fig.axes[0].get_xticks()) == [1]
    finally:
        plt.close(fig)
