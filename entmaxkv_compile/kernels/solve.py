"""Threshold solve: one program per (group, row) finds τ of the row.

Input: the group's segments (``NSEG`` of them, each ``(idx[segcap], z[R, segcap])`` with a count and a
per-row maximum), or the dense workspace row (``FROM_WS``). Only entries with ``z > M − 1`` (``M`` the
row maximum) can be in the support; a histogram of those gives a bracket ``τ₀ ≤ τ``
(:func:`common.bracket_start`) and Newton runs from it. When every segment fits in one chunk of ``SB``
entries (the usual case) the entries never leave registers: the histogram, Newton and the cut to the support
work on the loaded chunk. Longer segments are read twice, a chunk at a time: once for the histogram, once to
list only the entries above ``τ₀`` in the row's *list* (``list_idx``, ``list_z``, ``list_n``) — a few bins'
worth, however many candidates the segments hold — and Newton runs on that list (:func:`common.solve_tau`).
The output kernel reads the list; with ``SUPPORT_ONLY`` (the solve whose τ the output uses) it holds the
support ``z > τ`` alone (a list above ``τ₀`` longer than one block stays as it is), so the output reads a
few entries per row. A group whose segments overflowed (count > ``segcap``), whose total count exceeds
``capc`` or whose valid length (from the scoring pass's ``last`` positions) is below ``min_ctx`` is switched
to ``ovf_mode`` instead (every row reaches the same verdict); with ``WS_INLINE`` (the scoring pass also
wrote the dense workspace) it is solved from the workspace at once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import NEG_INF, bracket_start, compact_block, newton_tile, pdl_enter, solve_tau

NB: tl.constexpr = tl.constexpr(64)


@triton.jit
def _compact_above(idx_ptr, z_ptr, n, tau0, BLOCK: tl.constexpr):
    """Keep the list entries with ``z > τ₀`` (in place, order kept); returns their count."""
    cnt = tl.full([], 0, tl.int32)
    for s0 in range(0, n, BLOCK):
        o = s0 + tl.arange(0, BLOCK)
        z = tl.load(z_ptr + o, mask=o < n, other=NEG_INF)
        idx = tl.load(idx_ptr + o, mask=o < n, other=0)  # both read before any store of this block
        cnt = compact_block(idx_ptr, z_ptr, cnt, idx, z, z > tau0)
    return cnt


@triton.jit
def _hist(z, lim, sl0, NEL: tl.constexpr):
    """Histogram ``[2·NB]`` of a chunk ``z [·, SB]`` over ``[lim, lim + 1)`` in bins of ``1/NB``; entries
    ``≤ lim`` are spread over bins ``≥ NB`` (ignored), so no bin takes every masked entry."""
    b_i = tl.minimum(((z - lim) * NB).to(tl.int32), NB - 1)
    b_i = tl.where(z > lim, b_i, NB + (sl0[None, :] % NB))
    return tl.histogram(tl.reshape(b_i, [NEL]), 2 * NB)


@triton.jit
def _chunk(zp, ip, s0, sl0, smask, cnts, IDX: tl.constexpr):
    """Entries ``[s0, s0 + SB)`` of every segment: ``z`` (−inf past a segment's count) and, with ``IDX``,
    their positions."""
    inr = smask[:, None] & (s0 + sl0[None, :] < cnts[:, None])
    z = tl.load(zp + s0, mask=inr, other=NEG_INF)
    idx = tl.load(ip + s0, mask=inr, other=0) if IDX else z
    return z, idx


@triton.jit
def _write_above(idx_ptr, z_ptr, n, z, idx, thr):
    """Appends a chunk's entries with ``z > thr`` to the list at ``n`` (order kept); the new count."""
    keep = z > thr
    ki = keep.to(tl.int32)
    nk = tl.sum(ki)
    if nk > 0:  # most chunks of a long row keep nothing: no scans for them
        kc = tl.sum(ki, axis=1)
        slot = n + (tl.cumsum(kc, 0) - kc)[:, None] + tl.cumsum(ki, 1) - 1
        tl.store(idx_ptr + slot, idx, mask=keep)
        tl.store(z_ptr + slot, z, mask=keep)
    return n + nk


@triton.jit
def solve_kernel(
    seg_idx_ptr,
    seg_z_ptr,
    seg_cnt_ptr,
    seg_max_ptr,
    ws_ptr,
    list_idx_ptr,
    list_z_ptr,
    list_n_ptr,
    tau_ptr,
    mode_ptr,
    cand_ptr,
    last_ptr,
    nlast,
    min_ctx,
    S,
    nseg,
    segcap,
    cap2,
    capc,
    beta,
    want_mode,
    ovf_mode,
    R: tl.constexpr,
    RP: tl.constexpr,
    NSEG_P2: tl.constexpr,
    SB: tl.constexpr,
    BLOCK: tl.constexpr,
    FROM_WS: tl.constexpr,
    COUNT_CAND: tl.constexpr,
    MODE: tl.constexpr,
    MAXIT: tl.constexpr,
    NL_P2: tl.constexpr,
    WS_INLINE: tl.constexpr,
    SUPPORT_ONLY: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    bh = tl.program_id(0)
    r = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    segs = tl.arange(0, NSEG_P2)
    smask = segs < nseg
    seg = bh64 * nseg + segs
    # the segment maxima, counts and last positions are loaded with the mode, not after it (they are small)
    m = tl.load(mode_ptr + bh)
    zmax = tl.max(tl.load(seg_max_ptr + seg * RP + r, mask=smask, other=NEG_INF))
    cnts = tl.load(seg_cnt_ptr + seg, mask=smask, other=0)
    li = tl.arange(0, NL_P2)
    length = tl.max(tl.load(last_ptr + bh64 * nlast + li, mask=li < nlast, other=0))
    mine = m == want_mode
    if WS_INLINE:  # a row's program may find its group already switched by a sibling row's (same verdict)
        mine = mine | (m == ovf_mode)
    if mine:
        row = bh64 * R + r
        if FROM_WS:
            tau = solve_tau(ws_ptr + row * S, S, zmax, zmax - 1.0, beta, MODE, BLOCK, MAXIT)
            tl.store(tau_ptr + bh64 * RP + r, tau)
        else:
            total = tl.sum(cnts)
            if (tl.max(cnts) > segcap) | (total > capc) | (length < min_ctx):
                tl.store(mode_ptr + bh, ovf_mode)
                if WS_INLINE:
                    tau = solve_tau(ws_ptr + row * S, S, zmax, zmax - 1.0, beta, MODE, BLOCK, MAXIT)
                    tl.store(tau_ptr + bh64 * RP + r, tau)
            else:
                if COUNT_CAND and r == 0:
                    tl.store(cand_ptr + bh, total)
                lrow = row * cap2
                sl0 = tl.arange(0, SB)
                zp = seg_z_ptr + (seg[:, None] * 2 * R + r) * segcap + sl0[None, :]
                ip = seg_idx_ptr + seg[:, None] * segcap + sl0[None, :]
                lim = zmax - 1.0
                maxc = tl.max(cnts)
                if maxc <= SB:  # one chunk: the list never leaves registers, only the support is written
                    z, _ = _chunk(zp, ip, 0, sl0, smask, cnts, False)
                    z = tl.where(z > lim, z, NEG_INF)
                    tau0 = bracket_start(_hist(z, lim, sl0, NSEG_P2 * SB), zmax, beta, MODE, NB)
                    tau = newton_tile(z, tau0, zmax > NEG_INF, beta, MODE, MAXIT)
                    tau = tl.where(zmax > NEG_INF, tau, 0.0)
                    n = tl.full([], 0, tl.int32)
                    if SUPPORT_ONLY:
                        idx = tl.load(ip, mask=z > tau, other=0)
                        n = _write_above(list_idx_ptr + lrow, list_z_ptr + lrow, n, z, idx, tau)
                else:
                    # pass 1 histograms the entries within 1 of the maximum, pass 2 lists those above the
                    # bracket τ₀ (the support and what lies just below it: a few bins' worth, however many
                    # candidates the segments hold)
                    hist = tl.zeros([2 * NB], tl.int32)
                    z_nx, _ = _chunk(zp, ip, 0, sl0, smask, cnts, False)  # loads one chunk ahead
                    for s0 in range(0, maxc, SB):
                        z = z_nx
                        z_nx, _ = _chunk(zp, ip, s0 + SB, sl0, smask, cnts, False)
                        hist += _hist(z, lim, sl0, NSEG_P2 * SB)
                    tau0 = bracket_start(hist, zmax, beta, MODE, NB)
                    n = tl.full([], 0, tl.int32)
                    z_nx, i_nx = _chunk(zp, ip, 0, sl0, smask, cnts, True)
                    for s0 in range(0, maxc, SB):
                        z, idx = z_nx, i_nx
                        z_nx, i_nx = _chunk(zp, ip, s0 + SB, sl0, smask, cnts, True)
                        n = _write_above(list_idx_ptr + lrow, list_z_ptr + lrow, n, z, idx, tau0)
                    tl.debug_barrier()  # the list was written by every thread
                    tau = solve_tau(list_z_ptr + lrow, n, zmax, tau0, beta, MODE, BLOCK, MAXIT)
                    if SUPPORT_ONLY and (n <= BLOCK):  # the output then reads the support alone
                        n = _compact_above(list_idx_ptr + lrow, list_z_ptr + lrow, n, tau, BLOCK)
                tl.store(tau_ptr + bh64 * RP + r, tau)
                tl.store(list_n_ptr + row, n)
