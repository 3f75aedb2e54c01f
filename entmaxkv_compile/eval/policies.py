"""The selection policies the fidelity harness compares, as one table of named decode functions.

Most entries run the reference oracle (:func:`entmaxkv_compile.reference.decode.decode_attention`) with a
config. Three variants the reference does not offer are built here from its parts, with the same byte
model and the same certificate arithmetic:

* ``topk-mean``: pages ranked by ``q·mean(k_page)`` (one D-vector of metadata per page, no bound, so it
  certifies nothing: ``delta_bound`` is NaN);
* certified **one round** (``τ_low`` of the sketch lower bounds only, no exact probe);
* certified with the **per-group L1 bound** ``|s − ŝ| ≤ scale·Σ_g ‖q_g‖₁·step_g/2`` (every element of a
  symmetric round-to-nearest code is within half a step), alone or as the minimum with the reference's
  residual-norm (L2) bound; both are valid, so their minimum is too.

Every decode function takes ``q[B, Hq, 1, D]`` and keys/values ``[B, Hkv, S, D]`` that are all valid (the
harness slices the cache to its length) and returns ``(out, DecodeStats)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import EntmaxKVConfig
from ..models.llama_entmax import ALPHA
from ..reference.decode import DecodeStats, attention_scores, decode_attention
from ..reference.entmax import entmax, entmax_threshold
from ..reference.pages import FP32_UNIT_ROUNDOFF
from ..reference.sketch import QMAX, build_sketch, sketch_score_bounds

NEG_INF = -math.inf
RunFn = Callable[[Tensor, Tensor, Tensor, float, Tensor | None], tuple[Tensor, DecodeStats]]


@dataclass(frozen=True)
class Policy:
    """A named policy: ``run(q, k, v, scale, dense_out)``; ``headline`` ones also decode text and passkeys."""

    name: str
    family: str
    run: RunFn
    settings: dict
    headline: bool = False


def _reference(config: EntmaxKVConfig) -> RunFn:
    def run(q: Tensor, k: Tensor, v: Tensor, scale: float, dense_out: Tensor | None):
        return decode_attention(q, k, v, scale=scale, alpha=ALPHA, config=config, dense_out=dense_out)

    return run


def _heads(x: Tensor, hq: int) -> Tensor:
    """``[B, Hkv, S]`` → ``[B, Hq, 1, S]``."""
    return x.repeat_interleave(hq // x.shape[1], dim=1)[:, :, None]


def _any_group(x: Tensor, hkv: int) -> Tensor:
    """``[B, Hq, 1, S]`` bool → ``[B, Hkv, S]``: true where any head of the group is."""
    b, _, _, n = x.shape
    return x.reshape(b, hkv, -1, n).any(2)


def attend_selection(
    name: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    s: Tensor,
    keep: Tensor,
    meta_bytes: Tensor,
    dense_out: Tensor | None,
    ub: Tensor | None = None,
    tau_floor: Tensor | None = None,
    page_size: int = 16,
) -> tuple[Tensor, DecodeStats]:
    """Attend the tokens ``keep[B, Hkv, S]`` and describe it as the reference does (same byte model).

    ``ub``: per-token score upper bounds ``[B, Hq, 1, S]`` (None: no certificate, δ bound NaN);
    ``tau_floor``: a known lower bound on ``τ_full`` ``[B, Hq, 1]`` besides the attended set's own.
    """
    b, hq, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    keep_h = _heads(keep, hq)
    s_sel = s.masked_fill(~keep_h, NEG_INF)
    p = entmax(s_sel, ALPHA)
    out = (p.reshape(b, hkv, -1, n) @ v.float()).reshape(b, hq, 1, -1) / p.sum(-1, keepdim=True).clamp_min(
        1e-30
    )
    if ub is None:
        delta = torch.full(s.shape[:-1], math.nan, device=s.device)
    else:
        tau = entmax_threshold((ALPHA - 1) * s_sel, ALPHA)[..., 0]
        tau = tau if tau_floor is None else torch.maximum(tau, tau_floor)
        excess = ((ALPHA - 1) * ub - tau[..., None]).clamp_min(0).masked_fill(keep_h, 0.0)
        delta = excess.pow(1 / (ALPHA - 1)).sum(-1).clamp_max(1.0)
    support = _any_group(p > 0, hkv).sum(-1)
    tokens_read = keep.sum(-1)
    kv_row = d * k.element_size() + v.shape[-1] * v.element_size()
    read = meta_bytes + tokens_read * d * k.element_size() + support * v.shape[-1] * v.element_size()
    n_pages = -(-n // page_size)
    pages = torch.nn.functional.pad(keep, (0, n_pages * page_size - n)).unflatten(-1, (n_pages, page_size))
    stats = DecodeStats(
        policy=name,
        selected=keep,
        tokens_read=tokens_read,
        candidates=tokens_read,
        pages_selected=pages.any(-1).sum(-1),
        support_size=(p > 0).sum(-1),
        certified=(delta == 0).reshape(b, hkv, -1).all(-1),
        fallback=torch.zeros_like(keep[..., 0]),
        delta_bound=delta,
        kv_bytes_fraction=read / (n * kv_row),
    )
    if dense_out is not None:
        p_dense = entmax(s, ALPHA)
        in_dense = p_dense > 0
        stats.dropped_mass = (p_dense * ~keep_h).sum(-1) / p_dense.sum(-1)
        stats.support_recall = (in_dense & keep_h).sum(-1) / in_dense.sum(-1).clamp_min(1)
        ref = dense_out.float()
        stats.output_error = torch.linalg.vector_norm(out - ref, dim=-1) / torch.linalg.vector_norm(
            ref, dim=-1
        )
    return out.to(q.dtype), stats


def _page_mean(page_size: int, budget: int, sink: int, recent: int) -> RunFn:
    def run(q: Tensor, k: Tensor, v: Tensor, scale: float, dense_out: Tensor | None):
        b, hq, _, d = q.shape
        hkv, n = k.shape[1], k.shape[2]
        n_pages = -(-n // page_size)
        kp = torch.nn.functional.pad(k.float(), (0, 0, 0, n_pages * page_size - n)).unflatten(
            2, (n_pages, -1)
        )
        counts = torch.full((n_pages,), float(page_size), device=k.device)
        counts[-1] = n - (n_pages - 1) * page_size
        means = kp.sum(3) / counts[:, None]  # [B, Hkv, P, D]
        rank = attention_scores(q, means, scale=scale).reshape(b, hkv, -1, n_pages).amax(2)
        idx = torch.arange(n_pages, device=k.device)
        forced = (idx < sink) | (idx >= n_pages - recent)
        top = (
            rank.masked_fill(forced, math.inf).topk(min(n_pages, budget + int(forced.sum())), dim=-1).indices
        )
        pages = torch.zeros_like(rank, dtype=torch.bool).scatter(-1, top, True)
        keep = pages.repeat_interleave(page_size, dim=-1)[..., :n]
        meta = torch.full((b, hkv), n_pages * d * k.element_size(), device=k.device)
        s = attention_scores(q, k, scale=scale)
        return attend_selection("topk-mean", q, k, v, s, keep, meta, dense_out, page_size=page_size)

    return run


def l1_sketch_bound(q: Tensor, scales: Tensor, qmax: int, scale: float) -> Tensor:
    """``scale·Σ_g ‖q_g‖₁·step_g/2`` ``[B, Hq, 1, S]`` for sketch steps ``scales[B, Hkv, S, D/g]``.

    Rounding slack: ``k/step`` is within ``qmax·u`` of its fp32 value and ``code·step`` within ``u`` of
    exact, so each element error is at most ``step·(1/2 + 2·qmax·u)``; a factor ``1 + 8·qmax·u`` on the
    half step covers it and the fp32 sum of positive terms here. The dot-product rounding of ``s`` and
    ``ŝ`` is covered by the γ term the reference adds (kept by the caller).
    """
    b, hq, lq, d = q.shape
    hkv, n, groups = scales.shape[1], scales.shape[2], scales.shape[3]
    q1 = q.float().abs().reshape(b, hkv, -1, groups, d // groups).sum(-1)  # [B, Hkv, G, D/g]
    bound = q1 @ (scales / 2).transpose(-1, -2)
    return (scale * (1 + 8 * qmax * FP32_UNIT_ROUNDOFF) * bound).reshape(b, hq, lq, n)


def _certified(bits: int, group: int, bound: str, rounds: int, min_candidates: int) -> RunFn:
    """Certified selection with a choice of bound (``l2`` | ``l1`` | ``min``) and of rounds (1 | 2); round
    two probes the ``⌈min_candidates / G⌉`` highest sketch scores of each head, as the reference does."""

    def run(q: Tensor, k: Tensor, v: Tensor, scale: float, dense_out: Tensor | None):
        b, hq, _, d = q.shape
        hkv = k.shape[1]
        sketch = build_sketch(k, bits, group)
        s_hat, eps = sketch_score_bounds(q, sketch, scale)
        if bound != "l2":  # the reference's dot-product rounding term, kept on top of the L1 bound
            qn = torch.linalg.vector_norm(q.float(), dim=-1, keepdim=True)
            k_norm = torch.linalg.vector_norm(sketch.k_hat, dim=-1)
            gamma = 2.0 * (d + 2) * FP32_UNIT_ROUNDOFF
            rounding = scale * qn * _heads(gamma * (2 * k_norm + sketch.residual), hq)
            eps_l1 = l1_sketch_bound(q, sketch.scales, QMAX[bits], scale) + rounding
            eps = eps_l1 if bound == "l1" else torch.minimum(eps, eps_l1)
        s = attention_scores(q, k, scale=scale)
        tau_lb = entmax_threshold((ALPHA - 1) * (s_hat - eps), ALPHA)[..., 0]
        keep = torch.zeros_like(s[:, :hkv, 0], dtype=torch.bool)
        if rounds == 2:  # exact scores of each head's top sketch tokens: τ of a subset ≤ τ_full
            probe = -(-min_candidates // (hq // hkv))
            top = s_hat.topk(min(probe, s.shape[-1]), dim=-1).indices
            keep = _any_group(torch.zeros_like(s, dtype=torch.bool).scatter(-1, top, True), hkv)
            tau_probe = entmax_threshold((ALPHA - 1) * s.masked_fill(~_heads(keep, hq), NEG_INF), ALPHA)
            tau_lb = torch.maximum(tau_lb, tau_probe[..., 0])
        hi = s_hat + eps
        keep = keep | _any_group((ALPHA - 1) * hi > tau_lb[..., None], hkv)
        per_token = d * bits // 8 + 4 * (d // group) + (0 if bound == "l1" else 4)
        meta = torch.full((b, hkv), k.shape[2] * per_token, device=k.device)
        return attend_selection("certified", q, k, v, s, keep, meta, dense_out, ub=hi, tau_floor=tau_lb)

    return run


def policy_table(context: int, head_dim: int) -> list[Policy]:
    """Every policy compared at ``context`` tokens (budgets are fractions of its pages; sketch groups that
    divide ``head_dim``)."""
    out = [Policy("dense", "dense", _reference(EntmaxKVConfig(policy="dense")), {}, headline=True)]

    def pages(frac: float, ps: int) -> int:
        return max(1, round(frac * context / ps))

    for ps, fracs in ((16, (1 / 128, 1 / 64, 1 / 32, 1 / 16, 1 / 8)), (64, (1 / 64, 1 / 32, 1 / 16))):
        for f in fracs:
            cfg = EntmaxKVConfig(policy="topk", page_size=ps, budget_pages=pages(f, ps))
            headline = f == 1 / 16
            name = f"topk p{ps} 1/{round(1 / f)}"
            out.append(Policy(name, "topk", _reference(cfg), {"page_size": ps, "pages": f}, headline))
    for f in (1 / 64, 1 / 16):
        cfg = EntmaxKVConfig(
            policy="topk", page_size=16, budget_pages=pages(f, 16), sink_pages=0, recent_pages=0
        )
        name = f"quest p16 1/{round(1 / f)}"
        out.append(Policy(name, "quest", _reference(cfg), {"page_size": 16, "pages": f}, f == 1 / 16))
    for f in (1 / 64, 1 / 32, 1 / 16):
        run = _page_mean(16, pages(f, 16), sink=1, recent=2)
        out.append(Policy(f"topk-mean p16 1/{round(1 / f)}", "topk-mean", run, {"pages": f}, f == 1 / 16))
    for f in (1 / 16, 1 / 8):
        cfg = EntmaxKVConfig(policy="adaptive", page_size=16, budget_pages=pages(f, 16))
        name = f"adaptive p16 cap 1/{round(1 / f)}"
        out.append(Policy(name, "adaptive", _reference(cfg), {"cap": f}, f == 1 / 16))
    for sketch, group, rot in (
        ("int8", 32, False), ("int8", 64, False), ("int4", 32, False), ("int4", 16, False),
        ("int4", 8, False), ("int4", 32, True), ("int4", 64, True), ("int4", 128, True), ("int8", 128, True),
    ):  # fmt: skip
        if head_dim % group:
            continue
        cfg = EntmaxKVConfig(
            policy="certified", sketch=sketch, sketch_group=group, sketch_rotation=rot, candidate_fraction=1.0
        )
        name = f"certified {sketch} g{group} l2 2r" + (" rot" if rot else "")
        settings = {"sketch": sketch, "group": group, "bound": "l2", "rounds": 2, "rotated": rot}
        out.append(Policy(name, "certified", _reference(cfg), settings, group == 32 and not rot))
    default = EntmaxKVConfig(policy="certified")
    out.append(Policy("certified default config", "certified", _reference(default), {"default": True}))
    int4 = EntmaxKVConfig(policy="certified", sketch="int4")
    out.append(Policy("certified int4 default config", "certified", _reference(int4), {"default": True}))
    for bits, group, bound, rounds in (
        (8, 32, "l2", 1),
        (4, 32, "l2", 1),
        (4, 16, "l1", 2),
        (4, 16, "min", 2),
        (4, 8, "min", 2),
        (4, 8, "min", 1),
    ):
        run = _certified(bits, group, bound, rounds, default.min_candidates)
        name = f"certified int{bits} g{group} {bound} {rounds}r"
        settings = {"sketch": f"int{bits}", "group": group, "bound": bound, "rounds": rounds}
        out.append(Policy(name, "certified", run, settings))
    return out
