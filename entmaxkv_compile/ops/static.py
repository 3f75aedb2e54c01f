"""Static-budget decode ops: the attention sites of an exported (ONNX / TensorRT) graph.

Schemas (every shape is fixed by the input shapes and the integer arguments)::

    static_topk_attn(q[B,Hq,Lq,D], k[B,Hkv,S,D], v[B,Hkv,S,Dv], bias?, scale, alpha,
                     budget_pages, page_size, sink_pages, recent_pages)
        -> (out[B,Hq,Lq,Dv], pages[B,Hkv,sink+budget+recent] int64)
    static_certified_attn(q, k, v, bias?, scale, alpha, capacity, sketch_bits, sketch_group, sketch_rotate)
        -> (out[B,Hq,Lq,Dv], tokens[B,Hkv,capacity] int64, certified[B,Hq,Lq] bool)

Their semantics, and their eager kernels, are :mod:`entmaxkv_compile.reference.static`. Export does not
translate the ops node by node: it replaces them by the ``*_decomposition`` functions below
(:data:`STATIC_DECOMPOSITIONS`, for ``ExportedProgram.run_decompositions`` or Torch-TensorRT's
lowering), written only with ops whose ONNX forms TensorRT parses: ``topk`` with a constant ``k`` and
``sorted=True``, ``gather``, ``cumsum``, reductions over constant dims, ``where``. No sort, loop or
data-dependent shape. Entmax is exact for α ∈ {1.5, 2}, in fp32: sort-based (a full-length ``topk``)
when the selected row is shorter than :data:`TOPK_LIMIT`, otherwise a fixed number of bisection steps
followed by closed-form support refinements (no ``topk`` at all).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..reference.entmax import _shifted_threshold, entmax_probs
from ..reference.pages import group_bound, page_metadata, page_rank_bound
from ..reference.static import (
    full_bias,
    group_token_bounds,
    static_certified_reference,
    static_topk_reference,
)

# TensorRT's ONNX parser: "`K` input must be less than 3840" (TopK); longer rows use the sort-free solver.
TOPK_LIMIT = 3840
EXACT_ALPHAS = (1.5, 2.0)
# Sort-free solver: bisection narrows τ to 2⁻²⁰ (in units of (α−1)·score); each refinement then either
# lands on τ exactly or drops a token that is certainly outside the support, so the result is exact
# whenever at most REFINE_STEPS − 1 scores lie within 2⁻²⁰ below τ (and off by at most 2⁻²⁰ per such token).
BISECT_STEPS = 20
REFINE_STEPS = 3


def check_static_topk(
    seq_len: int, page_size: int, budget_pages: int, sink_pages: int, recent_pages: int
) -> None:
    """Raise ``ValueError`` unless the cache splits into pages and holds more pages than the selection."""
    if seq_len % page_size:
        raise ValueError(
            f"cache length {seq_len} must be a multiple of page_size={page_size}; "
            "pad the cache or change page_size"
        )
    n_sel, n_pages = sink_pages + budget_pages + recent_pages, seq_len // page_size
    if n_sel >= n_pages:
        raise ValueError(
            f"static budget of {n_sel} pages "
            f"(sink {sink_pages} + budget {budget_pages} + recent {recent_pages}) "
            f"must be smaller than the cache's {n_pages} pages (length {seq_len}, page_size {page_size}); "
            "lower budget_pages or export the dense model"
        )


def check_static_certified(seq_len: int, capacity: int) -> None:
    """Raise ``ValueError`` unless the candidate capacity is smaller than the cache."""
    if not 1 <= capacity < seq_len:
        raise ValueError(
            f"certified capacity {capacity} must be in [1, cache length {seq_len}); "
            "lower min_candidates / candidate_fraction or export the dense model"
        )


def check_alpha(alpha: float) -> None:
    if alpha not in EXACT_ALPHAS:
        raise NotImplementedError(
            f"static export solves entmax exactly for alpha in {EXACT_ALPHAS} only, got alpha={alpha}"
        )


@torch.library.custom_op("entmaxkv::static_topk_attn", mutates_args=())
def static_topk_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    scale: float,
    alpha: float,
    budget_pages: int,
    page_size: int,
    sink_pages: int,
    recent_pages: int,
) -> tuple[Tensor, Tensor]:
    check_alpha(alpha)
    check_static_topk(k.shape[2], page_size, budget_pages, sink_pages, recent_pages)
    return static_topk_reference(
        q, k, v, bias, scale, alpha, budget_pages, page_size, sink_pages, recent_pages
    )


@static_topk_attn.register_fake
def _(
    q, k, v, bias, scale, alpha, budget_pages, page_size, sink_pages, recent_pages
) -> tuple[Tensor, Tensor]:
    check_alpha(alpha)
    check_static_topk(k.shape[2], page_size, budget_pages, sink_pages, recent_pages)
    n_sel = sink_pages + budget_pages + recent_pages
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(
        k.shape[0], k.shape[1], n_sel, dtype=torch.int64
    )


@torch.library.custom_op("entmaxkv::static_certified_attn", mutates_args=())
def static_certified_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    scale: float,
    alpha: float,
    capacity: int,
    sketch_bits: int,
    sketch_group: int,
    sketch_rotate: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    check_alpha(alpha)
    check_static_certified(k.shape[2], capacity)
    return static_certified_reference(
        q, k, v, bias, scale, alpha, capacity, sketch_bits, sketch_group, sketch_rotate
    )


@static_certified_attn.register_fake
def _(
    q, k, v, bias, scale, alpha, capacity, sketch_bits, sketch_group, sketch_rotate
) -> tuple[Tensor, Tensor, Tensor]:
    check_alpha(alpha)
    check_static_certified(k.shape[2], capacity)
    return (
        q.new_empty(*q.shape[:-1], v.shape[-1]),
        q.new_empty(k.shape[0], k.shape[1], capacity, dtype=torch.int64),
        q.new_empty(q.shape[:-1], dtype=torch.bool),
    )


def _refine(z0: Tensor, tau: Tensor, alpha: float) -> Tensor:
    """One closed-form step from ``τ ≤ τ*``: solve on the support ``{z > τ}``, never past its smallest score.

    On ``[τ, m]`` (``m`` = smallest support score) the mass equation has the support's closed form; its root
    ``r`` is ``τ*`` when ``r ≤ m``, otherwise ``τ* > m`` and ``m`` is the next lower bound.
    """
    sup = z0 > tau
    n = sup.sum(-1, keepdim=True).clamp_min(1).to(z0.dtype)
    zs = torch.where(sup, z0, torch.zeros_like(z0))
    mean = zs.sum(-1, keepdim=True) / n
    if alpha == 2.0:
        root = mean - 1.0 / n
    else:  # Σ (z − τ)² = 1 on the support: the smaller root of the quadratic
        root = mean - torch.sqrt((mean * mean - ((zs * zs).sum(-1, keepdim=True) - 1.0) / n).clamp_min(0))
    smallest = torch.where(sup, z0, torch.full_like(z0, math.inf)).amin(-1, keepdim=True)
    return torch.minimum(root, smallest)


def _threshold_sort_free(z: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """``(τ of z − max z, max z)`` without sorting: bisection on ``[−1, 0]``, then closed-form refinements."""
    zmax = z.amax(-1, keepdim=True)
    zmax = torch.where(zmax > -math.inf, zmax, torch.zeros_like(zmax))
    z0 = z - zmax
    lo, hi = torch.full_like(zmax, -1.0), torch.zeros_like(zmax)
    for _ in range(BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        above = entmax_probs(z0, mid, alpha).sum(-1, keepdim=True) >= 1.0
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    for _ in range(REFINE_STEPS):
        lo = _refine(z0, lo, alpha)
    return lo, zmax


def _attend(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, tokens: Tensor, scale: float, alpha: float
) -> tuple[Tensor, Tensor]:
    """Entmax attention over ``tokens[B, Hkv, T]`` (``< 0``: empty slot): ``(out, τ[B, Hkv, G·Lq])``."""
    b, hq, lq, d = q.shape
    hkv, s, t = k.shape[1], k.shape[2], tokens.shape[-1]
    rows = hq // hkv * lq
    tok = tokens.clamp_min(0)
    ks = k.float().gather(2, tok[..., None].expand(b, hkv, t, d))
    vs = v.float().gather(2, tok[..., None].expand(b, hkv, t, v.shape[-1]))
    scores = scale * (q.float().reshape(b, hkv, rows, d) @ ks.transpose(-1, -2))
    if bias is not None:
        fb = full_bias(bias, q, s).reshape(b, hkv, rows, s)
        scores = scores + fb.gather(-1, tok[:, :, None, :].expand(b, hkv, rows, t))
    z = (alpha - 1.0) * scores.masked_fill((tokens < 0)[:, :, None, :], -math.inf)
    tau, zmax = _shifted_threshold(z, alpha) if t < TOPK_LIMIT else _threshold_sort_free(z, alpha)
    p = entmax_probs(z - zmax, tau, alpha)
    p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    out = (p @ vs).reshape(b, hq, lq, v.shape[-1]).to(q.dtype)
    # a row that sees none of the gathered tokens has no threshold (−inf), as in the reference
    return out, torch.where(z.amax(-1) > -math.inf, (tau + zmax)[..., 0], -math.inf)


def static_topk_decomposition(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    scale: float,
    alpha: float,
    budget_pages: int,
    page_size: int,
    sink_pages: int,
    recent_pages: int,
) -> tuple[Tensor, Tensor]:
    """:func:`static_topk_attn` in exportable ops; a last ``topk`` packs the selected pages into slots."""
    fb = full_bias(bias, q, k.shape[2])
    visible = (fb > -math.inf).flatten(1, 2).any(1)  # [B, S]
    kmin, kmax = page_metadata(k, page_size, visible)
    bound = group_bound(page_rank_bound(q, kmin, kmax, scale, fb, page_size), k.shape[1])  # [B, Hkv, P]
    live = bound > -math.inf
    count = live.float()  # TensorRT's CumSum takes floats only
    from_end = count.sum(-1, keepdim=True) - count.cumsum(-1) + count  # live pages at or after each page
    idx = torch.arange(bound.shape[-1], device=q.device)
    forced = live & ((idx < sink_pages) | (from_end <= recent_pages))
    # scatter into floats: TensorRT's ScatterElements takes no bool
    best = (torch.zeros_like(bound).scatter(-1, bound.topk(budget_pages, dim=-1).indices, 1.0) > 0) & live
    rank = torch.where(forced, math.inf, torch.where(best, bound, -math.inf))
    top, pages = rank.topk(sink_pages + budget_pages + recent_pages, dim=-1)
    pages = torch.where(top > -math.inf, pages, -1)
    tokens = (pages[..., None] * page_size + torch.arange(page_size, device=q.device)).flatten(-2)
    return _attend(q, k, v, bias, tokens, scale, alpha)[0], pages


def static_certified_decomposition(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    scale: float,
    alpha: float,
    capacity: int,
    sketch_bits: int,
    sketch_group: int,
    sketch_rotate: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`static_certified_attn` in exportable ops: ``topk(C + 1)`` gives the selection and next bound."""
    bound = group_token_bounds(q, k, bias, scale, sketch_bits, sketch_group, sketch_rotate)  # [B, Hkv, S]
    top, idx = bound.topk(capacity + 1, dim=-1)
    tokens = torch.where(top[..., :capacity] > -math.inf, idx[..., :capacity], -1)
    out, tau = _attend(q, k, v, bias, tokens, scale, alpha)
    b, hq, lq, _ = q.shape
    certified = (alpha - 1.0) * top[..., capacity:] <= tau  # [B, Hkv, G·Lq]
    return out, tokens, certified.reshape(b, hq, lq)


STATIC_DECOMPOSITIONS = {
    torch.ops.entmaxkv.static_topk_attn.default: static_topk_decomposition,
    torch.ops.entmaxkv.static_certified_attn.default: static_certified_decomposition,
}
