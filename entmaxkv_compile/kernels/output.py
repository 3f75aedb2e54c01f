"""Output: ``Σ_j p_j·v_j / Σ_j p_j`` with ``p_j = [z_j − τ]_+^β``, V rows read only for the support.

Grid ``[rows, NSO]``: each program takes a slice of its row's list (or of its dense workspace row when the
group is in mode 2), scans it ``SCAN`` entries at a time, gathers the V rows of the support tokens of the
blocks that hold any (``BLOCK`` rows at a time) and writes fp32 partials. The last program
of a row to finish (a ticket counter) sums the partials in a fixed order, normalises, writes the output
and the row's support size, and resets the row's ticket and running maximum for the next call; a sparse
pipeline's group row 0 also advances the group's watermark and records its probed key rows
(``meta.record_probes``). A list of at most ``SOLO`` entries (usually: the solve cuts short lists to their
support) is taken whole by the row's program 0, which writes the output itself: no partials, no ticket.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import NEG_INF, pdl_enter, pow_beta
from .meta import record_probes


@triton.jit
def _finish(
    optr, qrow, tot, ps, pc, row, bh, r, m, stats, lrow, nlast, probes,
    RP: tl.constexpr, NL_P2: tl.constexpr, HAS_WM: tl.constexpr, DK: tl.constexpr, P: tl.constexpr,
):  # fmt: skip
    """Write a row's output ``Σp·v / Σp`` (NaN, as in eager, if its query ``qrow`` holds a NaN or ±inf) and
    support size, reset its running maximum for the next call and, for a group's row 0, record the group's
    mode, advance its watermark (``lrow``: last positions) and record its probed key rows (``probes``: the
    group's key base, the keys' position stride, the probe buffers). ``stats``: the support, running
    maximum, mode and watermark buffers."""
    sup_ptr, gmax_ptr, smode_ptr, wm_ptr = stats
    qv = tl.load(qrow + tl.arange(0, DK)).to(tl.float32)
    finite = tl.min((tl.abs(qv) <= 3.4028234663852886e38).to(tl.int32), axis=0) > 0  # NaN compares false
    o = tl.where(ps > 0, tot / tl.maximum(ps, 1e-30), 0.0)
    tl.store(optr, tl.where(finite, o, float("nan")).to(optr.dtype.element_ty))
    tl.store(sup_ptr + row, pc)
    tl.store(gmax_ptr + bh.to(tl.int64) * RP + r, NEG_INF)
    if r == 0:
        tl.store(smode_ptr + bh, m)
        if HAS_WM:
            li = tl.arange(0, NL_P2)
            wm = tl.max(tl.load(lrow + li, mask=li < nlast, other=0))
            tl.store(wm_ptr + bh, wm)
            k_base, sks, ppos_ptr, prow_ptr = probes
            record_probes(k_base, sks, wm, ppos_ptr, prow_ptr, bh.to(tl.int64), DK, P)


@triton.jit
def output_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    ws_ptr,
    list_idx_ptr,
    list_z_ptr,
    list_n_ptr,
    tau_ptr,
    mode_ptr,
    part_ptr,
    psum_ptr,
    pcnt_ptr,
    ticket_ptr,
    gmax_ptr,
    support_ptr,
    stat_mode_ptr,
    wm_ptr,
    last_ptr,
    probe_pos_ptr,
    probe_rows_ptr,
    sqb,
    sqh,
    sql,
    skb,
    skh,
    sks,
    svb,
    svh,
    svs,
    sob,
    soh,
    sol,
    Hkv,
    S,
    cap2,
    beta,
    nlast,
    G: tl.constexpr,
    LQ: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK: tl.constexpr,
    SCAN: tl.constexpr,
    NSO_P2: tl.constexpr,
    NL_P2: tl.constexpr,
    MODE: tl.constexpr,
    HAS_WM: tl.constexpr,
    SOLO: tl.constexpr,
    P: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    row = tl.program_id(0)
    sp = tl.program_id(1)
    nso = tl.num_programs(1)
    row64 = row.to(tl.int64)
    bh = row // R
    r = row % R
    b = bh // Hkv
    kvh = bh % Hkv
    m = tl.load(mode_ptr + bh)
    tau = tl.load(tau_ptr + bh.to(tl.int64) * RP + r)
    n_list = tl.load(list_n_ptr + row)  # loaded with the mode, not after it: one round trip fewer
    use_ws = m == 2
    if use_ws:
        z_row = ws_ptr + row64 * S
        n = S
    else:
        z_row = list_z_ptr + row64 * cap2
        n = n_list
    idx_row = list_idx_ptr + row64 * cap2
    solo = (n <= SOLO) & (m != 2)  # a short list (the support): program 0 takes the row, nothing to combine
    chunk = tl.where(solo, n, tl.cdiv(n, nso))
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, n)
    ilim = tl.where(use_ws, 0, tl.minimum(hi, cap2))  # list entries to read indices from
    dv = tl.arange(0, DV)
    v_base = v_ptr + b.to(tl.int64) * svb + kvh.to(tl.int64) * svh
    acc = tl.zeros([DV], tl.float32)
    pv = tl.zeros([SCAN], tl.float32)
    cv = tl.zeros([SCAN], tl.int32)
    for c0 in range(lo, hi, SCAN):
        o = c0 + tl.arange(0, SCAN)
        p = pow_beta(tl.maximum(tl.load(z_row + o, mask=o < hi, other=NEG_INF) - tau, 0.0), beta, MODE)
        pv += p
        cv += (p > 0).to(tl.int32)
        if tl.sum((p > 0).to(tl.int32)) > 0:  # gather V rows only inside chunks holding support tokens
            blocks = tl.max(tl.reshape((p > 0).to(tl.int32), [SCAN // BLOCK, BLOCK]), axis=1)
            bi = tl.arange(0, SCAN // BLOCK)
            for s0 in range(c0, tl.minimum(c0 + SCAN, hi), BLOCK):
                # only blocks holding support tokens: each one visited costs a round trip to memory
                if tl.sum(tl.where(bi == (s0 - c0) // BLOCK, blocks, 0)) > 0:
                    ob = s0 + tl.arange(0, BLOCK)
                    zb = tl.load(z_row + ob, mask=ob < hi, other=NEG_INF)
                    ib = tl.load(idx_row + ob, mask=ob < ilim, other=0)  # with z, not after it
                    pb = pow_beta(tl.maximum(zb - tau, 0.0), beta, MODE)
                    sup = pb > 0
                    idx = tl.where(use_ws, ob, ib)
                    vptr = v_base + idx.to(tl.int64)[:, None] * svs + dv[None, :]
                    vt = tl.load(vptr, mask=sup[:, None], other=0.0)
                    acc += tl.sum(pb[:, None] * vt.to(tl.float32), axis=0)
    optr = out_ptr + b.to(tl.int64) * sob + (kvh * G + r // LQ) * soh + (r % LQ) * sol + dv
    qrow = q_ptr + b.to(tl.int64) * sqb + (kvh * G + r // LQ) * sqh + (r % LQ) * sql
    stats = (support_ptr, gmax_ptr, stat_mode_ptr, wm_ptr)
    lrow = last_ptr + bh.to(tl.int64) * nlast
    probes = (k_ptr + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh, sks, probe_pos_ptr, probe_rows_ptr)
    if solo:
        if sp == 0:
            _finish(optr, qrow, acc, tl.sum(pv), tl.sum(cv), row, bh, r, m, stats, lrow, nlast, probes,
                    RP, NL_P2, HAS_WM, DK, P)  # fmt: skip
    else:
        pslot = row64 * nso + sp
        tl.store(part_ptr + pslot * DV + dv, acc)
        tl.store(psum_ptr + pslot, tl.sum(pv))
        tl.store(pcnt_ptr + pslot, tl.sum(cv))
        tl.debug_barrier()
        if tl.atomic_add(ticket_ptr + row, 1) == nso - 1:
            j = tl.arange(0, NSO_P2)
            jm = j < nso
            jp = row64 * nso + j
            parts = tl.load(
                part_ptr + jp[:, None] * DV + dv[None, :], mask=jm[:, None], other=0.0, cache_modifier=".cg"
            )
            ps = tl.sum(tl.load(psum_ptr + jp, mask=jm, other=0.0, cache_modifier=".cg"))
            pc = tl.sum(tl.load(pcnt_ptr + jp, mask=jm, other=0, cache_modifier=".cg"))
            tl.store(ticket_ptr + row, 0)
            _finish(optr, qrow, tl.sum(parts, axis=0), ps, pc, row, bh, r, m, stats, lrow, nlast, probes,
                    RP, NL_P2, HAS_WM, DK, P)  # fmt: skip
