"""Page metadata (per-page, per-channel key boxes) and the page upper bound on attention scores.

Tokens live in pages of ``page_size`` consecutive positions per (batch row, KV head). A page's box
``[kmin, kmax]`` (element-wise min/max of its valid keys, stored in the key dtype, hence exact) bounds every
score in the page: ``scale·q·k ≤ scale·Σ_d max(q_d·kmin_d, q_d·kmax_d)`` (DESIGN.md §2). Empty pages carry
``kmin = +inf, kmax = −inf`` and get the bound ``−inf``.

GQA follows the ``repeat_kv`` convention: query head ``h`` reads KV head ``h // G`` with ``G = Hq / Hkv``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FP32_UNIT_ROUNDOFF = 2.0**-24


def num_pages(seq_len: int, page_size: int) -> int:
    return -(-seq_len // page_size)


def _paged(x: Tensor, page_size: int, fill: float, dim: int) -> Tensor:
    """Move ``dim`` last, pad it to whole pages with ``fill`` and split it into ``[P, page_size]``."""
    x = x.movedim(dim, -1)
    pad = num_pages(x.shape[-1], page_size) * page_size - x.shape[-1]
    return torch.nn.functional.pad(x, (0, pad), value=fill).unflatten(-1, (-1, page_size))


def page_counts(valid: Tensor, page_size: int) -> Tensor:
    """Valid tokens per page: ``valid[..., S]`` bool → ``[..., P]`` int64."""
    return _paged(valid.long(), page_size, 0, -1).sum(-1)


def page_bias_max(bias: Tensor, page_size: int) -> Tensor:
    """Largest bias of each page: ``bias[..., S]`` → ``[..., P]`` (−inf for a page without a valid token)."""
    return _paged(bias, page_size, -math.inf, -1).amax(-1)


def page_metadata(k: Tensor, page_size: int, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-page key boxes ``(kmin, kmax)``, each ``[B, Hkv, P, D]`` in ``k.dtype``.

    ``valid[B, S]`` (bool, optional) marks written positions; masked slots and the padding of a last
    partial page never widen a box, and a page without valid tokens gets ``kmin = +inf, kmax = −inf``.
    """
    if valid is not None:
        k = k.masked_fill(~valid[:, None, :, None], math.nan)  # NaN marks "not a token" until the reductions
    kp = _paged(k, page_size, math.nan, -2)  # [B, Hkv, D, P, page_size]
    missing = kp.isnan()
    kmin = kp.masked_fill(missing, math.inf).amin(-1)
    kmax = kp.masked_fill(missing, -math.inf).amax(-1)
    return kmin.transpose(-1, -2), kmax.transpose(-1, -2)


def page_upper_bound(
    q: Tensor, kmin: Tensor, kmax: Tensor, scale: float, bias: Tensor | None, page_size: int
) -> Tensor:
    """Upper bound on every score in each page, ``[B, Hq, Lq, P]`` fp32 (``−inf`` for empty/masked pages).

    ``u = scale·Σ_d max(q_d·kmin_d, q_d·kmax_d) + max_{j ∈ page} bias_j``, evaluated as
    ``scale·(q⁺·kmax + q⁻·kmin)``. ``bias`` broadcasts to ``[B, Hq, Lq, S]`` (−inf = masked).

    The bound is raised by a rounding slack so that it also holds against scores computed in fp32
    (``fl(scale·fl(q·k)) + bias``): an fp32 dot product of ``n`` terms is within ``γ_n·Σ|q_d·k_d|`` of the
    exact value (``γ_n ≈ n·2⁻²⁴``); the score is one such sum over ``D`` terms and the bound one over ``2D``,
    plus a rounding each for the scale. The slack ``2·γ_{2D+4}·scale·Σ_d |q_d|·max(|kmin_d|, |kmax_d|)``
    covers them with a factor two to spare. The bias needs none: fp32 rounding is monotone, so adding the
    page's bias maximum to a larger fp32 value never gives a smaller result.
    """
    b, hq, lq, d = q.shape
    hkv, p = kmin.shape[1], kmin.shape[2]
    empty = (kmin > kmax).any(-1)  # [B, Hkv, P]
    lo = kmin.float().masked_fill(empty[..., None], 0.0)
    hi = kmax.float().masked_fill(empty[..., None], 0.0)
    qf = q.float().reshape(b, hkv, -1, d)  # [B, Hkv, G·Lq, D]
    box = qf.clamp_min(0) @ hi.transpose(-1, -2) + qf.clamp_max(0) @ lo.transpose(-1, -2)
    mag = qf.abs() @ torch.maximum(lo.abs(), hi.abs()).transpose(-1, -2)
    slack = 2.0 * (2 * d + 4) * FP32_UNIT_ROUNDOFF
    u = (scale * box + slack * (scale * mag)).reshape(b, hq, lq, p)
    masked = empty.repeat_interleave(hq // hkv, dim=1)[:, :, None, :]
    if bias is not None:
        bmax = page_bias_max(bias.float().expand(b, hq, lq, -1), page_size)
        masked = masked | (bmax == -math.inf)
        u = u + bmax.masked_fill(masked, 0.0)
    return u.masked_fill(masked, -math.inf)


def page_rank_bound(
    q: Tensor, kmin: Tensor, kmax: Tensor, scale: float, bias: Tensor | None, page_size: int
) -> Tensor:
    """:func:`page_upper_bound` as the page ranking reads it: a NaN bound (a NaN key) is ``+inf``, the page
    cannot be excluded; a row whose query is not finite is ``−inf`` everywhere, since its output is NaN
    whatever is read, so it takes no part in the ranking (at ``+inf`` every page would tie and its group's
    other rows would get the first pages)."""
    u = page_upper_bound(q, kmin, kmax, scale, bias, page_size)
    u = u.masked_fill(u.isnan(), math.inf)
    return u.masked_fill(~torch.isfinite(q).all(-1, keepdim=True), -math.inf)


def group_bound(u: Tensor, num_kv_heads: int) -> Tensor:
    """Bound shared by a KV group: ``u[B, Hq, Lq, P]`` maxed over its heads and rows → ``[B, Hkv, P]``."""
    b, hq, lq, p = u.shape
    return u.reshape(b, num_kv_heads, -1, p).amax(-2)
