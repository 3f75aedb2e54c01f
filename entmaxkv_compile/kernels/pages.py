"""Static top-k over pages: page bounds, selection, and exact scoring of the selected pages.

* ``page_score_kernel`` (grid ``[B·Hkv, NSPLIT]``): for every page, the group bound
  ``max_rows (α−1)·(scale·(q⁺·kmax + q⁻·kmin + slack·|q|·max(|kmin|,|kmax|)) + max_page bias)``
  (DESIGN.md §2; the slack makes it hold for fp32-computed scores), −inf for empty or masked pages.
* ``select_kernel`` (one program per group): the ``budget`` highest bounds by an exact radix select on
  the bounds' order-preserving integer keys (four 8-bit rounds of histograms, ties to the lowest page),
  plus the sink pages and the pages holding the last ``recent·page_size`` valid positions; writes the
  selected pages in ascending order and their count. Groups shorter than ``min_ctx`` select nothing and
  go to the dense tail (mode 1).
* ``page_gather_kernel`` (grid ``[B·Hkv, NSPLIT]``): exact ``z`` of every token of a slice of the selected
  pages into the program's segment (the solve and output kernels take it from there).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import NEG_INF, cvt, group_rows, load_bias, load_q, mm


@triton.jit
def page_score_kernel(
    q_ptr,
    kmin_ptr,
    kmax_ptr,
    bias_ptr,
    pscore_ptr,
    last_ptr,
    sqb,
    sqh,
    sql,
    sbb,
    sbh,
    sbl,
    sbs,
    Hkv,
    S,
    n_pages,
    pcap,
    pages_per_split,
    zmul,
    bmul,
    slack,
    G: tl.constexpr,
    LQ: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    D: tl.constexpr,
    PS: tl.constexpr,
    BP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_ROWS: tl.constexpr,
    F32: tl.constexpr,
):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // Hkv
    kvh = bh % Hkv
    bh64 = bh.to(tl.int64)
    r, rmask, hq, qp = group_rows(kvh, G, LQ, R, RP)
    q = cvt(load_q(q_ptr, b, hq, qp, rmask, sqb, sqh, sql, D), F32)
    q_pos = tl.where(q > 0, q, 0.0).to(q.dtype)
    q_neg = tl.where(q < 0, q, 0.0).to(q.dtype)
    q_abs = tl.abs(q).to(q.dtype)
    bias_base = bias_ptr + b.to(tl.int64) * sbb
    d = tl.arange(0, D)
    j = tl.arange(0, BP * PS)
    p_start = sp * pages_per_split
    p_end = tl.minimum(p_start + pages_per_split, n_pages)
    last = tl.full([], 0, tl.int32)
    for p0 in range(p_start, p_end, BP):
        pg = p0 + tl.arange(0, BP)
        pm = pg < p_end
        off = (bh64 * pcap + pg)[:, None] * D + d[None, :]
        kmn = cvt(tl.load(kmin_ptr + off, mask=pm[:, None], other=0.0), F32)
        kmx = cvt(tl.load(kmax_ptr + off, mask=pm[:, None], other=0.0), F32)
        empty = tl.max((kmn > kmx).to(tl.int32), axis=1) > 0
        kmn = tl.where(empty[:, None], 0.0, kmn).to(kmn.dtype)
        kmx = tl.where(empty[:, None], 0.0, kmx).to(kmx.dtype)
        kabs = tl.maximum(tl.abs(kmn), tl.abs(kmx)).to(kmx.dtype)
        box = (
            mm(q_pos, tl.trans(kmx), F32)
            + mm(q_neg, tl.trans(kmn), F32)
            + slack * mm(q_abs, tl.trans(kabs), F32)
        )
        pos = p0 * PS + j
        tm = pos < tl.minimum(p_end * PS, S)
        bias = load_bias(bias_base, hq, qp, rmask, pos, tm, sbh, sbl, sbs, HAS_BIAS, BIAS_ROWS)
        bmax = tl.max(tl.reshape(bias, [RP, BP, PS]), axis=2)
        live = (bmax > NEG_INF) & (empty == 0)[None, :]
        u = tl.where(live, box * zmul + bmax * bmul, NEG_INF)
        tl.store(pscore_ptr + bh64 * pcap + pg, tl.max(u, axis=0), mask=pm)
        last = tl.maximum(last, tl.max(tl.where(tl.max(bias, axis=0) > NEG_INF, pos + 1, 0)))
    tl.store(last_ptr + bh64 * tl.num_programs(1) + sp, last)


@triton.jit
def _keys(score):
    """Order-preserving non-negative int64 keys of fp32 ``score`` (−inf → −1: never selected)."""
    bits = score.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(bits >= 0, bits + 2147483648, -1 - bits)
    return tl.where(score > NEG_INF, key, -1)


@triton.jit
def select_kernel(
    pscore_ptr,
    last_ptr,
    sel_ptr,
    nsel_ptr,
    mode_ptr,
    n_pages,
    pcap,
    sel_cap,
    nlast,
    budget,
    sink,
    recent,
    min_ctx,
    PS: tl.constexpr,
    BLOCK: tl.constexpr,
    NL_P2: tl.constexpr,
):
    bh = tl.program_id(0)
    bh64 = bh.to(tl.int64)
    base = pscore_ptr + bh64 * pcap
    bins = tl.arange(0, 512)
    real = bins < 256
    lv = tl.load(last_ptr + bh64 * nlast + tl.arange(0, NL_P2), mask=tl.arange(0, NL_P2) < nlast, other=0)
    length = tl.max(lv)
    short = length < min_ctx
    if short:
        tl.store(mode_ptr + bh, 1)  # too short to gain: the dense tail decodes this group
    last_page = (length - 1) // PS  # −1 when nothing is valid
    prefix = tl.full([], 0, tl.int64)
    need = tl.full([], 0, tl.int32)
    for rnd in tl.static_range(4):
        shift = 24 - 8 * rnd
        hist = tl.zeros([512], tl.int32)
        for p0 in range(0, n_pages, BLOCK):
            pg = p0 + tl.arange(0, BLOCK)
            key = _keys(tl.load(base + pg, mask=pg < n_pages, other=NEG_INF))
            match = key >= 0
            if rnd > 0:
                match = match & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
            hist += tl.histogram(tl.where(match, (key >> shift) & 255, 256 + (pg & 255)).to(tl.int32), 512)
        hist = tl.where(real, hist, 0)
        if rnd == 0:
            need = tl.where(short, 0, tl.minimum(tl.sum(hist), budget))
        at_or_above = tl.sum(hist) - tl.cumsum(hist, 0) + hist
        digit = tl.max(tl.where(real & (at_or_above >= need), bins, 0))
        need -= tl.sum(tl.where(bins > digit, hist, 0))
        prefix = prefix | (digit.to(tl.int64) << shift)
    # `prefix` is the key of the budget-th highest page; `need` pages with exactly that key are taken.
    cnt = tl.full([], 0, tl.int32)
    ties = tl.full([], 0, tl.int32)
    for p0 in range(0, n_pages, BLOCK):
        pg = p0 + tl.arange(0, BLOCK)
        key = _keys(tl.load(base + pg, mask=pg < n_pages, other=NEG_INF))
        live = (key >= 0) & (need + 0 * pg > 0)  # need == 0: nothing valid to rank
        tie = (key == prefix) & live
        ti = tie.to(tl.int32)
        forced = (
            (key >= 0)
            & ((pg < sink) | ((pg <= last_page) & (pg > last_page - recent)))
            & (length + 0 * pg >= min_ctx)
        )
        take = forced | (live & (key > prefix)) | (tie & (ties + tl.cumsum(ti, 0) <= need))
        ki = take.to(tl.int32)
        slot = cnt + tl.cumsum(ki, 0) - 1
        tl.store(sel_ptr + bh64 * sel_cap + slot, pg, mask=take & (slot < sel_cap))
        cnt += tl.sum(ki)
        ties += tl.sum(ti)
    tl.store(nsel_ptr + bh, tl.minimum(cnt, sel_cap))


@triton.jit
def page_gather_kernel(
    q_ptr,
    k_ptr,
    bias_ptr,
    sel_ptr,
    nsel_ptr,
    seg_idx_ptr,
    seg_z_ptr,
    seg_cnt_ptr,
    seg_max_ptr,
    sqb,
    sqh,
    sql,
    skb,
    skh,
    sks,
    sbb,
    sbh,
    sbl,
    sbs,
    Hkv,
    S,
    sel_cap,
    segcap,
    zmul,
    bmul,
    G: tl.constexpr,
    LQ: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    D: tl.constexpr,
    PS: tl.constexpr,
    BPG: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_ROWS: tl.constexpr,
    F32: tl.constexpr,
):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    nsp = tl.num_programs(1)
    b = bh // Hkv
    kvh = bh % Hkv
    bh64 = bh.to(tl.int64)
    r, rmask, hq, qp = group_rows(kvh, G, LQ, R, RP)
    qc = cvt(load_q(q_ptr, b, hq, qp, rmask, sqb, sqh, sql, D), F32)
    k_base = k_ptr + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh
    bias_base = bias_ptr + b.to(tl.int64) * sbb
    d = tl.arange(0, D)
    j = tl.arange(0, BPG * PS)
    nsel = tl.load(nsel_ptr + bh)
    chunk = tl.cdiv(nsel, nsp)
    i_lo = sp * chunk
    i_hi = tl.minimum(i_lo + chunk, nsel)
    seg = bh64 * nsp + sp
    zmax = tl.full([RP], NEG_INF, tl.float32)
    for i0 in range(i_lo, i_hi, BPG):
        slot = (i0 - i_lo) * PS + j
        im = i0 + j // PS < i_hi
        pg = tl.load(sel_ptr + bh64 * sel_cap + i0 + j // PS, mask=im, other=0)
        pos = pg * PS + j % PS
        pm = im & (pos < S)
        bias = load_bias(bias_base, hq, qp, rmask, pos, pm, sbh, sbl, sbs, HAS_BIAS, BIAS_ROWS)
        tv = tl.max(bias, axis=0) > NEG_INF
        kt = tl.load(k_base + pos.to(tl.int64)[:, None] * sks + d[None, :], mask=tv[:, None], other=0.0)
        z = mm(qc, tl.trans(cvt(kt, F32)), F32) * zmul + bias * bmul
        tl.store(seg_idx_ptr + seg * segcap + slot, pos, mask=im)
        tl.store(
            seg_z_ptr + (seg * 2 * R + r[:, None]) * segcap + slot[None, :],
            z,
            mask=rmask[:, None] & im[None, :],
        )
        zmax = tl.maximum(zmax, tl.max(z, axis=1))
    tl.store(seg_cnt_ptr + seg, (i_hi - i_lo) * PS)
    tl.store(seg_max_ptr + seg * RP + r, zmax)
