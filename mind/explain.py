"""Explain a user's interests: which history items the B2I routing sent to which interest.

For a history (raw item ids) the model's final coupling weights w (K, L) say how much
behaviour i contributes to interest j (softmax over interests, so each column sums to 1).
Each behaviour is assigned to its argmax_j w_ij; an interest is described by its
assigned items, their most common genres, its own top recommendations (items ranked
by V_j . e_i alone, history excluded) and their genres, and its share of the user's
merged list (the ``merged_n`` items ``recommend`` returns with the same ``merge`` and
``diversity``, from :mod:`mind.merge`: how many of them interest j scores best).  An interest that no behaviour has as its
strongest is still formed (from the weights it gets everywhere) and is said to be so.
"""

from __future__ import annotations

import collections
import pathlib
from typing import Optional, Sequence

import numpy as np
import torch

from .serve import Recommender


@torch.no_grad()
def explain(rec: Recommender, history: Sequence, png: Optional[str | pathlib.Path] = None,
            top_n: int = 5, user_features=None, merged_n: int = 50, merge: str = "max",
            diversity: float = 0.0, candidates: int = 200) -> dict:
    """Describe each active interest of ``history``; optionally save a coupling-weight heatmap PNG.

    Returns ``{"interests": [{"interest", "items": [(raw id, title, genres, weight)], "top_genres",
    "recommendations": [(raw id, title, score)], "recommended_genres": [(genre, count)],
    "merged_share": int}], "weights": (K, L') array over the used history,
    "history": [(raw id, title)], "text": str, "png": path or None}``.
    """
    hist, mapped = rec._batch([history])
    used = mapped[0][-rec.max_len:]
    v, imask, w = rec.model.interests(hist, rec._features(user_features, 1), return_weights=True)
    L = hist.shape[1]
    weights = w[0, :, L - len(used):].float().numpy()          # (K, L') over the real items
    active = imask[0].numpy()
    owner = weights.argmax(axis=0)
    vectors = v[0].float().numpy()
    scores = vectors @ rec.item_table.T                         # (K, N + 1)
    scores[:, 0] = -np.inf
    scores[:, np.unique(mapped[0])] = -np.inf

    from .merge import check_merge, merged_topn

    merged_n = min(merged_n, rec.num_items)
    check_merge(merge, diversity, merged_n, rec.num_items, candidates)
    masked = np.where(active[:, None], scores, -np.inf)
    merged, _ = merged_topn(v.float(), merged_n, table=rec.item_table, active=imask, exclude=[mapped[0]],
                            merge=merge, diversity=diversity, candidates=candidates, index=rec.index,
                            categories=rec.categories if merge == "diverse" else None)
    merged = merged[0][merged[0] > 0]                           # the list recommend() returns
    winner = masked[:, merged].argmax(axis=0)

    interests, lines = [], []
    lines.append(f"history: {len(used)} item(s) used (of {len(mapped[0])} known), "
                 f"{int(active.sum())} active interest(s)")
    for k in range(weights.shape[0]):
        if not active[k]:
            continue
        pos = np.flatnonzero(owner == k)
        items = [(rec.raw_ids[used[i]], rec.titles[used[i]], rec.genres[used[i]], float(weights[k, i])) for i in pos]
        genre_count = collections.Counter(g for _, _, gs, _ in items for g in gs)
        top = np.argsort(-scores[k], kind="stable")[:top_n]
        recs = [(rec.raw_ids[i], rec.titles[i], float(scores[k, i])) for i in top]
        rec_genres = collections.Counter(g for i in top for g in rec.genres[i]).most_common(3)
        share = int((winner == k).sum())
        interests.append({"interest": k, "items": items, "top_genres": genre_count.most_common(3),
                          "recommendations": recs, "recommended_genres": rec_genres, "merged_share": share})
        genres_txt = ", ".join(f"{g} ({c})" for g, c in genre_count.most_common(3)) or "-"
        if items:
            lines.append(f"\ninterest {k}: formed mostly from {len(items)} item(s); top genres: {genres_txt}")
        else:
            lines.append(f"\ninterest {k}: no history item has it as its strongest interest "
                         f"(its weights peak at {float(weights[k].max()):.2f}); formed from all items' shares")
        for raw, title, gs, wt in items:
            lines.append(f"    w={wt:.2f}  [{raw}] {title}  ({'|'.join(gs)})")
        lines.append("  recommends: " + "; ".join(f"{t} [{r}]" for r, t, _ in recs))
        lines.append(f"  its recommendations' genres: {', '.join(f'{g} ({c})' for g, c in rec_genres) or '-'}; "
                     f"it wins {share} of the {len(merged)} items of the merged list")

    out_png = None
    if png is not None:
        from .plots import plot_coupling_heatmap
        labels = [rec.titles[i] or str(rec.raw_ids[i]) for i in used]
        out_png = plot_coupling_heatmap(weights, labels, png)
        lines.append(f"\ncoupling-weight heatmap written to {out_png}")
    return {"interests": interests, "weights": weights, "history": [(rec.raw_ids[i], rec.titles[i]) for i in used],
            "text": "\n".join(lines), "png": out_png}
