"""Per-token low-precision key sketches with worst-case score bounds (the ``certified`` policy).

Each key is quantised symmetrically per (token, channel group): ``k̂ = code·step`` with
``step = max|k_group| / qmax`` (``qmax`` = 127 for int8, 7 for int4) and ``code = round(k / step)``.
The sketch also stores the residual norm ``r = ‖k − k̂‖₂`` per token, so for any query
``s − ŝ = scale·q·(k − k̂)`` and, by Cauchy–Schwarz, ``|s − ŝ| ≤ scale·‖q‖₂·r``.

A *rotated* sketch quantises ``R·k`` instead, ``R`` the normalised Sylvester–Hadamard matrix (orthogonal, so
``q·k = (R·q)·(R·k)``), and scores it with ``R·q``: the rotation spreads a few outlier channels over all
of them, so one step per token is about as tight as steps per group of 32 on real keys (docs/KERNELS.md).
``R·x`` computed in fp32 (any summation order, ``R`` rounded to fp32) is within ``rotation_eps(D)·‖x‖₂``
of exact; that term joins the residual (keys) and the bound (queries).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .pages import FP32_UNIT_ROUNDOFF

QMAX = {8: 127, 4: 7}


def row_norm(x: Tensor) -> Tensor:
    """``‖x‖₂`` over the last dim as ``max|x|·‖x/max|x|‖₂``: the squares of keys of 1e-20 underflow to 0
    in fp32, which made a sketch's residual 0 and its bound miss the score."""
    m = x.abs().amax(-1, keepdim=True)
    return (m * torch.linalg.vector_norm(x / torch.where(m > 0, m, 1.0), dim=-1, keepdim=True)).squeeze(-1)


def rotation(d: int) -> Tensor:
    """The normalised Sylvester–Hadamard matrix ``[d, d]`` (fp32; ``d`` a power of two): orthogonal."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"rotation: head dim {d} must be a power of two")
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h * d**-0.5


def rotation_eps(d: int) -> float:
    """Bound on ``‖fl(R̃·x) − R·x‖₂ / ‖x‖₂`` for fp32 dot products with ``R̃ = fl(R)``: ``2⁻²⁴`` for the rounded
    entries (``|fl(d^-½) − d^-½|·‖S·x‖₂``, ``S`` the ±1 matrix) plus ``√d·γ_d`` for the sums (each within
    ``γ_d·d^-½·‖x‖₁ ≤ γ_d·‖x‖₂``), with 10% to spare for the norms' own rounding."""
    u = FP32_UNIT_ROUNDOFF
    return 1.1 * (u + d**0.5 * d * u / (1 - d * u))


@dataclass
class KeySketch:
    """Sketch of keys ``k[B, Hkv, S, D]``.

    ``codes``: int8 ``[B, Hkv, S, D]`` (int4 values in [−7, 7] are stored one per int8, unpacked);
    ``scales``: fp32 step per channel group ``[B, Hkv, S, D / group]``; ``residual``: fp32 ``‖k − k̂‖₂``
    ``[B, Hkv, S]``; ``k_hat``: fp32 dequantised keys ``[B, Hkv, S, D]``.
    """

    codes: Tensor
    scales: Tensor
    residual: Tensor
    k_hat: Tensor
    bits: int
    group: int
    rotated: bool = False


def build_sketch(k: Tensor, bits: int, group: int, rotate: bool = False) -> KeySketch:
    """Quantise ``k[B, Hkv, S, D]`` (``R·k`` if ``rotate``) to ``bits`` (8 or 4) with one scale per ``group``
    channels of a token."""
    if bits not in QMAX:
        raise ValueError(f"sketch bits={bits!r}: must be 8 or 4")
    d = k.shape[-1]
    if group < 1 or d % group:
        raise ValueError(f"sketch group={group!r} must divide the head dim {d}")
    qmax = QMAX[bits]
    kf = k.float()
    slack = 0.0
    if rotate:
        slack = rotation_eps(d) * row_norm(kf)
        kf = kf @ rotation(d).to(kf.device).T
    kg = kf.unflatten(-1, (d // group, group))
    step = kg.abs().amax(-1) / qmax
    safe = torch.where(step > 0, step, torch.ones_like(step))[..., None]
    codes = torch.round(kg / safe).clamp(-qmax, qmax)
    k_hat = (codes * step[..., None]).flatten(-2)
    return KeySketch(
        codes=codes.flatten(-2).to(torch.int8),
        scales=step,
        residual=row_norm(kf - k_hat) + slack,
        k_hat=k_hat,
        bits=bits,
        group=group,
        rotated=rotate,
    )


def sketch_score_bounds(q: Tensor, sketch: KeySketch, scale: float) -> tuple[Tensor, Tensor]:
    """Sketch scores ``ŝ = scale·q·k̂`` and error bounds ``ε``, each ``[B, Hq, Lq, S]`` fp32 (GQA: ``h // G``).

    ``|s − ŝ| ≤ ε`` holds for the exact score ``s = scale·q·k`` and also for the scores as computed in fp32:
    ``ε = |scale|·‖q‖₂·(r + γ·(2‖k̂‖₂ + r))`` with ``γ = 2·(D+2)·2⁻²⁴``. The ``γ`` term absorbs the rounding
    of the two fp32 dot products (each within ``γ_D·‖q‖₂·‖x‖₂`` of exact, and ``‖k‖₂ ≤ ‖k̂‖₂ + r``), of
    the scale product and of the norms themselves; without it a key that the sketch stores exactly
    (``r = 0``) would get ``ε = 0`` while ``fl(q·k)`` and ``fl(q·k̂)`` may still differ in the last bits.

    Rotated: ``ŝ = scale·q̃·k̂`` with ``q̃ = fl(R·q)``; ``q·k − q̃·k̂ = (R·q − q̃)·R·k + q̃·(R·k − k̂)``, so with
    ``e = rotation_eps(D)/(1 − rotation_eps(D))`` (``‖q‖₂ ≤ ‖q̃‖₂/(1 − rotation_eps)``) the ``‖q̃‖₂``-factor
    grows by ``e·(‖k̂‖₂ + r) ≥ e·‖k‖₂`` and by ``e`` on the rounding term.
    """
    b, hq, lq, d = q.shape
    hkv, s = sketch.k_hat.shape[1], sketch.k_hat.shape[2]
    qf = q.float().reshape(b, hkv, -1, d)
    if sketch.rotated:
        qf = qf @ rotation(d).to(qf.device).T
    s_hat = (scale * (qf @ sketch.k_hat.transpose(-1, -2))).reshape(b, hq, lq, s)
    gamma = 2.0 * (d + 2) * FP32_UNIT_ROUNDOFF
    r = sketch.residual
    k_norm = row_norm(sketch.k_hat)
    err = r + gamma * (2.0 * k_norm + r)  # [B, Hkv, S]
    if sketch.rotated:
        e = rotation_eps(d) / (1 - rotation_eps(d))
        err = (1 + e) * err + e * (k_norm + r)
    qn = row_norm(qf)[..., None]  # [B, Hkv, G·Lq, 1]
    eps = (abs(scale) * qn * err[:, :, None, :]).reshape(b, hq, lq, s)
    return s_hat, eps
