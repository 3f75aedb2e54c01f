"""α-entmax in plain PyTorch: the semantics every kernel and rewrite is checked against.

Convention (DESIGN.md §2): for raw scores ``s`` and ``z = (α−1)·s``, ``p_j = [z_j − τ]_+^β`` with
``β = 1/(α−1)`` and ``τ`` the root of ``Σ_j [z_j − τ]_+^β = 1``, so ``τ ∈ [max z − 1, max z)``.

* α = 2 (sparsemax) and α = 1.5 have exact sort-based solutions; any other α in (1, 2] is solved by
  bisection on the bracket followed by normalisation (the same fixed point ``entmax_bisect`` reaches).
* ``-inf`` entries are masked: they never enter the support. A row with no finite entry gets ``p = 0``
  everywhere (defined, never NaN).
* Inputs of any float dtype are computed in fp32; the result comes back in the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import validate_alpha

BISECT_ITERS = 50


def _is_exact_alpha(alpha: float) -> bool:
    return alpha in (1.5, 2.0)


def entmax_threshold(z: Tensor, alpha: float) -> Tensor:
    """Threshold τ along the last dim of scaled scores ``z = (α−1)·s`` (fp32), shape ``[..., 1]``.

    Masked entries are ``-inf``. Fully masked rows get τ = 0 (their probabilities are all 0).
    """
    tau, zmax = _shifted_threshold(z.float(), validate_alpha(alpha))
    return tau + zmax


def _shifted_threshold(z: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """τ of ``z − max z`` and ``max z`` (0 for fully masked rows, whose shifted τ is also 0).

    Solving on the shifted scores keeps the prefix sums (and the variance of the α=1.5 closed form) free of
    cancellation: unshifted, scores around 1e3 already give errors of 0.1 in the probabilities.
    """
    zmax = z.amax(-1, keepdim=True)
    has_valid = torch.isfinite(zmax)
    zmax = torch.where(has_valid, zmax, torch.zeros_like(zmax))
    z0 = z - zmax
    tau = _threshold_sorted(z0, alpha) if _is_exact_alpha(alpha) else _threshold_bisect(z0, alpha)
    return torch.where(has_valid, tau, torch.zeros_like(tau)), zmax


def _threshold_sorted(z: Tensor, alpha: float) -> Tensor:
    zs, _ = torch.sort(z, dim=-1, descending=True)
    valid = torch.isfinite(zs)
    zs0 = torch.where(valid, zs, torch.zeros_like(zs))
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    cs = zs0.cumsum(-1)
    if alpha == 2.0:
        tau_k = (cs - 1) / k
    else:  # α = 1.5: p = (z − τ)², solve the quadratic on each sorted prefix
        mean = cs / k
        mean_sq = (zs0 * zs0).cumsum(-1) / k
        delta = (1 - k * (mean_sq - mean * mean)) / k
        tau_k = mean - torch.sqrt(delta.clamp_min(0))
    # the support is a prefix of the sorted order; its size picks the matching prefix threshold. Counted
    # as the leading run: huge finite fills (finfo.min) overflow the prefix sums to −inf, and a −inf τ_k
    # would otherwise admit them past the true support
    # (a cumsum, not a cumprod: the export path lowers this function to ONNX, which has no prod)
    support = (valid & (tau_k < zs)).to(z.dtype).cumsum(-1) == k
    k_star = support.sum(-1, keepdim=True).clamp_min(1)
    return tau_k.gather(-1, k_star - 1)


def _threshold_bisect(z: Tensor, alpha: float) -> Tensor:
    """Bisection for scores shifted so that ``max z = 0``: τ ∈ [−1, 0]."""
    beta = 1.0 / (alpha - 1.0)
    lo = torch.full_like(z[..., :1], -1.0)
    hi = torch.zeros_like(lo)
    for _ in range(BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        mass = (z - mid).clamp_min(0).pow(beta).sum(-1, keepdim=True)
        above = mass >= 1
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return lo


def entmax_probs(z: Tensor, tau: Tensor, alpha: float) -> Tensor:
    """``[z − τ]_+^β`` in fp32 (not normalised)."""
    beta = 1.0 / (alpha - 1.0)
    d = (z.float() - tau).clamp_min(0)
    if alpha == 2.0:
        return d
    if alpha == 1.5:
        return d * d
    return d.pow(beta)


def entmax(x: Tensor, alpha: float = 1.5, dim: int = -1) -> Tensor:
    """α-entmax of ``x`` along ``dim`` (α in (1, 2]); computed in fp32, returned in ``x.dtype``.

    >>> entmax(torch.tensor([1.0, 0.0, -3.0]), alpha=2.0)
    tensor([1., 0., 0.])
    """
    alpha = validate_alpha(alpha)
    if not x.is_floating_point():
        raise TypeError(f"entmax expects a floating tensor, got {x.dtype}")
    xt = x.float().movedim(dim, -1)
    # shift before scaling: (α−1)·x would round large scores before the solver's own shift can help
    z = (xt - xt.amax(-1, keepdim=True).nan_to_num(neginf=0.0)) * (alpha - 1.0)
    tau, zmax = _shifted_threshold(z, alpha)
    p = entmax_probs(z - zmax, tau, alpha)
    if not _is_exact_alpha(alpha):
        # bisection leaves τ within ~1e-15 of the root; normalising removes the residual mass error
        p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    return p.movedim(-1, dim).to(x.dtype)


def sparsemax(x: Tensor, dim: int = -1) -> Tensor:
    return entmax(x, 2.0, dim)


def entmax15(x: Tensor, dim: int = -1) -> Tensor:
    return entmax(x, 1.5, dim)
