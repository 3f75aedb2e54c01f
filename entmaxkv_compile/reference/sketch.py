"""Per-token low-precision key sketches with worst-case score bounds (the ``certified`` policy).

Each key is quantised symmetrically per (token, channel group): ``k̂ = code·step`` with
``step = max|k_group| / qmax`` (``qmax`` = 127 for int8, 7 for int4) and ``code = round(k / step)``.
The sketch also stores the residual norm ``r = ‖k − k̂‖₂`` per token, so for any query
``s − ŝ = scale·q·(k − k̂)`` and, by Cauchy–Schwarz, ``|s − ŝ| ≤ scale·‖q‖₂·r``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .pages import FP32_UNIT_ROUNDOFF

QMAX = {8: 127, 4: 7}


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


def build_sketch(k: Tensor, bits: int, group: int) -> KeySketch:
    """Quantise ``k[B, Hkv, S, D]`` to ``bits`` (8 or 4) with one scale per ``group`` channels of a token."""
    if bits not in QMAX:
        raise ValueError(f"sketch bits={bits!r}: must be 8 or 4")
    d = k.shape[-1]
    if group < 1 or d % group:
        raise ValueError(f"sketch group={group!r} must divide the head dim {d}")
    qmax = QMAX[bits]
    kf = k.float()
    kg = kf.unflatten(-1, (d // group, group))
    step = kg.abs().amax(-1) / qmax
    safe = torch.where(step > 0, step, torch.ones_like(step))[..., None]
    codes = torch.round(kg / safe).clamp(-qmax, qmax)
    k_hat = (codes * step[..., None]).flatten(-2)
    return KeySketch(
        codes=codes.flatten(-2).to(torch.int8),
        scales=step,
        residual=torch.linalg.vector_norm(kf - k_hat, dim=-1),
        k_hat=k_hat,
        bits=bits,
        group=group,
    )


def sketch_score_bounds(q: Tensor, sketch: KeySketch, scale: float) -> tuple[Tensor, Tensor]:
    """Sketch scores ``ŝ = scale·q·k̂`` and error bounds ``ε``, each ``[B, Hq, Lq, S]`` fp32 (GQA: ``h // G``).

    ``|s − ŝ| ≤ ε`` holds for the exact score ``s = scale·q·k`` and also for the scores as computed in fp32:
    ``ε = |scale|·‖q‖₂·(r + γ·(2‖k̂‖₂ + r))`` with ``γ = 2·(D+2)·2⁻²⁴``. The ``γ`` term absorbs the rounding
    of the two fp32 dot products (each within ``γ_D·‖q‖₂·‖x‖₂`` of exact, and ``‖k‖₂ ≤ ‖k̂‖₂ + r``), of
    the scale product and of the norms themselves; without it a key that the sketch stores exactly
    (``r = 0``) would get ``ε = 0`` while ``fl(q·k)`` and ``fl(q·k̂)`` may still differ in the last bits.
    """
    b, hq, lq, d = q.shape
    hkv, s = sketch.k_hat.shape[1], sketch.k_hat.shape[2]
    qf = q.float().reshape(b, hkv, -1, d)
    s_hat = (scale * (qf @ sketch.k_hat.transpose(-1, -2))).reshape(b, hq, lq, s)
    gamma = 2.0 * (d + 2) * FP32_UNIT_ROUNDOFF
    r = sketch.residual
    err = r + gamma * (2.0 * torch.linalg.vector_norm(sketch.k_hat, dim=-1) + r)  # [B, Hkv, S]
    qmax = qf.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    qn = qmax * torch.linalg.vector_norm(qf / qmax, dim=-1, keepdim=True)  # [B, Hkv, G·Lq, 1], no underflow
    eps = (abs(scale) * qn * err[:, :, None, :]).reshape(b, hq, lq, s)
    return s_hat, eps
