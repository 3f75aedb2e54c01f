"""Threshold solve: one program per (group, row) finds τ of the row.

Input: the group's segments (``NSEG`` of them, each ``(idx[segcap], z[R, segcap])`` with a count and a
per-row maximum), or the dense workspace row (``FROM_WS``). Only entries with ``z > M − 1`` (``M`` the
row maximum) can be in the support, so the program first compacts those into the row's *list*
(``list_idx``, ``list_z``, ``list_n``), histogramming them on the way, and runs Newton on the list
(:func:`common.solve_tau`) from the histogram's bracket ``τ₀ ≤ τ`` (:func:`common.bracket_start`); a list
longer than one block first drops its entries ``≤ τ₀`` (never in the support), so Newton usually iterates
on registers. The output kernel reads the same list; with ``SUPPORT_ONLY`` (the solve whose τ the output
uses) a list of at most one block is cut to its support ``z > τ`` first, so the output reads a few entries
per row instead of every candidate within 1 of the maximum. A group whose segments overflowed (count >
``segcap``), whose total count exceeds ``capc`` or whose valid length (from the scoring pass's ``last``
positions) is below ``min_ctx`` is switched to ``ovf_mode`` instead (every row reaches the same verdict);
with ``WS_INLINE`` (the scoring pass also wrote the dense workspace) it is solved from the workspace at once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import NEG_INF, bracket_start, pdl_enter, solve_tau

NB: tl.constexpr = tl.constexpr(64)


@triton.jit
def _compact_above(idx_ptr, z_ptr, n, tau0, BLOCK: tl.constexpr):
    """Keep the list entries with ``z > τ₀`` (in place, order kept); returns their count."""
    cnt = tl.full([], 0, tl.int32)
    for s0 in range(0, n, BLOCK):
        o = s0 + tl.arange(0, BLOCK)
        z = tl.load(z_ptr + o, mask=o < n, other=NEG_INF)
        idx = tl.load(idx_ptr + o, mask=o < n, other=0)  # both read before any store of this block
        keep = z > tau0
        ki = keep.to(tl.int32)
        slot = cnt + tl.cumsum(ki, 0) - 1  # ≤ o: compacting in place never overtakes the reads
        tl.debug_barrier()
        tl.store(idx_ptr + slot, idx, mask=keep)
        tl.store(z_ptr + slot, z, mask=keep)
        cnt += tl.sum(ki)
    return cnt


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
                sl0 = tl.arange(0, SB)
                n = tl.full([], 0, tl.int32)
                hist = tl.zeros([2 * NB], tl.int32)
                zp = seg_z_ptr + (seg[:, None] * 2 * R + r) * segcap
                ip = seg_idx_ptr + seg[:, None] * segcap
                # each chunk's (z, idx) is loaded one chunk ahead: no chunk waits on its own loads
                m_nx = smask[:, None] & (sl0[None, :] < cnts[:, None])
                z_nx = tl.load(zp + sl0[None, :], mask=m_nx, other=NEG_INF)
                i_nx = tl.load(ip + sl0[None, :], mask=m_nx, other=0)
                for s0 in range(0, tl.max(cnts), SB):
                    sl = s0 + sl0
                    z, idx = z_nx, i_nx
                    m_nx = smask[:, None] & (sl[None, :] + SB < cnts[:, None])
                    z_nx = tl.load(zp + SB + sl[None, :], mask=m_nx, other=NEG_INF)
                    i_nx = tl.load(ip + SB + sl[None, :], mask=m_nx, other=0)
                    keep = z > zmax - 1.0
                    ki = keep.to(tl.int32)
                    kc = tl.sum(ki, axis=1)
                    slot = n + (tl.cumsum(kc, 0) - kc)[:, None] + tl.cumsum(ki, 1) - 1
                    tl.store(list_idx_ptr + row * cap2 + slot, idx, mask=keep)
                    tl.store(list_z_ptr + row * cap2 + slot, z, mask=keep)
                    n += tl.sum(kc)
                    b_i = tl.minimum(((z - (zmax - 1.0)) * NB).to(tl.int32), NB - 1)
                    b_i = tl.where(keep, b_i, NB + (sl[None, :] % NB))
                    hist += tl.histogram(tl.reshape(b_i, [NSEG_P2 * SB]), 2 * NB)
                tau0 = bracket_start(hist, zmax, beta, MODE, NB)
                if n > BLOCK:  # τ ≥ τ₀: entries ≤ τ₀ are never in the support, drop them before Newton
                    n = _compact_above(list_idx_ptr + row * cap2, list_z_ptr + row * cap2, n, tau0, BLOCK)
                tau = solve_tau(list_z_ptr + row * cap2, n, zmax, tau0, beta, MODE, BLOCK, MAXIT)
                tl.store(tau_ptr + bh64 * RP + r, tau)
                if SUPPORT_ONLY and (n <= BLOCK):  # the output then reads the support alone, in one block
                    n = _compact_above(list_idx_ptr + row * cap2, list_z_ptr + row * cap2, n, tau, BLOCK)
                tl.store(list_n_ptr + row, n)
