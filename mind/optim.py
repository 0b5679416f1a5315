"""Optimizers for MIND's training: dense AdamW, or AdamW with row-wise (lazy) embedding tables.

``"adamw"``: ``torch.optim.AdamW`` over every parameter (the default).

``"rowwise"``: the embedding tables (every ``nn.Embedding`` weight) are updated only on the
rows the step's gradient touched, as TorchRec's fused row-wise optimizers and
``torch.optim.SparseAdam`` do; the dense parameters keep AdamW.  For a table W (N, d) with
gradient G and the rows R = {n : G[n] != 0} of this step, with t the optimizer's step count:

    m[R] = b1 m[R] + (1 - b1) G[R]            v[R] = b2 v[R] + (1 - b2) G[R]^2
    W[R] = W[R] (1 - lr wd) - lr (m[R] / (1 - b1^t)) / (sqrt(v[R] / (1 - b2^t)) + eps)

Rows outside R keep W, m and v unchanged (no decay of the moments, no weight decay): the
"lazy" Adam.  It differs from dense AdamW only on rows a step does not touch, and its cost
follows |R| d instead of N d.  With the exact softmax every row is touched every step, so
it buys nothing there; it pays for large catalogues with the sampled softmax.

Both are exactly resumable: :meth:`RowWiseAdamW.state_dict` holds tensors and numbers only
(checkpoint-safe) and :meth:`load_state_dict` restores them bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

OPTIMIZERS = ("adamw", "rowwise")


class RowWiseAdamW:
    """AdamW for the dense parameters + lazy row-wise Adam(W) for ``tables`` (see module doc).

    Args:
        dense: parameters updated by ``torch.optim.AdamW``.
        tables: 2-D embedding weights updated row-wise.
        lr, weight_decay, betas, eps: as AdamW's, shared by both parts.
    """

    def __init__(self, dense, tables, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
        self.tables = list(tables)
        for w in self.tables:
            if w.dim() != 2:
                raise ValueError(f"RowWiseAdamW: tables must be 2-D (rows, d), got {tuple(w.shape)}")
        self.dense = torch.optim.AdamW(list(dense), lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
        self.lr, self.weight_decay, self.betas, self.eps = float(lr), float(weight_decay), tuple(betas), float(eps)
        self.step_count = 0
        self.exp_avg = [torch.zeros_like(w) for w in self.tables]
        self.exp_avg_sq = [torch.zeros_like(w) for w in self.tables]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)
        for w in self.tables:
            w.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.dense.step()
        self.step_count += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.step_count, 1 - b2 ** self.step_count
        for w, m, v in zip(self.tables, self.exp_avg, self.exp_avg_sq):
            if w.grad is None:
                continue
            g = w.grad
            rows = g.ne(0).any(dim=1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            gr = g.index_select(0, rows)
            mr = m.index_select(0, rows).mul_(b1).add_(gr, alpha=1 - b1)
            vr = v.index_select(0, rows).mul_(b2).addcmul_(gr, gr, value=1 - b2)
            m.index_copy_(0, rows, mr)
            v.index_copy_(0, rows, vr)
            wr = w.index_select(0, rows).mul_(1 - self.lr * self.weight_decay)
            wr.addcdiv_(mr, vr.div(c2).sqrt_().add_(self.eps), value=-self.lr / c1)
            w.index_copy_(0, rows, wr)

    def state_dict(self) -> dict:
        return {"dense": self.dense.state_dict(), "step": self.step_count,
                "exp_avg": [t.clone() for t in self.exp_avg], "exp_avg_sq": [t.clone() for t in self.exp_avg_sq]}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "exp_avg" not in state:
            raise ValueError("RowWiseAdamW: the checkpoint's optimizer state was written by another optimizer "
                             "(train with the same --optimizer to resume)")
        if [tuple(t.shape) for t in state["exp_avg"]] != [tuple(w.shape) for w in self.tables]:
            raise ValueError("RowWiseAdamW: the checkpoint's embedding tables have other shapes")
        self.dense.load_state_dict(state["dense"])
        self.step_count = int(state["step"])
        for dst, src in zip(self.exp_avg + self.exp_avg_sq, list(state["exp_avg"]) + list(state["exp_avg_sq"])):
            dst.copy_(src)


def build_optimizer(model: nn.Module, kind: str, lr: float, weight_decay: float):
    """``kind`` "adamw" (torch.optim.AdamW over everything) or "rowwise" (:class:`RowWiseAdamW`)."""
    if kind == "adamw":
        # fused=True: one kernel over all parameters (CPU and CUDA), the same update as the per-parameter
        # loop up to float rounding; 1.03x per ML-100k step (bench/bench_train.py --sections levers).
        params = list(model.parameters())
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if kind != "rowwise":
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    table_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params = list(model.parameters())
    return RowWiseAdamW([p for p in params if id(p) not in table_ids], [p for p in params if id(p) in table_ids],
                        lr=lr, weight_decay=weight_decay)
