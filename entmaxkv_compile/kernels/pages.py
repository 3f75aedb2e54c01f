"""Static top-k over pages: page bounds, selection, and exact scoring of the selected pages.

* ``page_score_kernel`` (grid ``[B·Hkv, NSPLIT]``): for every page, the group bound
  ``max_rows (α−1)·(scale·(q⁺·kmax + q⁻·kmin + slack·|q|·max(|kmin|,|kmax|)) + max_page bias)``
  (DESIGN.md §2; the slack makes it hold for fp32-computed scores), −inf for empty or masked pages.
* ``select_hist_kernel`` × 3, ``select_take_kernel`` (grid ``[B·Hkv, NSPLIT]``, the page-scoring slices):
  the ``budget`` highest bounds by an exact radix select on the bounds' order-preserving integer keys (four
  8-bit rounds, the first made by ``page_score_kernel`` after its slice; each slice adds its digit histogram
  to the group's, every program replays the digits; ties to the lowest page), plus the sink pages and the
  pages holding the last ``recent·page_size`` valid positions; the last round's slice histograms give each
  slice its count of earlier ties, and each slice writes its taken pages (ascending) and their count. No
  program walks all pages of a group. ``update_kernel`` zeroes the histograms at the start of the step (an
  interrupted step leaves nothing behind). Groups shorter than ``min_ctx`` select nothing and go to the
  dense tail (mode 1).
* ``page_gather_kernel`` (grid ``[B·Hkv, NSPLIT]``): exact ``z`` of every token of an equal share of the
  selected pages (the slices' lists in order: each program maps its share through the slices' counts); the
  tokens within 1 of the running maximum go into the program's segment, and what the group's maximum (one
  ``atomic_max`` at the end) rules out is dropped before the solve and output kernels take it from there
  (they used to scan every selected token: 16K per row at 1M, 1/64). It also stores the statistics' count
  of gathered key rows.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    NEG_INF,
    compact_block,
    cvt,
    dpow_beta,
    group_rows,
    load_bias,
    load_q,
    mm,
    newton_step,
    pdl_enter,
    pow_beta,
    refilter,
    seg_store,
)

POS_INF = tl.constexpr(float("inf"))


@triton.jit
def _bias_raw(
    bias_base, hq, qp, rmask, pos, tm, sbh, sbl, sbs, HAS_BIAS: tl.constexpr, BIAS_ROWS: tl.constexpr
):
    """The bias at positions ``pos`` as loaded: ``[RP, N]`` for per-row biases, else one vector ``[N]`` (0
    without a bias), −inf where masked or out of range."""
    if HAS_BIAS and BIAS_ROWS != 1:
        raw = load_bias(bias_base, hq, qp, rmask, pos, tm, sbh, sbl, sbs, HAS_BIAS, BIAS_ROWS)
    elif HAS_BIAS:
        raw = tl.load(bias_base + pos.to(tl.int64) * sbs, mask=tm, other=NEG_INF)
    else:
        raw = tl.where(tm, 0.0, NEG_INF)
    return raw


@triton.jit
def _bias_pages(
    raw,
    pos,
    rmask,
    RP: tl.constexpr,
    BP: tl.constexpr,
    PS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_ROWS: tl.constexpr,
):
    """Per row and page the largest bias ``[RP, BP]`` of ``_bias_raw``'s tile, and one past its last valid
    position (0: none). A shared bias is reduced once, as a vector."""
    if HAS_BIAS and BIAS_ROWS != 1:
        bmax = tl.max(tl.reshape(raw, [RP, BP, PS]), axis=2)
        valid = tl.max(raw, axis=0) > NEG_INF
    else:
        bmax = tl.where(rmask[:, None], tl.max(tl.reshape(raw, [BP, PS]), axis=1)[None, :], NEG_INF)
        valid = raw > NEG_INF
    return bmax, tl.max(tl.where(valid, pos + 1, 0))


@triton.jit
def _page_counts(
    raw, RP: tl.constexpr, BP: tl.constexpr, PS: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_ROWS: tl.constexpr
):
    """Valid tokens per row and page ``[RP, BP]`` of ``_bias_raw``'s tile (shared: the same for every row)."""
    if HAS_BIAS and BIAS_ROWS != 1:
        n = tl.sum(tl.reshape((raw > NEG_INF).to(tl.int32), [RP, BP, PS]), axis=2)
    else:
        n = tl.sum(tl.reshape((raw > NEG_INF).to(tl.int32), [BP, PS]), axis=1)
        n = tl.broadcast_to(n[None, :], [RP, BP])
    return n


@triton.jit
def page_score_kernel(
    q_ptr,
    kmin_ptr,
    kmax_ptr,
    bias_ptr,
    pscore_ptr,
    last_ptr,
    hist_ptr,
    urow_ptr,
    zc_ptr,
    nc_ptr,
    zcmax_ptr,
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
    HB: tl.constexpr,
    ADAPT: tl.constexpr,
    PDL: tl.constexpr,
):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // Hkv
    kvh = bh % Hkv
    bh64 = bh.to(tl.int64)
    r, rmask, hq, qp = group_rows(kvh, G, LQ, R, RP)
    q = cvt(load_q(q_ptr, b, hq, qp, rmask, sqb, sqh, sql, D), F32)
    # A row whose query is not finite takes no part in the ranking (its output is NaN whatever is read): it
    # gets a copy of the group's first finite row, which with a shared bias changes no page's maximum (masking
    # its bounds in the tile loop instead moved the whole tile out of the dots' layout: 1M, 1/64, page scoring
    # 76 → 110 µs); a per-row bias is masked for it in the tile loop. Without a finite row the group selects
    # nothing.
    qok = tl.sum((tl.abs(q.to(tl.float32)) < POS_INF).to(tl.int32), axis=1) == D
    first = tl.min(tl.where(qok & rmask, r, RP))
    q = tl.where(qok[:, None], q, tl.sum(tl.where((r == first)[:, None], q, 0.0), axis=0)[None, :])
    anyok = first < RP
    q_pos = tl.where(q > 0, q, 0.0).to(q.dtype)
    q_neg = tl.where(q < 0, q, 0.0).to(q.dtype)
    q_abs = tl.abs(q).to(q.dtype)
    bias_base = bias_ptr + b.to(tl.int64) * sbb
    d = tl.arange(0, D)
    j = tl.arange(0, BP * PS)
    p_start = sp * pages_per_split
    p_end = tl.minimum(p_start + pages_per_split, n_pages)
    t_end = tl.minimum(p_end * PS, S)
    last = tl.full([], 0, tl.int32)
    zcrun = tl.full([RP, BP], NEG_INF, tl.float32)  # adaptive: running maxima, reduced once per slice
    # the bias is loaded a tile ahead by hand (too narrow a load for async copies: no tile waits on it)
    nxt = p_start * PS + j
    bias_nxt = _bias_raw(bias_base, hq, qp, rmask, nxt, nxt < t_end, sbh, sbl, sbs, HAS_BIAS, BIAS_ROWS)
    pdl_enter(PDL)  # the query and the first bias tile (the op's inputs) before the wait: launch.py, EARLY
    for p0 in range(p_start, p_end, BP):
        pg = p0 + tl.arange(0, BP)
        pm = pg < p_end
        off = (bh64 * pcap + pg)[:, None] * D + d[None, :]
        kmn = cvt(tl.load(kmin_ptr + off, mask=pm[:, None], other=0.0), F32)
        kmx = cvt(tl.load(kmax_ptr + off, mask=pm[:, None], other=0.0), F32)
        pos = p0 * PS + j
        bias = bias_nxt
        nxt = pos + BP * PS
        bias_nxt = _bias_raw(bias_base, hq, qp, rmask, nxt, nxt < t_end, sbh, sbl, sbs, HAS_BIAS, BIAS_ROWS)
        # empty pages (kmin = +inf > kmax = −inf in every channel: boxes are written whole) are told by their
        # first channel and masked after the dots, where their inf/NaN stays in their own column (compared as
        # the dots' operands: the interpreter holds bf16 as its uint16 bits)
        off0 = (bh64 * pcap + pg) * D
        empty = cvt(tl.load(kmin_ptr + off0, mask=pm, other=0.0), F32) > cvt(
            tl.load(kmax_ptr + off0, mask=pm, other=0.0), F32
        )
        kabs = tl.maximum(tl.abs(kmn), tl.abs(kmx)).to(kmx.dtype)
        hi_lo = mm(q_pos, tl.trans(kmx), F32) + mm(q_neg, tl.trans(kmn), F32)
        box = hi_lo + slack * mm(q_abs, tl.trans(kabs), F32)
        bmax, tlast = _bias_pages(bias, pos, rmask, RP, BP, PS, HAS_BIAS, BIAS_ROWS)
        if HAS_BIAS and BIAS_ROWS != 1:  # its own bias would let the copied row see pages only it sees
            bmax = tl.where(qok[:, None], bmax, NEG_INF)
        live = (bmax > NEG_INF) & ~empty[None, :] & anyok
        u = box * zmul + bmax * bmul
        # a NaN key: the page cannot be excluded (a maximum on the GPU would drop it beside a −inf row)
        u = tl.where(live, tl.where(u == u, u, POS_INF), NEG_INF)
        score = tl.max(u, axis=0)
        tl.store(pscore_ptr + bh64 * pcap + pg, score, mask=pm)
        last = tl.maximum(last, tlast)
        if ADAPT:  # per row: the bound, and the τ estimate's entry (centre score + largest bias, n tokens)
            ctr = hi_lo + mm(q_neg, tl.trans(kmx), F32) + mm(q_pos, tl.trans(kmn), F32)  # q·kmin + q·kmax
            ro = (bh64 * R + r)[:, None] * pcap + pg[None, :]
            rm = rmask[:, None] & pm[None, :]
            tl.store(urow_ptr + ro, u, mask=rm)
            zc = tl.where(live, ctr * (0.5 * zmul) + bmax * bmul, NEG_INF)
            tl.store(zc_ptr + ro, zc, mask=rm)
            zcrun = tl.maximum(zcrun, zc)
            tl.store(nc_ptr + ro, _page_counts(bias, RP, BP, PS, HAS_BIAS, BIAS_ROWS), mask=rm)
    if not ADAPT:  # adaptive: page_pass_kernel makes the first round, once the τ estimate has dropped pages
        # the radix select's first round over the slice just scored (its scores are in L2; a histogram per
        # 1,024 pages, not per tile: one costs about as much for 32 keys as for 1,024)
        tl.debug_barrier()
        hist = _slice_hist(pscore_ptr, bh64, pcap, p_start, p_end, 0, 0, HB)
        _add_hist(hist_ptr, bh64, 0, hist)
    tl.store(last_ptr + bh64 * tl.num_programs(1) + sp, last)
    if ADAPT:
        tl.store(zcmax_ptr + (bh64 * tl.num_programs(1) + sp) * RP + r, tl.max(zcrun, axis=1))


@triton.jit
def _weighted_sums(z, w, tau, beta, MODE: tl.constexpr):
    """``Σ w·[z − τ]_+^β`` and minus its derivative in τ."""
    x = tl.maximum(z - tau, 0.0)
    return tl.sum(w * pow_beta(x, beta, MODE)), tl.sum(w * dpow_beta(x, beta, MODE))


@triton.jit
def _tau_pass(zc_base, nc_base, src, n, dst, cnt, tau, beta, f, g, MODE: tl.constexpr, BLOCK: tl.constexpr):
    """One pass of ``page_tau_kernel`` over the entries ``[src, src + n)`` of a row: adds their weighted sums
    at ``tau`` to ``f, g`` and moves the entries above ``tau`` to the list at ``dst`` (``cnt`` so far; in
    place: ``dst + cnt ≤ src``)."""
    o = tl.arange(0, BLOCK)
    for p0 in range(0, n, BLOCK):
        z = tl.load(zc_base + src + p0 + o, mask=p0 + o < n, other=NEG_INF)
        w = tl.load(nc_base + src + p0 + o, mask=p0 + o < n, other=0)
        fb, gb = _weighted_sums(z, w.to(tl.float32), tau, beta, MODE)
        f += fb
        g += gb
        cnt = compact_block(zc_base + dst, nc_base + dst, cnt, z, w, z > tau)
    return f, g, cnt


@triton.jit
def page_tau_kernel(
    zc_ptr,
    nc_ptr,
    zcmax_ptr,
    tau_ptr,
    part_ptr,
    pcnt_ptr,
    ticket_ptr,
    pcap,
    n_pages,
    nsplit,
    part_len,
    beta,
    R: tl.constexpr,
    RP: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK: tl.constexpr,
    NL_P2: tl.constexpr,
    NT_P2: tl.constexpr,
    MAXIT: tl.constexpr,
    PDL: tl.constexpr,
):
    """``adaptive``'s τ estimate of one row (grid ``[B·Hkv, R, NT]``): ``Σ_p n_p·[z_p − τ]_+^β = 1`` over the
    pages' entries, by Newton from a lower bound of the root (the sum is convex and decreasing: the iterates
    rise to the root); −inf for a row without a valid page. Entries at or below an iterate never count again,
    so each pass over the row also compacts it (in place) to the entries above the iterate; once they fit in
    one block, Newton finishes in registers. A row of more than one block has its first pass split over its
    ``NT`` programs (one program walked all 65K entries of a row at 1M: ~50 µs); the last to finish (a
    ticket counter) sums their parts in a fixed order and goes on alone, loading the parts' kept entries
    straight into registers when they fit one block."""
    pdl_enter(PDL)
    bh64 = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1)
    t = tl.program_id(2)
    nt = tl.num_programs(2)
    row = bh64 * R + r
    zc_base = zc_ptr + row * pcap
    nc_base = nc_ptr + row * pcap
    sl = tl.arange(0, NL_P2)
    smax = tl.load(zcmax_ptr + (bh64 * nsplit + sl) * RP + r, mask=sl < nsplit, other=NEG_INF)
    zmax = tl.max(smax)
    # Start from a lower bound of the root tighter than max z − 1: the j largest slice maxima are j
    # distinct entries of weight ≥ 1, so f(τ) ≥ j·(z_(j) − τ)^β for τ ≤ z_(j), and f(τ*) = 1 gives
    # τ* ≥ z_(j) − j^(−1/β) (j = 1: max z − 1). On flat scores the first pass then keeps ~1% of the entries.
    srt = tl.sort(smax, descending=True)
    root = tl.exp2(-tl.log2((sl + 1).to(tl.float32)) / beta) * 1.0001  # j^(−1/β), rounded up
    lb = srt - root - tl.abs(srt) * 2.4e-7  # and the subtraction's rounding (≤ half an ulp of z) covered
    tau = tl.maximum(tl.max(tl.where(srt > NEG_INF, lb, NEG_INF)), zmax - 1.0)
    zero = tl.zeros([], tl.float32)
    none = tl.full([], 0, tl.int32)
    o = tl.arange(0, BLOCK)
    go = zmax > NEG_INF
    it = none
    mine = t == 0  # this program finishes the row
    if n_pages <= BLOCK:  # one block: straight to registers
        z = tl.load(zc_base + o, mask=o < n_pages, other=NEG_INF)
        w = tl.load(nc_base + o, mask=o < n_pages, other=0).to(tl.float32)
    else:
        z = tl.full([BLOCK], NEG_INF, tl.float32)
        w = tl.zeros([BLOCK], tl.float32)
        lo = t * part_len
        f, g, cnt = _tau_pass(
            zc_base,
            nc_base,
            lo,
            tl.minimum(part_len, n_pages - lo),
            lo,
            none,
            tau,
            beta,
            zero,
            zero,
            MODE,
            BLOCK,
        )
        j = tl.arange(0, NT_P2)
        pj = row * nt + j
        tl.store(part_ptr + 2 * (row * nt + t) + tl.arange(0, 2), tl.where(tl.arange(0, 2) == 0, f, g))
        tl.store(pcnt_ptr + row * nt + t, cnt)
        tl.debug_barrier()
        mine = tl.atomic_add(ticket_ptr + row, 1) == nt - 1
        if mine:
            tl.store(ticket_ptr + row, 0)
            f = tl.sum(tl.load(part_ptr + 2 * pj, mask=j < nt, other=0.0, cache_modifier=".cg"))
            g = tl.sum(tl.load(part_ptr + 2 * pj + 1, mask=j < nt, other=0.0, cache_modifier=".cg"))
            parts = tl.load(pcnt_ptr + pj, mask=j < nt, other=0, cache_modifier=".cg")
            tau, go = newton_step(tau, f, g)
            go = go & (zmax > NEG_INF)
            it += 1
            n = tl.sum(parts)
            if n <= BLOCK:  # the parts' lists, in order, straight into registers: one gathering load
                upto = tl.cumsum(parts, 0)
                sj = tl.zeros([BLOCK], tl.int32)  # the part holding entry o, and the entries before it
                before = tl.zeros([BLOCK], tl.int32)
                for pt in tl.static_range(NT_P2):
                    past = o >= tl.sum(tl.where(j == pt, upto, 0))
                    sj += past.to(tl.int32)
                    before += tl.where(past, tl.sum(tl.where(j == pt, parts, 0)), 0)
                src = sj * part_len + o - before
                z = tl.load(zc_base + src, mask=o < n, other=NEG_INF)
                w = tl.load(nc_base + src, mask=o < n, other=0).to(tl.float32)
            else:  # rare (the start bound keeps ~1% of flat scores): one list at the row's front, then passes
                f = zero
                g = zero
                n = none
                for pt in range(0, nt):
                    npt = tl.sum(tl.where(j == pt, parts, 0))
                    f, g, n = _tau_pass(
                        zc_base, nc_base, pt * part_len, npt, 0, n, tau, beta, f, g, MODE, BLOCK
                    )
                tl.debug_barrier()  # the list was written by every thread
                tau, go = newton_step(tau, f, g)
                it += 1
                while (it < MAXIT) & go & (n > BLOCK):
                    f, g, n = _tau_pass(zc_base, nc_base, 0, n, 0, none, tau, beta, zero, zero, MODE, BLOCK)
                    tl.debug_barrier()
                    tau, go = newton_step(tau, f, g)
                    it += 1
                z = tl.load(zc_base + o, mask=o < n, other=NEG_INF)
                w = tl.load(nc_base + o, mask=o < n, other=0).to(tl.float32)
    if mine:
        while (it < MAXIT) & go:
            f, g = _weighted_sums(z, w, tau, beta, MODE)
            tau, go = newton_step(tau, f, g)
            it += 1
        tl.store(tau_ptr + bh64 * RP + r, tl.where(zmax > NEG_INF, tau, NEG_INF))


@triton.jit
def page_pass_kernel(
    pscore_ptr,
    rank_ptr,
    urow_ptr,
    tau_ptr,
    hist_ptr,
    pcap,
    n_pages,
    pages_per_split,
    slack,
    R: tl.constexpr,
    RP: tl.constexpr,
    BLOCK: tl.constexpr,
    HB: tl.constexpr,
    PDL: tl.constexpr,
):
    """``adaptive`` (grid ``[B·Hkv, NSPLIT]``, the page-scoring slices): the selection ranks ``rank``, the
    page scores with −inf for every page no row's bound lifts above that row's τ estimate minus ``slack`` (a
    NaN bound passes; sink and recent pages are still taken by their unmasked score); then the radix
    select's first round over the slice."""
    pdl_enter(PDL)
    bh64 = tl.program_id(0).to(tl.int64)
    p_start = tl.program_id(1) * pages_per_split
    p_end = tl.minimum(p_start + pages_per_split, n_pages)
    r = tl.arange(0, RP)
    rmask = r < R
    thr = tl.where(rmask, tl.load(tau_ptr + bh64 * RP + r, mask=rmask, other=0.0), POS_INF) - slack
    for p0 in range(p_start, p_end, BLOCK):
        pg = p0 + tl.arange(0, BLOCK)
        pm = pg < p_end
        uo = (bh64 * R + r)[:, None] * pcap + pg[None, :]
        u = tl.load(urow_ptr + uo, mask=rmask[:, None] & pm[None, :], other=NEG_INF)
        passing = tl.max(((u > thr[:, None]) | (u != u)).to(tl.int32), axis=0) > 0
        score = tl.load(pscore_ptr + bh64 * pcap + pg, mask=pm, other=NEG_INF)
        tl.store(rank_ptr + bh64 * pcap + pg, tl.where(passing, score, NEG_INF), mask=pm)
    tl.debug_barrier()
    hist = _slice_hist(rank_ptr, bh64, pcap, p_start, p_end, 0, 0, HB)
    _add_hist(hist_ptr, bh64, 0, hist)


@triton.jit
def _keys(score):
    """Order-preserving non-negative int64 keys of fp32 ``score`` (−inf → −1: never selected)."""
    bits = score.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(bits >= 0, bits + 2147483648, -1 - bits)
    return tl.where(score > NEG_INF, key, -1)


@triton.jit
def _slice_hist(pscore_ptr, bh64, pcap, p_start, p_end, prefix, RND: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram ``[512]`` of the round-``RND`` 8-bit digit of the slice's valid keys that match ``prefix``
    on the digits above it (bins 0–255; the rest go to bins 256–511, spread by page)."""
    shift: tl.constexpr = 24 - 8 * RND
    local = tl.zeros([512], tl.int32)
    for p0 in range(p_start, p_end, BLOCK):
        pg = p0 + tl.arange(0, BLOCK)
        key = _keys(tl.load(pscore_ptr + bh64 * pcap + pg, mask=pg < p_end, other=NEG_INF))
        match = key >= 0
        if RND > 0:
            match = match & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
        digit = tl.where(match, (key >> shift) & 255, 256 + (pg & 255))
        local += tl.histogram(digit.to(tl.int32), 512)
    return local


@triton.jit
def _add_hist(hist_ptr, bh64, RND: tl.constexpr, local):
    """Adds a program's histogram of round ``RND`` to the group's (one masked atomic add per bin)."""
    bins = tl.arange(0, 512)
    tl.atomic_add(
        hist_ptr + (bh64 * 4 + RND) * 256 + bins, local, mask=(bins < 256) & (local > 0), sem="relaxed"
    )


@triton.jit
def _group_length(last_ptr, bh64, nlast, NL_P2: tl.constexpr):
    """One past the group's last valid position (max over the page-scoring programs)."""
    o = tl.arange(0, NL_P2)
    return tl.max(tl.load(last_ptr + bh64 * nlast + o, mask=o < nlast, other=0))


@triton.jit
def _radix_state(hist_ptr, bh64, budget, short, NR: tl.constexpr):
    """``(prefix, need)`` after the first ``NR`` 8-bit rounds of the exact radix select, replayed from the
    group's round histograms ``hist[BH, 4, 256]`` (every program derives the same digits)."""
    bins = tl.arange(0, 256)
    prefix = tl.full([], 0, tl.int64)
    need = tl.full([], 0, tl.int32)
    for rnd in tl.static_range(NR):
        hist = tl.load(hist_ptr + (bh64 * 4 + rnd) * 256 + bins)
        if rnd == 0:
            need = tl.where(short, 0, tl.minimum(tl.sum(hist), budget))
        at_or_above = tl.sum(hist) - tl.cumsum(hist, 0) + hist
        digit = tl.max(tl.where(at_or_above >= need, bins, 0))
        need -= tl.sum(tl.where(bins > digit, hist, 0))
        prefix = prefix | (digit.to(tl.int64) << (24 - 8 * rnd))
    return prefix, need


@triton.jit
def select_hist_kernel(
    pscore_ptr,
    last_ptr,
    hist_ptr,
    ties_ptr,
    n_pages,
    pcap,
    nlast,
    budget,
    min_ctx,
    pages_per_split,
    RND: tl.constexpr,
    BLOCK: tl.constexpr,
    NL_P2: tl.constexpr,
    PDL: tl.constexpr,
):
    """Round ``RND`` ≥ 1 of the radix select (``page_score_kernel`` makes round 0): this program's page
    slice adds its histogram of the next 8-bit digit (among keys matching the prefix so far) to the group's
    ``hist[RND]`` — one masked atomic add per bin and program, after the slice. The last round also keeps the
    slice's own histogram: its bin of the final digit is the slice's count of ties with the cut-off key."""
    pdl_enter(PDL)
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    short = _group_length(last_ptr, bh64, nlast, NL_P2) < min_ctx
    prefix, need = _radix_state(hist_ptr, bh64, budget, short, RND)
    p_start = sp * pages_per_split
    p_end = tl.minimum(p_start + pages_per_split, n_pages)
    local = _slice_hist(pscore_ptr, bh64, pcap, p_start, p_end, prefix, RND, BLOCK)
    _add_hist(hist_ptr, bh64, RND, local)
    if RND == 3:
        bins = tl.arange(0, 512)
        tl.store(ties_ptr + (bh64 * tl.num_programs(1) + sp) * 256 + bins, local, mask=bins < 256)


@triton.jit
def select_take_kernel(
    pscore_ptr,
    last_ptr,
    hist_ptr,
    ties_ptr,
    cnt_ptr,
    sel_ptr,
    mode_ptr,
    box_ptr,
    n_pages,
    pcap,
    nlast,
    budget,
    sink,
    recent,
    min_ctx,
    pages_per_split,
    PS: tl.constexpr,
    BLOCK: tl.constexpr,
    NL_P2: tl.constexpr,
    RANKED: tl.constexpr,
    PDL: tl.constexpr,
):
    """After the four rounds, ``prefix`` is the key of the budget-th highest page and ``need`` pages with
    exactly that key are taken, lowest pages first (the ties of earlier slices are in their last-round
    histograms). Each slice writes its taken pages (top-``budget`` ∪ sink ∪ recent, ascending) from its own
    first page on, ``sel[BH, pcap]``, and their count; ``page_gather_kernel`` reads the slices' counts and
    takes the lists in order (a second pass writing one compact list cost a launch). ``RANKED``
    (``adaptive``): ``pscore`` holds the ranked scores and ``box`` the page scores that tell non-empty sink
    and recent pages."""
    pdl_enter(PDL)
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    nsp = tl.num_programs(1)
    bh64 = bh.to(tl.int64)
    length = _group_length(last_ptr, bh64, nlast, NL_P2)
    short = length < min_ctx
    last_page = (length - 1) // PS  # −1 when nothing is valid
    prefix, need = _radix_state(hist_ptr, bh64, budget, short, 4)
    o = tl.arange(0, NL_P2)
    ties_at = ties_ptr + (bh64 * nsp + o) * 256 + (prefix & 255).to(tl.int32)
    ties = tl.sum(tl.load(ties_at, mask=(o < nsp) & (o < sp), other=0))  # ties in earlier slices
    if (sp == 0) & short:
        tl.store(mode_ptr + bh, 1)  # too short to gain: the dense tail decodes this group
    own_ties = tl.full([], 0, tl.int32)
    own = tl.full([], 0, tl.int32)
    p_start = sp * pages_per_split
    p_end = tl.minimum(p_start + pages_per_split, n_pages)
    for p0 in range(p_start, p_end, BLOCK):
        pg = p0 + tl.arange(0, BLOCK)
        key = _keys(tl.load(pscore_ptr + bh64 * pcap + pg, mask=pg < p_end, other=NEG_INF))
        live = (key >= 0) & (need + 0 * pg > 0)  # need == 0: nothing valid to rank
        tie = (key == prefix) & live
        ti = tie.to(tl.int32)
        nonempty = key >= 0
        if RANKED:
            nonempty = tl.load(box_ptr + bh64 * pcap + pg, mask=pg < p_end, other=NEG_INF) > NEG_INF
        forced = (
            nonempty
            & ((pg < sink) | ((pg <= last_page) & (pg > last_page - recent)))
            & (length + 0 * pg >= min_ctx)
        )
        rank = ties + own_ties + tl.cumsum(ti, 0)
        take = forced | (live & (key > prefix)) | (tie & (rank <= need))
        ki = take.to(tl.int32)
        tl.store(sel_ptr + bh64 * pcap + p_start + own + tl.cumsum(ki, 0) - 1, pg, mask=take)
        own += tl.sum(ki)
        own_ties += tl.sum(ti)
    tl.store(cnt_ptr + bh64 * nsp + sp, own)


@triton.jit
def page_gather_kernel(
    q_ptr,
    k_ptr,
    bias_ptr,
    sel_ptr,
    cnt_ptr,
    list_ptr,
    rows_ptr,
    seg_idx_ptr,
    seg_z_ptr,
    seg_cnt_ptr,
    seg_max_ptr,
    gmax_ptr,
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
    pcap,
    nslice,
    pages_per_split,
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
    NL_P2: tl.constexpr,
    MAP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_ROWS: tl.constexpr,
    F32: tl.constexpr,
    PDL: tl.constexpr,
):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    nsp = tl.num_programs(1)
    b = bh // Hkv
    kvh = bh % Hkv
    bh64 = bh.to(tl.int64)
    r, rmask, hq, qp = group_rows(kvh, G, LQ, R, RP)
    qc = cvt(load_q(q_ptr, b, hq, qp, rmask, sqb, sqh, sql, D), F32)
    pdl_enter(PDL)  # the query (an input of the op) before the wait: launch.py, EARLY
    k_base = k_ptr + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh
    bias_base = bias_ptr + b.to(tl.int64) * sbb
    d = tl.arange(0, D)
    j = tl.arange(0, BPG * PS)
    # the slices' lists, in order, are the selection: this program takes its share of them
    sl = tl.arange(0, NL_P2)
    taken = tl.load(cnt_ptr + bh64 * nslice + sl, mask=sl < nslice, other=0)
    upto = tl.cumsum(taken, 0)  # entries in slices ≤ sl
    nsel = tl.minimum(tl.sum(taken), sel_cap)
    if sp == 0:
        tl.store(rows_ptr + bh, nsel * PS)  # statistics: key rows of the selected pages
    chunk = tl.cdiv(nsel, nsp)
    i_lo = sp * chunk
    i_hi = tl.minimum(i_lo + chunk, nsel)
    # the program's share, from the slices' lists into the group's compact list once (MAP entries a step,
    # MAP·NL_P2 ≤ 4096: the mapping stays in registers), then read per tile (mapping each tile's entries in
    # the tile loop doubled its instructions)
    for g0 in range(i_lo, i_hi, MAP):
        gi = g0 + tl.arange(0, MAP)
        sj = tl.sum((upto[None, :] <= gi[:, None]).to(tl.int32), axis=1)  # the slice holding entry gi
        before = tl.sum(tl.where(sl[None, :] == sj[:, None], upto - taken, 0), axis=1)
        pgs = tl.load(sel_ptr + bh64 * pcap + sj * pages_per_split + gi - before, mask=gi < i_hi)
        tl.store(list_ptr + bh64 * sel_cap + gi, pgs, mask=gi < i_hi)
    tl.debug_barrier()  # the tiles' entries were written by other threads
    seg = bh64 * nsp + sp
    idx_base = seg_idx_ptr + seg * segcap
    z_base = seg_z_ptr + seg * 2 * R * segcap
    zmax = tl.full([RP], NEG_INF, tl.float32)
    cnt = tl.full([], 0, tl.int32)
    for i0 in range(i_lo, i_hi, BPG):
        im = i0 + j // PS < i_hi
        pg = tl.load(list_ptr + bh64 * sel_cap + i0 + j // PS, mask=im, other=0)
        pos = pg * PS + j % PS
        pm = im & (pos < S)
        bias = load_bias(bias_base, hq, qp, rmask, pos, pm, sbh, sbl, sbs, HAS_BIAS, BIAS_ROWS)
        tv = tl.max(bias, axis=0) > NEG_INF
        kt = tl.load(k_base + pos.to(tl.int64)[:, None] * sks + d[None, :], mask=tv[:, None], other=0.0)
        z = mm(qc, tl.trans(cvt(kt, F32)), F32) * zmul + bias * bmul
        zmax = tl.maximum(zmax, tl.max(z, axis=1))
        # only tokens within 1 of the running maximum can be in the support (τ ≥ max z − 1)
        keep = (tl.sum((z > zmax[:, None] - 1.0).to(tl.int32), axis=0) > 0) & tv
        ki = keep.to(tl.int32)
        slot = cnt + tl.cumsum(ki, 0) - 1
        seg_store(idx_base, z_base, slot, keep, pos, z, z, segcap, r, rmask, R, False)
        cnt += tl.sum(ki)
    # the group's maximum over all slices, then what it rules out is dropped (as in the scoring pass)
    old = tl.atomic_max(gmax_ptr + bh64 * RP + r, zmax, mask=rmask, sem="relaxed")
    thr = tl.maximum(tl.where(rmask, old, NEG_INF), zmax) - 1.0
    cnt = refilter(idx_base, z_base, cnt, segcap, thr, r, rmask, R, False, BPG * PS)
    tl.store(seg_cnt_ptr + seg, cnt)
    tl.store(seg_max_ptr + seg * RP + r, zmax)
