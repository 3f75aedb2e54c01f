"""One decode step of α-entmax attention under every selection policy of DESIGN.md §3 (the oracle).

Shapes: ``q[B, Hq, Lq, D]``, ``k[B, Hkv, S, D]``, ``v[B, Hkv, S, Dv]``, ``bias`` broadcastable to
``[B, Hq, Lq, S]`` (additive, −inf = masked: padding, causal, unwritten slots; finite values e.g. ALiBi).
Query head ``h`` reads KV head ``h // G`` (``repeat_kv``). Each query row (``Lq > 1``: speculative decode)
is solved independently; a KV group's selection is the union over its heads and rows. Scores are fp32
(``scale·fl(q·k) + bias``), outputs are normalised by ``Σp`` and come back in ``q.dtype``.

Certificate (every policy): with ``τ_lb ≤ τ_full`` a threshold lower bound (``τ_S`` of the attended set, by
monotonicity; the certified policy also knows its round-two threshold) and ``ub_j`` an upper bound on the
score of each token ``j`` left out (its page bound, or its sketch bound), the dropped mass is at most
``δ = Σ_{j ∉ S} [(α−1)·ub_j − τ_lb]_+^β`` (summing a page bound over the page's tokens is the
``n_p·[…]`` of DESIGN.md §2). ``δ = 0`` for every row of a KV group ⇔ the group is ``certified``.

Byte model of ``kv_bytes_fraction`` (per batch row and KV group, relative to reading K and V of every
valid token once, as dense SDPA does): exact K rows of the attended tokens, V rows of the tokens in the
group's support only (DESIGN.md §6), plus metadata — ``topk``/``adaptive``: kmin+kmax of every non-empty
page in the key dtype; ``certified``: per valid token ``D·bits/8`` code bytes, one fp32 scale per channel
group and an fp32 residual norm. Rows decoded densely because of ``min_context`` read no metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import EntmaxKVConfig, validate_alpha
from .entmax import entmax, entmax_threshold
from .pages import group_bound, page_bias_max, page_counts, page_metadata, page_rank_bound
from .sketch import build_sketch, sketch_score_bounds

NEG_INF = -math.inf


@dataclass
class DecodeStats:
    """What a decode step did. ``[B, Hkv]`` fields are per KV group, ``[B, Hq, Lq]`` per query row.

    ``selected``: tokens attended ``[B, Hkv, S]``; ``tokens_read``: their count (exact K rows read);
    ``candidates``: tokens the policy proposed before any fallback; ``pages_selected``: pages holding an
    attended token; ``fallback``: group decoded densely (``min_context``, or certified over capacity);
    ``delta_bound``: bound on the dropped dense mass (0 ⇒ exact); ``certified``: ``delta_bound == 0`` for
    all rows of the group. With ``dense_out`` given: ``dropped_mass`` (dense probability outside the
    selection), ``support_recall`` (share of the dense support attended, 1 for an empty support) and
    ``output_error`` (relative L2 error of the returned output against ``dense_out``), each ``[B, Hq, Lq]``.
    """

    policy: str
    selected: Tensor
    tokens_read: Tensor
    candidates: Tensor
    pages_selected: Tensor
    support_size: Tensor
    certified: Tensor
    fallback: Tensor
    delta_bound: Tensor
    kv_bytes_fraction: Tensor
    dropped_mass: Tensor | None = None
    support_recall: Tensor | None = None
    output_error: Tensor | None = None


def attention_scores(q: Tensor, k: Tensor, *, scale: float, bias: Tensor | None = None) -> Tensor:
    """Raw scores ``scale·q·kᵀ (+ bias)`` in fp32, ``[B, Hq, Lq, S]``."""
    b, hq, lq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    x = (scale * (q.float().reshape(b, hkv, -1, d) @ k.float().transpose(-1, -2))).reshape(b, hq, lq, s)
    return x if bias is None else x + bias.float()


def _attend(s: Tensor, v: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Entmax of scores ``s`` (−inf = not attended) applied to ``v``: (fp32 output, probabilities)."""
    b, hq, lq, n = s.shape
    p = entmax(s, alpha)
    out = (p.reshape(b, v.shape[1], -1, n) @ v.float()).reshape(b, hq, lq, -1)
    return out / p.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny), p


def _threshold(z: Tensor, alpha: float) -> Tensor:
    """τ of each row of ``z`` (``[..., S]`` → ``[...]``); −inf (no bound) for rows without a finite z."""
    tau = entmax_threshold(z, alpha)[..., 0]
    return tau.masked_fill(~torch.isfinite(z).any(-1), NEG_INF)


def _to_heads(x: Tensor, hq: int) -> Tensor:
    """``[B, Hkv, S]`` → ``[B, Hq, 1, S]`` (each query head sees its KV group's entry)."""
    return x.repeat_interleave(hq // x.shape[1], dim=1)[:, :, None]


def _to_groups(x: Tensor, hkv: int) -> Tensor:
    """``[B, Hq, Lq, S]`` bool → ``[B, Hkv, S]``: true where any head or row of the group is true."""
    b, _, _, n = x.shape
    return x.reshape(b, hkv, -1, n).any(2)


def dense_decode(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, alpha: float, bias: Tensor | None = None
) -> Tensor:
    """Exact entmax attention ``[B, Hq, Lq, Dv]`` in ``q.dtype``; fully masked rows give 0."""
    s = attention_scores(q, k, scale=scale, bias=bias)
    return _attend(s, v, validate_alpha(alpha))[0].to(q.dtype)


def adaptive_tau_estimate(
    q: Tensor,
    kmin: Tensor,
    kmax: Tensor,
    s: Tensor,
    scale: float,
    alpha: float,
    bias: Tensor | None,
    page_size: int,
) -> Tensor:
    """``adaptive``'s τ estimate ``[B, Hq, Lq]`` (−inf for a row without a valid token): τ of every valid
    token (``s > −inf``) scored as its page-box centre plus its page's largest bias — a function of pages,
    with ``n_p`` equal entries each, so the kernels solve it on ``P`` entries, not ``S``. Spreading scores
    raises τ (``Σ[z − τ]_+^β`` is convex in ``z``), so this tends to under-estimate ``τ_full`` and keep more
    pages."""
    n = s.shape[-1]
    centre = ((kmin.float() + kmax.float()) / 2).masked_fill((kmin > kmax).any(-1, keepdim=True), 0.0)
    s_centre = attention_scores(q, centre.repeat_interleave(page_size, dim=2)[:, :, :n], scale=scale)
    if bias is not None:
        bmax = page_bias_max(bias.float().expand(s.shape), page_size)  # [B, Hq, Lq, P]
        s_centre = s_centre + bmax.repeat_interleave(page_size, dim=-1)[..., :n]
    return _threshold((alpha - 1) * s_centre.masked_fill(s == NEG_INF, NEG_INF), alpha)


def _page_selection(
    q: Tensor,
    k: Tensor,
    s: Tensor,
    valid: Tensor,
    scale: float,
    alpha: float,
    bias: Tensor | None,
    config: EntmaxKVConfig,
) -> tuple[Tensor, Tensor, Tensor]:
    """``topk``/``adaptive``: (selected pages ``[B, Hkv, P]``, per-token score bounds, metadata bytes)."""
    ps, hkv = config.page_size, k.shape[1]
    kmin, kmax = page_metadata(k, ps, valid)
    u = page_rank_bound(q, kmin, kmax, scale, bias, ps)  # [B, Hq, Lq, P]
    gb = group_bound(u, hkv)
    nonempty = gb > NEG_INF
    n_pages = gb.shape[-1]
    index = torch.arange(n_pages, device=gb.device)
    from_end = nonempty.flip(-1).cumsum(-1).flip(-1)  # non-empty pages at or after each page
    forced = nonempty & ((index < config.sink_pages) | (from_end <= config.recent_pages))
    if config.policy == "adaptive":
        tau_est = adaptive_tau_estimate(q, kmin, kmax, s, scale, alpha, bias, ps)
        passing = (alpha - 1) * u > (tau_est[..., None] - config.adaptive_slack)
        gb_rank = gb.masked_fill(~_to_groups(passing, hkv), NEG_INF)
    else:
        gb_rank = gb
    # the budget highest bounds, ties to the lowest page (as the kernels and ONNX TopK break them; torch.topk
    # leaves the order of equal values unspecified): a stable descending sort keeps equal bounds in page order
    ranked, order = torch.sort(gb_rank, dim=-1, descending=True, stable=True)
    budget = min(config.budget_pages, n_pages)
    chosen = torch.zeros_like(nonempty).scatter(-1, order[..., :budget], ranked[..., :budget] > NEG_INF)
    ub = u.repeat_interleave(ps, dim=-1)[..., : s.shape[-1]]
    meta_bytes = 2 * k.shape[-1] * k.element_size() * nonempty.sum(-1)
    return chosen | forced, ub, meta_bytes


def _certified_selection(
    q: Tensor,
    k: Tensor,
    s: Tensor,
    valid: Tensor,
    scale: float,
    alpha: float,
    bias: Tensor | None,
    config: EntmaxKVConfig,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``certified``: (tokens to read ``[B, Hkv, S]``, per-token score bounds, τ lower bound, sketch bytes).

    Round one: ``τ_low`` = τ of the lower bounds ``ŝ − ε`` (each ≤ its score, so ``τ_low ≤ τ_full``).
    Round two: exact scores of the union over the group of each row's ``⌈min_candidates / (G·Lq)⌉``
    highest sketch scores give ``τ_T ≤ τ_full`` (a subset's threshold). Every token with
    ``(α−1)(ŝ + ε) > max(τ_low, τ_T)`` for some row of the group is a candidate: a superset of the support.
    """
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    bits = 8 if config.sketch == "int8" else 4
    sketch = build_sketch(k, bits, config.group_size(d), config.rotate_sketch)
    s_hat, eps = sketch_score_bounds(q, sketch, scale)
    b_f = 0.0 if bias is None else bias.float()
    masked = s == NEG_INF
    lo = ((s_hat - eps) + b_f).masked_fill(masked, NEG_INF)
    hi = ((s_hat + eps) + b_f).masked_fill(masked, NEG_INF)
    est = (s_hat + b_f).masked_fill(masked, NEG_INF)
    tau_low = _threshold((alpha - 1) * lo, alpha)
    m = min(-(-config.min_candidates // (hq // hkv * lq)), s.shape[-1])
    top = est.topk(m, dim=-1)
    probe = _to_groups(torch.zeros_like(masked).scatter(-1, top.indices, top.values > NEG_INF), hkv)
    tau_probe = _threshold((alpha - 1) * s.masked_fill(~_to_heads(probe, hq), NEG_INF), alpha)
    tau_lb = torch.maximum(tau_low, tau_probe)
    read = probe | _to_groups((alpha - 1) * hi > tau_lb[..., None], hkv)
    sketch_bytes = valid.sum(-1, keepdim=True) * (d * bits // 8 + 4 * (d // config.group_size(d)) + 4)
    return read, hi, tau_lb, sketch_bytes.expand(b, hkv)


def softmax_topk_decode(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, bias: Tensor | None = None, config: EntmaxKVConfig
) -> Tensor:
    """Quest-style *softmax* decode (approximate, opt-in through ``config.softmax_topk``).

    Softmax over the tokens of the ``budget_pages`` pages with the highest page upper bound, plus the sink
    and recent pages (the ``topk`` selection); fully masked rows give 0, rows with a NaN or +inf score give
    NaN (as eager softmax does, whether or not the selection kept that token).
    """
    b, hq, _, _ = q.shape
    hkv, n_tok = k.shape[1], k.shape[2]
    s = attention_scores(q, k, scale=scale, bias=bias)
    valid = (s > NEG_INF).reshape(b, -1, n_tok).any(1)
    pages, _, _ = _page_selection(q, k, s, valid, scale, 2.0, bias, config.replace(policy="topk"))
    keep = pages.repeat_interleave(config.page_size, dim=-1)[..., :n_tok]
    kept = s.masked_fill(~_to_heads(keep, hq), NEG_INF)
    p = torch.softmax(kept, dim=-1).masked_fill((kept == NEG_INF).all(-1, keepdim=True), 0.0)
    p = p.masked_fill((s.isnan() | (s == float("inf"))).any(-1, keepdim=True), float("nan"))
    return (p.reshape(b, hkv, -1, n_tok) @ v.float()).reshape(b, hq, -1, v.shape[-1]).to(q.dtype)


def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    alpha: float,
    bias: Tensor | None = None,
    config: EntmaxKVConfig,
    dense_out: Tensor | None = None,
) -> tuple[Tensor, DecodeStats]:
    """One decode step under ``config.policy``; returns the output (``q.dtype``) and its :class:`DecodeStats`.

    ``dense``, ``certified`` and any certified group are exact (equal to :func:`dense_decode` up to
    rounding). ``dense_out`` (the dense output) turns on the fidelity fields of the stats.
    """
    alpha = validate_alpha(alpha)
    b, hq, lq, d = q.shape
    hkv, n_tok = k.shape[1], k.shape[2]
    config = config.resolve(n_tok)
    s = attention_scores(q, k, scale=scale, bias=bias)
    valid = (s > NEG_INF).reshape(b, -1, n_tok).any(1)  # [B, S]: attendable by some head of the row
    n_valid = valid.sum(-1)
    group_valid = valid[:, None].expand(b, hkv, n_tok)
    fallback = (n_valid < config.min_context)[:, None].expand(b, hkv)
    ub, tau_floor = s, None
    meta_bytes = torch.zeros(b, hkv, dtype=torch.long, device=q.device)
    if config.policy == "dense":
        fallback = torch.zeros_like(fallback)
        keep = group_valid
    elif config.policy == "certified":
        keep, ub, tau_floor, meta_bytes = _certified_selection(q, k, s, valid, scale, alpha, bias, config)
        keep = keep & group_valid
        capacity = max(config.min_candidates, math.ceil(config.candidate_fraction * n_tok))
        fallback = fallback | (keep.sum(-1) > capacity)
    else:
        pages, ub, meta_bytes = _page_selection(q, k, s, valid, scale, alpha, bias, config)
        keep = pages.repeat_interleave(config.page_size, dim=-1)[..., :n_tok] & group_valid
    candidates = keep.sum(-1)
    meta_bytes = meta_bytes.masked_fill(n_valid[:, None] < config.min_context, 0)
    keep = torch.where(fallback[..., None], group_valid, keep)
    keep_h = _to_heads(keep, hq)

    s_sel = s.masked_fill(~keep_h, NEG_INF)
    out, p = _attend(s_sel, v, alpha)
    tau_lb = _threshold((alpha - 1) * s_sel, alpha)
    if tau_floor is not None:
        tau_lb = torch.maximum(tau_lb, tau_floor)
    dropped = keep_h.logical_not() & (ub > NEG_INF) & (s > NEG_INF)
    excess = ((alpha - 1) * ub - tau_lb[..., None]).masked_fill(~dropped, 0.0).clamp_min(0)
    delta = excess.pow(1.0 / (alpha - 1)).sum(-1).clamp_max(1.0)
    certified = (delta == 0).reshape(b, hkv, -1).all(-1)

    support = _to_groups(p > 0, hkv).sum(-1)
    tokens_read = keep.sum(-1)
    dense_bytes = n_valid[:, None] * (d * k.element_size() + v.shape[-1] * v.element_size())
    read_bytes = meta_bytes + tokens_read * d * k.element_size() + support * v.shape[-1] * v.element_size()
    stats = DecodeStats(
        policy=config.policy,
        selected=keep,
        tokens_read=tokens_read,
        candidates=candidates,
        pages_selected=(page_counts(keep, config.page_size) > 0).sum(-1),
        support_size=(p > 0).sum(-1),
        certified=certified,
        fallback=fallback,
        delta_bound=delta,
        kv_bytes_fraction=read_bytes / dense_bytes.clamp_min(1),
    )
    # NaN or +inf scores make eager entmax NaN; the solve above would hide them as zero weights
    out = out.masked_fill((s.isnan() | (s == math.inf)).any(-1, keepdim=True), math.nan).to(q.dtype)
    if dense_out is not None:
        p_dense = entmax(s, alpha)
        in_dense = p_dense > 0
        stats.dropped_mass = (p_dense * ~keep_h).sum(-1) / p_dense.sum(-1).clamp_min(1e-30)
        recall = (in_dense & keep_h).sum(-1) / in_dense.sum(-1).clamp_min(1)
        stats.support_recall = recall.masked_fill(~in_dense.any(-1), 1.0)
        ref = dense_out.float()
        err = torch.linalg.vector_norm(out.float() - ref, dim=-1)
        stats.output_error = err / torch.linalg.vector_norm(ref, dim=-1).clamp_min(1e-30)
    return out, stats
