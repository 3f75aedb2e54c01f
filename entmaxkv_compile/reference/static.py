"""Static-budget decode semantics in plain PyTorch: what the exported graphs must compute.

Two selection rules whose shapes are fixed by the cache length and a few integers (DESIGN.md §3):

* **topk pages** — the ``topk`` policy of :func:`~entmaxkv_compile.reference.decode.decode_attention`: per
  batch row and KV group, the ``budget`` live pages of highest page-box bound, plus the first ``sink`` and
  the last ``recent`` live pages. At most ``sink + budget + recent`` pages; the unused slots hold ``−1``.
  Approximate: what lies outside the selection is dropped.
* **certified tokens** — per batch row and KV group, the ``C`` tokens of highest key-sketch upper bound
  (``ŝ + ε + bias``, the maximum over the group's rows), exact entmax over their exact keys; per query row,
  ``certified`` is true when the ``(C+1)``-th bound ``u`` cannot cross the threshold solved on the
  selection, ``(α−1)·u ≤ τ_S``. By monotonicity (``τ_S ≤ τ_full``) no unselected token is then in the full
  support, and the output equals the dense one.

Selections come as id slots in no particular order (compare them as sets). Attention here is dense with
every unselected token masked, so this oracle shares no gather or threshold code with the static ops.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import EntmaxKVConfig
from .decode import attention_scores, decode_attention, dense_decode
from .entmax import entmax_threshold
from .pages import group_bound
from .sketch import build_sketch, sketch_score_bounds


def full_bias(bias: Tensor | None, q: Tensor, seq_len: int) -> Tensor:
    """Additive bias broadcast to ``[B, Hq, Lq, S]`` in fp32 (zeros when there is none)."""
    b, hq, lq, _ = q.shape
    if bias is None:
        return q.new_zeros(b, hq, lq, seq_len, dtype=torch.float32)
    return bias.float().expand(b, hq, lq, seq_len)


def group_token_bounds(
    q: Tensor,
    k: Tensor,
    bias: Tensor | None,
    scale: float,
    sketch_bits: int,
    sketch_group: int,
    sketch_rotate: bool,
) -> Tensor:
    """Key-sketch bounds ``ŝ + ε + bias`` shared by each KV group, ``[B, Hkv, S]`` fp32 (−inf = masked)."""
    s_hat, eps = sketch_score_bounds(q, build_sketch(k, sketch_bits, sketch_group, sketch_rotate), scale)
    return group_bound(s_hat + eps + full_bias(bias, q, k.shape[2]), k.shape[1])


def _slots(selected: Tensor, n_slots: int) -> Tensor:
    """``selected[B, Hkv, N]`` bool → ids ``[B, Hkv, n_slots]`` int64, ascending, padded with ``−1``."""
    ids = torch.where(selected, torch.arange(selected.shape[-1], device=selected.device), selected.shape[-1])
    ids = ids.sort(-1).values[..., :n_slots]
    return ids.masked_fill(ids == selected.shape[-1], -1)


def static_topk_reference(
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
    """Static top-k page decode: ``(out[B, Hq, Lq, Dv], pages[B, Hkv, sink+budget+recent] int64)``.

    ``q[B, Hq, Lq, D]``, ``k[B, Hkv, S, D]``, ``v[B, Hkv, S, Dv]``, ``bias`` broadcastable to
    ``[B, Hq, Lq, S]`` (−inf = masked); ``S`` a multiple of ``page_size``.
    """
    config = EntmaxKVConfig(
        policy="topk",
        page_size=page_size,
        budget_pages=budget_pages,
        sink_pages=sink_pages,
        recent_pages=recent_pages,
    )
    out, stats = decode_attention(q, k, v, scale=scale, alpha=alpha, bias=bias, config=config)
    # pages holding an attended token (a selected page whose tokens are all masked attends none: unused slot)
    pages = stats.selected.unflatten(-1, (-1, page_size)).any(-1)
    return out, _slots(pages, sink_pages + budget_pages + recent_pages)


def static_certified_reference(
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
    """Static certified decode: ``(out, tokens[B, Hkv, C] int64, certified[B, Hq, Lq] bool)``."""
    bound = group_token_bounds(q, k, bias, scale, sketch_bits, sketch_group, sketch_rotate)
    b, hkv, s = bound.shape
    keep = torch.zeros(b, hkv, s, dtype=torch.bool)
    next_bound = torch.full((b, hkv), -math.inf)
    for i in range(b):
        for g in range(hkv):
            row = bound[i, g].tolist()
            ranked = sorted((j for j in range(s) if row[j] > -math.inf), key=lambda j: (-row[j], j))
            keep[i, g, ranked[:capacity]] = True
            if len(ranked) > capacity:
                next_bound[i, g] = row[ranked[capacity]]
    g = q.shape[1] // hkv
    hidden = ~keep.to(q.device).repeat_interleave(g, 1)[:, :, None]
    masked_bias = full_bias(bias, q, s).masked_fill(hidden, -math.inf)
    out = dense_decode(q, k, v, scale=scale, alpha=alpha, bias=masked_bias)
    z = (alpha - 1.0) * attention_scores(q, k, scale=scale, bias=masked_bias)
    # a row seeing none of the selected tokens has no threshold (−inf): certified only if nothing is left out
    tau = entmax_threshold(z, alpha)[..., 0].masked_fill(z.amax(-1) == -math.inf, -math.inf)
    u = next_bound.to(q.device).repeat_interleave(g, 1)[:, :, None]
    return out, _slots(keep.to(q.device), capacity), (alpha - 1.0) * u <= tau
