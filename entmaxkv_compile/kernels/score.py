"""Scoring kernels: one pass over a group's tokens computing fp32 ``z`` for all its rows at once.

``score_kernel`` (grid ``[B·Hkv, NSPLIT]``, one token range per program) scores every token of its range from
the exact keys (``SRC == 0``) or from a key sketch (``SRC`` 1: int8, 2: int4) with a per-token bound ``[z_lo,
z_hi]``. With ``KEEP`` it keeps the tokens that can matter (``z_hi > M̃ − 1`` for some row, ``M̃ ≤ max z_lo``
a running maximum shared by all programs of the group through ``gmax``; τ ≥ max z − 1 makes every other token
irrelevant; programs exchange their running maxima through ``gmax`` only every ``SYNC`` tiles and use the
answer a tile later, so no tile waits on an L2 atomic) in the program's *segment* ``(idx, z_lo[, z_hi])`` of
static capacity ``segcap`` (a count past it marks an overflow). With ``WRITE_WS`` it writes every ``z`` to the
dense workspace instead (the overflow fallback). ``cand_kernel`` turns a sketch segment into a segment of
exact scores: it keeps the tokens whose upper bound beats ``τ_low`` (the threshold of the lower bounds,
which is ≤ τ by monotonicity), gathers their exact key rows and compacts them in place.

An int8 sketch with one step per key row (the default) is scored by int8 tensor-core dots on the codes as
loaded: the query is split into two int8 levels once per program, and what those leave (``‖e‖₁·127·step``
per token) widens the bound. Grouped steps dequantise each tile to the key dtype for one 16-bit dot.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import NEG_INF, cvt, cvt_key, group_rows, load_bias, load_q, mm, refilter


@triton.jit
def _dequant(codes, step, BLOCK_N: tl.constexpr, W: tl.constexpr, GS: tl.constexpr):
    """``k̂ = code·step`` ``[BLOCK_N, W]`` (fp32) from codes ``[BLOCK_N, W]`` and the fp16 steps
    ``[BLOCK_N, W/GS]`` of their channel groups."""
    kh = tl.reshape(codes.to(tl.float32), [BLOCK_N, W // GS, GS]) * step.to(tl.float32)[:, :, None]
    return tl.reshape(kh, [BLOCK_N, W])


@triton.jit
def _qcode(x, s):
    """``round(x/s)`` as int8 codes (``|x| ≤ 127·s``) and the residual ``x − code·s`` (fp32)."""
    c = tl.floor(x / s[:, None] + 0.5)
    return c.to(tl.int8), x - c * s[:, None]


@triton.jit
def _qstep(amax):
    """Quantisation step of int8 codes for rows of largest magnitude ``amax`` (1 where ~0: codes 0)."""
    return tl.where(amax > 1e-30, amax / 127.0, 1.0)


@triton.jit
def _qlevels(qf, amax, zmul, D: tl.constexpr):
    """Two int8 levels of the query rows ``qf`` (``amax = max|qf|`` per row), ``qf = s1·c1 + s2·c2 + e``, and
    the bound term per unit step ``(α−1)·scale·127·‖e‖₁`` plus a slack (``D·max|q|·2⁻²⁰``) covering the fp32
    rounding of ``e`` and of the combination (``|e·k̂| ≤ ‖e‖₁·127·step``)."""
    s1 = _qstep(amax)
    c1, e = _qcode(qf, s1)
    s2 = _qstep(tl.max(tl.abs(e), axis=1))
    c2, e = _qcode(e, s2)
    qerr = zmul * 127.0 * (tl.sum(tl.abs(e), axis=1) + D * amax * 9.5367431640625e-07)
    return s1, c1, s2, c2, qerr


@triton.jit
def _idot(c1, c2, s1, s2, codes):
    """``(s1·c1 + s2·c2) · codesᵀ`` ``[RP, N]`` (fp32) from two exact int8 tensor-core products."""
    a1 = tl.dot(c1, tl.trans(codes), out_dtype=tl.int32).to(tl.float32)
    a2 = tl.dot(c2, tl.trans(codes), out_dtype=tl.int32).to(tl.float32)
    return a1 * s1[:, None] + a2 * s2[:, None]


@triton.jit
def _sketch_meta(scale_base, res_base, pos, pm, NGT: tl.constexpr):
    """One tile's fp16 steps ``[N, D/GS]`` and residuals ``[N]`` (0 where ``~pm``)."""
    p64 = pos.to(tl.int64)
    g = tl.arange(0, NGT)
    steps = tl.load(scale_base + p64[:, None] * NGT + g[None, :], mask=pm[:, None], other=0.0)
    return steps, tl.load(res_base + p64, mask=pm, other=0.0)


@triton.jit
def score_kernel(
    q_ptr,
    k_ptr,
    bias_ptr,
    code_ptr,
    scale_ptr,
    res_ptr,
    seg_idx_ptr,
    seg_z_ptr,
    seg_cnt_ptr,
    seg_max_ptr,
    last_ptr,
    gmax_ptr,
    ws_ptr,
    mode_ptr,
    vend_ptr,
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
    sk_cap,
    split_len,
    segcap,
    zmul,
    bmul,
    want_mode,
    G: tl.constexpr,
    LQ: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SRC: tl.constexpr,
    GS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_ROWS: tl.constexpr,
    KEEP: tl.constexpr,
    WRITE_WS: tl.constexpr,
    F32: tl.constexpr,
    SYNC: tl.constexpr,
    PACK: tl.constexpr,
    REFILTER: tl.constexpr,
):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    nsp = tl.num_programs(1)
    if (want_mode < 0) & (sp == 0):
        tl.store(mode_ptr + bh, -want_mode)  # a pipeline's first kernel sets the group's mode
    if (want_mode < 0) | (tl.load(mode_ptr + bh) == want_mode):
        b = bh // Hkv
        kvh = bh % Hkv
        bh64 = bh.to(tl.int64)
        # PACK (Plan.packed: int8, one step per row, 2R ≤ RP): both int8 query levels share one dot (level 1
        # in rows [0, RS), level 2 in rows [RS, RP), summed in registers); bounds on RS rows.
        RS: tl.constexpr = RP // 2 if PACK else RP
        r, rmask, hq, qp = group_rows(kvh, G, LQ, R, RS)
        bias_base = bias_ptr + b.to(tl.int64) * sbb
        if SRC == 2:  # int4: channel j in the low nibble of byte j, channel j + D/2 in the high one
            qc = cvt(load_q(q_ptr, b, hq, qp, rmask, sqb, sqh, sql, D // 2), F32)
            qc_hi = cvt(load_q(q_ptr + D // 2, b, hq, qp, rmask, sqb, sqh, sql, D // 2), F32)
        else:
            qc = cvt(load_q(q_ptr, b, hq, qp, rmask, sqb, sqh, sql, D), F32)
        if SRC == 0:
            k_base = k_ptr + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh
            d = tl.arange(0, D)
        else:
            qf = load_q(q_ptr, b, hq, qp, rmask, sqb, sqh, sql, D).to(tl.float32)
            amax = tl.max(tl.abs(qf), axis=1)
            qs = qf / tl.where(amax > 0, amax, 1.0)[:, None]  # ‖q‖₂ = max|q|·‖q/max|q|‖₂: no under/overflow
            emul = zmul * amax * tl.sqrt(tl.sum(qs * qs, axis=1))  # (α−1)·scale·‖q‖₂ per row
            W: tl.constexpr = D if SRC == 1 else D // 2
            NGT: tl.constexpr = D // GS
            if SRC == 1 and W == GS:  # one step per row: int8 dots on the codes as loaded
                # q = s1·c1 + s2·c2 + e with int8 c1, c2; the e term (qerr per unit step) joins the bound
                if PACK:  # rows i and RS + i both hold query row i: level 1 from the first, level 2 from the
                    # second, and the bound term from the first — one decomposition, so codes and bound agree
                    rf = tl.arange(0, RP)
                    rr = rf % RS
                    qd = load_q(q_ptr, b, kvh * G + rr // LQ, rr % LQ, rr < R, sqb, sqh, sql, D)
                    qd = qd.to(tl.float32)
                    t1, d1, t2, d2, qe = _qlevels(qd, tl.max(tl.abs(qd), axis=1), zmul, D)
                    cq = tl.where((rf < RS)[:, None], d1, d2)
                    sq = tl.where(rf < RS, t1, t2)
                    qerr, _ = tl.split(tl.permute(tl.reshape(qe, [2, RS]), (1, 0)))
                else:
                    s1, c1, s2, c2, qerr = _qlevels(qf, amax, zmul, D)
            code_base = code_ptr + bh64 * sk_cap * W
            scale_base = scale_ptr + bh64 * sk_cap * NGT
            res_base = res_ptr + bh64 * sk_cap
        seg = bh64 * nsp + sp
        idx_base = seg_idx_ptr + seg * segcap
        zlo_base = seg_z_ptr + seg * 2 * R * segcap
        start = sp * split_len
        end = tl.minimum(start + split_len, S)
        if SRC != 0:  # no valid position at or past vend (append semantics, kept by update_kernel)
            end = tl.minimum(end, tl.load(vend_ptr + bh))
        runmax = tl.full([RS], NEG_INF, tl.float32)
        lastv = tl.zeros([BLOCK_N], tl.int32)  # per tile column: reduced once, at the end
        known = tl.full([RS], NEG_INF, tl.float32)
        pending = tl.full([RS], NEG_INF, tl.float32)
        it = tl.full([], 0, tl.int32)
        cnt = tl.full([], 0, tl.int32)
        nxt = start + tl.arange(0, BLOCK_N)
        bias_nxt = load_bias(bias_base, hq, qp, rmask, nxt, nxt < end, sbh, sbl, sbs, HAS_BIAS, BIAS_ROWS)
        if SRC != 0:
            steps_nxt, res_nxt = _sketch_meta(scale_base, res_base, nxt, nxt < end, NGT)
        for n0 in range(start, end, BLOCK_N):
            # Key and code tiles are pipelined by Triton (async copies through shared memory). The bias and
            # a sketch's steps and residuals — loads too narrow for async copies — are loaded a tile ahead by
            # hand, so no tile waits on them; exact key rows wait on their tile's bias (masked rows are never
            # read), sketch tiles are masked by range only.
            pos = n0 + tl.arange(0, BLOCK_N)
            inr = pos < end
            bias = bias_nxt
            tokv = tl.max(bias, axis=0) > NEG_INF if HAS_BIAS else inr
            nxt = pos + BLOCK_N
            bias_nxt = load_bias(bias_base, hq, qp, rmask, nxt, nxt < end, sbh, sbl, sbs, HAS_BIAS, BIAS_ROWS)
            if SRC == 0:
                kt = tl.load(
                    k_base + pos.to(tl.int64)[:, None] * sks + d[None, :], mask=tokv[:, None], other=0.0
                )
                zlo = mm(qc, tl.trans(cvt(kt, F32)), F32) * zmul + bias * bmul
                zhi = zlo
            else:
                steps, res = steps_nxt, res_nxt
                steps_nxt, res_nxt = _sketch_meta(scale_base, res_base, nxt, nxt < end, NGT)
                p64 = pos.to(tl.int64)
                codes = tl.load(
                    code_base + p64[:, None] * W + tl.arange(0, W)[None, :], mask=inr[:, None], other=0
                )
                if SRC == 2:
                    packed = codes.to(tl.int32)
                    clo = (packed & 15) - 8
                    chi = (packed >> 4) - 8
                if W == GS:  # one step per row (per half for int4): scaled after the dot
                    if SRC == 1:
                        step = tl.reshape(steps, [BLOCK_N]).to(tl.float32)
                        if PACK:
                            a = tl.dot(cq, tl.trans(codes), out_dtype=tl.int32).to(tl.float32) * sq[:, None]
                            a1, a2 = tl.split(tl.permute(tl.reshape(a, [2, RS, BLOCK_N]), (1, 2, 0)))
                            qk = (a1 + a2) * step[None, :]
                        else:
                            qk = _idot(c1, c2, s1, s2, codes) * step[None, :]
                        qeps = qerr[:, None] * step[None, :]
                    else:
                        s_lo, s_hi = tl.split(steps)
                        qk = mm(qc, tl.trans(clo.to(qc.dtype)), F32) * s_lo.to(tl.float32)[None, :]
                        qk += mm(qc_hi, tl.trans(chi.to(qc.dtype)), F32) * s_hi.to(tl.float32)[None, :]
                elif SRC == 1:  # several steps per row: dequantised to the key dtype (the reconstruction
                    # update_kernel measured the residual against) so that one dot scores every group
                    kh = _dequant(codes, steps, BLOCK_N, D, GS)
                    qk = mm(qc, tl.trans(cvt_key(kh, k_ptr, F32)), F32)
                else:
                    s_lo, s_hi = tl.split(tl.permute(tl.reshape(steps, [BLOCK_N, 2, NGT // 2]), (0, 2, 1)))
                    klo = _dequant(clo, s_lo, BLOCK_N, D // 2, GS)
                    khi = _dequant(chi, s_hi, BLOCK_N, D // 2, GS)
                    qk = mm(qc, tl.trans(cvt_key(klo, k_ptr, F32)), F32)
                    qk += mm(qc_hi, tl.trans(cvt_key(khi, k_ptr, F32)), F32)
                live = bias > NEG_INF  # the sketch of a masked position may be anything, even NaN
                zc = qk * zmul + bias * bmul
                if SRC == 1 and W == GS:
                    zc_lo = zc - qeps
                    zc_hi = zc + qeps
                else:
                    zc_lo = zc
                    zc_hi = zc
                # fma onto the dot's tile: the residual term is formed in the dot's layout (a separate product
                # would be formed in the loads' layout and the whole tile converted through shared memory)
                zlo = tl.where(live, tl.fma(-emul[:, None], res[None, :], zc_lo), NEG_INF)
                zhi = tl.where(live, tl.fma(emul[:, None], res[None, :], zc_hi), NEG_INF)
            runmax = tl.maximum(runmax, tl.max(zlo, axis=1))
            lastv = tl.maximum(lastv, tl.where(tokv, pos + 1, 0))
            if KEEP:
                known = tl.maximum(known, pending)  # the previous exchange's answer, one tile late
                if it % SYNC == 0:
                    old = tl.atomic_max(gmax_ptr + bh64 * RP + r, runmax, mask=rmask)
                    pending = tl.where(rmask, old, NEG_INF)
                thr = tl.maximum(known, runmax) - 1.0
                keep = tl.sum((zhi > thr[:, None]).to(tl.int32), axis=0) > 0
                nk = tl.sum(keep.to(tl.int32))
                if nk > 0:
                    slot = cnt + tl.cumsum(keep.to(tl.int32), 0) - 1
                    ok = keep & (slot < segcap)
                    tl.store(idx_base + slot, pos, mask=ok)
                    zptr = zlo_base + r[:, None] * segcap + slot[None, :]
                    tl.store(zptr, zlo, mask=rmask[:, None] & ok[None, :])
                    if SRC != 0:
                        tl.store(zptr + R * segcap, zhi, mask=rmask[:, None] & ok[None, :])
                    cnt += nk
                it += 1
            if WRITE_WS:
                wptr = ws_ptr + (bh64 * R + r[:, None]) * S + pos[None, :]
                tl.store(wptr, zlo, mask=rmask[:, None] & inr[None, :])
        if KEEP and REFILTER:  # one last exchange (its answer covers every earlier one), then drop what the
            # final maximum rules out (an overflowed segment stays one)
            old = tl.atomic_max(gmax_ptr + bh64 * RP + r, runmax, mask=rmask)
            thr = tl.maximum(tl.where(rmask, old, NEG_INF), runmax)
            if cnt <= segcap:
                cnt = refilter(idx_base, zlo_base, cnt, segcap, thr - 1.0, r, rmask, R, SRC != 0, BLOCK_N)
        tl.store(seg_cnt_ptr + seg, cnt)
        tl.store(seg_max_ptr + seg * RP + r, runmax)
        tl.store(last_ptr + seg, tl.max(lastv))


@triton.jit
def cand_kernel(
    q_ptr,
    k_ptr,
    bias_ptr,
    seg_idx_ptr,
    seg_z_ptr,
    seg_cnt_ptr,
    seg_max_ptr,
    tau_low_ptr,
    mode_ptr,
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
    segcap,
    zmul,
    bmul,
    G: tl.constexpr,
    LQ: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_ROWS: tl.constexpr,
    F32: tl.constexpr,
):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    if tl.load(mode_ptr + bh) == 0:
        b = bh // Hkv
        kvh = bh % Hkv
        bh64 = bh.to(tl.int64)
        r, rmask, hq, qp = group_rows(kvh, G, LQ, R, RP)
        qc = cvt(load_q(q_ptr, b, hq, qp, rmask, sqb, sqh, sql, D), F32)
        k_base = k_ptr + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh
        bias_base = bias_ptr + b.to(tl.int64) * sbb
        d = tl.arange(0, D)
        tau_low = tl.load(tau_low_ptr + bh64 * RP + r, mask=rmask, other=float("inf"))
        seg = bh64 * tl.num_programs(1) + sp
        idx_base = seg_idx_ptr + seg * segcap
        z_base = seg_z_ptr + seg * 2 * R * segcap
        n = tl.minimum(tl.load(seg_cnt_ptr + seg), segcap)
        cnt = tl.full([], 0, tl.int32)
        zmax = tl.full([RP], NEG_INF, tl.float32)
        for s0 in range(0, n, BLOCK_N):
            sl = s0 + tl.arange(0, BLOCK_N)
            inr = sl < n
            pos = tl.load(idx_base + sl, mask=inr, other=0)
            zhi = tl.load(
                z_base + (R + r[:, None]) * segcap + sl[None, :],
                mask=rmask[:, None] & inr[None, :],
                other=NEG_INF,
            )
            cand = (tl.sum((zhi > tau_low[:, None]).to(tl.int32), axis=0) > 0) & inr
            bias = load_bias(bias_base, hq, qp, rmask, pos, cand, sbh, sbl, sbs, HAS_BIAS, BIAS_ROWS)
            kt = tl.load(k_base + pos.to(tl.int64)[:, None] * sks + d[None, :], mask=cand[:, None], other=0.0)
            z = mm(qc, tl.trans(cvt(kt, F32)), F32) * zmul + bias * bmul
            ci = cand.to(tl.int32)
            slot = cnt + tl.cumsum(ci, 0) - 1  # ≤ sl: compacting in place never overtakes the reads
            tl.store(idx_base + slot, pos, mask=cand)
            tl.store(z_base + r[:, None] * segcap + slot[None, :], z, mask=rmask[:, None] & cand[None, :])
            cnt += tl.sum(ci)
            zmax = tl.maximum(zmax, tl.max(z, axis=1))
        tl.store(seg_cnt_ptr + seg, cnt)
        tl.store(seg_max_ptr + seg * RP + r, zmax)
