"""``entmaxkv::entmax``: α-entmax as one opaque op, so graphs carry it as a single node.

The backend maps every known entmax callable (the ``entmax`` package, the project's own, hand-written
forms) onto this op before the graph reaches AOTAutograd; the attention matcher then anchors on it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference.entmax import entmax as entmax_reference


@torch.library.custom_op("entmaxkv::entmax", mutates_args=())
def entmax(x: Tensor, alpha: float, dim: int) -> Tensor:
    return entmax_reference(x, alpha, dim)


@entmax.register_fake
def _(x: Tensor, alpha: float, dim: int) -> Tensor:
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output) -> None:
    ctx.alpha, ctx.dim = inputs[1], inputs[2]
    ctx.save_for_backward(output)


def _backward(ctx, grad: Tensor):
    # d entmax: u = p^(2−α) on the support; dx = u·g − (Σ u·g / Σ u)·u
    (p,) = ctx.saved_tensors
    pf, gf = p.float(), grad.float()
    u = torch.where(pf > 0, pf.pow(2.0 - ctx.alpha), torch.zeros_like(pf))
    dim = ctx.dim
    coef = (u * gf).sum(dim, keepdim=True) / u.sum(dim, keepdim=True).clamp_min(1e-30)
    return (u * gf - coef * u).to(grad.dtype), None, None


entmax.register_autograd(_backward, setup_context=_setup_context)
