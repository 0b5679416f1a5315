"""Did MIND recover the planted interests? (for `mind.data.make_planted` / `make_synthetic` data)

The measure, per evaluated user u with planted clusters P_u and K interest vectors v_uk:

* each interest k retrieves its ``top`` items by <v_uk, e_i> over the whole catalogue (the
  history is NOT excluded: the question is what the interest points at, not what is new);
* m_uk = the majority planted cluster of those items, share_uk = its fraction of them.

Reported (means over users, or over (user, interest) pairs where said):

* ``purity``: mean share_uk over all (u, k): 1 = every interest points at one cluster;
* ``on_planted``: fraction of (u, k) whose m_uk is in P_u (an interest on a foreign cluster,
  or one split between clusters so its majority is foreign, counts against);
* ``recovered``: mean over users of |{m_uk : k} ∩ P_u| / |P_u|, the share of a user's planted
  clusters that some interest points at (with K >= |P_u| all can be, with K = 1 at most one);
* ``all_recovered``: fraction of users with recovered = 1.

Inactive interests (dynamic K'_u) are left out.
"""

from __future__ import annotations

import collections

import numpy as np
import torch


def interest_recovery(interests, item_embeddings, item_cluster, user_clusters, top: int = 20,
                      interest_mask=None) -> dict:
    """The measure of the module docstring.

    interests: (U, K, d) interest vectors; item_embeddings: (num_items + 1, d), row 0 padding;
    item_cluster: (num_items + 1,) planted cluster per item index (row 0 ignored);
    user_clusters: U lists of planted clusters; interest_mask: (U, K) bool or None (all active).
    """
    V = torch.as_tensor(interests, dtype=torch.float64)
    E = torch.as_tensor(item_embeddings, dtype=torch.float64)[1:]
    cl = np.asarray(item_cluster)[1:]
    if V.dim() != 3 or V.shape[0] != len(user_clusters):
        raise ValueError(f"interests must be (U, K, d) with U = len(user_clusters) = {len(user_clusters)}, "
                         f"got {tuple(V.shape)}")
    U, K, _ = V.shape
    active = np.ones((U, K), bool) if interest_mask is None else np.asarray(interest_mask, bool)
    top = min(top, E.shape[0])
    idx = torch.topk(V @ E.T, top, dim=2).indices.numpy()          # (U, K, top)
    shares, on, recovered = [], [], []
    for u in range(U):
        planted = set(int(c) for c in user_clusters[u])
        found = set()
        for k in range(K):
            if not active[u, k]:
                continue
            c, n = collections.Counter(cl[idx[u, k]].tolist()).most_common(1)[0]
            shares.append(n / top)
            on.append(c in planted)
            if c in planted:
                found.add(c)
        recovered.append(len(found) / max(1, len(planted)))
    recovered = np.asarray(recovered)
    return {"purity": float(np.mean(shares)), "on_planted": float(np.mean(on)),
            "recovered": float(recovered.mean()), "all_recovered": float((recovered == 1).mean()),
            "users": U, "top": top}


def model_interest_recovery(model, data, truth: dict, split: str = "test", top: int = 20) -> dict:
    """`interest_recovery` of a trained MIND on ``data.valid`` or ``data.test`` users, with the
    ``truth`` returned by the generator (raw ids) mapped onto ``data``'s item indices."""
    from .evaluate import user_interests

    ev = getattr(data, split)
    V, mask = user_interests(model, ev.histories, data.user_features[ev.user_index])
    with torch.no_grad():
        was_training = model.training
        model.eval()
        E = model.item_embeddings().cpu()
        model.train(was_training)
    item_cluster = np.array([-1] + [truth["item_cluster"][int(r)] for r in data.item_raw_ids[1:]])
    users = [truth["user_clusters"][int(u)] for u in ev.users]
    return interest_recovery(V, E, item_cluster, users, top=top, interest_mask=mask)
