"""Helpers shared by the fused-backend test files (Triton, CUDA)."""


def run_op(fn, E, S, b0, mask, interest_mask, G, r, over, **kwargs):
    """(capsules, w, dE, dS) of one routing call ``fn`` with gradient G on the capsules.

    ``kwargs`` (e.g. ``logit_scale``) are passed on to ``fn``.
    """
    E = E.detach().clone().requires_grad_()
    S = S.detach().clone().requires_grad_()
    c, w = fn(E, S, b0, mask, interest_mask, r, over, **kwargs)
    c.backward(G)
    return c.detach(), w.detach(), E.grad, S.grad
